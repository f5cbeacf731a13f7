"""Losses and softmax statistics used for training and evaluation.

All losses are computed in float64 (the grokking papers' practice: float32 cross-entropy rounds
the loss of confidently correct examples to exactly zero — Prieto et al. 2025's "softmax collapse").
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["LOSSES", "loss_fn", "cross_entropy", "mse", "stablemax_cross_entropy", "stablemax",
           "softmax_collapse", "token_nll", "IGNORE"]

IGNORE = -100
"""The target of a position that carries no loss (PyTorch's and Hugging Face's ignore index)."""


def cross_entropy(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"], reduction: str = "mean") -> Tensor:
    """Mean cross-entropy in float64 (``reduction="none"``: one value per example ``[batch]``)."""
    return torch.nn.functional.cross_entropy(logits.double(), labels, reduction=_reduction(reduction))


def _reduction(reduction: str) -> str:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none' (one value per example), got {reduction!r}")
    return reduction


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    return per_example.mean() if _reduction(reduction) == "mean" else per_example


def mse(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"], reduction: str = "mean") -> Tensor:
    """Mean squared error to one-hot targets, averaged over examples *and* classes (as
    ``nn.MSELoss``), in float64. Doshi et al. 2023 train their MLP with this loss.
    ``reduction="none"``: the mean over classes of each example ``[batch]``."""
    target = torch.nn.functional.one_hot(labels, logits.shape[-1]).double()
    return _reduce(((logits.double() - target) ** 2).mean(-1), reduction)


def _s(x: Tensor) -> Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0 (Prieto et al. 2025, eq. 7)
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))


def stablemax(logits: Float[Tensor, "batch d_out"]) -> Float[Tensor, "batch d_out"]:
    """StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability"):
    ``s(x_i) / Σ_j s(x_j)`` with ``s`` growing linearly instead of exponentially."""
    s = _s(logits.double())
    return s / s.sum(-1, keepdim=True)


def stablemax_cross_entropy(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"],
                            reduction: str = "mean") -> Tensor:
    """Cross-entropy with StableMax in place of softmax, float64 (``reduction="none"``: ``[batch]``)."""
    s = _s(logits.double())
    log_p = torch.log(s.gather(-1, labels[:, None]).squeeze(-1)) - torch.log(s.sum(-1))
    return _reduce(-log_p, reduction)


def token_nll(logits: Float[Tensor, "batch pos d_out"], targets: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """Per-token next-token cross-entropy in float64, ``0`` where ``targets == IGNORE``.

    ``logits[b, t]`` predicts ``targets[b, t]`` (TL-style ``[batch, pos, vocab]`` logits; a
    ``SequenceTask``'s targets are already aligned with its inputs)."""
    return torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), targets, ignore_index=IGNORE,
                                             reduction="none")


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
