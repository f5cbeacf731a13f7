"""From attribution scores to circuits: discovery, faithfulness, and the grokking contrast.

- ``discover``: attribute, then select by top-k, threshold, a faithfulness target (greedy), or
  ACDC's own decisions; the circuit records its provenance and faithfulness.
- ``faithfulness``: ``(m(C) − m(∅)) / (m(full) − m(∅))`` with every component outside ``C``
  ablated (Conmy et al. 2023; Hanna et al. 2024).
- ``generalizing_vs_memorizing``: the same method and corruption run twice on a corrupted-label
  task, with the generalization metric on held-out examples and the memorization metric on
  corrupted training examples (Doshi et al. 2023's split, found by circuit discovery).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok import models
from mechgrok._config import check_float, check_int
from mechgrok.circuits import metrics as _metrics
from mechgrok.circuits.attribution import acdc_default_tau, acdc_kept, attribute, check_args
from mechgrok.circuits.circuit import Circuit, faithfulness_curve as _curve, select, select_greedy
from mechgrok.circuits.circuit import faithfulness as _faithfulness
from mechgrok.circuits.graph import graph as build_graph
from mechgrok.circuits.patching import Patcher
from mechgrok.circuits.prompts import Prompts, as_prompts, sample
from mechgrok.tasks import Task

__all__ = ["discover", "faithfulness", "faithfulness_curve", "circuit_metric", "contrast",
           "generalizing_vs_memorizing", "task_circuits"]


def _run_kwargs(p: Patcher, circuit: Circuit | None) -> dict[str, Any]:
    """``Patcher.run`` arguments that keep exactly ``circuit`` (None: keep nothing)."""
    g = p.graph
    kept = set() if circuit is None else set(circuit.components)
    if unknown := kept - set(g.components):  # they would be ignored: the circuit is of another graph
        raise ValueError(f"{len(unknown)} of the circuit's components are not in this model's {g.level}-level graph, "
                         f"e.g. {sorted(unknown)[:3]}; evaluate a circuit on the model it was found on")
    if g.level == "edge" and g.kind == "transformer":
        masks = p.all_masks(1.0)
        for e in g.edges:
            if e.name not in kept:
                masks[e.receiver][p.receivers[e.receiver].index(e.src)] = 0.0
        return {"masks": masks}
    if g.level == "edge":  # HookedMLP: ablate the source of every dropped edge
        return {"ablate_nodes": sorted({e.src for e in g.edges if e.name not in kept})}
    return {"ablate_nodes": [c for c in g.components if c not in kept]}


@torch.no_grad()
def circuit_metric(p: Patcher, metric: Callable[[Tensor], Tensor], circuit: Circuit | None) -> float:
    """The metric with only ``circuit`` kept (everything else ablated); None keeps nothing."""
    return float(_metrics.scalar(metric, p.run(**_run_kwargs(p, circuit))[0]))


def _endpoints(p: Patcher, metric) -> tuple[float, float]:
    _metrics.check_metric(metric)
    with torch.no_grad():
        full = float(_metrics.scalar(metric, p.run()[0]))
    empty = circuit_metric(p, metric, None)
    if not (math.isfinite(full) and math.isfinite(empty)):
        raise ValueError(f"the metric is {full} on the clean run and {empty} with everything ablated; it must be "
                         "finite (check its labels: they index the logits of the clean batch)")
    return full, empty


def _circuit_patcher(model: nn.Module, circuit: Circuit, prompts: Prompts, corruption: str) -> Patcher:
    """A Patcher over ``model``'s graph at ``circuit``'s level, refusing a circuit of another graph
    (whose components would otherwise be silently ignored)."""
    if not isinstance(circuit, Circuit):
        raise TypeError(f"circuit must be a mechgrok Circuit (from discover or select), got {type(circuit).__name__}")
    g = build_graph(model, circuit.level)
    if tuple(g.nodes) != tuple(circuit.graph_nodes):
        raise ValueError(f"the circuit was found on another graph ({len(circuit.graph_nodes)} nodes, e.g. "
                         f"{list(circuit.graph_nodes[:4])}) than this model's {circuit.level}-level graph "
                         f"({len(g.nodes)} nodes, e.g. {list(g.nodes[:4])}); evaluate it on the model it came from")
    return Patcher(model, g, prompts.clean, prompts.corrupted, corruption)


def faithfulness(model: nn.Module, circuit: Circuit, prompts: Prompts | Tensor, *args,
                 corruption: str = "resample") -> float:
    """``(m(C) − m(∅)) / (m(full) − m(∅))``: 1 for the full model, 0 with everything ablated.

    Called as ``faithfulness(model, circuit, prompts, metric)`` (or ``(model, circuit, clean,
    corrupted, metric)``); ``corruption`` may also be given positionally after the metric."""
    args, corruption = _trailing_corruption(args, corruption)
    prompts, metric = as_prompts(model, prompts, args, "faithfulness")
    p = _circuit_patcher(model, circuit, prompts, corruption)
    metric = _metrics.bind(metric, prompts, lambda: p.run()[0])
    full, empty = _endpoints(p, metric)
    return _faithfulness(circuit_metric(p, metric, circuit), empty, full)


def faithfulness_curve(model: nn.Module, circuit: Circuit, prompts: Prompts | Tensor, *args,
                       corruption: str = "resample", sizes=None) -> dict[str, Any]:
    """Faithfulness of the top-k circuits by ``circuit.scores`` over sizes k, and its area (called as
    ``faithfulness``)."""
    args, corruption = _trailing_corruption(args, corruption)
    prompts, metric = as_prompts(model, prompts, args, "faithfulness_curve")
    p = _circuit_patcher(model, circuit, prompts, corruption)
    metric = _metrics.bind(metric, prompts, lambda: p.run()[0])
    full, empty = _endpoints(p, metric)
    return _curve(p.graph, dict(circuit.scores),
                  lambda c: _faithfulness(circuit_metric(p, metric, c), empty, full), sizes)


def _trailing_corruption(args: tuple, corruption: str) -> tuple[tuple, str]:
    """The older positional form ``(..., metric, corruption)``: split the corruption name off."""
    if args and isinstance(args[-1], str):
        return args[:-1], args[-1]
    return args, corruption


def _digest(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _inputs_digest(prompts: Prompts) -> str:
    """A hash of the clean and corrupted tokens (and of the answer positions when not all last)."""
    last = bool((prompts.answer_pos == prompts.n_pos - 1).all())
    return _digest(prompts.clean, prompts.corrupted, None if last else prompts.answer_pos)


def discover(model: nn.Module, prompts: Prompts | Tensor, *args, method: str = "eap-ig", level: str = "edge",
             top_k: int | None = None, threshold: float | None = None, target: float | None = None,
             corruption: str = "resample", steps: int = 5, tau: float | None = None, progress: bool = True,
             provenance: dict[str, Any] | None = None) -> Circuit:
    """Attribute and select a circuit: ``discover(model, prompts, metric, ...)`` (or, as before
    prompts existed, ``discover(model, clean, corrupted, metric, ...)``).

    ``prompts`` is a ``mg.circuits.Prompts``; ``metric`` maps full logits ``[batch, pos, vocab]`` to
    a scalar (an unbound ``mg.circuits.metrics`` metric is bound to the prompts). Selection:
    ``top_k`` (largest |score|), ``threshold`` (|score| ≥ threshold), ``target`` (the smallest top-k
    circuit whose faithfulness reaches it), or, for ``method="acdc"`` with none of these, the
    components ACDC kept. Provenance records method, metric, corruption, level, selection,
    steps/tau, a hash of the inputs, the model spec and the circuit's faithfulness.
    """
    prompts, metric = as_prompts(model, prompts, args, "discover")
    if method != "acdc" and sum(x is not None for x in (top_k, threshold, target)) != 1:
        raise ValueError("give exactly one of top_k=, threshold= or target= (ACDC may use none)")
    steps, tau = check_args(method, metric, steps, tau)
    if provenance is not None and not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict of JSON values, got {type(provenance).__name__}")
    g = build_graph(model, level)
    if top_k is not None:
        top_k = check_int(top_k, "top_k", low=1, high=len(g), owner=f"discover ({level}-level graph of {len(g)} "
                          "components)")
    if threshold is not None:  # on |score|: a negative threshold would select everything
        threshold = check_float(threshold, "threshold", low=0.0, owner="discover (|score| >= threshold)")
    if target is not None:  # faithfulness: 1 is the full model, 0 everything ablated
        target = check_float(target, "target", low=0.0, high=1.0, low_open=True, owner="discover (faithfulness)")
    p = Patcher(model, g, prompts.clean, prompts.corrupted, corruption)
    metric = _metrics.bind(metric, prompts, lambda: p.run()[0])
    full, empty = _endpoints(p, metric)
    if method == "acdc" and tau is None:
        tau = acdc_default_tau(full, empty)
    scores = attribute(model, prompts, metric, method=method, level=level, corruption=corruption,
                       steps=steps, tau=tau, graph=g, progress=progress)
    try:  # how to rebuild the model (any HookedTransformer: its transformer-lens config)
        spec = models.spec(model)
    except (TypeError, ValueError):
        spec = None
    prov = {"method": method, "metric": getattr(metric, "metric_name", getattr(metric, "__name__", "custom")),
            "corruption": corruption, "level": level, "inputs_sha256": _inputs_digest(prompts),
            "n_examples": len(prompts), "model": spec, **(provenance or {})}
    if method == "eap-ig":
        prov["steps"] = steps
    if method == "acdc":
        prov["tau"] = tau

    def faith(c: Circuit) -> float:
        return _faithfulness(circuit_metric(p, metric, c), empty, full)

    if target is not None:
        circ = select_greedy(g, scores, faith, target=target, provenance=prov)
    elif method == "acdc" and top_k is None and threshold is None:
        circ = Circuit.from_graph(g, acdc_kept(scores, tau), scores, {**prov, "selection": f"acdc tau={tau:.4g}"})
    else:
        circ = select(g, scores, top_k=top_k, threshold=threshold, provenance=prov)
    return circ.with_provenance(faithfulness=faith(circ), metric_full=full, metric_empty=empty)


# ------------------------------------------------------------------------------------ grokking


def contrast(task: Task, split: str, n: int | None = 256, seed: int = 0,
             task_name: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clean inputs from ``split``, resampled counterfactual inputs, and their labels.

    Returns ``(clean, corrupted, labels, true_labels)``: up to ``n`` examples of ``split`` (seeded
    choice; only those of sub-task ``task_name`` of a multi-task mix when given), and for each a
    random other example of the same sub-task as its counterfactual, so resample ablation
    replaces the operands and keeps the op.
    """
    idx, other = sample(task, split, n, seed, task_name)
    return task.inputs[idx], task.inputs[other], task.labels[idx], task.true_labels[idx]


def task_circuits(model: nn.Module, task: Task, *, method: str = "eap-ig", level: str = "neuron",
                  top_k: int | None = None, target: float | None = 0.8, n: int = 256, seed: int = 0,
                  corruption: str = "resample", progress: bool = True) -> tuple[Circuit, Circuit | None]:
    """The generalizing circuit of ``task``, and its memorizing circuit when it has corrupted labels
    (else None). See ``generalizing_vs_memorizing`` for the metrics and the selection."""
    models.check_compatible(model, task)
    sel = {"top_k": top_k} if top_k is not None else {"target": target}
    common = dict(method=method, level=level, corruption=corruption, progress=progress, **sel)
    x, xc, y, _ = contrast(task, "test", n, seed)
    gen = discover(model, x, xc, _metrics.generalization(y), **common,
                   provenance={"role": "generalizing", "split": "test", "task": task.config})
    if not bool(task.train_corrupted.any()):
        return gen, None
    x, xc, y, y_true = contrast(task, "train_corrupted", n, seed)
    mem = discover(model, x, xc, _metrics.memorization(y, y_true), **common,
                   provenance={"role": "memorizing", "split": "train_corrupted", "task": task.config})
    return gen, mem


def generalizing_vs_memorizing(model: nn.Module, task: Task, *, method: str = "eap-ig", level: str = "neuron",
                               top_k: int | None = None, target: float | None = 0.8, n: int = 256, seed: int = 0,
                               corruption: str = "resample", progress: bool = True) -> tuple[Circuit, Circuit]:
    """The generalizing and the memorizing circuit of a corrupted-label model.

    Generalizing: generalization metric (correct logit minus mean logit) on held-out examples.
    Memorizing: memorization metric (corrupted-label logit minus true-label logit) on corrupted
    training examples. Same method, corruption and selection for both (default: the smallest
    top-k circuit with faithfulness ≥ 0.8). On 1-layer models the neuron level separates them.
    """
    if not bool(task.train_corrupted.any()):
        raise ValueError(f"task {task.name!r} has no corrupted labels: there is no memorizing circuit to find "
                         "(use task_circuits for the generalizing circuit alone)")
    return task_circuits(model, task, method=method, level=level, top_k=top_k, target=target, n=n, seed=seed,
                         corruption=corruption, progress=progress)
