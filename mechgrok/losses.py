"""Losses and softmax statistics used for training and evaluation.

Every loss is computed in float64 by default (the grokking papers' practice: float32 cross-entropy
rounds the loss of confidently correct examples to exactly zero — Prieto et al. 2025's "softmax
collapse"). Each takes ``dtype=`` to compute in float32 instead (``TrainConfig(loss_dtype="float32")``,
the precision Prieto et al. study): the logits are cast to ``dtype`` and every step of the loss and of
its backward runs in it. ``loss_fn(name, dtype)`` returns the loss bound to a precision.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["LOSSES", "LOSS_DTYPES", "loss_fn", "loss_dtype", "cross_entropy", "mse", "stablemax_cross_entropy",
           "stablemax", "softmax_collapse", "collapsed", "SC_DTYPES", "token_nll", "IGNORE"]

IGNORE = -100
"""The target of a position that carries no loss (PyTorch's and Hugging Face's ignore index)."""

#: The precisions a loss can be computed in, by name (``TrainConfig.loss_dtype``).
LOSS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def loss_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` (a name in ``LOSS_DTYPES`` or the torch dtype itself) as a torch dtype; an error otherwise.

    >>> loss_dtype("float32")
    torch.float32
    """
    if isinstance(dtype, str) and dtype in LOSS_DTYPES:
        return LOSS_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in LOSS_DTYPES.values():
        return dtype
    raise ValueError(f"loss dtype must be one of {sorted(LOSS_DTYPES)} (the precision of the loss and its gradient), "
                     f"got {dtype!r}")


def cross_entropy(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"], reduction: str = "mean", *,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Mean cross-entropy in ``dtype`` (float64 unless given; ``reduction="none"``: one value per
    example ``[batch]``). In float32 an example whose correct logit leads every other by more than
    ``24 ln 2 ≈ 16.6`` has loss exactly 0 and gradient exactly 0 on that logit (softmax collapse)."""
    return torch.nn.functional.cross_entropy(logits.to(loss_dtype(dtype)), labels, reduction=_reduction(reduction))


def _reduction(reduction: str) -> str:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none' (one value per example), got {reduction!r}")
    return reduction


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    return per_example.mean() if _reduction(reduction) == "mean" else per_example


def mse(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"], reduction: str = "mean", *,
        dtype: torch.dtype = torch.float64) -> Tensor:
    """Mean squared error to one-hot targets, averaged over examples *and* classes (as
    ``nn.MSELoss``), in ``dtype`` (float64 unless given). Doshi et al. 2023 train their MLP with this
    loss. ``reduction="none"``: the mean over classes of each example ``[batch]``."""
    dtype = loss_dtype(dtype)
    target = torch.nn.functional.one_hot(labels, logits.shape[-1]).to(dtype)
    return _reduce(((logits.to(dtype) - target) ** 2).mean(-1), reduction)


def _s(x: Tensor) -> Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0 (Prieto et al. 2025, eq. 7)
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))


def stablemax(logits: Float[Tensor, "batch d_out"]) -> Float[Tensor, "batch d_out"]:
    """StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability"):
    ``s(x_i) / Σ_j s(x_j)`` with ``s`` growing linearly instead of exponentially."""
    s = _s(logits.double())
    return s / s.sum(-1, keepdim=True)


def stablemax_cross_entropy(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"],
                            reduction: str = "mean", *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Cross-entropy with StableMax in place of softmax, in ``dtype`` (float64 unless given;
    ``reduction="none"``: ``[batch]``)."""
    s = _s(logits.to(loss_dtype(dtype)))
    log_p = torch.log(s.gather(-1, labels[:, None]).squeeze(-1)) - torch.log(s.sum(-1))
    return _reduce(-log_p, reduction)


def token_nll(logits: Float[Tensor, "batch pos d_out"], targets: Int[Tensor, "batch pos"], *,
              dtype: torch.dtype = torch.float64) -> Float[Tensor, "batch pos"]:
    """Per-token next-token cross-entropy in ``dtype`` (float64 unless given), ``0`` where
    ``targets == IGNORE``.

    ``logits[b, t]`` predicts ``targets[b, t]`` (TL-style ``[batch, pos, vocab]`` logits; a
    ``SequenceTask``'s targets are already aligned with its inputs)."""
    return torch.nn.functional.cross_entropy(logits.to(loss_dtype(dtype)).transpose(1, 2), targets,
                                             ignore_index=IGNORE, reduction="none")


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "stablemax": stablemax_cross_entropy}


def loss_fn(name: str, dtype: str | torch.dtype = "float64"):
    """The loss function registered as ``name`` in ``LOSSES``, computing in ``dtype`` (a name in
    ``LOSS_DTYPES`` or the torch dtype); a clear error for an unknown name or precision.

    The float64 loss is the registered function itself; another precision is that function with
    ``dtype`` bound (it still takes ``reduction=``).

    >>> loss_fn("cross_entropy") is cross_entropy
    True
    >>> float(loss_fn("cross_entropy", "float32")(torch.tensor([[20.0, 0.0]]), torch.tensor([0])))
    0.0
    """
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    dtype = loss_dtype(dtype)
    fn = LOSSES[name]
    if dtype == torch.float64:
        return fn
    bound = functools.partial(fn, dtype=dtype)
    bound.__name__ = f"{fn.__name__}_{str(dtype).removeprefix('torch.')}"  # type: ignore[attr-defined]
    return bound


#: dtypes softmax collapse can be computed in (``collapsed``, ``softmax_collapse``; its absorption threshold is ``-ln(eps / 2)``).
SC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def collapsed(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"], dtype: torch.dtype = torch.float32
              ) -> Tensor:
    """``[batch]`` bool: the correct class' softmax probability in ``dtype`` is exactly ``1``.

    Computed with PyTorch's log-softmax in ``dtype`` (the kernel a ``dtype`` cross-entropy uses): an
    example is collapsed when its log-probability of the label is exactly ``0``, i.e. its loss is exactly
    ``0`` and so is the gradient on its correct logit, ``exp(0) - 1``. Mathematically that is Prieto et
    al.'s test ``Σ_j exp(z_j - max z) == 1`` with the label on top; in floating point the two can differ
    right at the threshold, where the order of the summation decides (2 of 3,000 random float32 examples in
    tests/test_stability.py), and this one is the one that decides the gradient. A tie for the largest
    logit sums to at least 2, so it never collapses.

    >>> collapsed(torch.tensor([[17.0, 0.0], [16.0, 0.0], [0.0, 40.0]]), torch.tensor([0, 0, 1])).tolist()
    [True, False, True]
    >>> collapsed(torch.tensor([[0.0, 40.0]]), torch.tensor([1]), torch.float64).tolist()
    [True]
    """
    _check_dtype(dtype)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [batch, d_out] and labels [batch], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    log_p = torch.log_softmax(logits.detach().to(dtype), dim=-1)  # [batch, d_out], in dtype
    return (log_p.gather(-1, labels[:, None].to(log_p.device)).squeeze(-1) == 0).cpu()


def _check_dtype(dtype: Any) -> None:
    if dtype not in SC_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SC_DTYPES]} (the precision the softmax is computed "
                         f"in), got {dtype!r}")


@torch.no_grad()
def softmax_collapse(logits: Float[Tensor, "batch d_out"], labels: Int[Tensor, " batch"],
                     dtype: torch.dtype = torch.float32) -> float:
    """Fraction of examples whose softmax in ``dtype`` (float32 by default, as in ``history.jsonl``)
    gives the label probability exactly 1: the mean of ``collapsed``.

    Prieto et al. 2025: once this happens the gradient of those examples is exactly zero in that
    precision, which can stall grokking ("softmax collapse"). Returns NaN for an empty batch.
    """
    if logits.shape[0] == 0:
        return float("nan")
    return float(collapsed(logits, labels, dtype).double().mean())
