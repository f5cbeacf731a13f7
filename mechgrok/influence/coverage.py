"""Which parameters an EK-FAC fit covers, and a loud warning about layers it cannot fit.

EK-FAC approximates the Fisher of the parameters of its linear maps only (see
:mod:`mechgrok.influence.maps`); every other parameter is left out of the gradients it
preconditions and of the influence scores. So that a partial fit is never silent:

- :class:`Coverage` lists the parameters the selected maps cover (fully or in part, e.g. one head of
  ``W_Q``, or ``b_O`` with ``per_head=True``), those they do not (embeddings of an ``nn.Module``,
  LayerNorm / RMSNorm scales, a gated MLP's ``b_in``, maps left out with ``modules=``), the numbers
  of trainable scalars covered and in total, and the weights shared with another module (tied).
  :class:`~mechgrok.influence.EKFAC` logs it at INFO, keeps it as ``.coverage``, shows it in its
  ``repr`` and saves it with the factors.
- The rule for the warning: a module that directly holds a trainable parameter of 2 or more
  dimensions (a weight matrix, a convolution kernel) that no linear map EK-FAC knows for this model
  covers, and that is not an ``nn.Embedding`` / ``nn.EmbeddingBag`` (a lookup, not covered by
  design), is *unsupported*: :func:`coverage` issues one :class:`CoverageWarning` naming every such
  module, its type and its parameters. Maps left out on purpose with ``modules=[...]`` do not warn
  (they are listed as not covered). Silence it knowingly with
  ``warnings.filterwarnings("ignore", category=mechgrok.influence.CoverageWarning)``.

Only trainable parameters (``requires_grad``) count; a parameter shared by several modules counts once.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from mechgrok.influence.maps import LinearMap

__all__ = ["Coverage", "CoverageWarning", "coverage"]


class CoverageWarning(UserWarning):
    """EK-FAC leaves out a layer that holds a weight matrix it cannot fit."""


@dataclass(frozen=True)
class Coverage:
    """What an EK-FAC fit covers (parameter names as ``model.named_parameters()`` spells them).

    Attributes:
        maps: the fitted maps' names.
        covered: parameters every scalar of which some map covers.
        partial: ``{parameter: [covered scalars, scalars]}`` for parameters covered in part.
        not_covered: trainable parameters no map covers.
        n_covered: trainable scalars covered.
        n_total: trainable scalars of the model.
        unsupported: ``"module (Type: param [shape], ...)"`` for each layer with a weight matrix that
            EK-FAC cannot fit (these were warned about).
        tied: ``{name a map uses: the model's parameter}`` for weights shared with another module;
            the map covers its own use of the weight only (``lm_head`` tied to ``wte``: the
            unembedding, not the embedding lookup).
    """

    maps: tuple[str, ...]
    covered: tuple[str, ...]
    not_covered: tuple[str, ...]
    n_covered: int
    n_total: int
    partial: dict[str, list[int]] = field(default_factory=dict)
    unsupported: tuple[str, ...] = ()
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Covered share of the trainable scalars."""
        return self.n_covered / self.n_total if self.n_total else 0.0

    def short(self) -> str:
        """One line for a ``repr``."""
        return (f"{len(self.maps)} maps covering {self.n_covered:,} of {self.n_total:,} trainable parameters "
                f"({100 * self.fraction:.1f}%)")

    def __str__(self) -> str:
        def names(xs, k=8):
            xs = list(xs)
            return ", ".join(xs[:k]) + (f", ... ({len(xs) - k} more)" if len(xs) > k else "")

        lines = [f"EK-FAC fits {self.short()}"]
        lines.append(f"  covered: {names(self.covered)}" if self.covered else "  covered: nothing in full")
        if self.partial:
            lines.append("  partly covered: " + names(f"{k} ({c}/{n})" for k, (c, n) in self.partial.items()))
        if self.tied:
            lines.append("  tied (the map's own use only): " + names(f"{k} = {v}" for k, v in self.tied.items()))
        lines.append(f"  not covered: {names(self.not_covered)}" if self.not_covered else "  not covered: nothing")
        if self.unsupported:
            lines.append(f"  unsupported layers: {names(self.unsupported)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def coverage(model: nn.Module, maps: list[LinearMap], known: list[LinearMap], *, warn: bool = True,
             stacklevel: int = 3) -> Coverage:
    """The :class:`Coverage` of ``maps`` (the selected maps) on ``model``; ``known`` are all the maps
    EK-FAC can fit on it (``linear_maps(model)``), which decide what is *unsupported* (see the module
    docstring). With ``warn``, unsupported layers raise one :class:`CoverageWarning`."""
    canon = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    alias = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    numel = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}

    def counts(ms: list[LinearMap]) -> tuple[dict[str, int], dict[str, str]]:
        got: dict[str, int] = {}
        tied: dict[str, str] = {}
        for m in ms:
            parts = [(m.weight, m.d_out * m.d_in)] + ([(m.bias_param, m.d_out)] if m.bias else [])
            for name, k in parts:
                p = alias.get(name)
                if p is None or id(p) not in canon:
                    continue  # frozen
                real = canon[id(p)]
                got[real] = got.get(real, 0) + k
                if real != name:
                    tied[name] = real
        return got, tied

    got, tied = counts(maps)
    known_got, _ = counts(known)
    covered = tuple(n for n in numel if got.get(n, 0) >= numel[n])
    partial = {n: [got[n], numel[n]] for n in numel if 0 < got.get(n, 0) < numel[n]}
    not_covered = tuple(n for n in numel if got.get(n, 0) == 0)
    unsupported = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            continue
        pre = f"{mname}." if mname else ""
        held = [(f"{pre}{k}", p) for k, p in mod.named_parameters(recurse=False)
                if p.requires_grad and p.ndim >= 2 and id(p) in canon
                and known_got.get(canon[id(p)], 0) == 0]
        if held:
            shown = ", ".join(f"{k.rsplit('.', 1)[-1]} {list(p.shape)}" for k, p in held)
            unsupported.append(f"{mname or '<model>'} ({type(mod).__name__}: {shown})")
    cov = Coverage(maps=tuple(m.name for m in maps), covered=covered, not_covered=not_covered,
                   n_covered=sum(min(got.get(n, 0), numel[n]) for n in numel), n_total=sum(numel.values()),
                   partial=partial, unsupported=tuple(unsupported), tied=tied)
    if warn and unsupported:
        warnings.warn(f"EK-FAC cannot fit {len(unsupported)} layer(s) of this {type(model).__name__} and leaves "
                      f"their parameters out of the fit: {'; '.join(unsupported)}. It fits exact nn.Linear and "
                      "transformers Conv1D layers (and a HookedTransformer's / HookedMLP's maps); rewrite these "
                      "layers as nn.Linear to include them. .coverage lists what is fitted.",
                      CoverageWarning, stacklevel=stacklevel)
    return cov
