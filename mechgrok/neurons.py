"""Neuron scores, memorizing/generalizing classification, and pruning.

Scores, one per MLP neuron of layer ``layer`` (hook ``blocks.{layer}.mlp.hook_post``) of a
``HookedMLP`` or of any ``HookedTransformer`` with MLPs (plain, gated, LayerNorm-activation; not
attention-only blocks nor mixtures of experts, which are refused with a message):

- ``ipr``: periodicity (Doshi et al. 2023, "To grok or not to grok"). Near 1 for a neuron tuned to
  one frequency (generalizing), near 0 for one whose weights are spread over all frequencies
  (memorizing). Only meaningful on modular arithmetic: any other task (knowledge, language
  corpora) is refused, pointing at the memorization score.
- ``memorization_score``: how much the neuron's direct contribution to the logits favours the
  corrupted label over the true label on corrupted training examples. It does not rely on
  periodicity, so it serves any task with corrupted (or otherwise "to be memorized") labels.

Interventions return edited copies (the caller's model is untouched): ``prune`` zeroes a
neuron's weights; ``ablate`` scales the neuron's entries of a hook's output (``blocks.L.mlp.hook_post``
by default), and takes any ``nn.Module`` by module path (``hook="transformer.h.0.mlp.act"`` of a
Hugging Face GPT-2). ``prune_sweep`` measures accuracy per split while pruning more and more
neurons in a chosen order.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._config import check_float, check_int
from mechgrok._threads import torch_threads
from mechgrok.capture import check_hook, edit_output
from mechgrok.models import device_of
from mechgrok.measures import grid_forward, neuron_ipr, task_grid
from mechgrok.measures.fourier import ipr as _ipr
from mechgrok.tasks import Task
from mechgrok.train import metrics_from_logits

__all__ = ["ipr", "memorization_score", "scores", "classify", "NeuronGroups", "prune", "ablate", "prune_sweep",
           "neuron_indices", "otsu_threshold", "direct_logit_map", "SWEEP_ORDERS"]

SWEEP_ORDERS = ("low-first", "random", "high-first")


def _mlp(model: nn.Module, layer: int) -> nn.Module:
    if not isinstance(model, (models.HookedTransformer, models.HookedMLP)):
        raise TypeError(f"neuron scores and prune need a HookedTransformer or HookedMLP, got {type(model).__name__}; "
                        "convert a Hugging Face model with mg.models.from_pretrained, or ablate neurons of any "
                        "module's output with mg.neurons.ablate(model, neurons, hook='path.to.module')")
    check_int(layer, "layer")
    if not 0 <= layer < models.n_layers(model):
        raise ValueError(f"layer {layer} does not exist; the model has {models.n_layers(model)} layer(s) "
                         f"(layer in [0, {models.n_layers(model) - 1}])")
    mlp = getattr(model.blocks[layer], "mlp", None)
    if mlp is None:
        raise ValueError(f"blocks.{layer} has no MLP (an attention-only model has no neurons to score or prune)")
    if not hasattr(mlp, "W_in"):
        raise ValueError(f"blocks.{layer}.mlp is a {type(mlp).__name__} without W_in (a mixture of experts?); "
                         "ablate one expert's neurons with mg.neurons.ablate(model, neurons, hook=...) on its hook_post")
    return mlp


def direct_logit_map(model: nn.Module, layer: int = 0) -> Float[Tensor, "d_mlp d_out"]:
    """Each neuron's direct effect on the logits per unit activation: ``W_out`` for the MLP,
    ``W_out @ W_U`` for a transformer (ignores later layers and any final LayerNorm)."""
    W_out = _mlp(model, layer).W_out.detach()  # [d_mlp, d_model or d_out]
    if isinstance(model, models.HookedTransformer):
        return W_out @ model.W_U.detach()  # [d_mlp, d_vocab_out]
    return W_out


@torch.no_grad()
def _activations(model: nn.Module, inputs: Tensor, layer: int) -> Float[Tensor, "batch d_mlp"]:
    """Neuron activations at the answer position, ``[batch, d_mlp]``."""
    name = models.mlp_hook(layer)
    _, cache = model.run_with_cache(inputs.to(device_of(model)), names_filter=name)
    act = cache[name]
    return act[:, -1] if act.ndim == 3 else act


def _check_single_op(task: Task) -> None:
    """Refuse IPR on anything but one modular-arithmetic operation, where periodicity means nothing."""
    kind = (task.config or {}).get("kind")
    instead = ("use the memorization score instead (score='memorization', neurons.memorization_score), which needs "
               "corrupted or otherwise to-be-memorized labels")
    if kind not in (None, "modular_arithmetic", "multi_task") or (kind is None and "op" not in (task.config or {})):
        what = repr(kind) if kind else "not marked as modular arithmetic (a hand-built one: give it config={'kind': " \
            "'modular_arithmetic', 'op': ...})"
        raise ValueError(f"IPR scores periodicity over Z_p and only means something on modular arithmetic; task "
                         f"{task.name!r} is {what}: {instead}")
    if len(task.task_names) != 1:
        raise ValueError(f"IPR scores need a single modular operation; task {task.name!r} mixes "
                         f"{task.task_names}: build a single-op task, or {instead}")


@torch.no_grad()
def ipr(model: nn.Module, task: Task, layer: int = 0) -> Float[Tensor, " d_mlp"]:
    """Periodicity score of each MLP neuron: the mean of three IPRs (Doshi et al. 2023).

    - HookedMLP: IPR of the neuron's input weights from ``a`` (``W_in[:p, n]``), from ``b``
      (``W_in[p:2p, n]``) and of its output weights (``W_out[n]``), as in Doshi et al.
    - Transformer: IPR of the neuron's activation (answer position, full ``(a, b)`` grid) along
      ``a`` and along ``b`` (``mechgrok.measures.neuron_ipr``, weighted as two of the three parts),
      and of its direct path to the logits (``(W_out W_U)[n]``); the constant frequency is left out
      of all three, since a ReLU activation's positive mean would otherwise dominate.

    Returns ``[d_mlp]`` in [1/(p//2+1), 1]. Limits: IPR sees concentration in frequency only; on a
    1-layer transformer a neuron can be periodic in ``a + b`` while its marginals are flat.
    """
    _check_single_op(task)
    models.check_compatible(model, task)  # a model of another p would be sliced silently wrong
    p = task.p
    mlp = _mlp(model, layer)
    if isinstance(model, models.HookedMLP):
        W_in, W_out = mlp.W_in.detach(), mlp.W_out.detach()  # [2p, d_mlp], [d_mlp, d_out]
        parts = [_ipr(W_in[:p].T), _ipr(W_in[p:].T), _ipr(W_out)]
    else:
        hook = models.mlp_hook(layer)
        _, acts = grid_forward(model, task_grid(task), [hook])  # {hook: [p, p, d_mlp]}
        act_ipr = neuron_ipr(acts[hook])  # [d_mlp], mean of the IPRs along a and along b
        D = direct_logit_map(model, layer)  # [d_mlp, d_vocab_out]
        parts = [act_ipr.to(D.device), act_ipr.to(D.device), _ipr(D, exclude_constant=True)]
    return torch.stack(parts).mean(0).float().cpu()


@torch.no_grad()
def memorization_score(model: nn.Module, task: Task, layer: int = 0) -> Float[Tensor, " d_mlp"]:
    """How much each neuron pushes corrupted labels over true labels on corrupted training examples.

    ``m_n = mean_i act_n(x_i) · (D[n, ỹ_i] − D[n, y_i])`` over corrupted training examples ``i``,
    with ``ỹ`` the corrupted and ``y`` the true label and ``D = direct_logit_map`` (logit units:
    the neuron's average direct contribution to the corrupted-minus-true logit difference).
    Positive: the neuron helps memorize corrupted labels. Task-agnostic (no periodicity), in the
    spirit of the memorization localisation of Doshi et al. 2023. Limits: direct path only.
    """
    models.check_compatible(model, task)
    _mlp(model, layer)  # a layer with neurons, or a clear error
    c = task.train_corrupted
    if not bool(c.any()):
        raise ValueError(f"task {task.name!r} has no corrupted training labels, so there is nothing to "
                         "score memorization against (build it with corrupt_frac > 0)")
    act = _activations(model, task.inputs[c], layer).double()  # [n_corr, d_mlp]
    D = direct_logit_map(model, layer).double().to(act.device)  # [d_mlp, d_out]
    diff = D[:, task.labels[c].to(act.device)] - D[:, task.true_labels[c].to(act.device)]  # [d_mlp, n_corr]
    return (act.T * diff).mean(1).float().cpu()


_SCORES = {"ipr": ipr, "memorization": memorization_score}


def scores(model: nn.Module, task: Task, score: str = "ipr", layer: int = 0) -> Tensor:
    """Dispatch to a named score (``"ipr"`` or ``"memorization"``)."""
    if score not in _SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {sorted(_SCORES)}")
    return _SCORES[score](model, task, layer)


def otsu_threshold(x: Tensor, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of a 1-D sample and its separability ``η = σ²_between / σ²_total`` in [0, 1].

    The threshold maximises the between-class variance of the two groups it makes (the middle of
    the gap when several thresholds make the same groups); ``η`` near 1
    means a clearly bimodal sample, near 0 a unimodal one (then the split is arbitrary).
    """
    bins = check_int(bins, "bins", low=2)
    x = x.detach().double().flatten()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"otsu_threshold needs a non-empty sample of finite numbers, got {x.numel()} values"
                         + ("" if x.numel() == 0 else f", {int((~torch.isfinite(x)).sum())} of them not finite"))
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return lo, 0.0
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:-1]  # candidate thresholds
    below = x[None, :] < edges[:, None]  # [bins-1, n]
    w0 = below.double().mean(1)
    w1 = 1 - w0
    s0 = (x[None, :] * below).sum(1)
    s1 = (x[None, :] * ~below).sum(1)
    m0 = s0 / below.sum(1).clamp(min=1)
    m1 = s1 / (~below).sum(1).clamp(min=1)
    between = w0 * w1 * (m0 - m1) ** 2
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).flatten()
    i = int(best[len(best) // 2])  # the middle of the plateau of equally good thresholds (an empty gap)
    return float(edges[i]), float(between[i] / x.var(unbiased=False))


@dataclass(frozen=True)
class NeuronGroups:
    """Neurons of one layer split into memorizing / generalizing by a documented rule."""

    memorizing: tuple[int, ...]
    generalizing: tuple[int, ...]
    scores: Tensor  # [d_mlp]
    score: str  # "ipr" | "memorization"
    threshold: float
    separability: float  # Otsu's η of the scores (near 1: clearly bimodal)
    rule: str
    layer: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"memorizing": list(self.memorizing), "generalizing": list(self.generalizing),
                "scores": self.scores.tolist(), "score": self.score, "threshold": self.threshold,
                "separability": self.separability, "rule": self.rule, "layer": self.layer}


def classify(model: nn.Module, task: Task, score: str = "ipr", threshold: float | None = None,
             layer: int = 0) -> NeuronGroups:
    """Split the neurons of ``layer`` into memorizing and generalizing.

    Rule: with ``score="ipr"`` a neuron memorizes when its IPR is below the threshold; with
    ``score="memorization"`` when its memorization score is above it. The threshold defaults to
    Otsu's threshold of the scores (the split that maximises between-group variance, natural for the
    bimodal IPR distribution Doshi et al. report); ``separability`` says how bimodal the scores are.
    Dead neurons (all-zero weights) count as generalizing under IPR only if their score says so.
    """
    if threshold is not None:  # IPR lies in (0, 1]; a memorization score is in logit units
        threshold = (check_float(threshold, "threshold", low=0.0, high=1.0, owner="classify(score='ipr')")
                     if score == "ipr" else check_float(threshold, "threshold", owner=f"classify(score={score!r})"))
    s = scores(model, task, score, layer)
    t, eta = otsu_threshold(s)
    if threshold is not None:
        t = threshold
    mem = (s < t) if score == "ipr" else (s > t)
    how = "Otsu's threshold" if threshold is None else "a given threshold"
    cmp = "<" if score == "ipr" else ">"
    rule = f"memorizing if {score} score {cmp} {t:.4g} ({how}); generalizing otherwise"
    idx = torch.arange(len(s))
    return NeuronGroups(tuple(idx[mem].tolist()), tuple(idx[~mem].tolist()), s, score, t, eta, rule, layer)


def prune(model: nn.Module, neurons: Sequence[int], layer: int = 0) -> nn.Module:
    """A copy of ``model`` with ``neurons`` of ``layer`` removed: their input weights (``W_in``, a
    gated MLP's ``W_gate``, the input bias) and output weights set to zero. The original model is
    untouched. For a LayerNorm activation (``solu_ln``), whose normalisation mixes all neurons,
    only the output weights are zeroed, so the other neurons compute what they did. In every case
    the effect equals zeroing the neurons' entries of ``blocks.{layer}.mlp.hook_post`` (``ablate``).
    """
    idx = neuron_indices(model, neurons, layer)
    pruned = copy.deepcopy(model)
    mlp = _mlp(pruned, layer)
    ln_act = isinstance(model, models.HookedTransformer) and model.cfg.is_layer_norm_activation()
    with torch.no_grad():
        mlp.W_out[idx.to(mlp.W_out.device), :] = 0
        for name in () if ln_act else ("W_in", "W_gate"):
            if getattr(mlp, name, None) is not None:
                getattr(mlp, name)[:, idx.to(mlp.W_out.device)] = 0
        if not ln_act and getattr(mlp, "b_in", None) is not None:
            mlp.b_in[idx.to(mlp.b_in.device)] = 0
    return pruned


def ablate(model: nn.Module, neurons: Sequence[int] | Tensor, *, hook: str | None = None, layer: int = 0,
           scale: float = 0.0) -> nn.Module:
    """A copy of ``model`` whose ``neurons`` (entries of the last dimension of ``hook``'s output, at
    every position) are multiplied by ``scale`` (0, the default: zero-ablation). The original is
    untouched; the copy goes into any analysis (``mg.evaluate``, ``mg.capture``, circuits).

    Args:
        model: a ``HookedTransformer`` / ``HookedMLP`` (``hook`` defaults to
            ``blocks.{layer}.mlp.hook_post``, and ablating there equals ``prune``), or any
            ``nn.Module`` with ``hook`` naming a submodule, e.g. ``"transformer.h.0.mlp.act"`` (the
            4·d_model GELU outputs of a Hugging Face GPT-2 MLP).
        neurons: distinct indices ``>= 0`` (``neuron_indices``); checked against the output's width
            when the copy runs if the model does not say it beforehand.
        hook: a hook name or module path (``mechgrok.capture.check_hook``: "did you mean").
        scale: the factor (0 removes, 2 doubles).

    Limits: the edit is a forward hook on the copy (``capture.edit_output``), not a change of the
    weights; ``prune`` edits the weights of mechgrok / transformer-lens models instead.
    """
    scale = check_float(scale, "scale", owner="neurons.ablate (0 removes the neurons, 1 changes nothing)")
    if hook is None:
        if not isinstance(model, (models.HookedTransformer, models.HookedMLP)):
            raise ValueError(f"name the module whose output holds the neurons, e.g. hook='transformer.h.0.mlp.act' for "
                             f"a Hugging Face GPT-2; a {type(model).__name__} has no blocks.L.mlp.hook_post")
        hook = models.mlp_hook(layer)
    check_hook(model, hook)
    mlp_layer = re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_post", hook)
    if mlp_layer and isinstance(model, (models.HookedTransformer, models.HookedMLP)):
        idx = neuron_indices(model, neurons, int(mlp_layer.group(1)))
    else:
        idx = _indices(neurons, None, f"the output of {hook!r}")

    def fn(act: Tensor) -> Tensor:  # [..., width]
        if idx.numel() and int(idx.max()) >= act.shape[-1]:
            raise ValueError(f"neuron {int(idx.max())} does not exist: the output of {hook!r} has {act.shape[-1]} "
                             f"entries on its last dimension (shape {tuple(act.shape)})")
        factor = torch.ones(act.shape[-1], device=act.device, dtype=act.dtype)
        factor[idx.to(act.device)] = scale
        return act * factor

    return edit_output(model, hook, fn)


def neuron_indices(model: nn.Module, neurons: Sequence[int] | Tensor, layer: int = 0) -> Tensor:
    """``neurons`` as a LongTensor of distinct neuron indices of ``layer``'s MLP, or a clear error.

    Accepts a sequence of ints (numpy ints too) or a 1-D integer tensor / array. Refuses bools,
    floats (``1.5`` is not neuron 1), negative indices (no counting from the end), indices ≥ the
    layer's width, and repeats (a list built by concatenating groups that overlap).
    """
    width = _mlp(model, layer).W_in.shape[1]
    size = f"width={width}" if isinstance(model, models.HookedMLP) else f"d_mlp={width}"
    return _indices(neurons, width, f"layer {layer} has {size}")


def _indices(neurons: Sequence[int] | Tensor, width: int | None, where: str) -> Tensor:
    """``neuron_indices`` for a known ``width`` or, with ``width=None``, any index ``>= 0``."""
    if isinstance(neurons, (int, float, str, bytes)) or not hasattr(neurons, "__len__"):
        raise TypeError(f"neurons must be a list of neuron indices, e.g. [{neurons!r}], got {type(neurons).__name__}")
    if isinstance(neurons, Tensor) or hasattr(neurons, "dtype"):  # a tensor or numpy array
        t = torch.as_tensor(neurons)
        if t.ndim != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"neurons must be a 1-D tensor of integer indices, got dtype {t.dtype} and shape "
                            f"{tuple(t.shape)} (for a boolean mask m pass m.nonzero().flatten())")
        values = t.tolist()
    else:
        values = [check_int(i, f"neurons[{j}]") for j, i in enumerate(neurons)]
    if bad := [i for i in values if not 0 <= i < (width if width is not None else float("inf"))]:
        span = f"[0, {width})" if width is not None else ">= 0 (no counting from the end)"
        raise ValueError(f"neuron indices must lie in {span} ({where}), got {bad[:10]}")
    if len(set(values)) < len(values):
        twice = sorted({i for i in values if values.count(i) > 1})
        raise ValueError(f"neurons {twice[:10]} are listed more than once; pass each neuron once "
                         "(e.g. sorted(set(neurons)))")
    return torch.tensor(values, dtype=torch.long)


@torch.no_grad()
def _mlp_post(model: nn.Module, task: Task) -> Tensor | None:
    """A HookedMLP's ``hook_post`` activations on every example ``[N, width]`` (computed once for a
    pruning sweep: what follows them is one matmul), or None for other models."""
    if not isinstance(model, models.HookedMLP):
        return None
    seen: dict[str, Tensor] = {}

    def grab(act, hook):
        seen["post"] = act
        return act

    with model.hooks(fwd_hooks=[(models.mlp_hook(0), grab)]):
        model(task.inputs.to(device_of(model)))
    return seen["post"]


@torch.no_grad()
def _masked_metrics(model: nn.Module, task: Task, layer: int, keep: Tensor, loss: str,
                    post: Tensor | None = None) -> dict:
    """Per-split metrics with the neurons where ``keep`` is False zeroed at ``hook_post``
    (equivalent to ``prune``: zeroing a neuron's output removes all of its effect). ``post``: a
    HookedMLP's cached ``hook_post`` (``_mlp_post``); the rest of its forward is then the same
    arithmetic as ``_MLPLayer.forward`` after the hook, so the numbers are the same."""
    if post is not None:
        mlp = _mlp(model, 0)
        logits = (post * keep.to(post.device, post.dtype)) @ mlp.W_out
        logits = logits + mlp.b_out if mlp.b_out is not None else logits
        return metrics_from_logits(logits.cpu(), task, loss)

    def hook(act, hook):  # act: [batch, (pos,) d_mlp]
        return act * keep.to(act.device, act.dtype)

    with model.hooks(fwd_hooks=[(models.mlp_hook(layer), hook)]):
        logits = models.final_logits(model, task.inputs.to(device_of(model)))
    return metrics_from_logits(logits.cpu(), task, loss)


def prune_sweep(model: nn.Module, task: Task, order: str | Tensor = "ipr", *, counts: Sequence[int] | None = None,
                orders: Sequence[str] = SWEEP_ORDERS, seeds: Sequence[int] = (0, 1, 2), layer: int = 0,
                loss: str = "cross_entropy", progress: bool = True, threads: int | None = 1) -> list[dict[str, Any]]:
    """Accuracy per split as more and more neurons are pruned.

    Args:
        order: the score that orders neurons: ``"ipr"``, ``"memorization"``, or a ``[d_mlp]`` tensor.
        counts: numbers of neurons to prune (default: 0 to all, 21 evenly spaced values).
        orders: ``"low-first"`` (ascending score: for IPR, the least periodic first), ``"random"``
            (one ordering per seed), ``"high-first"``.
        seeds: seeds of the random orderings.
        threads: torch threads during the sweep (restored afterwards; None leaves them).

    Returns:
        One row per (order, seed, count): ``{"order", "seed", "n_pruned", "frac_pruned", "score",
        "<split>_acc", "<split>_loss"}`` for the splits of ``mechgrok.evaluate``. The pruned set of a
        row contains that of every smaller count of the same ordering (nested prefixes).
    """
    n = _mlp(model, layer).W_in.shape[1]
    if isinstance(orders, str) or not orders:
        raise ValueError(f"orders must be a non-empty list drawn from {SWEEP_ORDERS}, got {orders!r}"
                         + (f"; write [{orders!r}]" if isinstance(orders, str) else ""))
    bad = sorted(set(orders) - set(SWEEP_ORDERS))
    if bad:
        raise ValueError(f"unknown orders {bad}; choose from {SWEEP_ORDERS}")
    if counts is None:
        counts = sorted({int(round(x)) for x in torch.linspace(0, n, 21).tolist()})
    else:
        counts = sorted({check_int(k, "counts", low=0, high=n, owner=f"prune_sweep (layer {layer} has {n} neurons)")
                         for k in counts})
        if not counts:
            raise ValueError(f"counts is empty; give numbers of neurons to prune in [0, {n}], or None for 21 of them")
    seeds = [check_int(seed, "seeds", low=0) for seed in seeds] if "random" in orders else list(seeds)
    if "random" in orders and not seeds:
        raise ValueError("orders include 'random' but seeds is empty; give at least one seed")
    s = order if isinstance(order, Tensor) else scores(model, task, order, layer)
    name = "custom" if isinstance(order, Tensor) else order
    if s.shape != (n,):
        raise ValueError(f"scores must have shape [{n}], got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("the scores that order the neurons must be finite (a NaN would put its neuron anywhere)")
    perms: list[tuple[str, int | None, Tensor]] = []
    for o in orders:
        if o == "random":
            perms += [(o, seed, torch.randperm(n, generator=torch.Generator().manual_seed(seed))) for seed in seeds]
        else:
            perms.append((o, None, torch.argsort(s, descending=(o == "high-first"), stable=True)))
    rows = []
    with torch_threads(threads), tqdm(total=len(perms) * len(counts), disable=not progress, desc="prune sweep") as bar:
        post = _mlp_post(model, task)  # a HookedMLP: its first layer once, not once per row
        for o, seed, perm in perms:
            for k in counts:
                keep = torch.ones(n, dtype=torch.bool)
                keep[perm[:k]] = False
                metrics = _masked_metrics(model, task, layer, keep, loss, post)
                row = {"order": o, "seed": seed, "n_pruned": k, "frac_pruned": k / n, "score": name}
                for split, m in metrics.items():
                    row[f"{split}_acc"], row[f"{split}_loss"] = m["acc"], m["loss"]
                rows.append(row)
                bar.update(1)
    return rows
