"""Attribution of a metric to the components of a model's graph: exact patching, EAP, EAP-IG, ACDC.

Every method estimates, for each component ``c`` (an edge, a node or a neuron),
``score(c) = m(c ablated) − m(clean)``: how much the metric moves when ``c`` alone takes its
corrupted value. Large ``|score|`` means important.

- ``exact``: activation / edge patching, one forward per component (the oracle).
- ``eap`` (Syed et al. 2023, "Attribution patching outperforms automated circuit discovery"):
  ``score(u→v) = (out_u^corr − out_u^clean) · ∂m/∂x_v`` with the gradient on the clean run; one
  forward and one backward. Exact for edges into the logits of a model without LayerNorm when
  ``m`` is linear in the logits (logit difference).
- ``eap-ig`` (Hanna et al. 2024, "Have faith in faithfulness"): the same with the gradient averaged
  over ``steps`` runs whose input embedding is interpolated, ``corr + (k/steps)(clean − corr)``.
- ``acdc`` (Conmy et al. 2023, "Towards automated circuit discovery"): greedy; receivers from the
  logits backwards, each incoming edge removed for good when the metric gets worse by less than
  ``tau``. Its scores are the damage measured when each edge was tried (in context, so they depend
  on the order); the edges it kept are ``acdc_kept(scores)``.

Node and neuron scores of EAP / EAP-IG use the gradient at the node's output, which equals the sum
of its outgoing edges' scores (the residual stream is a sum).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok._config import check_float, check_int
from mechgrok._threads import torch_threads
from mechgrok.circuits.graph import Graph, graph as build_graph
from mechgrok.circuits.metrics import bind, check_metric, scalar
from mechgrok.circuits.patching import Patcher, frozen, receiver_hook
from mechgrok.circuits.prompts import Prompts, as_prompts

__all__ = ["attribute", "METHODS", "acdc_kept", "acdc_default_tau"]

METHODS = ("exact", "eap", "eap-ig", "acdc")


def attribute(model: nn.Module, prompts: Prompts | Tensor, *args, method: str = "eap-ig", level: str = "edge",
              corruption: str = "resample", steps: int = 5, tau: float | None = None, graph: Graph | None = None,
              progress: bool = True, threads: int | None = 1) -> dict[str, float]:
    """Score every component of ``graph(model, level)`` (see the module docstring).

    Called as ``attribute(model, prompts, metric, ...)`` (or, as before prompts existed,
    ``attribute(model, clean, corrupted, metric, ...)``).

    Args:
        model: a HookedTransformer (any pre-norm config; see ``mechgrok.circuits.patching``) or HookedMLP.
        prompts: ``mg.circuits.Prompts``: clean and corrupted tokens ``[batch, pos]``, answer positions
            and answers; ``corrupted`` may be None with ``corruption="mean"|"zero"``.
        metric: full logits ``[batch, pos, vocab] -> scalar`` (see ``mechgrok.circuits.metrics``); an
            unbound metric (``metrics.logit_diff()``) is bound to ``prompts``.
        method: ``"exact" | "eap" | "eap-ig" | "acdc"``.
        level: ``"edge" | "node" | "neuron"``.
        steps: interpolation steps of EAP-IG.
        tau: ACDC's threshold (default: 1% of ``|m(clean) − m(all ablated)|``).
        threads: torch threads meanwhile (restored afterwards; None leaves them).

    Returns:
        ``{component: score}`` in graph order.
    """
    prompts, metric = as_prompts(model, prompts, args, "attribute")
    steps, tau = check_args(method, metric, steps, tau)
    g = build_graph(model, level) if graph is None else _check_graph(model, graph, level)
    with torch_threads(threads):
        p = Patcher(model, g, prompts.clean, prompts.corrupted, corruption)
        metric = bind(metric, prompts, lambda: p.run()[0])
        if method == "exact":
            scores = _exact(p, metric, progress)
        elif method in ("eap", "eap-ig"):
            scores = _gradient(p, metric, steps if method == "eap-ig" else None)
        else:
            scores = _acdc(p, metric, tau, progress)
    return {c: float(scores[c]) for c in g.components}


def check_args(method: str, metric: Callable, steps: int, tau: float | None) -> tuple[int, float | None]:
    """Check ``attribute``'s method, metric, ``steps`` (an integer >= 1) and ``tau`` (None or a finite
    number >= 0) before anything runs; return ``steps`` and ``tau`` as ``int`` / ``float``."""
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(method), METHODS, n=1)
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    check_metric(metric)
    steps = check_int(steps, "steps", low=1, owner="EAP-IG interpolation")
    if tau is not None:  # ACDC keeps an edge when removing it costs at least tau: tau < 0 keeps everything
        tau = check_float(tau, "tau", low=0.0, owner="ACDC threshold")
    return steps, tau


def _check_graph(model: nn.Module, g: Graph, level: str) -> Graph:
    """``g`` if it is ``model``'s graph (same nodes), else a ValueError: scores of another model's
    graph would be computed on whatever hooks happen to share its names."""
    if not isinstance(g, Graph):
        raise TypeError(f"graph must be a mechgrok.circuits.Graph (from graph(model, level)), got {type(g).__name__}")
    mine = build_graph(model, g.level, positions=bool(g.positions))
    if mine.nodes != g.nodes:
        raise ValueError(f"graph= is not this model's {g.level}-level graph ({len(g.nodes)} nodes vs {len(mine.nodes)}); "
                         "pass graph(model, level) of the model being attributed, or leave graph=None")
    if g.level != level:
        raise ValueError(f"graph= is at level {g.level!r} but level={level!r}; pass one level")
    return g


def _ablate_component(p: Patcher, comp: str) -> dict:
    """``run`` keyword arguments that ablate one component."""
    if p.graph.level == "edge" and p.graph.kind == "transformer":
        e = p.graph.edge_index[comp]
        mask = torch.ones(len(p.receivers[e.receiver]))
        mask[p.receivers[e.receiver].index(e.src)] = 0
        return {"masks": {e.receiver: mask}}
    if p.graph.level == "edge":  # HookedMLP: each node has one outgoing edge
        return {"ablate_nodes": [p.graph.edge_index[comp].src]}
    return {"ablate_nodes": [comp]}


@torch.no_grad()
def _exact(p: Patcher, metric, progress: bool) -> dict[str, float]:
    base = float(scalar(metric, p.run()[0]))
    out = {}
    for c in tqdm(p.graph.components, disable=not progress, desc="exact patching"):
        out[c] = float(scalar(metric, p.run(**_ablate_component(p, c))[0])) - base
    return out


def _gradient(p: Patcher, metric, steps: int | None) -> dict[str, float]:
    """EAP (steps=None) or EAP-IG: gradients at receivers (edges) or at node outputs (nodes,
    neurons), averaged over the interpolation steps, dotted with the corrupted-minus-clean deltas.
    No forward here patches a head's input, so none splits the heads' inputs
    (``Patcher.receiver_grads``)."""
    g = p.graph
    edge_level = g.level == "edge" and g.kind == "transformer"
    alphas = [None] if steps is None else [k / steps for k in range(1, steps + 1)]
    grads: dict[str, Tensor] = {}

    def add(key: str, grad: Tensor) -> None:
        step = grad.detach() / len(alphas)
        grads[key] = step if key not in grads else grads[key].add_(step)

    delta = {n: p.corr_out[n] - p.clean_out[n] for n in p.sources}  # [batch, (pos,) (d)]
    if edge_level:
        for alpha in alphas:
            for hook, grad in p.receiver_grads(lambda logits: scalar(metric, logits), alpha).items():
                add(hook, grad)
        return _edge_scores(p, delta, grads)
    nodes = [e.src for e in g.edges] if g.level == "edge" else list(g.components)
    # The input embedding becomes the graph's only grad leaf: the weights are frozen meanwhile,
    # so backward computes activation gradients only (no weight gradients nobody reads).
    retain = sorted({f"src:{p.hook_of(n)[0]}" for n in nodes} | {f"src:{p.hook_of('input')[0]}"})
    with frozen(p.model):
        for alpha in alphas:
            with torch.enable_grad():
                logits, kept = p.run(interpolate=alpha, retain=retain, split_heads=False)
                scalar(metric, logits).backward()
            for k, t in kept.items():
                add(k, t.grad)
    node_score = {}
    for n in set(nodes):
        hook, idx = p.hook_of(n)
        grad = grads[f"src:{hook}"]
        if idx is not None:
            grad = grad[..., idx, :] if grad.ndim == 4 else grad[..., idx]
        node_score[n] = float((delta[n] * grad).sum())
    if g.level == "edge":  # HookedMLP: an edge's score is its source's
        return {e.name: node_score[e.src] for e in g.edges}
    return node_score


@torch.no_grad()
def _edge_scores(p: Patcher, delta: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, float]:
    """``score(s -> r) = Σ (out_s^corr − out_s^clean) · ∂m/∂x_r`` for every edge, as one contraction
    per receiver hook: the deltas of all sources ``[S, batch·pos, d]`` against the hook's gradient
    ``[batch·pos, heads, d]`` give every (source, head) score of that hook at once, ``[S, heads]``
    (one matrix product instead of an elementwise product and a sum per edge)."""
    sources = list(p.sources)
    row = {s: i for i, s in enumerate(sources)}
    D = torch.stack([p.to_resid(s, delta[s]) for s in sources])  # [S, batch, pos, d_model]
    d = D.shape[-1]
    D = D.reshape(len(sources), -1, d)  # [S, batch·pos, d_model]
    by_hook: dict[str, list[str]] = {}
    for r in p.receivers:
        by_hook.setdefault(receiver_hook(p.model, r)[0], []).append(r)
    table: dict[str, list[list[float]]] = {}  # receiver hook -> [S][head] scores
    for hook, recvs in by_hook.items():
        grad = grads[hook]  # the gradient at the hook: every head's slice at once
        G = grad.reshape(D.shape[1], -1, d)  # [batch·pos, heads (1 for an MLP or the logits), d]
        table[hook] = torch.einsum("snd,nhd->sh", D, G).tolist()  # [S, heads]
    out = {}
    for e in p.graph.edges:
        hook, idx = receiver_hook(p.model, e.receiver)
        out[e.name] = table[hook][row[e.src]][0 if idx is None else idx]
    return out


@torch.no_grad()
def _acdc(p: Patcher, metric, tau: float | None, progress: bool) -> dict[str, float]:
    higher = getattr(metric, "higher_is_better", True)
    m_full = float(scalar(metric, p.run()[0]))
    g = p.graph
    edge_level = g.level == "edge" and g.kind == "transformer"
    if edge_level:
        m_empty = float(scalar(metric, p.run(masks=p.all_masks(0.0))[0]))
    else:
        m_empty = float(scalar(metric, p.run(ablate_nodes=list(g.components))[0]))
    tau = acdc_default_tau(m_full, m_empty) if tau is None else float(tau)
    masks = p.all_masks(1.0)
    ablated: list[str] = []
    current = m_full
    scores: dict[str, float] = {}
    order = list(reversed(g.components))  # receivers from the logits back; sources latest first
    transformer = g.kind == "transformer" and p.model.cfg.positional_embedding_type != "shortformer"
    for c in tqdm(order, disable=not progress, desc="ACDC"):
        # Everything before the layer being decided is still intact, so start the run there; the
        # logits' receiver sits at the end of the last block, which must run.
        node = g.edge_index[c].dst if edge_level else c
        start = min(g.layer[node], g.n_layers - 1) if transformer else 0
        if edge_level:
            e = g.edge_index[c]
            i = p.receivers[e.receiver].index(e.src)
            trial = {r: m.clone() for r, m in masks.items()}
            trial[e.receiver][i] = 0.0
            new = float(scalar(metric, p.run(masks=trial, start_layer=start)[0]))
        else:
            trial = ablated + [c]
            new = float(scalar(metric, p.run(ablate_nodes=trial, start_layer=start)[0]))
        damage = (current - new) if higher else (new - current)
        scores[c] = damage
        if damage < tau:  # removing it costs little: leave it out
            current = new
            if edge_level:
                masks = trial
            else:
                ablated = trial
    return {c: scores[c] for c in g.components}


def acdc_default_tau(m_full: float, m_empty: float) -> float:
    """ACDC's default threshold here: 1% of how far the metric moves when everything is ablated."""
    return 0.01 * abs(m_full - m_empty)


def acdc_kept(scores: dict[str, float], tau: float) -> list[str]:
    """The components ACDC kept: those whose damage when tried was at least ``tau``."""
    return [c for c, s in scores.items() if s >= tau]
