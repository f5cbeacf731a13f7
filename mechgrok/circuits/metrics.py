"""Metrics for patching and attribution: full logits ``[batch, pos, vocab]`` -> a scalar.

A metric reads the logits at each prompt's answer position (the EAP-IG / auto-circuit / MIB
convention; see :class:`~mechgrok.circuits.prompts.Prompts`) and returns a 0-d float64 tensor,
differentiable for gradient methods. Each constructor returns a :class:`Metric`:

- **bound** to its data: ``logit_diff(correct, incorrect)``, ``logit_diff(prompts)``;
- or **unbound**: ``logit_diff()``; ``discover(model, prompts, metric)`` binds it to the prompts
  (``metric.bind(prompts)`` does it by hand). ``kl_to()`` takes the clean logits from the clean run.

A metric bound to label tensors without prompts reads the last position. It also accepts logits
already taken at the answer positions, ``[batch, vocab]``. Any function of the full logits
returning a scalar tensor works too (``lambda logits: logits[:, -1, a].mean()``); the ``Metric``
attributes ``metric_name`` and ``higher_is_better`` (which way ACDC counts damage) are optional.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechgrok.circuits.prompts import Prompts

__all__ = ["Metric", "logit_diff", "prob", "kl_to", "loss", "generalization", "memorization", "check_metric",
           "scalar", "at_answers", "bind"]

_CONSTRUCTORS = ("logit_diff", "prob", "kl_to", "loss", "generalization", "memorization")
_SHAPE = "logits [batch, pos, vocab]"


def at_answers(logits: Tensor, answer_pos: Tensor | None, owner: str = "metric") -> Float[Tensor, "batch vocab"]:
    """``logits[i, answer_pos[i]]`` for every prompt ``i`` (the last position when ``answer_pos`` is
    None); logits already at the answers (``[batch, vocab]``) are returned as they are."""
    if not isinstance(logits, Tensor) or logits.ndim not in (2, 3):
        raise ValueError(f"{owner}: expected {_SHAPE} (or [batch, vocab] at the answer positions), got "
                         f"{list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if logits.ndim == 2:
        return logits
    if answer_pos is None or logits.shape[1] == 1:  # the last position, or a model predicting at one (HookedMLP)
        return logits[:, -1]
    if answer_pos.shape[0] != logits.shape[0]:
        raise ValueError(f"{owner}: the metric holds {answer_pos.shape[0]} answer positions but scores a batch of "
                         f"{logits.shape[0]}; build it from the prompts it scores")
    if int(answer_pos.max()) >= logits.shape[1]:
        raise ValueError(f"{owner}: an answer position is {int(answer_pos.max())} but the logits have "
                         f"{logits.shape[1]} positions")
    return logits[torch.arange(logits.shape[0], device=logits.device), answer_pos.to(logits.device)]


class Metric:
    """A scalar of the logits at the answer positions, with what it needs from the prompts.

    Attributes:
        metric_name: e.g. ``"logit_diff"`` (recorded in a circuit's provenance).
        higher_is_better: True when a larger value means more of the behaviour (ACDC's damage sign).
        needs: the prompt fields it reads (``"correct"``, ``"incorrect"``, ``"clean_logits"``).
        bound: whether its data are set (an unbound metric must be bound before it is called).
    """

    def __init__(self, name: str, higher_is_better: bool, fn: Callable[[Tensor, Mapping[str, Tensor]], Tensor],
                 needs: tuple[str, ...], data: Mapping[str, Tensor] | None = None, answer_pos: Tensor | None = None):
        self.metric_name, self.higher_is_better, self.needs = name, higher_is_better, needs
        self._fn, self._data, self.answer_pos = fn, dict(data) if data is not None else None, answer_pos

    @property
    def bound(self) -> bool:
        return self._data is not None

    def __repr__(self) -> str:
        return f"Metric({self.metric_name}, {'bound' if self.bound else 'unbound'})"

    def bind(self, prompts: Prompts, clean_logits: Tensor | None = None) -> Metric:
        """This metric reading ``prompts``' answers at their answer positions (``clean_logits``, the
        clean run's full logits, for ``kl_to()``)."""
        if not isinstance(prompts, Prompts):
            raise TypeError(f"bind needs a mechgrok.circuits.Prompts, got {type(prompts).__name__}")
        data = {}
        for k in self.needs:
            value = clean_logits if k == "clean_logits" else getattr(prompts, k)
            if value is None:
                how = ("pass the clean run's logits" if k == "clean_logits"
                       else f"build the prompts with {k}=... (one token per prompt)")
                raise ValueError(f"metric {self.metric_name} reads the prompts' {k}, which these prompts lack; {how}")
            data[k] = value
        answer_pos = prompts.answer_pos if prompts.n_pos > 1 else None
        if "clean_logits" in data:
            data["clean_logits"] = _log_probs(at_answers(data["clean_logits"].detach(), answer_pos, self.metric_name))
        return Metric(self.metric_name, self.higher_is_better, self._fn, self.needs, data, answer_pos)

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.bound:
            raise ValueError(f"metric {self.metric_name} is not bound to any prompts: pass it to "
                             f"mg.circuits.discover(model, prompts, metric), or call metric.bind(prompts) first")
        return self._fn(at_answers(logits, self.answer_pos, self.metric_name).double(), self._data)


def bind(metric: Callable, prompts: Prompts, clean_logits: Callable[[], Tensor] | None = None) -> Callable:
    """``metric`` ready for ``prompts``: an unbound ``Metric`` is bound to them (``clean_logits()``
    computes the clean run's logits when the metric needs them); anything else is returned as is."""
    check_metric(metric)
    if isinstance(metric, Metric) and not metric.bound:
        return metric.bind(prompts, clean_logits() if "clean_logits" in metric.needs and clean_logits else None)
    return metric


def check_metric(metric: object) -> Callable:
    """``metric`` if it is callable, else a ``TypeError`` that says how to build one."""
    if callable(metric):
        return metric
    hint = "e.g. mg.circuits.metrics.logit_diff()"
    if isinstance(metric, str):
        import difflib
        import inspect

        close = difflib.get_close_matches(metric, _CONSTRUCTORS, n=1, cutoff=0.5)
        if close:
            args = ", ".join(inspect.signature(globals()[close[0]]).parameters)
            hint = f"did you mean mg.circuits.metrics.{close[0]}({args})?"
        raise TypeError(f"metric must be a function {_SHAPE} -> scalar tensor, got the string {metric!r}; {hint}")
    raise TypeError(f"metric must be a function {_SHAPE} -> scalar tensor, got {type(metric).__name__}; {hint}")


def scalar(metric: Callable, logits: Tensor) -> Tensor:
    """``metric(logits)``, checked to be a one-element tensor (the convention of this module), so a
    metric that forgot to average over the batch fails here, saying what it returned."""
    value = metric(logits)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.reshape(())
    if callable(value):
        name = getattr(metric, "__name__", "metric")
        got = f"a function: was the constructor {name} passed instead of {name}(...)?"
    elif isinstance(value, Tensor):
        got = f"a tensor of shape {list(value.shape)}: reduce it over the batch (e.g. .mean())"
    else:
        got = f"{type(value).__name__} {value!r:.60}: return a torch tensor, so gradient methods can differentiate it"
    raise ValueError(f"a metric maps {_SHAPE} {list(logits.shape)} to a scalar (a 0-d tensor), but it returned "
                     f"{got} (see mechgrok.circuits.metrics)")


def _labels(labels, name: str, owner: str) -> Tensor:
    """``labels`` as a 1-D integer tensor of class indices >= 0."""
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        call = owner
        if owner in _CONSTRUCTORS:
            import inspect

            call = f"{owner}({', '.join(inspect.signature(globals()[owner]).parameters)})"
        hint = (f"; it looks like logits: was the constructor {owner} passed as the metric instead of {call}?"
                if t.ndim in (2, 3) and t.is_floating_point() else "")
        raise ValueError(f"{owner}: {name} must be a non-empty 1-D tensor of integer class indices (one per clean "
                         f"example), got dtype {t.dtype} and shape {tuple(t.shape)}{hint}")
    if int(t.min()) < 0:
        raise ValueError(f"{owner}: {name} must be class indices >= 0, got {int(t.min())}")
    return t.long()


def _check(answers: Tensor, labels: Tensor, owner: str) -> None:
    """The answer logits ``[n, vocab]`` must hold a row per label and a column for every label."""
    if answers.shape[0] != len(labels):
        raise ValueError(f"{owner}: the metric holds {len(labels)} labels but scores a batch of {answers.shape[0]}; "
                         "build it from the labels of the clean batch it scores")
    top = int(labels.max())
    if answers.shape[-1] <= top:
        raise ValueError(f"{owner}: a label is {top} but the logits have only {answers.shape[-1]} classes; the labels "
                         "come from another task than the model")


def _make(name: str, higher: bool, fn, needs: tuple[str, ...], args: tuple, owner: str) -> Metric:
    """A metric bound to ``args`` (label tensors, or one Prompts), or unbound when they are all None;
    ``needs`` names the prompt fields the arguments stand for."""
    import inspect

    params = list(inspect.signature(globals()[owner]).parameters)  # the names the caller used
    if len(args) >= 1 and isinstance(args[0], Prompts):
        if any(a is not None for a in args[1:]):
            raise TypeError(f"{owner}: pass either prompts or label tensors, not both")
        return Metric(name, higher, fn, needs).bind(args[0])
    if all(a is None for a in args):
        return Metric(name, higher, fn, needs)
    if any(a is None for a in args):
        for k, a in zip(params, args):  # a constructor called with logits: say so
            if a is not None:
                _labels(a, k, owner)
        raise TypeError(f"{owner}: give all of {params} (or prompts, or none to bind later)")
    data = {k: _labels(a, p, owner) for k, p, a in zip(needs, params, args)}
    if len({len(v) for v in data.values()}) > 1:
        raise ValueError(f"{owner}: " + " and ".join(f"{p} {list(v.shape)}" for p, v in zip(params, data.values()))
                         + " differ in length")
    return Metric(name, higher, fn, needs, data)


def _gather(answers: Tensor, labels: Tensor) -> Tensor:
    return answers.gather(-1, labels.to(answers.device)[:, None]).squeeze(-1)  # [batch]


def logit_diff(correct: Int[Tensor, " batch"] | Prompts | None = None,
               incorrect: Int[Tensor, " batch"] | None = None) -> Metric:
    """Mean of ``logit[correct] − logit[incorrect]`` at the answer positions (linear in the logits)."""
    def fn(a, d):
        _check(a, d["correct"], "logit_diff"), _check(a, d["incorrect"], "logit_diff")
        return (_gather(a, d["correct"]) - _gather(a, d["incorrect"])).mean()

    return _make("logit_diff", True, fn, ("correct", "incorrect"), (correct, incorrect), "logit_diff")


def prob(correct: Int[Tensor, " batch"] | Prompts | None = None) -> Metric:
    """Mean softmax probability of the correct answer."""
    def fn(a, d):
        _check(a, d["correct"], "prob")
        return _gather(torch.softmax(a, -1), d["correct"]).mean()

    return _make("prob", True, fn, ("correct",), (correct,), "prob")


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.double(), -1)


def kl_to(clean_logits: Float[Tensor, "batch pos vocab"] | Prompts | None = None) -> Metric:
    """Mean ``KL(p_clean ‖ p_patched)`` at the answer positions (0 on the clean run; ACDC's default,
    Conmy et al. 2023). ``clean_logits``: the clean run's full logits (or ``[batch, vocab]`` at the
    answers); None to take them from the clean run when bound."""
    if isinstance(clean_logits, Prompts):
        raise TypeError("kl_to needs the clean run's logits, not prompts: kl_to(clean_logits), or kl_to() to let "
                        "discover take them from the clean run")

    def fn(a, d):
        ref = d["clean_logits"]
        if a.shape != ref.shape:
            raise ValueError(f"kl_to: got answer logits of shape {list(a.shape)} but the clean ones are "
                             f"{list(ref.shape)}; build the metric from the clean batch it scores")
        return (ref.exp() * (ref - torch.log_softmax(a, -1))).sum(-1).mean()

    if clean_logits is None:
        return Metric("kl_to_clean", False, fn, ("clean_logits",))
    if not isinstance(clean_logits, Tensor) or clean_logits.ndim not in (2, 3) or not clean_logits.is_floating_point():
        raise ValueError("kl_to: clean_logits must be the clean run's logits, a float tensor [batch, pos, vocab] "
                         f"(or [batch, vocab]), got {getattr(clean_logits, 'shape', type(clean_logits).__name__)}")
    return Metric("kl_to_clean", False, fn, ("clean_logits",),
                  {"clean_logits": _log_probs(at_answers(clean_logits.detach(), None, "kl_to"))})


def loss(labels: Int[Tensor, " batch"] | Prompts | None = None) -> Metric:
    """Mean cross-entropy against ``labels`` (the prompts' ``correct`` answers)."""
    def fn(a, d):
        _check(a, d["correct"], "loss")
        return torch.nn.functional.cross_entropy(a, d["correct"].to(a.device))

    return _make("loss", False, fn, ("correct",), (labels,), "loss")


def generalization(labels: Int[Tensor, " batch"] | Prompts | None = None) -> Metric:
    """Correct-answer logit minus the mean logit, averaged over (held-out) examples."""
    def fn(a, d):
        _check(a, d["correct"], "generalization")
        return (_gather(a, d["correct"]) - a.mean(-1)).mean()

    return _make("generalization", True, fn, ("correct",), (labels,), "generalization")


def memorization(corrupted_labels: Int[Tensor, " batch"] | Prompts | None = None,
                 true_labels: Int[Tensor, " batch"] | None = None) -> Metric:
    """Corrupted-label (memorized) logit minus true-label logit, averaged over corrupted training
    examples (prompts: ``correct`` is the memorized label, ``incorrect`` the true one)."""
    def fn(a, d):
        _check(a, d["correct"], "memorization"), _check(a, d["incorrect"], "memorization")
        return (_gather(a, d["correct"]) - _gather(a, d["incorrect"])).mean()

    return _make("memorization", True, fn, ("correct", "incorrect"), (corrupted_labels, true_labels), "memorization")
