"""Counterfactual memorization (Zhang et al. 2023, "Counterfactual Memorization in Neural Language
Models"): how much better a model predicts a sequence when the sequence was in its training set.

With models ``f_S`` trained on random subsets ``S`` of the training data,

    mem(x) = E_{S ∋ x}[acc(f_S, x)] − E_{S ∌ x}[acc(f_S, x)],

``acc`` the share of ``x``'s target tokens predicted right under teacher forcing. A sequence a rule
predicts (a structured one) scores about 0, because the models that never saw it predict it too; a
planted random sequence scores about its accuracy when trained on, because nothing else predicts it.

The subsets come from ``mg.tasks.lm_corpus(subset_seed=s)``: the same sequences, a seeded half of
each group left out of training. Training one model per seed is a sweep::

    mg.sweep("lm", {"subset_seed": list(range(8))}, out="runs/cf", workers=2)   # or backend="ray"
    cf = mg.memorization.counterfactual("runs/cf")

Limits: the estimate of each sequence averages over the runs that did and did not train on it, so
it needs both (with 8 half-subsets a sequence is left out of 4 on average; one that is never left
out, or never trained on, gets NaN). Zhang et al. use hundreds of models; a few give a noisy
estimate per sequence but clear means per group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechgrok._stats import auroc
from mechgrok.memorization.extraction import token_accuracy
from mechgrok.run import Run
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["Counterfactual", "counterfactual"]

_SUBSET_GROUP = re.compile(r"^(planted_r\d+|structured_train)$")


@dataclass(frozen=True)
class Counterfactual:
    """Counterfactual memorization per sequence (module docstring), over every row of the corpus.

    Attributes:
        memorization: ``mem(x)`` ``[N]`` (NaN where the runs did not both train and leave out ``x``).
        acc_in: mean token accuracy of the runs that trained on ``x`` ``[N]``.
        acc_out: the same over the runs that did not ``[N]``.
        n_in, n_out: how many runs trained on / left out ``x`` ``[N]``.
        kind: per row, the group it belongs to when it trains: ``planted_r{R}`` or ``structured_train``
            (``""`` for test and held-out rows, which no run trains on).
        runs: the run folders used.
    """

    memorization: Float[Tensor, " N"]
    acc_in: Float[Tensor, " N"]
    acc_out: Float[Tensor, " N"]
    n_in: Int[Tensor, " N"]
    n_out: Int[Tensor, " N"]
    kind: list[str]
    runs: list[str]

    def group(self, name: str) -> Bool[Tensor, " N"]:
        """Rows whose training group is ``name`` (``planted_r10``, ``structured_train``)."""
        return torch.tensor([k == name for k in self.kind], dtype=torch.bool)

    def by_group(self) -> list[dict[str, Any]]:
        """One row per training group: ``{"group", "n", "memorization", "acc_in", "acc_out"}`` (means
        over the rows with a finite estimate)."""
        out = []
        for g in sorted(set(self.kind) - {""}, key=_order):
            m = self.group(g) & torch.isfinite(self.memorization)
            out.append({"group": g, "n": int(m.sum()), **{k: float(getattr(self, k)[m].mean()) if bool(m.any())
                                                          else None for k in ("memorization", "acc_in", "acc_out")}})
        return out

    def auroc(self, positive: str, negative: str = "structured_train") -> float | None:
        """P(a row of training group ``positive`` has higher ``mem`` than one of ``negative``)."""
        ok = torch.isfinite(self.memorization)
        return auroc(self.memorization[self.group(positive) & ok].numpy(),
                     self.memorization[self.group(negative) & ok].numpy())

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "by_group": self.by_group(), "memorization": self.memorization.tolist(),
                "n_in": self.n_in.tolist(), "n_out": self.n_out.tolist(), "kind": self.kind}


def _order(group: str) -> tuple[int, int]:
    return (0, 0) if group == "structured_train" else (1, int(group.removeprefix("planted_r")))


def counterfactual(runs: str | Path | Sequence[str | Path | Run], *, batch_size: int = 256,
                   threads: int | None = 1) -> Counterfactual:
    """Counterfactual memorization from runs trained on subsets of one corpus (module docstring).

    Args:
        runs: a sweep folder (every sub-folder that is a run is used) or a list of run folders / Runs,
            each trained on ``mg.tasks.lm_corpus(..., subset_seed=s)`` with the same corpus settings.
        batch_size, threads: as in ``token_accuracy``.
    """
    found = _runs(runs)
    if len(found) < 2:
        raise ValueError(f"memorization.counterfactual needs at least 2 runs trained on different subsets (ideally 8 "
                         f"or more), got {len(found)}; train them with mg.sweep('lm', {{'subset_seed': [0, 1, ...]}})")
    first: SequenceTask | None = None
    acc_sum_in = acc_sum_out = n_in = n_out = kind = None
    for run in found:
        task = run.task()
        if not isinstance(task, SequenceTask):
            raise TypeError(f"{run.path} trained on {type(task).__name__} {task.name!r}, not a SequenceTask corpus")
        if first is None:
            first = task
            zeros = torch.zeros(task.n, dtype=torch.float64)
            acc_sum_in, acc_sum_out, n_in, n_out = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
            kind = [""] * task.n
        elif task.inputs.shape != first.inputs.shape or not torch.equal(task.inputs, first.inputs):
            raise ValueError(f"{run.path} trained on other sequences than {found[0].path}; counterfactual memorization "
                             "compares runs on one corpus that differ only in subset_seed")
        for g, m in task.groups.items():
            name = g.replace("left_out_r", "planted_r").replace("left_out_structured", "structured_train")
            if _SUBSET_GROUP.match(name):
                for i in m.nonzero().flatten().tolist():
                    kind[i] = name
        acc = token_accuracy(run.load_model(), task, "all", batch_size=batch_size, threads=threads)  # [N]
        trained = task.train
        acc_sum_in += torch.where(trained, acc, 0.0)
        acc_sum_out += torch.where(trained, 0.0, acc)
        n_in += trained.double()
        n_out += (~trained).double()
    acc_in, acc_out = acc_sum_in / n_in, acc_sum_out / n_out  # NaN where a side has no run
    return Counterfactual(memorization=acc_in - acc_out, acc_in=acc_in, acc_out=acc_out, n_in=n_in.long(),
                          n_out=n_out.long(), kind=kind, runs=[str(r.path) for r in found])


def _runs(runs: str | Path | Sequence[str | Path | Run]) -> list[Run]:
    if isinstance(runs, (str, Path)):
        folder = Path(runs)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of runs (a sweep's out=)")
        return [Run(p) for p in sorted(folder.iterdir()) if (p / "config.json").is_file()]
    if not isinstance(runs, Sequence):
        raise TypeError(f"runs must be a sweep folder or a list of run folders, got {type(runs).__name__}")
    return [r if isinstance(r, Run) else Run(r) for r in runs]
