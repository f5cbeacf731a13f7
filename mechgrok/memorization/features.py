"""SAE features that fire on memorized sequences: for each feature of an SAE trained on every
position of a language model (``mg.sae.train(model, task.inputs, hook, position="all")``), how
often it fires on the target tokens of a group of sequences (``planted_r100``) against the
structured training sequences and against planted-style sequences the model never saw.

A feature *selective for* the group fires on it far more often than on either reference:
``selectivity = rate(group) − max(rate(reference), rate(unseen))``, rates over the positions that
predict a target (``task.loss_mask``). A feature that fires on planted sequences because they
are random text fires on the unseen ones too, so the second reference separates memorization
from "this is not structured text".

Limits: firing is ``activation > 0``; the rates weigh every target position equally; one SAE
site at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok._config import check_int
from mechgrok.memorization.extraction import _check
from mechgrok.tasks.lm import planted_groups
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["FeatureSelectivity", "planted_features"]


@dataclass(frozen=True)
class FeatureSelectivity:
    """Firing rates of each SAE feature on three groups of sequences (module docstring)."""

    group: str
    reference: str
    unseen: str
    rate_group: Float[Tensor, " d_sae"]
    rate_reference: Float[Tensor, " d_sae"]
    rate_unseen: Float[Tensor, " d_sae"]

    @property
    def selectivity(self) -> Float[Tensor, " d_sae"]:
        return self.rate_group - torch.maximum(self.rate_reference, self.rate_unseen)

    def top(self, k: int = 10) -> list[int]:
        """The ``k`` most selective features, best first (ties by index)."""
        k = check_int(k, "k", low=1, high=len(self.rate_group), owner="FeatureSelectivity.top")
        return torch.sort(-self.selectivity, stable=True).indices[:k].tolist()

    def selective(self, margin: float = 0.5) -> list[int]:
        """Features whose selectivity is at least ``margin``, by index."""
        return (self.selectivity >= margin).nonzero().flatten().tolist()

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        top = self.top(min(k, len(self.rate_group)))
        return {"group": self.group, "reference": self.reference, "unseen": self.unseen,
                "n_features": len(self.rate_group), "n_selective_0.5": len(self.selective(0.5)),
                "top": [{"feature": f, "rate_group": float(self.rate_group[f]),
                         "rate_reference": float(self.rate_reference[f]), "rate_unseen": float(self.rate_unseen[f])}
                        for f in top]}


@torch.no_grad()
def planted_features(model: nn.Module, sae, task: SequenceTask, group: str | None = None, *,
                     reference: str = "structured_train", unseen: str = "held_out_planted",
                     batch_size: int = 256) -> FeatureSelectivity:
    """Firing rates of ``sae``'s features on the target positions of ``group``, ``reference`` and
    ``unseen`` (module docstring); ``group`` defaults to the most repeated ``planted_r{R}``. ``sae``
    is one ``mg.sae.train`` trained at a hook of ``model`` with ``position="all"``."""
    from mechgrok.sae.train import encode, site  # noqa: PLC0415 (sae-lens is heavy)

    _check(model, task, "memorization.planted_features")
    hook, position = site(sae)
    if position != "all":
        raise ValueError(f"memorization.planted_features reads every position; this SAE was trained at position "
                         f"{position!r}: train it with mg.sae.train(..., position='all')")
    batch_size = check_int(batch_size, "batch_size", low=1, owner="memorization.planted_features")
    if group is None:
        if not (planted := planted_groups(task.groups)):
            raise ValueError(f"memorization.planted_features: task {task.name!r} has no planted_r{{R}} group; pass "
                             "group= a group of memorized sequences")
        group = planted[-1][1]
    rates = []
    was_training = model.training
    model.eval()
    try:
        for g in (group, reference, unseen):
            rows = task.mask(g).nonzero().flatten()
            if len(rows) == 0:
                raise ValueError(f"memorization.planted_features: group {g!r} of task {task.name!r} is empty")
            fired, count = None, 0
            for i in range(0, len(rows), batch_size):
                b = rows[i:i + batch_size]
                _, cache = model.run_with_cache(task.inputs[b].to(next(model.parameters()).device),
                                                names_filter=lambda n: n == hook)
                keep = task.loss_mask[b]  # [b, T]: positions that predict a target
                x = cache[hook][keep.to(cache[hook].device)].float().cpu()  # [tokens, d]
                f = (encode(sae, x) > 0).double().sum(0)  # [d_sae]
                fired = f if fired is None else fired + f
                count += int(keep.sum())
            rates.append(fired / max(count, 1))
    finally:
        model.train(was_training)
    return FeatureSelectivity(group, reference, unseen, *rates)
