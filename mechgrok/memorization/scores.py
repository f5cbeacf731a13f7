"""Memorization scores per sequence, side by side, and how well each separates planted sequences
from sequences the model never saw.

``scores(model, task, methods=(...))`` returns one :class:`MemorizationScores`: a score per method
for every sequence scored, higher meaning "more memorized":

- ``"extractable"``: the k-extractability match of :func:`~mechgrok.memorization.extract` (share of
  continuation tokens greedy decoding from the true ``k``-token prefix gets right; 1 = extractable;
  Carlini et al. 2021, 2023; Biderman et al. 2023).
- ``"loss"``: the loss gap, the mean per-token loss of the ``reference`` group (sequences of the same
  kind the model never trained on, ``held_out_planted`` in ``mg.tasks.lm_corpus``) minus the
  sequence's own (:func:`~mechgrok.memorization.sequence_loss`); about 0 for an unseen sequence.
  Carlini et al. 2021 rank by perplexity against a reference the same way.
- ``"self_influence"``: EK-FAC self-influence ``g_zᵀ (F + λI)⁻¹ g_z`` of the sequence's next-token
  loss summed over its target tokens (Grosse et al. 2023; Feldman & Zhang 2020 for self-influence as
  a memorization score), factors fitted on the task's training rows (each once, not weighted by
  ``repeats``). It measures how much the sequence's own gradient moves its own loss: large for a
  sequence the model is still fitting, and it *falls* once a sequence is fitted to near-zero loss.

Counterfactual memorization (Zhang et al. 2023) needs models trained without each sequence:
:func:`~mechgrok.memorization.counterfactual`.

:meth:`MemorizationScores.auroc_by_group` gives, per method, the AUROC of each ``planted_r{R}``
group against the reference group (1 = the score ranks every planted sequence above every unseen
one; 0.5 = chance); :meth:`MemorizationScores.agreement` the Spearman correlation of the methods'
scores over the planted and reference sequences.

Limits: the scores of different kinds of sequence do not compare (a structured sequence whose
continuation a rule predicts is "extractable" without being memorized): compare planted sequences
with held-out ones of the same kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechgrok._config import check_int
from mechgrok._stats import auroc, average_ranks
from mechgrok.memorization.extraction import _check, extract, sequence_loss
from mechgrok.tasks.lm import planted_groups
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["MemorizationScores", "scores", "SCORE_METHODS"]

SCORE_METHODS = ("extractable", "loss", "self_influence")


@dataclass(frozen=True)
class MemorizationScores:
    """Per-sequence memorization scores of several methods (module docstring).

    Attributes:
        task_name: the task scored.
        rows: the task rows scored ``[n]``.
        scores: method -> score ``[n]`` float64, higher = more memorized.
        groups: the task's groups restricted to ``rows`` (name -> ``[n]`` bool).
        repeats: per row, how many times an epoch showed it (``metadata["repeats"]``), or None.
        k: the prefix length of ``"extractable"`` (BOS included).
        reference: the group of unseen sequences the loss gap and the AUROCs compare against.
    """

    task_name: str
    rows: Int[Tensor, " n"]
    scores: dict[str, Float[Tensor, " n"]]
    groups: dict[str, Bool[Tensor, " n"]]
    repeats: Int[Tensor, " n"] | None
    k: int
    reference: str

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def planted_groups(self) -> list[tuple[int, str]]:
        """``(R, "planted_r{R}")`` for each planted group scored, by R."""
        return planted_groups(self.groups)

    def auroc(self, method: str, positive: str, negative: str | None = None) -> float | None:
        """P(a sequence of group ``positive`` scores above one of ``negative`` (default: the
        reference group)) under ``method``, ties half; None when either group is empty."""
        s = self._scores(method)
        pos, neg = self._group(positive), self._group(negative or self.reference)
        ok = torch.isfinite(s)
        return auroc(s[pos & ok].numpy(), s[neg & ok].numpy())

    def auroc_by_group(self) -> dict[str, dict[str, float | None]]:
        """``{method: {"planted_r{R}": AUROC against the reference group}}``."""
        return {m: {g: self.auroc(m, g) for _, g in self.planted_groups()} for m in self.scores}

    def agreement(self, among: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """Spearman rank correlation of each pair of methods over the sequences of the groups
        ``among`` (default: the planted groups and the reference group), ``{a: {b: rho}}``."""
        groups = list(among) if among is not None else [g for _, g in self.planted_groups()] + [self.reference]
        sel = torch.zeros(len(self.rows), dtype=torch.bool)
        for g in groups:
            sel |= self._group(g)
        out: dict[str, dict[str, float]] = {}
        for a in self.scores:
            out[a] = {}
            for b in self.scores:
                x, y = self.scores[a][sel].numpy(), self.scores[b][sel].numpy()
                ok = np.isfinite(x) & np.isfinite(y)
                out[a][b] = _spearman(x[ok], y[ok])
        return out

    def by_repeats(self) -> list[dict[str, Any]]:
        """One row per planted group and the reference: ``{"group", "repeats", "n", method: mean score}``
        (the curve of each score against the repetition count)."""
        rows = [(0, self.reference)] + self.planted_groups()
        return [{"group": g, "repeats": r, "n": int(self._group(g).sum()),
                 **{m: _nanmean(s[self._group(g)]) for m, s in self.scores.items()}} for r, g in rows]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task_name, "k": self.k, "reference": self.reference, "rows": self.rows.tolist(),
                "scores": {m: s.tolist() for m, s in self.scores.items()},
                "groups": {g: m.nonzero().flatten().tolist() for g, m in self.groups.items()},
                "auroc": self.auroc_by_group(), "agreement": self.agreement(), "by_repeats": self.by_repeats()}

    def _scores(self, method: str) -> Tensor:
        if method not in self.scores:
            raise ValueError(f"no scores of method {method!r}; these have {list(self.scores)}")
        return self.scores[method]

    def _group(self, name: str) -> Tensor:
        if name not in self.groups:
            raise ValueError(f"unknown group {name!r}; the scored sequences have groups {sorted(self.groups)}")
        return self.groups[name]


def scores(model: nn.Module, task: SequenceTask, methods: Sequence[str] = SCORE_METHODS, *, k: int | None = None,
           reference: str = "held_out_planted", split: str = "all", batch_size: int = 256, damping: float = 0.1,
           threads: int | None = 1, progress: bool = False) -> MemorizationScores:
    """Memorization scores of every sequence of ``split`` under each of ``methods`` (module docstring).

    Args:
        model: a HookedTransformer whose vocabulary and context fit ``task``.
        task: a ``SequenceTask``, e.g. ``mg.tasks.lm_corpus(...)``.
        methods: any of ``SCORE_METHODS``.
        k: prefix length of ``"extractable"``, BOS included (default ``n_ctx // 4``, at least 2; the
            8-of-32 tokens of Carlini et al. 2023's 50-of-200 scaled to short sequences).
        reference: a group of sequences of the planted kind that the model never trained on.
        split: the group scored (``"all"`` for every row).
        batch_size: sequences per forward.
        damping: EK-FAC damping, relative to the mean eigenvalue (``"self_influence"``).
        threads: torch threads meanwhile.
        progress: progress bars for the EK-FAC fit.
    """
    _check(model, task, "memorization.scores")
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise TypeError(f"memorization.scores: methods must be a non-empty list of {SCORE_METHODS}, got {methods!r}")
    unknown = [m for m in methods if m not in SCORE_METHODS]
    if unknown:
        raise ValueError(f"memorization.scores: unknown methods {unknown}; choose among {list(SCORE_METHODS)} "
                         "(counterfactual memorization trains models: mg.memorization.counterfactual)")
    if reference not in task.groups or not bool(task.groups[reference].any()):
        raise ValueError(f"memorization.scores: reference group {reference!r} is not in task {task.name!r} or is empty; "
                         f"pass reference= one of {sorted(g for g in task.groups if bool(task.groups[g].any()))}, a "
                         "group of sequences like the memorized ones that the model never trained on")
    if bool((task.groups[reference] & task.train).any()):
        raise ValueError(f"memorization.scores: reference group {reference!r} overlaps the training rows, so it is not "
                         "a never-seen baseline; pick a group outside 'train'")
    k = check_int(max(2, task.n_ctx // 4) if k is None else k, "k", low=1, high=task.n_ctx - 1,
                  owner="memorization.scores (prefix length, BOS included)")
    sel = task.mask(split) | task.groups[reference]  # the reference is always scored: the gap and AUROCs need it
    rows = sel.nonzero().flatten()  # [n]
    name = "_scored"
    while name in task.groups:  # a group of the caller's may already have the name
        name += "_"
    scoped = task.with_groups(**{name: sel})
    out: dict[str, Tensor] = {}
    for method in dict.fromkeys(methods):
        if method == "extractable":
            out[method] = extract(model, scoped, k, split=name, batch_size=batch_size, threads=threads).match
        elif method == "loss":
            loss = sequence_loss(model, scoped, split=name, batch_size=batch_size, threads=threads)  # [n]
            out[method] = float(loss[task.groups[reference][rows]].nanmean()) - loss
        else:
            out[method] = _self_influence(model, task, rows, batch_size, damping, threads, progress)
    groups = {g: m[rows] for g, m in task.groups.items()}
    repeats = task.metadata["repeats"][rows].long() if "repeats" in task.metadata else None
    return MemorizationScores(task_name=task.name, rows=rows, scores=out, groups=groups, repeats=repeats, k=k,
                              reference=reference)


def _self_influence(model: nn.Module, task: SequenceTask, rows: Tensor, batch_size: int, damping: float,
                    threads: int | None, progress: bool) -> Tensor:
    from mechgrok.influence import EKFAC  # noqa: PLC0415 (influence is heavy; only this method needs it)

    was_training = model.training
    model.eval()
    try:
        ekfac = EKFAC(model, task.sequences("all"), damping=damping, batch_size=batch_size, progress=progress,
                      threads=threads)
        ekfac.fit(task.train.nonzero().flatten())
        return ekfac.self_influence(rows).double().cpu()
    finally:
        model.train(was_training)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    sx, sy = rx.std(), ry.std()
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy)) if sx > 0 and sy > 0 else float("nan")


def _nanmean(x: Tensor) -> float | None:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if len(x) else None
