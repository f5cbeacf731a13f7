"""Per-sequence memorization scores of a language model on a ``SequenceTask``: the loss of each
sequence and whether greedy decoding from its prefix reproduces the rest.

- **Extractability** (Carlini et al. 2021, "Extracting Training Data from Large Language Models";
  the k-prefix form of Carlini et al. 2023, "Quantifying Memorization Across Neural Language
  Models", and Biderman et al. 2023, "Emergent and Predictable Memorization in Large Language
  Models"): give the model the first ``k`` tokens of a sequence, decode greedily to the sequence's
  length, and compare with the true continuation. ``match`` is the share of continuation tokens
  the greedy output gets right position by position (Biderman et al.'s memorization score);
  ``extractable`` is ``match == 1``. A continuation that a rule predicts (the repeated half of an
  induction sequence) is "extractable" without being memorized: compare planted sequences with
  held-out ones of the same kind, never scores of one kind with those of another.
- **Sequence loss**: the mean next-token cross-entropy over the sequence's target tokens (its
  loss mask), in nats; the loss gap of a memorized sequence is its loss against that of held-out
  sequences of the same kind.

Limits: decoding runs the full forward once per generated token (no key/value cache), which is
what the short sequences of ``mg.tasks.lm_corpus`` need; greedy only (no sampling, no beam).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechgrok import models
from mechgrok._config import check_int
from mechgrok._threads import torch_threads
from mechgrok.losses import IGNORE, token_nll
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["Extraction", "extract", "sequence_loss", "token_accuracy"]


@dataclass(frozen=True)
class Extraction:
    """Greedy continuations of ``k``-token prefixes (``extract``).

    Attributes:
        rows: the task's row of each sequence ``[n]``.
        k: prefix length, BOS included.
        generated: the greedy continuation ``[n, T - k]``.
        match: share of continuation tokens equal to the true ones, position by position ``[n]``.
        extractable: ``match == 1`` ``[n]``.
    """

    rows: Int[Tensor, " n"]
    k: int
    generated: Int[Tensor, "n T_k"]
    match: Float[Tensor, " n"]
    extractable: Bool[Tensor, " n"]

    @property
    def rate(self) -> float:
        """The share of sequences that are extractable (NaN when there are none)."""
        return float(self.extractable.double().mean()) if len(self.rows) else float("nan")


def _check(model: nn.Module, task: SequenceTask, owner: str) -> None:
    if not isinstance(task, SequenceTask):
        raise TypeError(f"{owner} scores a SequenceTask (e.g. mg.tasks.lm_corpus(...)), got {type(task).__name__}")
    if not isinstance(model, models.HookedTransformer):
        raise TypeError(f"{owner} needs a HookedTransformer (logits [batch, pos, vocab]), got {type(model).__name__}; "
                        "a Hugging Face model converts with mg.models.from_pretrained")
    cfg = model.cfg
    if cfg.d_vocab < task.d_vocab or cfg.d_vocab_out < task.d_vocab or cfg.n_ctx < task.n_ctx:
        raise ValueError(f"{owner}: the model (d_vocab {cfg.d_vocab}, d_vocab_out {cfg.d_vocab_out}, n_ctx {cfg.n_ctx}) "
                         f"cannot read or predict {task.name!r} (d_vocab {task.d_vocab}, n_ctx {task.n_ctx}); build it "
                         "with mg.models.transformer(task, ...)")


def _per_batch(model: nn.Module, task: SequenceTask, split: str, batch_size: int, threads: int | None,
               fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The rows of ``split`` ``[n]`` and ``fn(rows of one batch)`` for each batch of ``batch_size``,
    with the model in eval mode (restored afterwards) and ``threads`` torch threads."""
    rows = task.mask(split).nonzero().flatten()  # [n]
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads):
            return rows, [fn(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    finally:
        model.train(was_training)


@torch.no_grad()
def extract(model: nn.Module, task: SequenceTask, k: int, split: str = "all", batch_size: int = 256,
            threads: int | None = 1) -> Extraction:
    """Greedy-decode each sequence of ``split`` from its first ``k`` tokens (module docstring).

    Args:
        model: a HookedTransformer whose vocabulary and context fit ``task``.
        task: a ``SequenceTask``.
        k: prefix length, BOS included, ``1 <= k < n_ctx``.
        split: a group of ``task`` (``"planted_r10"``, ``"held_out_planted"``, ...) or ``"all"``.
        batch_size: sequences per forward.
        threads: torch threads meanwhile (restored afterwards; None leaves them).
    """
    _check(model, task, "memorization.extract")
    k = check_int(k, "k", low=1, high=task.n_ctx - 1, owner="memorization.extract (prefix length, BOS included)")
    batch_size = check_int(batch_size, "batch_size", low=1, owner="memorization.extract")
    device = models.device_of(model)

    def greedy(rows: Tensor) -> Tensor:
        x = task.inputs[rows, :k].to(device)  # [b, k]
        for _ in range(task.n_ctx - k):
            x = torch.cat([x, model(x)[:, -1].argmax(-1)[:, None]], dim=1)  # one greedy token more
        return x[:, k:].cpu()  # [b, T - k]

    rows, out = _per_batch(model, task, split, batch_size, threads, greedy)
    generated = torch.cat(out) if out else torch.zeros(0, task.n_ctx - k, dtype=torch.long)  # [n, T - k]
    match = (generated == task.inputs[rows, k:]).double().mean(-1)  # [n]
    return Extraction(rows=rows, k=k, generated=generated, match=match, extractable=match == 1)


@torch.no_grad()
def sequence_loss(model: nn.Module, task: SequenceTask, split: str = "all", batch_size: int = 256,
                  threads: int | None = 1) -> Float[Tensor, " n"]:
    """The mean next-token cross-entropy (nats, float64) of each sequence of ``split`` over its
    target tokens (``task.loss_mask``), ``[n]`` in row order; NaN for a sequence without targets."""
    _check(model, task, "memorization.sequence_loss")
    batch_size = check_int(batch_size, "batch_size", low=1, owner="memorization.sequence_loss")
    device = models.device_of(model)

    def loss(rows: Tensor) -> Tensor:
        y = task.targets[rows]  # [b, T], IGNORE where no loss
        nll = token_nll(model(task.inputs[rows].to(device)).cpu(), y)  # [b, T], 0 where ignored
        return nll.sum(-1) / (y != IGNORE).sum(-1)  # [b]; NaN (0/0) without targets

    _, out = _per_batch(model, task, split, batch_size, threads, loss)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def token_accuracy(model: nn.Module, task: SequenceTask, split: str = "all", batch_size: int = 256,
                   threads: int | None = 1) -> Float[Tensor, " n"]:
    """The share of each sequence's target tokens whose argmax is right under teacher forcing
    (float64), ``[n]`` for the rows of ``split`` in row order; NaN for a sequence without targets."""
    _check(model, task, "memorization.token_accuracy")
    batch_size = check_int(batch_size, "batch_size", low=1, owner="memorization.token_accuracy")
    device = models.device_of(model)

    def acc(rows: Tensor) -> Tensor:
        y = task.targets[rows]  # [b, T]
        keep = y != IGNORE
        right = (model(task.inputs[rows].to(device)).argmax(-1).cpu() == y) & keep  # [b, T]
        return right.sum(-1).double() / keep.sum(-1)  # [b]; NaN without targets

    _, out = _per_batch(model, task, split, batch_size, threads, acc)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
