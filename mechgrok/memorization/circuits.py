"""The generalizing and the memorizing circuit of a language model on a ``SequenceTask``, and how
much they overlap: the grokking question (which part of the network carries the rule, which the
memorized data) asked of the structured and the planted sequences of ``mg.tasks.lm_corpus``.

``sequence_prompts(task, group)`` turns sequences into contrastive ``mg.circuits.Prompts``: each
clean prompt is a sequence of ``group``, read at its last target position (the answer is its
target there); its counterfactual is a sequence of ``counterfactual`` (default
``held_out_planted``: random text the model never saw), and the contrasted answer is the
counterfactual's own next token at that position. Resample ablation then removes what tells the
clean sequence from random text: the copied segment of a structured sequence, or a planted
sequence's identity.

``lm_circuits(model, task)`` discovers both circuits with one method and selection
(``mg.circuits.discover``, metric ``logit_diff``): the generalizing one on held-out structured
sequences (``"test"``), the memorizing one on the most repeated planted group; and
``mg.circuits.overlap`` compares them against random circuits of the same sizes.

Limits: one answer position per sequence (the last target), so a circuit says how that token is
predicted; a structured sequence's answer is copied from the first period, a planted one's from
memory, and the same resample (random text) serves both, so the two metrics differ in kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mechgrok._config import check_int
from mechgrok.losses import IGNORE
from mechgrok.memorization.extraction import _check
from mechgrok.tasks.lm import planted_groups
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["sequence_prompts", "lm_circuits", "LMCircuits"]


def sequence_prompts(task: SequenceTask, group: str, *, counterfactual: str = "held_out_planted",
                     n: int | None = 64, seed: int = 0):
    """Contrastive prompts from the sequences of ``group`` (module docstring): up to ``n`` of them
    (a seeded choice; None: all), each read at its last target position."""
    from mechgrok.circuits.prompts import Prompts  # noqa: PLC0415 (circuits is heavy; only this needs it)

    if not isinstance(task, SequenceTask):
        raise TypeError(f"sequence_prompts reads a SequenceTask (mg.tasks.lm_corpus), got {type(task).__name__}")
    for g in (group, counterfactual):
        if not bool(task.mask(g).any()):
            raise ValueError(f"sequence_prompts: group {g!r} of task {task.name!r} is empty")
    gen = torch.Generator().manual_seed(check_int(seed, "seed", low=0, owner="sequence_prompts"))
    rows = task.mask(group).nonzero().flatten()
    rows = rows[~(task.targets[rows] == IGNORE).all(1)]  # sequences with a target
    if len(rows) == 0:
        raise ValueError(f"sequence_prompts: no sequence of {group!r} has a target (the loss mask is empty there)")
    if n is not None:
        rows = rows[torch.randperm(len(rows), generator=gen)[:check_int(n, "n", low=1, owner="sequence_prompts")]]
        rows = rows.sort().values
    others = task.mask(counterfactual).nonzero().flatten()
    other = others[torch.randint(len(others), (len(rows),), generator=gen)]  # [b]
    has = task.targets[rows] != IGNORE  # [b, T]
    pos = (has * torch.arange(task.n_ctx)).argmax(1)  # [b] the last target position
    # the counterfactual's own next token there (its input one on); the last column has no next token
    nxt = torch.cat([task.inputs[other, 1:], task.inputs[other, -1:]], dim=1)  # [b, T]
    return Prompts(task.inputs[rows], task.inputs[other], answer_pos=pos,
                   correct=task.targets[rows, pos], incorrect=nxt[torch.arange(len(rows)), pos])


@dataclass(frozen=True)
class LMCircuits:
    """The two circuits of ``lm_circuits`` and their overlap (``mg.circuits.overlap``'s dict)."""

    generalizing: Any  # mg.circuits.Circuit
    memorizing: Any
    memorizing_group: str
    overlap: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        ov = {k: v for k, v in self.overlap.items() if not isinstance(v, (set, frozenset))}
        return {"memorizing_group": self.memorizing_group,
                "generalizing": {"size": len(self.generalizing),
                                 "faithfulness": self.generalizing.provenance.get("faithfulness"),
                                 "components": sorted(self.generalizing.components)},
                "memorizing": {"size": len(self.memorizing),
                               "faithfulness": self.memorizing.provenance.get("faithfulness"),
                               "components": sorted(self.memorizing.components)},
                "overlap": ov}


def lm_circuits(model: nn.Module, task: SequenceTask, *, memorizing: str | None = None, method: str = "eap-ig",
                level: str = "node", target: float = 0.8, n: int = 64, seed: int = 0, baseline: int = 1000,
                progress: bool = False) -> LMCircuits:
    """The generalizing circuit (held-out structured sequences, ``"test"``) and the memorizing one
    (``memorizing``, default the most repeated ``planted_r{R}`` group) of ``model``, each the
    smallest top-k circuit with faithfulness ``>= target`` under ``method`` at ``level``
    (``mg.circuits.discover``), and their overlap beside ``baseline`` random circuits."""
    from mechgrok import circuits  # noqa: PLC0415

    _check(model, task, "memorization.lm_circuits")
    if memorizing is None:
        planted = planted_groups(task.groups)
        if not planted:
            raise ValueError(f"memorization.lm_circuits: task {task.name!r} has no planted_r{{R}} group; pass "
                             "memorizing= a group of memorized sequences")
        memorizing = planted[-1][1]
    found = {}
    for role, group in (("generalizing", "test"), ("memorizing", memorizing)):
        prompts = sequence_prompts(task, group, n=n, seed=seed)
        found[role] = circuits.discover(model, prompts, circuits.metrics.logit_diff(), method=method, level=level,
                                        target=target, progress=progress,
                                        provenance={"role": role, "group": group, "task": task.config})
    ov = circuits.overlap(found["generalizing"], found["memorizing"], baseline=baseline, seed=seed)
    return LMCircuits(found["generalizing"], found["memorizing"], memorizing, ov)
