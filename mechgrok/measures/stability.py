"""Softmax collapse and naïve loss minimization (Prieto, Barsbey, Mediano and Birdal 2025, "Grokking at
the edge of numerical stability", ICLR 2025).

Without weight decay, once a model fits its training set, cross-entropy keeps falling by scaling the
logits up: for a homogeneous model (``f(cθ) = c^k f(θ)``, e.g. a bias-free MLP) that is the
direction of the weights themselves, **naïve loss minimization (NLM)**. The logits grow until
floating-point absorption rounds ``Σ_j exp(z_j - max z)`` to exactly ``1``: **softmax collapse
(SC)**. The paper argues that this stops learning, and that StableMax (a softmax whose ``s(x)``
grows linearly, ``mechgrok.losses.stablemax``) or ⊥Grad (the gradient without its component along
the weights, ``TrainConfig(optimizer="adamw_orthograd")``) let grokking happen without weight decay.

- ``model_softmax_collapse(model, data)``: the share of examples whose softmax, computed in ``dtype``,
  gives the correct class probability exactly ``1`` (``mechgrok.losses.softmax_collapse(logits,
  labels)``, re-exported as ``mg.measures.softmax_collapse``, is the same share from given float32
  logits).
- ``nlm_alignment(model, data)``: ``cos(−∇_θ L, θ)`` over all parameters, the full-batch gradient
  of the loss against the weight vector. ``+1``: the gradient-descent step only scales the weights
  up (pure NLM); ``0``: it is orthogonal to them; ``−1``: it only shrinks them.
- ``stability_over_training(run)``: both (SC in float32 and float64) on every checkpoint of a run.
  ``mg.measures.progress(run)`` has the same numbers as its columns ``softmax_collapse``,
  ``softmax_collapse_float64`` and ``nlm_alignment`` (over a modular-arithmetic grid).

How these compare with the paper's released code (``logger.py``, read in the public fork
EIFY/grokking-at-the-edge-of-numerical-stability): its ``softmax_collapse`` is the share of training
examples with ``Σ_j exp(z_j - max z) == 1`` in the loss precision, and its ``zero_terms`` the share
whose loss is exactly ``0``. ``collapsed`` here is the second (the label's log-probability is exactly
0), which is the first restricted to examples with the label on top; they differ only right at the
threshold (tests/test_stability.py). The paper shows the gradient aligning with the NLM direction,
which it derives as ``θ`` itself for a positively homogeneous model; its released code holds no
implementation of that measure, so the choices here (the cosine of ``−∇L`` and ``θ``, all parameters
as one vector, the mean loss over the training split, eval mode) are mechgrok's.

What SC does to the gradient (measured with PyTorch's float32 cross-entropy, see
tests/test_stability.py): a collapsed example's loss is exactly ``0`` and the gradient on its correct
logit, ``p_y - 1``, is exactly ``0``; the gradients on the other logits, ``p_j = exp(z_j - max z)``,
stay nonzero but below ``2⁻²⁴`` each (zero only once ``exp`` underflows). The paper calls these
examples' gradient zero. SC needs a gap of at least ``24 ln 2 ≈ 16.64`` (float32) or
``53 ln 2 ≈ 36.74`` (float64) between the correct logit and every other one (more with many classes:
``(C - 1) e^{-gap} ≤ 2⁻²⁴``).

Limits:

- mechgrok trains with losses in float64 unless ``TrainConfig(loss_dtype="float32")``: in a float64
  run, float32 SC of its logits is a *diagnostic* of how large they have grown (what a float32 loss
  would have seen), not something that stopped its gradients; float64 SC is. In a float32 run the
  float32 SC is the one that zeroes gradients.
- The paper's own logger counts an example as collapsed whenever ``Σ_j exp(z_j - max z) == 1``,
  whichever class is the largest; here only the correct class counts (a confidently *wrong* example
  has a large gradient). On a fitted training set the two agree.
- ``θ`` is the NLM direction only for a homogeneous model. A transformer (biases, attention
  softmax, LayerNorm) is not homogeneous, so there ``nlm_alignment`` says how much the gradient
  step points along the weights (``d‖θ‖²/dt = −2⟨∇L, θ⟩`` under gradient flow: positive means the
  norm grows), not exactly how much it only scales the logits.
- It is a property of the gradient, not of the optimizer's step: AdamW divides each coordinate by
  its own second-moment estimate, so its step can point elsewhere.
- For a StableMax run the two collapse measures are about the *softmax* of its logits, which its
  loss does not use: StableMax's ``s(x)`` grows linearly, so its probability of the label rounds to
  1 only once ``Σ_{j≠y} s(z_j) < 2⁻²⁴ s(z_y)`` (float32; a gap of about ``(C − 1)·2²⁴`` when the other
  logits are near 0). High SC there means large logits, not zero gradients.
- ⊥Grad removes the component along the weights **per parameter tensor** before AdamW rescales
  it; ``nlm_alignment`` measures the raw loss gradient over all parameters at once, so it shows what
  the loss landscape asks for, not the step ⊥Grad took.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._threads import torch_threads
from mechgrok.losses import LOSSES, SC_DTYPES, _check_dtype, collapsed, loss_fn
from mechgrok.run import Run
from mechgrok.tasks import SequenceTask, Task

__all__ = ["model_softmax_collapse", "nlm_alignment", "nlm_alignment_on", "stability_over_training",
           "StabilityOverTraining", "collapsed", "SC_DTYPES", "STABILITY_FORMAT"]

STABILITY_FORMAT = "mechgrok.stability/1"
def _check_data(model: nn.Module, data: Any, owner: str) -> Task:
    if isinstance(data, SequenceTask):
        raise TypeError(f"{owner} reads one answer per example (a Task); {data.name!r} is a SequenceTask (a target "
                        "per position), which it does not support")
    if not isinstance(data, Task):
        raise TypeError(f"{owner}: data must be a mechgrok Task (e.g. run.task()), got {type(data).__name__}")
    models.check_compatible(model, data)
    return data


def _split(task: Task, split: str, owner: str) -> tuple[Tensor, Tensor]:
    """``(inputs [n, n_ctx], labels [n])`` of ``split``; an error for an empty one."""
    if not isinstance(split, str):
        raise TypeError(f"{owner}: split must be a split name such as 'train', got {split!r}")
    mask = task.mask(split)  # refuses unknown names, listing the valid ones
    if not bool(mask.any()):
        raise ValueError(f"{owner}: split {split!r} of task {task.name!r} has no examples; choose another split "
                         "('train', 'test', 'all', ...)")
    return task.inputs[mask], task.labels[mask]  # labels: the training targets (true labels outside train)


def _logits(model: nn.Module, inputs: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return models.final_logits(model, inputs.to(models.device_of(model)))  # [n, d_out]
    finally:
        model.train(was_training)


def model_softmax_collapse(model: nn.Module, data: Task, *, split: str = "train",
                           dtype: torch.dtype = torch.float32) -> float:
    """Share of ``split``'s examples whose softmax in ``dtype`` gives the correct class probability
    exactly 1 (softmax collapse, Prieto et al. 2025; module docstring).

    Args:
        model: a ``HookedTransformer`` or ``HookedMLP`` that fits ``data``.
        data: a ``Task``; the correct class is its training label (the true label outside ``train``).
        split: ``"train"`` (the paper's), ``"test"``, ``"train_clean"``, ``"train_corrupted"`` or ``"all"``.
        dtype: the precision of the softmax: ``torch.float32`` (the paper's setting; a logit gap of
            ≥ 16.64 collapses), ``torch.float64`` (mechgrok's loss precision; ≥ 36.74), float16 or bfloat16.

    Returns:
        A fraction in [0, 1]. One forward pass (no gradient).

    >>> from mechgrok import tasks, models
    >>> task = tasks.modular_arithmetic(p=5, op="add", train_frac=0.5, seed=0)
    >>> model_softmax_collapse(models.mlp(task, width=8), task)  # an untrained model: nothing collapsed
    0.0
    """
    _check_dtype(dtype)
    task = _check_data(model, data, "model_softmax_collapse")
    x, y = _split(task, split, "model_softmax_collapse")
    return float(collapsed(_logits(model, x), y, dtype).double().mean())


def _loss(loss: str | Callable, loss_dtype: str = "float64") -> Callable:
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a loss name ({sorted(LOSSES)}) or a function (logits, labels) -> scalar, "
                        f"got {loss!r}")
    return loss_fn(loss, loss_dtype)  # an unknown name or precision is an error listing the known ones


def nlm_alignment_on(model: nn.Module, x: Int[Tensor, "batch n_ctx"], y: Int[Tensor, " batch"], fn: Callable
                     ) -> float:
    """``nlm_alignment`` on given examples: ``cos(−∇_θ L, θ)`` of the loss ``fn(logits, y)`` (a scalar)
    on inputs ``x`` over every trainable parameter (float64 maths); no checks of ``x`` against the model.

    The logits are ``models.training_logits`` (what the training loop differentiates; no hooks are
    attached here), in eval mode (no dropout)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nlm_alignment: the model has no trainable parameters (requires_grad=False everywhere)")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            value = fn(models.training_logits(model, x.to(models.device_of(model))), y.to(models.device_of(model)))
            if value.ndim != 0:
                raise ValueError(f"nlm_alignment: the loss must be a scalar (the mean over the split), got shape "
                                 f"{tuple(value.shape)}")
            grads = torch.autograd.grad(value, params, allow_unused=True)  # leaves every p.grad untouched
    finally:
        model.train(was_training)
    dot = g2 = w2 = 0.0
    for p, g in zip(params, grads):
        w = p.detach().double().reshape(-1)
        w2 += float(w @ w)
        if g is not None:  # a parameter the loss does not reach has gradient 0
            g = g.double().reshape(-1)
            dot += float(g @ w)
            g2 += float(g @ g)
    if g2 == 0.0 or w2 == 0.0 or not (math.isfinite(dot) and math.isfinite(g2)):
        return float("nan")  # no gradient (or no weights): no direction to compare
    return -dot / math.sqrt(g2 * w2)


def nlm_alignment(model: nn.Module, data: Task, *, split: str = "train", loss: str | Callable = "cross_entropy",
                  loss_dtype: str = "float64") -> float:
    """Naïve-loss-minimization alignment: ``cos(−∇_θ L, θ)`` (Prieto et al. 2025; module docstring).

    ``L`` is the mean loss over ``split`` (full batch), ``θ`` every trainable parameter flattened into
    one vector. Sign: gradient descent steps along ``−∇L``, so ``+1`` means the step only scales the
    weights up (pure NLM: for a homogeneous model, only the logits grow), ``0`` a step orthogonal to
    the weights (what ⊥Grad enforces per tensor), ``−1`` a step that only shrinks them.

    Args:
        model: a ``HookedTransformer`` or ``HookedMLP`` that fits ``data`` (left unchanged: its
            ``.grad`` fields are not touched; evaluated in eval mode).
        data: a ``Task``.
        split: the examples of the loss (default ``"train"``: the training loss).
        loss: a name in ``mechgrok.losses.LOSSES`` (``"cross_entropy"``, ``"stablemax"``, ``"mse"``),
            computed in ``loss_dtype``, or a function ``(logits [n, d_out], labels [n]) -> scalar``.
        loss_dtype: the precision of a named loss, ``"float64"`` or ``"float32"`` (a run's
            ``TrainConfig.loss_dtype``); with float32, collapsed examples contribute no gradient.

    Returns:
        The cosine in [−1, 1]; NaN when the gradient (or every weight) is exactly zero. Costs one
        forward and one backward pass over the split.
    """
    fn = _loss(loss, loss_dtype)
    task = _check_data(model, data, "nlm_alignment")
    x, y = _split(task, split, "nlm_alignment")
    return nlm_alignment_on(model, x, y, fn)


@dataclass(frozen=True)
class StabilityOverTraining:
    """Softmax collapse and NLM alignment on the checkpoints of a run (``stability_over_training``).

    Attributes:
        run: the run folder.
        split: the examples measured.
        loss: the loss of the NLM gradient (the run's training loss unless given).
        loss_dtype: its precision (the run's ``loss_dtype``), None for a loss given as a function.
        steps: checkpoint steps, ascending.
        softmax_collapse: float32 SC per step (the paper's measure; a diagnostic of logit scale in a
            run trained with float64 losses, mechgrok's default).
        softmax_collapse_float64: float64 SC per step (what stops a float64 loss's gradient).
        nlm_alignment: ``cos(−∇L, θ)`` per step (NaN where the gradient is exactly 0).
        train_acc, test_acc: accuracies from the same forward pass (NaN for an empty split).
        weight_norm: ``‖θ‖₂`` per step.
    """

    run: str
    split: str
    loss: str
    loss_dtype: str | None
    steps: tuple[int, ...]
    softmax_collapse: tuple[float, ...]
    softmax_collapse_float64: tuple[float, ...]
    nlm_alignment: tuple[float, ...]
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    weight_norm: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one list per measure (NaN becomes ``None``) and ``"format"``."""
        def col(values):
            return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
        return {"format": STABILITY_FORMAT, "run": self.run, "split": self.split, "loss": self.loss,
                "loss_dtype": self.loss_dtype,
                "steps": list(self.steps),
                **{k: col(getattr(self, k)) for k in ("softmax_collapse", "softmax_collapse_float64",
                                                      "nlm_alignment", "train_acc", "test_acc", "weight_norm")}}

    def first_step(self, measure: str, at_least: float) -> int | None:
        """The first step whose ``measure`` (one of the per-step fields) is ≥ ``at_least``, or None."""
        if measure not in _SERIES:
            raise ValueError(f"unknown measure {measure!r}; choose one of {_SERIES}")
        return next((s for s, v in zip(self.steps, getattr(self, measure)) if v >= at_least), None)


_SERIES = ("softmax_collapse", "softmax_collapse_float64", "nlm_alignment", "train_acc", "test_acc", "weight_norm")


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean()) if len(labels) else float("nan")


def stability_over_training(run: Run | str, steps: Iterable[int] | None = None, *, split: str = "train",
                            loss: str | Callable | None = None, progress: bool = True, threads: int | None = 1
                            ) -> StabilityOverTraining:
    """``softmax_collapse`` (float32 and float64) and ``nlm_alignment`` on the checkpoints of ``run``.

    Args:
        run: a ``Run`` or its folder (a ``Task``-trained run: one answer per example).
        steps: checkpoint steps (default: every checkpoint).
        split: the examples of both measures (default ``"train"``).
        loss: the loss of the NLM gradient (default: the run's training loss, ``config.json``). A
            name is computed in the run's ``loss_dtype`` (float64 for runs that do not set it).
        progress: a tqdm bar over checkpoints.
        threads: torch threads meanwhile (restored afterwards; ``None`` leaves them).

    Returns:
        A ``StabilityOverTraining``. Per checkpoint: one model load, one forward pass over every
        example (SC, accuracies) and one forward and backward pass over ``split`` (NLM).
    """
    run = run if isinstance(run, Run) else Run(run)
    wanted = run.select_steps(steps, owner="stability_over_training")
    if loss is None:
        loss = run.config["train"].get("loss", "cross_entropy")
    dtype = run.config["train"].get("loss_dtype", "float64")  # absent: a float64 run (TrainConfig.to_dict)
    fn = _loss(loss, dtype)
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
    task = run.task()
    if isinstance(task, SequenceTask):
        raise TypeError(f"{run.path} trains a SequenceTask (next-token); stability_over_training reads one answer "
                        "per example (a Task-trained run)")
    mask = task.mask(split)
    if not bool(mask.any()):
        raise ValueError(f"split {split!r} of {run.path} has no examples; choose another split")
    cols: dict[str, list] = {k: [] for k in _SERIES}
    with torch_threads(threads):
        for step in tqdm(wanted, desc=f"stability {run.name}", unit="ckpt", disable=not progress):
            model = run.load_model(step)
            logits = _logits(model, task.inputs).cpu()  # [N, d_out], every example
            cols["softmax_collapse"].append(float(collapsed(logits[mask], task.labels[mask]).double().mean()))
            cols["softmax_collapse_float64"].append(
                float(collapsed(logits[mask], task.labels[mask], torch.float64).double().mean()))
            cols["train_acc"].append(_accuracy(logits[task.train], task.labels[task.train]))
            cols["test_acc"].append(_accuracy(logits[task.test], task.true_labels[task.test]))
            cols["nlm_alignment"].append(nlm_alignment_on(model, task.inputs[mask], task.labels[mask], fn))
            cols["weight_norm"].append(math.sqrt(sum(float((p.detach().double() ** 2).sum())
                                                     for p in model.parameters())))
    return StabilityOverTraining(run=str(run.path), split=split, loss=str(loss_name),
                                 loss_dtype=dtype if isinstance(loss, str) else None, steps=tuple(wanted),
                                 **{k: tuple(v) for k, v in cols.items()})
