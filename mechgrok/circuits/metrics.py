"""Metrics of final-position logits ``[batch, d_out]`` -> scalar, for patching and attribution.

Each constructor closes over the labels of the clean batch and returns ``metric(logits) -> Tensor``
(a 0-d float64 tensor, differentiable). ``HIGHER_IS_BETTER`` tells ACDC which direction is worse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["logit_diff", "prob", "kl_to", "loss", "generalization", "memorization", "Metric", "check_metric",
           "scalar"]

Metric = Callable[[Float[Tensor, "batch d_out"]], Tensor]
_CONSTRUCTORS = ("logit_diff", "prob", "kl_to", "loss", "generalization", "memorization")


def check_metric(metric: object) -> Metric:
    """``metric`` if it is callable, else a ``TypeError`` that says how to build one."""
    if callable(metric):
        return metric
    hint = "e.g. mg.circuits.metrics.generalization(labels)"
    if isinstance(metric, str):
        import difflib
        import inspect

        close = difflib.get_close_matches(metric, _CONSTRUCTORS, n=1, cutoff=0.5)
        if close:
            args = ", ".join(inspect.signature(globals()[close[0]]).parameters)
            hint = f"did you mean mg.circuits.metrics.{close[0]}({args})?"
        raise TypeError(f"metric must be a function logits [batch, d_out] -> scalar tensor, got the string "
                        f"{metric!r}; build one from the clean batch's labels: {hint}")
    raise TypeError(f"metric must be a function logits [batch, d_out] -> scalar tensor, got "
                    f"{type(metric).__name__}; {hint}")


def scalar(metric: Metric, logits: Float[Tensor, "batch d_out"]) -> Tensor:
    """``metric(logits)``, checked to be a one-element tensor (the convention of this module), so a
    metric that forgot to average over the batch fails here, saying what it returned."""
    value = metric(logits)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.reshape(())
    if callable(value):
        name = getattr(metric, "__name__", "metric")
        got = f"a function: was the constructor {name} passed instead of {name}(labels)?"
    elif isinstance(value, Tensor):
        got = f"a tensor of shape {list(value.shape)}: reduce it over the batch (e.g. .mean())"
    else:
        got = f"{type(value).__name__} {value!r:.60}: return a torch tensor, so gradient methods can differentiate it"
    raise ValueError(f"a metric maps final-position logits {list(logits.shape)} ([batch, d_out]) to a scalar "
                     f"(a 0-d tensor), but it returned {got} (see mechgrok.circuits.metrics)")


def _tagged(fn: Metric, name: str, higher_is_better: bool) -> Metric:
    fn.metric_name, fn.higher_is_better = name, higher_is_better
    return fn


def _labels(labels: Tensor, name: str, owner: str) -> tuple[Tensor, int]:
    """``labels`` as a 1-D integer tensor of class indices >= 0, and its largest value."""
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        hint = (f"; it looks like logits: was the constructor {owner} passed as the metric instead of {owner}(labels)?"
                if t.ndim == 2 and t.is_floating_point() else "")
        raise ValueError(f"{owner}: {name} must be a non-empty 1-D tensor of integer class indices (one per clean "
                         f"example), got dtype {t.dtype} and shape {tuple(t.shape)}{hint}")
    if int(t.min()) < 0:
        raise ValueError(f"{owner}: {name} must be class indices >= 0, got {int(t.min())}")
    return t.long(), int(t.max())


def _check_logits(logits: Tensor, n: int, top: int, owner: str) -> None:
    """The logits a metric gets must be ``[n, d_out]`` with every label below ``d_out``."""
    if logits.ndim != 2:
        raise ValueError(f"{owner}: expected final-position logits [batch, d_out], got shape {list(logits.shape)}")
    if logits.shape[0] != n:
        raise ValueError(f"{owner}: the metric holds {n} labels but scores a batch of {logits.shape[0]}; build it "
                         "from the labels of the clean batch it scores")
    if logits.shape[1] <= top:
        raise ValueError(f"{owner}: a label is {top} but the logits have only d_out={logits.shape[1]} classes; the "
                         "labels come from another task than the model")


def logit_diff(correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]) -> Metric:
    """Mean of ``logit[correct] − logit[wrong]`` (linear in the logits)."""
    (correct, c_top), (wrong, w_top) = _labels(correct, "correct", "logit_diff"), _labels(wrong, "wrong", "logit_diff")
    if correct.shape != wrong.shape:
        raise ValueError(f"logit_diff: correct {list(correct.shape)} and wrong {list(wrong.shape)} differ in length")

    def metric(logits: Tensor) -> Tensor:
        _check_logits(logits, len(correct), max(c_top, w_top), "logit_diff")
        lg = logits.double()
        return (lg.gather(-1, correct[:, None]) - lg.gather(-1, wrong[:, None])).mean()

    return _tagged(metric, "logit_diff", True)


def prob(correct: Int[Tensor, " batch"]) -> Metric:
    """Mean softmax probability of the correct class."""
    correct, top = _labels(correct, "correct", "prob")

    def metric(logits: Tensor) -> Tensor:
        _check_logits(logits, len(correct), top, "prob")
        return torch.softmax(logits.double(), -1).gather(-1, correct[:, None]).mean()

    return _tagged(metric, "prob", True)


def kl_to(clean_logits: Float[Tensor, "batch d_out"]) -> Metric:
    """Mean ``KL(p_clean ‖ p_patched)`` (0 on the clean run; ACDC's default, Conmy et al. 2023)."""
    if not isinstance(clean_logits, Tensor) or clean_logits.ndim != 2 or not clean_logits.is_floating_point():
        raise ValueError("kl_to: clean_logits must be the clean run's final-position logits, a float tensor "
                         f"[batch, d_out], got {getattr(clean_logits, 'shape', type(clean_logits).__name__)}")
    ref = torch.log_softmax(clean_logits.detach().double(), -1)

    def metric(logits: Tensor) -> Tensor:
        if logits.shape != ref.shape:
            raise ValueError(f"kl_to: got logits of shape {list(logits.shape)} but the clean logits are "
                             f"{list(ref.shape)}; build the metric from the clean batch it scores")
        lp = torch.log_softmax(logits.double(), -1)
        return (ref.exp() * (ref - lp)).sum(-1).mean()

    return _tagged(metric, "kl_to_clean", False)


def loss(labels: Int[Tensor, " batch"]) -> Metric:
    """Mean cross-entropy against ``labels``."""
    labels, top = _labels(labels, "labels", "loss")

    def metric(logits: Tensor) -> Tensor:
        _check_logits(logits, len(labels), top, "loss")
        return torch.nn.functional.cross_entropy(logits.double(), labels)

    return _tagged(metric, "loss", False)


def generalization(labels: Int[Tensor, " batch"]) -> Metric:
    """Correct-answer logit minus the mean logit, averaged over (held-out) examples."""
    labels, top = _labels(labels, "labels", "generalization")

    def metric(logits: Tensor) -> Tensor:
        _check_logits(logits, len(labels), top, "generalization")
        lg = logits.double()
        return (lg.gather(-1, labels[:, None]).squeeze(-1) - lg.mean(-1)).mean()

    return _tagged(metric, "generalization", True)


def memorization(corrupted_labels: Int[Tensor, " batch"], true_labels: Int[Tensor, " batch"]) -> Metric:
    """Corrupted-label logit minus true-label logit, averaged over corrupted training examples."""
    metric = logit_diff(corrupted_labels, true_labels)
    return _tagged(metric, "memorization", True)
