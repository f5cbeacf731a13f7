"""Losses and softmax statistics used for training and evaluation.

All losses are computed in float64 (the grokking papers' practice: float32 cross-entropy rounds
the loss of confidently correct examples to exactly zero — Prieto et al. 2025's "softmax collapse").
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["LOSSES", "loss_fn", "cross_entropy", "mse", "stablemax_cross_entropy", "stablemax",
           "softmax_collapse"]


def cross_entropy(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"]) -> Tensor:
    """Mean cross-entropy in float64."""
    return torch.nn.functional.cross_entropy(logits.double(), labels)


def mse(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"]) -> Tensor:
    """Mean squared error to one-hot targets, averaged over examples *and* classes (as
    ``nn.MSELoss``), in float64. Doshi et al. 2023 train their MLP with this loss."""
    target = torch.nn.functional.one_hot(labels, logits.shape[-1]).double()
    return ((logits.double() - target) ** 2).mean()


def _s(x: Tensor) -> Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0 (Prieto et al. 2025, eq. 7)
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))


def stablemax(logits: Float[Tensor, "batch d_out"]) -> Float[Tensor, "batch d_out"]:
    """StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability"):
    ``s(x_i) / Σ_j s(x_j)`` with ``s`` growing linearly instead of exponentially."""
    s = _s(logits.double())
    return s / s.sum(-1, keepdim=True)


def stablemax_cross_entropy(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"]) -> Tensor:
    """Cross-entropy with StableMax in place of softmax, float64."""
    s = _s(logits.double())
    log_p = torch.log(s.gather(-1, labels[:, None]).squeeze(-1)) - torch.log(s.sum(-1))
    return -log_p.mean()


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "stablemax": stablemax_cross_entropy}


def loss_fn(name: str):
    """The loss function registered as ``name`` in ``LOSSES``; a clear error for unknown names."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


@torch.no_grad()
def softmax_collapse(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"]) -> float:
    """Fraction of examples whose float32 softmax gives the label probability exactly 1.

    Prieto et al. 2025: once this happens the gradient of those examples is exactly zero in float32,
    which can stall grokking ("softmax collapse"). Returns NaN for an empty batch.
    """
    if logits.shape[0] == 0:
        return float("nan")
    p = torch.softmax(logits.float(), dim=-1).gather(-1, labels[:, None])
    return float((p == 1.0).float().mean())
