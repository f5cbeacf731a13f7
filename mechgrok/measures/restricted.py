"""Restricted and excluded loss (Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability", §5.1).

A grokked modular-addition model writes its answer as ``Σ_k cos(2πk(a+b-c)/p)`` over a few key
frequencies ``k``. Over the ``(a, b)`` grid, for each output class ``c``, that is a combination of the
unit vectors ``u_cos = cos(2πk(a+b)/p)`` and ``u_sin = sin(2πk(a+b)/p)`` (normalised over the ``p²``
pairs). ``P(L)`` projects the logits ``L[a, b, c]`` onto those vectors for the key frequencies:

- **restricted loss**: cross-entropy on *all* pairs of ``mean_(a,b) L + P(L)`` (the constant plus the
  key-frequency directions only). It falls as the generalizing circuit forms, before test loss does.
- **excluded loss**: cross-entropy on the *training* pairs of ``L - P(L)``. It rises during circuit
  formation: the memorized answers come to rely on the key frequencies.

Defined for ``add`` (direction ``a + b``) and ``sub`` (``a - b``). Losses are in float64 and use
cross-entropy whatever loss the model was trained with, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok.losses import cross_entropy
from mechgrok.measures.grid import TaskGrid, grid_forward, task_grid
from mechgrok.tasks import Task

__all__ = ["PROJECTABLE_OPS", "key_frequency_directions", "key_frequency_projection", "restricted_logits",
           "excluded_logits", "restricted_loss", "excluded_loss", "restricted_loss_from_logits",
           "excluded_loss_from_logits"]

PROJECTABLE_OPS = {"add": 1, "sub": -1}  # op -> sign of b in the direction a ± b


def _check(op: str, p: int, freqs: Iterable[int]) -> list[int]:
    if op not in PROJECTABLE_OPS:
        raise ValueError(f"restricted/excluded loss is defined for the ops {sorted(PROJECTABLE_OPS)} (whose "
                         f"answer is a Fourier function of a ± b), not for {op!r}")
    out = []
    for k in freqs:
        k = int(k)
        if k == 0:
            raise ValueError("frequency 0 is the constant, which restricted logits always keep and excluded "
                             f"logits never remove; pass key frequencies in 1 .. {p // 2}")
        if not 1 <= k <= p // 2:
            raise ValueError(f"frequency {k} is outside 1 .. {p // 2} (p = {p}); frequency k and p - k are the same")
        if k not in out:
            out.append(k)
    return out


def key_frequency_directions(p: int, freqs: Iterable[int], op: str = "add") -> Float[Tensor, "pp n_dir"]:
    """Orthonormal columns ``cos(2πk(a ± b)/p)``, ``sin(2πk(a ± b)/p)`` over the ``p²`` grid cells
    (row-major ``a * p + b``), two per frequency (one, the cosine, for ``k = p/2``: its sine is 0)."""
    ks = _check(op, p, freqs)
    a, b = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")
    s = (a + PROJECTABLE_OPS[op] * b).reshape(-1)  # [p*p]
    cols = []
    for k in ks:
        cols.append(torch.cos(2 * math.pi * k * s / p))
        if 2 * k != p:
            cols.append(torch.sin(2 * math.pi * k * s / p))
    if not cols:
        return torch.zeros(p * p, 0, dtype=torch.float64)
    U = torch.stack(cols, dim=1)  # [p*p, n_dir]
    return U / U.norm(dim=0, keepdim=True)


def key_frequency_projection(logits: Float[Tensor, "p p d_out"], freqs: Iterable[int], op: str = "add"
                             ) -> Float[Tensor, "p p d_out"]:
    """``P(L) = Σ_u u (uᵀ L)`` over the key-frequency directions ``u``, independently for each class.

    Args:
        logits: ``[p, p, d_out]`` logits over the ``(a, b)`` grid.
        freqs: key frequencies in ``1 .. p//2``.
        op: ``"add"`` or ``"sub"``.

    Returns:
        ``P(L)`` in float64, ``[p, p, d_out]``: an orthogonal projection (idempotent, and
        ``L - P(L)`` is orthogonal to it).
    """
    p = logits.shape[0]
    if logits.ndim != 3 or logits.shape[1] != p:
        raise ValueError(f"logits must be [p, p, d_out] over the (a, b) grid, got {tuple(logits.shape)}")
    U = key_frequency_directions(p, freqs, op)  # [p*p, n_dir]
    L = logits.detach().double().reshape(p * p, -1)  # [p*p, d_out]
    return (U @ (U.T @ L)).reshape(logits.shape)  # [p, p, d_out]


def restricted_logits(logits: Float[Tensor, "p p d_out"], freqs: Iterable[int], op: str = "add"
                      ) -> Float[Tensor, "p p d_out"]:
    """``mean_(a,b) L + P(L)``: the constant and the key-frequency components only (float64)."""
    return logits.detach().double().mean((0, 1), keepdim=True) + key_frequency_projection(logits, freqs, op)


def excluded_logits(logits: Float[Tensor, "p p d_out"], freqs: Iterable[int], op: str = "add"
                    ) -> Float[Tensor, "p p d_out"]:
    """``L - P(L)``: the logits with the key-frequency components removed (float64)."""
    return logits.detach().double() - key_frequency_projection(logits, freqs, op)


def restricted_loss_from_logits(logits: Float[Tensor, "p p d_out"], grid: TaskGrid, freqs: Iterable[int]) -> float:
    """Restricted loss from precomputed grid logits: cross-entropy of ``restricted_logits`` on every
    example of the operation (all pairs; ``b != 0`` only for division) against the true labels."""
    r = restricted_logits(logits, freqs, grid.op).reshape(grid.p * grid.p, -1)  # [p*p, d_out]
    return float(cross_entropy(r[grid.cells], grid.true_labels))


def excluded_loss_from_logits(logits: Float[Tensor, "p p d_out"], grid: TaskGrid, freqs: Iterable[int]) -> float:
    """Excluded loss from precomputed grid logits: cross-entropy of ``excluded_logits`` on the
    training examples against their training labels (corrupted ones included, as trained)."""
    e = excluded_logits(logits, freqs, grid.op).reshape(grid.p * grid.p, -1)  # [p*p, d_out]
    if not bool(grid.train.any()):
        raise ValueError(f"operation {grid.name!r} has no training examples")
    return float(cross_entropy(e[grid.cells[grid.train]], grid.labels[grid.train]))


def restricted_loss(model: nn.Module, task: Task, freqs: Iterable[int], task_name: str | int | None = None) -> float:
    """Restricted loss of ``model`` (Nanda et al. 2023 §5.1): cross-entropy on all pairs of the logits
    kept to the constant and the key frequencies ``freqs``. Low only when the key-frequency
    (generalizing) circuit alone predicts the answers. ``add``/``sub`` only; one forward pass."""
    grid = task_grid(task, task_name)
    freqs = _check(grid.op, grid.p, freqs)  # fail before the forward pass
    return restricted_loss_from_logits(grid_forward(model, grid)[0], grid, freqs)


def excluded_loss(model: nn.Module, task: Task, freqs: Iterable[int], task_name: str | int | None = None) -> float:
    """Excluded loss of ``model`` (Nanda et al. 2023 §5.1): training cross-entropy with the
    key-frequency components of the logits removed. With ``freqs = []`` it is the training loss.
    ``add``/``sub`` only; one forward pass."""
    grid = task_grid(task, task_name)
    freqs = _check(grid.op, grid.p, freqs)
    return excluded_loss_from_logits(grid_forward(model, grid)[0], grid, freqs)
