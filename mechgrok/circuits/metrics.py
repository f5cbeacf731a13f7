"""Metrics of final-position logits ``[batch, d_out]`` -> scalar, for patching and attribution.

Each constructor closes over the labels of the clean batch and returns ``metric(logits) -> Tensor``
(a 0-d float64 tensor, differentiable). ``HIGHER_IS_BETTER`` tells ACDC which direction is worse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["logit_diff", "prob", "kl_to", "loss", "generalization", "memorization", "Metric"]

Metric = Callable[[Float[Tensor, "batch d_out"]], Tensor]


def _tagged(fn: Metric, name: str, higher_is_better: bool) -> Metric:
    fn.metric_name, fn.higher_is_better = name, higher_is_better
    return fn


def logit_diff(correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]) -> Metric:
    """Mean of ``logit[correct] − logit[wrong]`` (linear in the logits)."""
    def metric(logits: Tensor) -> Tensor:
        lg = logits.double()
        return (lg.gather(-1, correct[:, None]) - lg.gather(-1, wrong[:, None])).mean()

    return _tagged(metric, "logit_diff", True)


def prob(correct: Int[Tensor, " batch"]) -> Metric:
    """Mean softmax probability of the correct class."""
    def metric(logits: Tensor) -> Tensor:
        return torch.softmax(logits.double(), -1).gather(-1, correct[:, None]).mean()

    return _tagged(metric, "prob", True)


def kl_to(clean_logits: Float[Tensor, "batch d_out"]) -> Metric:
    """Mean ``KL(p_clean ‖ p_patched)`` (0 on the clean run; ACDC's default, Conmy et al. 2023)."""
    ref = torch.log_softmax(clean_logits.detach().double(), -1)

    def metric(logits: Tensor) -> Tensor:
        lp = torch.log_softmax(logits.double(), -1)
        return (ref.exp() * (ref - lp)).sum(-1).mean()

    return _tagged(metric, "kl_to_clean", False)


def loss(labels: Int[Tensor, " batch"]) -> Metric:
    """Mean cross-entropy against ``labels``."""
    def metric(logits: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits.double(), labels)

    return _tagged(metric, "loss", False)


def generalization(labels: Int[Tensor, " batch"]) -> Metric:
    """Correct-answer logit minus the mean logit, averaged over (held-out) examples."""
    def metric(logits: Tensor) -> Tensor:
        lg = logits.double()
        return (lg.gather(-1, labels[:, None]).squeeze(-1) - lg.mean(-1)).mean()

    return _tagged(metric, "generalization", True)


def memorization(corrupted_labels: Int[Tensor, " batch"], true_labels: Int[Tensor, " batch"]) -> Metric:
    """Corrupted-label logit minus true-label logit, averaged over corrupted training examples."""
    metric = logit_diff(corrupted_labels, true_labels)
    return _tagged(metric, "memorization", True)
