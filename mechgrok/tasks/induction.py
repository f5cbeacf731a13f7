"""In-context copying ("induction"): the task whose circuit is a previous-token head feeding an
induction head (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et
al. 2022, "In-context Learning and Induction Heads").

Each sequence is ``n_ctx`` random tokens without repeats except one: the last token ``x[-1]`` is a
copy of an earlier ``x[j]`` (``j`` uniform in ``[1, n_ctx − 3]``), and the answer is the token that
followed it, ``x[j + 1]``. Nothing but the content says where ``j`` is, so no positional rule
solves the task: the model must find the earlier occurrence of the current token and copy its
successor, which a 2-layer attention model does with a previous-token head in layer 0 (it writes
``x[k − 1]`` into position ``k``) and an induction head in layer 1 (its query, the current token,
matches the key of position ``j + 1``, which holds ``x[j]``; its value copies ``x[j + 1]``). Position
0 holds ``BOS``, a token used nowhere else (``d_vocab − 1``).

``d_vocab_out`` is ``d_vocab`` (any token can be the answer); ``p`` is set to it (there is no
modulus). ``operand_positions`` are ``(0, n_ctx − 1)`` (BOS and the query) only because a Task needs
two; the (a, b)-grid, Fourier and IPR analyses of modular arithmetic do not apply.

>>> import mechgrok as mg
>>> task = mg.tasks.induction(d_vocab=16, n_ctx=8, n=64, seed=0)
>>> x, y = task.inputs[0], int(task.labels[0])
>>> j = int((x[:-1] == x[-1]).nonzero()[0]); int(x[j + 1]) == y
True
"""

from __future__ import annotations

import torch

from mechgrok._config import check_float, check_int
from mechgrok.tasks.task import Task

__all__ = ["induction"]


def induction(d_vocab: int = 32, n_ctx: int = 10, n: int = 4096, train_frac: float = 0.9, seed: int = 0) -> Task:
    """``n`` induction sequences (module docstring), a seeded ``train_frac`` of them for training.

    Args:
        d_vocab: vocabulary, ``BOS = d_vocab − 1`` included; needs ``d_vocab − 1 >= n_ctx − 2`` distinct
            content tokens per sequence.
        n_ctx: sequence length (>= 5).
        n: number of sequences.
        train_frac: share in the training split, in (0, 1).
        seed: seeds the sequences and the split.
    """
    owner = "tasks.induction"
    n_ctx = check_int(n_ctx, "n_ctx", low=5, owner=owner)
    d_vocab = check_int(d_vocab, "d_vocab", low=n_ctx - 1, owner=f"{owner} (d_vocab - 1 >= n_ctx - 2 distinct tokens)")
    n = check_int(n, "n", low=2, owner=owner)
    train_frac = check_float(train_frac, "train_frac", low=0.0, high=1.0, low_open=True, high_open=True, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    g = torch.Generator().manual_seed(seed)
    bos, k = d_vocab - 1, n_ctx - 2  # k distinct content tokens at positions 1 .. n_ctx - 2
    content = torch.argsort(torch.rand(n, d_vocab - 1, generator=g), dim=1)[:, :k]  # [n, k], no repeats
    j = torch.randint(1, n_ctx - 2, (n,), generator=g)  # position of the cue, so j + 1 <= n_ctx - 2
    inputs = torch.cat([torch.full((n, 1), bos), content, torch.zeros(n, 1, dtype=torch.long)], dim=1)  # [n, n_ctx]
    rows = torch.arange(n)
    inputs[:, -1] = inputs[rows, j]
    labels = inputs[rows, j + 1]
    train = torch.zeros(n, dtype=torch.bool)
    train[torch.randperm(n, generator=g)[:max(1, min(n - 1, round(train_frac * n)))]] = True
    return Task(name=f"induction_v{d_vocab}_t{n_ctx}", inputs=inputs, labels=labels, true_labels=labels.clone(),
                train=train, train_corrupted=torch.zeros(n, dtype=torch.bool), task_ids=torch.zeros(n, dtype=torch.long),
                task_names=("induction",), d_vocab=d_vocab, d_vocab_out=d_vocab, p=d_vocab,
                operand_positions=(0, n_ctx - 1),
                config={"kind": "induction", "d_vocab": d_vocab, "n_ctx": n_ctx, "n": n, "train_frac": train_frac,
                        "seed": seed})
