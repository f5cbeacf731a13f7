"""Language-model corpora that put memorization beside generalization, in one SequenceTask.

What it is for: studying *where* a language model stores memorized sequences and how that depends
on repetition, next to a skill it must generalize. Carlini et al. (2021, "Extracting Training Data
from Large Language Models") call a training sequence extractable when a prompt with its prefix
makes the model emit its suffix; Hernandez et al. (2022, "Scaling Laws and Interpretability of
Learning from Repeated Data") show that a small share of data repeated many times is memorized and
hurts the skills (induction heads among them) that the rest of the data teaches. This corpus holds
both parts with exact bookkeeping:

- **structured** sequences a model can learn by a rule: ``"induction"`` (BOS, a segment of
  ``L = (seq_len − 1) // 2`` distinct content tokens, the same segment again, one more copied token
  when ``seq_len − 1`` is odd; loss only where the target lies in the repeated part) or
  ``"arithmetic"`` (BOS, then triples ``a b c`` with ``c = (a + b) mod p``, ``p`` the largest prime
  ``<= d_vocab − 2``; loss only on the ``c`` tokens, predicted at the position of ``b``; a last,
  incomplete triple fills the length without loss) or ``"induction_varied"`` (BOS, then a segment
  of ``L_n`` distinct content tokens repeated periodically to the end, ``L_n`` drawn uniformly from
  ``[max(2, L // 2), L]`` per sequence; loss where the target lies in a repeat, ``t >= L_n``). A
  seeded ``test_frac`` of them is held out
  (group ``"test"``) to measure generalization.
- **planted** sequences: BOS and uniform random content tokens, loss on every next token. Nothing
  but memorization predicts them. They are split evenly over ``repeats``; group ``planted_r{R}``
  is seen R times per epoch.
- **held-out planted** sequences (group ``held_out_planted``), drawn the same way but in neither
  ``"train"`` nor ``"test"``: the model never sees them, so their loss and extractability give the
  chance level a memorized sequence is compared against.

Each sequence is stored *once*: repetition is the metadata ``repeats`` (R for ``planted_r{R}``, 1
for structured training sequences, 0 for the structured test and the held-out planted ones). A
trainer draws row ``n`` ``repeats[n]`` times per epoch, as :meth:`SequenceTask.epoch_rows` does.
Metadata ``kind`` is 0 for structured, 1 for planted and 2 for held-out planted sequences. Token
``d_vocab − 1`` is BOS and appears nowhere else; every sequence in the corpus is distinct.

Limits: the ``"induction"`` and ``"arithmetic"`` sequences all have the same layout, so a
fixed-offset head ("copy the token ``L`` back", "add the tokens 2 and 1 back") solves them as well
as a content-based induction head: the ``lm`` preset's model does it with layer-0 heads that attend
``L - 1`` back (``mg.measures.induction_scores`` at another segment length tells them apart). With
``"induction_varied"`` the offset changes from sequence to sequence, so only a head that finds
the earlier occurrence of the current token (an induction head) copies right. Planted sequences are uniform, so a model
that learned only the token frequencies scores about ``log(d_vocab − 1)`` nats per token on them.

>>> import mechgrok as mg
>>> t = mg.tasks.lm_corpus(n_structured=40, n_planted=6, repeats=(1, 10), n_held_out=3, seq_len=9, d_vocab=16)
>>> {g: int(m.sum()) for g, m in t.groups.items()}
{'train': 42, 'test': 4, 'structured_train': 36, 'planted_r1': 3, 'planted_r10': 3, 'held_out_planted': 3}
>>> len(t.epoch_rows()) == 36 + 3 * 1 + 3 * 10
True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from mechgrok._config import check_float, check_int
from mechgrok.tasks.modular import is_prime
from mechgrok.tasks.sequence import IGNORE, SequenceTask

__all__ = ["lm_corpus", "STRUCTURES", "planted_groups"]

STRUCTURES = ("induction", "arithmetic", "induction_varied")
KIND_STRUCTURED, KIND_PLANTED, KIND_HELD_OUT = 0, 1, 2
_MAX_ROUNDS = 100  # redraws of duplicate sequences before giving up
_PLANTED = re.compile(r"^planted_r(\d+)$")


def lm_corpus(structure: str = "induction", n_structured: int = 4096, n_planted: int = 192,
              repeats: Sequence[int] = (1, 10, 100), n_held_out: int = 192, seq_len: int = 32, d_vocab: int = 64,
              test_frac: float = 0.1, seed: int = 0, subset_seed: int | None = None,
              subset_frac: float = 0.5) -> SequenceTask:
    """A corpus of structured, planted (repeated) and held-out planted sequences (module docstring).

    Args:
        structure: ``"induction"``, ``"arithmetic"`` or ``"induction_varied"``, the rule the structured
            part follows.
        n_structured: number of structured sequences (>= 2), ``test_frac`` of them in ``"test"``.
        n_planted: number of planted sequences, a multiple of ``len(repeats)`` (0 for none).
        repeats: distinct positive counts; a planted sequence of group ``planted_r{R}`` is seen R
            times per epoch.
        n_held_out: number of held-out planted sequences (0 for none).
        seq_len: tokens per sequence, BOS included (>= 3 for induction, >= 4 for arithmetic).
        d_vocab: vocabulary, BOS = ``d_vocab − 1`` included; induction needs ``d_vocab − 1 >= L``
            distinct content tokens, arithmetic ``d_vocab >= 4`` (so that ``p >= 2``).
        test_frac: share of the structured sequences held out, in (0, 1).
        seed: seeds every draw and the split (a local generator).
        subset_seed: ``None`` (default) trains on every training row. An integer leaves a seeded
            ``1 - subset_frac`` of the structured training rows and of each planted group out of
            training (groups ``left_out_structured`` and ``left_out_r{R}``, repeats 0), the
            sequences themselves unchanged: the random training subsets of Zhang et al. 2023's
            counterfactual memorization (``mg.memorization.counterfactual``), one per seed.
        subset_frac: the share of each of those groups that stays in training, in (0, 1).

    Returns:
        A SequenceTask ``[N, seq_len]`` with ``N = n_structured + n_planted + n_held_out`` (structured
        rows first, then planted by group, then held-out), groups ``train``, ``test``,
        ``structured_train``, ``planted_r{R}``, ``held_out_planted``, metadata ``repeats`` and ``kind``.
    """
    owner = "tasks.lm_corpus"
    if structure not in STRUCTURES:
        raise ValueError(f"{owner}: unknown structure {structure!r}; choose one of {list(STRUCTURES)}")
    seq_len = check_int(seq_len, "seq_len", low={"induction": 3, "arithmetic": 4, "induction_varied": 5}[structure],
                        owner=owner)
    L = (seq_len - 1) // 2
    if structure != "arithmetic":
        d_vocab = check_int(d_vocab, "d_vocab", low=max(3, L + 1),
                            owner=f"{owner} (d_vocab - 1 >= (seq_len - 1) // 2 distinct segment tokens)")
    else:
        d_vocab = check_int(d_vocab, "d_vocab", low=4, owner=f"{owner} (a prime p <= d_vocab - 2)")
    n_structured = check_int(n_structured, "n_structured", low=2, owner=owner)
    n_planted = check_int(n_planted, "n_planted", low=0, owner=owner)
    n_held_out = check_int(n_held_out, "n_held_out", low=0, owner=owner)
    if isinstance(repeats, (str, bytes)) or not isinstance(repeats, Sequence) or not repeats:
        raise TypeError(f"{owner}: repeats must be a non-empty list of positive integers, e.g. (1, 10, 100), "
                        f"got {repeats!r}")
    repeats = [check_int(r, "repeats[]", low=1, owner=owner) for r in repeats]
    if len(set(repeats)) != len(repeats):
        raise ValueError(f"{owner}: repeats must be distinct (each names a group planted_r{{R}}), got {repeats}")
    if n_planted % len(repeats):
        lo = n_planted - n_planted % len(repeats)
        raise ValueError(f"{owner}: n_planted={n_planted} does not split evenly over the {len(repeats)} repeat "
                         f"counts {repeats}; use a multiple of {len(repeats)}, e.g. {lo} or {lo + len(repeats)}")
    test_frac = check_float(test_frac, "test_frac", low=0.0, high=1.0, low_open=True, high_open=True, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    if subset_seed is not None:
        subset_seed = check_int(subset_seed, "subset_seed", low=0, owner=f"{owner} (None: train on every row)")
    subset_frac = check_float(subset_frac, "subset_frac", low=0.0, high=1.0, low_open=True, high_open=True,
                              owner=owner)

    g = torch.Generator().manual_seed(seed)
    bos, n_content = d_vocab - 1, d_vocab - 1
    if structure == "induction":
        def draw_structured(k: int) -> Tensor:
            seg = torch.argsort(torch.rand(k, n_content, generator=g), dim=1)[:, :L]  # [k, L] distinct tokens
            return seg[:, torch.arange(seq_len - 1) % L]  # [k, seq_len - 1]: seg, seg again, padded by the repeat
        loss_at = torch.arange(L, seq_len - 1)  # positions whose target (t + 1) lies in the repeated part
    elif structure == "induction_varied":
        lo = max(2, L // 2)

        def draw_structured(k: int) -> Tensor:
            period = torch.randint(lo, L + 1, (k, 1), generator=g)  # [k, 1] the segment length of each row
            seg = torch.argsort(torch.rand(k, n_content, generator=g), dim=1)[:, :L]  # [k, L] distinct tokens
            return seg.gather(1, torch.arange(seq_len - 1)[None] % period)  # [k, seq_len - 1] periodic
        loss_at = None  # per row: from its period on
    else:
        p = max(q for q in range(2, d_vocab - 1) if is_prime(q))
        n_tri = -(-(seq_len - 1) // 3)  # triples needed to fill the length (the last may be cut)

        def draw_structured(k: int) -> Tensor:
            a, b = torch.randint(0, p, (2, k, n_tri), generator=g)  # [k, n_tri] each
            return torch.stack([a, b, (a + b) % p], dim=-1).reshape(k, 3 * n_tri)[:, :seq_len - 1]  # [k, seq_len-1]
        loss_at = torch.arange(2, seq_len - 1, 3)  # the b positions (1 + 3j + 1) whose next token c is in range

    def draw_random(k: int) -> Tensor:
        return torch.randint(0, n_content, (k, seq_len - 1), generator=g)  # [k, seq_len - 1]

    seen: set[tuple[int, ...]] = set()  # every sequence is distinct from every other
    body_s = _distinct(draw_structured, n_structured, seq_len - 1, seen, "structured", owner)
    body_p = _distinct(draw_random, n_planted, seq_len - 1, seen, "planted", owner)
    body_h = _distinct(draw_random, n_held_out, seq_len - 1, seen, "held-out planted", owner)
    n_s, n_p, n_h = n_structured, n_planted, n_held_out
    N = n_s + n_p + n_h
    inputs = torch.cat([torch.full((N, 1), bos), torch.cat([body_s, body_p, body_h])], dim=1)  # [N, seq_len]

    targets = torch.full_like(inputs, IGNORE)  # [N, seq_len]
    if loss_at is not None:
        targets[:n_s, loss_at] = inputs[:n_s, loss_at + 1]
    else:  # induction_varied: the period is where the first token comes back (segment tokens are distinct)
        period = 1 + (body_s[:, 1:] == body_s[:, :1]).long().argmax(1)  # [n_s]
        t = torch.arange(seq_len - 1)[None]  # position t predicts token t + 1 (body index t)
        keep = t >= period[:, None]  # [n_s, seq_len - 1]
        targets[:n_s, :-1] = torch.where(keep, inputs[:n_s, 1:], IGNORE)
    targets[n_s:, :-1] = inputs[n_s:, 1:]  # planted and held-out: every next token

    n_test = max(1, min(n_s - 1, round(test_frac * n_s)))
    is_test = torch.zeros(N, dtype=torch.bool)
    is_test[torch.randperm(n_s, generator=g)[:n_test]] = True
    structured = torch.arange(N) < n_s
    planted = (torch.arange(N) >= n_s) & (torch.arange(N) < n_s + n_p)
    per = n_p // len(repeats)
    rep = torch.zeros(N, dtype=torch.long)
    rep[structured & ~is_test] = 1
    groups = {"train": (structured & ~is_test) | planted, "test": is_test, "structured_train": structured & ~is_test}
    for i, r in enumerate(repeats):
        m = torch.zeros(N, dtype=torch.bool)
        m[n_s + i * per:n_s + (i + 1) * per] = True
        groups[f"planted_r{r}"] = m
        rep[m] = r
    groups["held_out_planted"] = torch.arange(N) >= n_s + n_p
    if subset_seed is not None:  # a counterfactual subset: the same sequences, some left out of training
        sub = torch.Generator().manual_seed(subset_seed)
        for name, out_name in [("structured_train", "left_out_structured"),
                               *((f"planted_r{r}", f"left_out_r{r}") for r in repeats)]:
            members = groups[name].nonzero().flatten()
            n_out = len(members) - round(subset_frac * len(members))
            out = torch.zeros(N, dtype=torch.bool)
            out[members[torch.randperm(len(members), generator=sub)[:n_out]]] = True
            groups[name] = groups[name] & ~out
            groups[out_name] = out
            groups["train"] = groups["train"] & ~out
            rep[out] = 0
    kind = torch.full((N,), KIND_STRUCTURED, dtype=torch.long)
    kind[planted] = KIND_PLANTED
    kind[groups["held_out_planted"]] = KIND_HELD_OUT
    config = {"kind": "lm_corpus", "structure": structure, "n_structured": n_structured, "n_planted": n_planted,
              "repeats": repeats, "n_held_out": n_held_out, "seq_len": seq_len, "d_vocab": d_vocab,
              "test_frac": test_frac, "seed": seed, "subset_seed": subset_seed, "subset_frac": subset_frac}
    return SequenceTask(name=f"lm_{structure}_v{d_vocab}_t{seq_len}", inputs=inputs, targets=targets, groups=groups,
                        d_vocab=d_vocab, metadata={"repeats": rep, "kind": kind}, config=config)


def planted_groups(groups: Mapping[str, Tensor]) -> list[tuple[int, str]]:
    """``(R, "planted_r{R}")`` for each non-empty planted group of ``groups`` (a task's), by R."""
    found = [(int(m.group(1)), g) for g in groups if (m := _PLANTED.match(g)) and bool(groups[g].any())]
    return sorted(found)


def _distinct(draw: Callable[[int], Tensor], n: int, width: int, seen: set[tuple[int, ...]], what: str,
              owner: str) -> Tensor:
    """``n`` rows of ``draw`` that are new to ``seen`` (and added to it), redrawing duplicates."""
    rows: list[list[int]] = []
    for _ in range(_MAX_ROUNDS):
        if len(rows) == n:
            break
        for r in draw(n - len(rows)).tolist():
            key = tuple(r)
            if key not in seen:
                seen.add(key)
                rows.append(r)
    if len(rows) < n:
        raise ValueError(f"{owner}: cannot draw {n} distinct {what} sequences ({len(rows)} after {_MAX_ROUNDS} "
                         "rounds); raise d_vocab or seq_len, or ask for fewer sequences")
    return torch.tensor(rows, dtype=torch.long).reshape(n, width)  # [n, width], also for n = 0
