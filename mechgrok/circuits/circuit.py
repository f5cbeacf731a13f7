"""The ``Circuit`` type: an immutable, scored selection of the components of a ``Graph``.

A circuit keeps the attribution score of *every* component of its graph, the graph's nodes and
layers, and its provenance, so faithfulness curves can be recomputed and the circuit drawn or
rebuilt as a ``networkx.DiGraph`` without the model; it saves as node-link JSON or GraphML.
Selection, the faithfulness curve and the faithfulness formula are plain functions.

>>> import mechgrok as mg
>>> from mechgrok.circuits.graph import graph
>>> g = graph(mg.models.mlp(mg.tasks.modular_arithmetic(p=7, train_frac=0.5), width=4), "neuron")
>>> c = select(g, {"m0.n0": 0.1, "m0.n1": -2.0, "m0.n2": 0.5, "m0.n3": 0.0}, top_k=2)
>>> c.components, c.nodes
(('m0.n1', 'm0.n2'), ('input', 'm0.n1', 'm0.n2', 'logits'))
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from mechgrok._config import check_float
from mechgrok._io import atomic_path, atomic_write_text, to_jsonable
from mechgrok.circuits.graph import LEVELS, Graph
from mechgrok.components import base, is_head, is_neuron, node_of, parse, parse_edge, position_of

__all__ = ["Circuit", "select", "select_greedy", "faithfulness_curve", "faithfulness", "SUFFIXES"]

SUFFIXES = (".json", ".graphml")
FORMAT = "mechgrok.circuit/1"  # written into every file, checked on load
_SIGN_COLOUR = {True: "tab:blue", False: "tab:red"}  # score >= 0, score < 0
_QKV_STYLE = {"q": "-", "k": "--", "v": ":"}
_HIGHLIGHT = "tab:orange"  # outline / halo of highlighted components


def _freeze(v: Any) -> Any:  # dict -> read-only mapping, list -> tuple, recursively
    return (types.MappingProxyType({k: _freeze(x) for k, x in v.items()}) if isinstance(v, Mapping)
            else tuple(map(_freeze, v)) if isinstance(v, (list, tuple)) else v)


def _thaw(v: Any) -> Any:  # the inverse of _freeze, for JSON
    return ({k: _thaw(x) for k, x in v.items()} if isinstance(v, Mapping)
            else list(map(_thaw, v)) if isinstance(v, (list, tuple)) else v)


#: At the neuron level, the number of selected neurons drawn per layer (the strongest by |score|).
MAX_DRAWN = 24


@dataclasses.dataclass(frozen=True, repr=False)
class Circuit:
    """An immutable selection of the components of a ``Graph`` (names as in ``graph.py``).

    Attributes:
        level: "edge" | "node" | "neuron".
        components: selected edge names (``"a0.h1->a1.h0.k"``) at the edge level, else node names
            (``"a0.h1"``, ``"m0"``, ``"m0.n17"``); in graph order when built by ``select``.
        scores: attribution score of every component of the graph (read-only mapping).
        graph_nodes / graph_layer: the graph's nodes in topological order / node -> layer.
        provenance: method, metric, corruption, level, selection rule ("top_k=20", "greedy", ...),
            dataset hash, checkpoint step, model spec, faithfulness: JSON values, frozen.
    Build one with ``select``, ``select_greedy`` or ``Circuit.from_graph``."""

    level: str
    components: tuple[str, ...]
    scores: Mapping[str, float]
    graph_nodes: tuple[str, ...]
    graph_layer: Mapping[str, int]
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}; choose one of {LEVELS}")
        put("components", tuple(map(str, self.components)))
        put("graph_nodes", tuple(map(str, self.graph_nodes)))
        put("graph_layer", types.MappingProxyType({str(n): int(v) for n, v in dict(self.graph_layer).items()}))
        if set(self.graph_layer) != set(self.graph_nodes):
            raise ValueError("graph_layer must give the layer of every node of graph_nodes and no other")
        try:  # component names (mechgrok.components), so that .nodes and .edges can read them
            for n in self.graph_nodes:
                parse(n)
        except ValueError as e:
            raise ValueError(f"graph_nodes must be node names of a graph: {e}") from None
        put("scores", types.MappingProxyType({str(k): float(v) for k, v in dict(self.scores).items()}))
        if bad := [c for c, v in self.scores.items() if not math.isfinite(v)]:
            raise ValueError(f"scores must be finite; {len(bad)} are not, e.g. {bad[:5]}")
        missing = [c for c in self.components if c not in self.scores]
        if missing or len(set(self.components)) < len(self.components):
            raise ValueError(f"components must not repeat and each needs a score (missing: {missing[:5]})")
        nodes, parts = set(self.graph_nodes), {}
        for name in self.scores:
            if self.level == "edge":
                parts[name] = _parse_edge(name, nodes)
            elif name not in nodes or base(name) in ("input", "logits"):
                raise ValueError(f"{name!r} is not a head, MLP or neuron of the graph (level {self.level!r})")
        put("_parts", parts)  # edge name -> (src, dst, receiver)
        put("provenance", _freeze(to_jsonable(_thaw(self.provenance))))

    @classmethod
    def from_graph(cls, graph: Graph, components: Iterable[str], scores: Mapping[str, float],
                   provenance: Mapping[str, Any] | None = None) -> Circuit:
        """A circuit of ``graph`` selecting ``components`` (stored in graph order)."""
        scores, chosen = _ranked(graph, scores)[0], set(components)
        if unknown := sorted(chosen - set(scores)):
            raise ValueError(f"{len(unknown)} components are not in the graph, e.g. {unknown[:5]}")
        prov = {**(provenance or {}), "level": graph.level}
        return cls(graph.level, tuple(c for c in scores if c in chosen), scores, graph.nodes, graph.layer, prov)

    def __len__(self) -> int:
        return len(self.components)

    def __contains__(self, component: object) -> bool:
        """Whether ``component`` (an edge name, or a head / MLP / neuron name) is selected."""
        return component in self.components

    def __hash__(self) -> int:
        return hash((self.level, self.components, self.graph_nodes))

    def __deepcopy__(self, memo: dict) -> Circuit:
        return self  # immutable (and read-only mappings cannot be deep-copied)

    def __repr__(self) -> str:
        return (f"Circuit(level={self.level!r}, {len(self)}/{len(self.scores)} components, "
                f"method={self.provenance.get('method', '?')!r}, selection={self.provenance.get('selection', '?')!r})")

    @property
    def nodes(self) -> tuple[str, ...]:
        """The graph nodes the circuit touches, in graph order; ``input`` and ``logits`` always."""
        used = {n for c in self.components for n in self._parts[c][:2]} if self.level == "edge" else {*self.components}
        return tuple(n for n in self.graph_nodes if n in used or base(n) in ("input", "logits"))

    @property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """``(src, dst)`` pairs without repeats: the selected edges (q, k, v edges give one pair), or
        at the node / neuron levels the layered residual-stream edges among ``nodes``: a node feeds
        every later layer and a head its own layer's MLP (heads read earlier positions, the rest
        their own); no ``input -> logits`` skip in a graph without heads (a HookedMLP)."""
        if self.level == "edge":
            return tuple(dict.fromkeys(self._parts[c][:2] for c in self.components))
        skip, layer, out = any(map(is_head, self.graph_nodes)), self.graph_layer, []
        nodes = self.nodes
        head, pos, merged = ({n: f(n) for n in nodes} for f in (is_head, position_of, base))
        for u in nodes:
            for v in nodes:
                head_u, head_v, pu, pv = head[u], head[v], pos[u], pos[v]
                if ((layer[u] < layer[v] or (layer[u] == layer[v] and head_u and not head_v))
                        and (skip or (merged[u], merged[v]) != ("input", "logits"))
                        and (pu is None or pv is None or (pu <= pv if head_v else pu == pv))):
                    out.append((u, v))
        return tuple(out)

    def with_provenance(self, **entries: Any) -> Circuit:
        """A copy with ``entries`` added to (or replacing keys of) the provenance."""
        return dataclasses.replace(self, provenance={**_thaw(self.provenance), **entries})

    def to_networkx(self) -> nx.DiGraph:
        """The circuit as a ``networkx.DiGraph`` on ``nodes`` (attribute ``layer``, and ``score`` on
        selected nodes). Edge level: edges carry ``score`` and ``receiver``, parallel q / k / v edges
        merged (scores summed, receivers comma-joined); node / neuron levels: ``edges``, unscored.
        The graph attributes hold all fields, for ``Circuit.from_networkx``."""
        g = nx.DiGraph(format=FORMAT, **{f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)})
        for n in self.nodes:
            g.add_node(n, layer=self.graph_layer[n], **({"score": self.scores[n]} if n in self else {}))
        g.add_edges_from(self.edges if self.level != "edge" else ())  # structural edges, unscored
        for c in self.components if self.level == "edge" else ():
            src, dst, receiver = self._parts[c]
            if g.has_edge(src, dst):
                g.edges[src, dst]["score"] += self.scores[c]
                g.edges[src, dst]["receiver"] += f",{receiver}"
            else:
                g.add_edge(src, dst, score=self.scores[c], receiver=receiver)
        return g

    @classmethod
    def from_networkx(cls, g: nx.Graph) -> Circuit:
        """Rebuild a circuit from the graph attributes written by ``to_networkx`` (or GraphML)."""
        a = {k: json.loads(v) if isinstance(v, str) and k not in ("format", "level") else v for k, v in g.graph.items()}
        if a.get("format") != FORMAT:
            raise ValueError(f"not a mechgrok circuit (format {a.get('format')!r}, expected {FORMAT!r})")
        return cls(**{f.name: a[f.name] for f in dataclasses.fields(cls)})

    def save(self, path: str | Path) -> Path:
        """Write the circuit atomically as ``.json`` (networkx node-link) or ``.graphml``."""
        path = _check_suffix(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give the circuit a file name, e.g. {path / 'circuit.json'}")
        g = self.to_networkx()
        if path.suffix.lower() == ".json":
            atomic_write_text(path, json.dumps(nx.node_link_data(g, edges="edges"), indent=1, allow_nan=False))
        else:  # GraphML holds scalars only: the structured graph attributes become JSON strings
            g.graph = {k: v if isinstance(v, str) else json.dumps(v, allow_nan=False) for k, v in g.graph.items()}
            with atomic_path(path) as tmp:
                nx.write_graphml(g, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit written by ``save``; a damaged file raises ``ValueError`` naming it."""
        path = _check_suffix(path)
        try:
            g = (nx.node_link_graph(json.loads(path.read_text("utf-8")), edges="edges")
                 if path.suffix.lower() == ".json" else nx.read_graphml(path))
            circuit = cls.from_networkx(g)
            if set(g.nodes) != set(circuit.nodes):
                raise ValueError("its nodes do not match its components")
        except OSError:
            raise
        except Exception as e:  # JSON / XML syntax, missing keys, wrong types, NetworkXError, ...
            raise ValueError(f"{path} is not a valid circuit file ({type(e).__name__}: {e}); rewrite it") from e
        return circuit

    def draw(self, ax=None, *, highlight: Iterable[str] = (), highlight_label: str = "highlighted"):
        """A layered drawing (``input`` at the bottom, a row of heads then MLP per layer, ``logits`` on
        top; at the neuron level only the selected neurons and a count of the rest). Edge level: width
        and opacity follow |score|, colour its sign (blue +, red -), line style the q / k / v input;
        node / neuron levels: node colour follows the score.

        ``highlight``: components (of this circuit) drawn with a heavy orange outline (nodes) or an
        orange halo (edges), e.g. those another circuit shares (``mechgrok.circuits.draw_shared``);
        ``highlight_label`` names them in the legend. Returns the Figure (no pyplot)."""
        from matplotlib.colors import to_rgb
        from matplotlib.lines import Line2D  # (imported here: matplotlib is slow to import)

        from mechgrok.report.figures import new_figure

        layers = sorted(set(self.graph_layer.values()))
        shown = set()  # at the neuron level: the strongest selected neurons of each layer, at most MAX_DRAWN
        for lv in layers:
            mine = [n for n in self.components if is_neuron(n) and self.graph_layer[n] == lv]
            shown |= set(sorted(mine, key=lambda n: -abs(self.scores[n]))[:MAX_DRAWN])
        drawn = [n for n in self.graph_nodes if self.level != "neuron" or not is_neuron(n) or n in shown]
        rows = {lv: [n for n in drawn if self.graph_layer[n] == lv] for lv in layers}
        hidden = {lv: sum(self.graph_layer[n] == lv for n in self.graph_nodes) - len(rows[lv]) for lv in layers}
        hidden_in = {lv: sum(self.graph_layer[n] == lv for n in self.components if n not in shown and is_neuron(n))
                     for lv in layers}
        marked = set(highlight) & set(self.components)
        hidden_marked = {lv: sum(self.graph_layer[n] == lv for n in marked if n not in shown and is_neuron(n))
                         for lv in layers}
        width = max(len(rows[lv]) + (hidden[lv] > 0) for lv in layers)
        if ax is None:
            ax = new_figure(width=min(2.8 + 0.9 * width, 40), height=1.0 + 1.0 * len(layers))[1][0]
            ax.get_figure(root=True).subplots_adjust(left=0.1, right=0.8, bottom=0.03, top=0.9)
        xy = {}
        for y, lv in enumerate(layers):
            slots = len(rows[lv]) + (hidden[lv] > 0)
            xy.update({n: (i - (slots - 1) / 2, y) for i, n in enumerate(rows[lv])})
            if hidden[lv]:
                extra = f"\n({hidden_in[lv]} in circuit)" if hidden_in[lv] else ""
                extra += f"\n({hidden_marked[lv]} {highlight_label})" if hidden_marked[lv] else ""
                ax.text((slots - 1) / 2, y, f"+{hidden[lv]}\nneurons{extra}", ha="center", va="center", size=7, c="0.5")
        top = max((abs(self.scores[c]) for c in self.components), default=0.0) or 1.0
        touched = set(self.nodes)
        for n, (x, y) in xy.items():
            face, ink = ("white", "black") if n in touched else ("0.95", "0.65")
            if self.level != "edge" and n in self:
                a = 0.15 + 0.6 * abs(self.scores[n]) / top  # tint of the sign colour
                face = tuple(1 - a * (1 - c) for c in to_rgb(_SIGN_COLOUR[self.scores[n] >= 0]))
            edge, lw = (_HIGHLIGHT, 2.4) if n in marked else (ink, 0.8)
            ax.text(x, y, n, ha="center", va="center", fontsize=8, color=ink, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.3", fc=face, ec=edge, lw=lw))
        edges = ([(*self._parts[c], self.scores[c], c in marked)
                  for c in sorted(self.components, key=lambda c: abs(self.scores[c]))]
                 if self.level == "edge" else [(u, v, v, None, False) for u, v in self.edges if u in xy and v in xy])
        for u, v, receiver, s, halo in edges:
            qkv = parse(receiver).port or ""  # "q", "k", "v" or ""
            rad = 0.12 + 0.1 * "qkv".find(qkv or "q") + (0.25 if xy[u][1] == xy[v][1] else 0)  # arc over a row
            style = (dict(color="0.6", lw=0.7, alpha=0.6) if s is None else dict(
                color=_SIGN_COLOUR[s >= 0], lw=0.5 + 3 * abs(s) / top, alpha=0.35 + 0.65 * abs(s) / top,
                linestyle=_QKV_STYLE.get(qkv, "-")))
            if halo:
                ax.annotate("", xy=xy[v], xytext=xy[u], zorder=1, arrowprops=dict(
                    arrowstyle="-", shrinkA=9, shrinkB=9, connectionstyle=f"arc3,rad={rad}", color=_HIGHLIGHT,
                    lw=style["lw"] + 4, alpha=0.45))
            ax.annotate("", xy=xy[v], xytext=xy[u], zorder=2, arrowprops=dict(
                arrowstyle="-|>", shrinkA=9, shrinkB=9, mutation_scale=8, connectionstyle=f"arc3,rad={rad}", **style))
        ax.set(xlim=(-width / 2 - 0.1, width / 2 + 0.1), ylim=(-0.5, len(layers) - 0.5), xticks=[])
        ax.set_yticks(range(len(layers)), ["" if lv in (-1, layers[-1]) else f"layer {lv}" for lv in layers])
        ax.tick_params(length=0, labelsize=8)
        ax.spines[:].set_visible(False)
        handles = [Line2D([], [], color=_SIGN_COLOUR[s], lw=2, label=f"score {'>' if s else '<'} 0") for s in (1, 0)]
        handles += [Line2D([], [], color="0.3", ls=ls, label=f"into {r}") for r, ls in _QKV_STYLE.items()
                    if self.level == "edge" and any(map(is_head, self.graph_nodes))]
        if marked:
            handles.append(Line2D([], [], color=_HIGHLIGHT, lw=3, label=f"{highlight_label} ({len(marked)})"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
        method, f = self.provenance.get("method", "circuit"), self.provenance.get("faithfulness")
        ax.set_title(f"{method} · {self.level} level · {len(self)}/{len(self.scores)} components"
                     + (f" · faithfulness {f:.2f}" if isinstance(f, (int, float)) else ""), fontsize=9)
        return ax.get_figure(root=True)


def _parse_edge(name: str, nodes: set[str]) -> tuple[str, str, str]:
    """``"a0.h1->a1.h0.k@2"`` -> ``("a0.h1", "a1.h0@2", "a1.h0.k@2")``: (src, dst, receiver)."""
    try:
        src, receiver = parse_edge(name)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name!r} is not an edge of the graph (expected 'src->receiver', e.g. 'a0.h1->a1.h0.k'): "
                         f"{e}") from None
    dst = node_of(receiver)
    if src not in nodes or dst not in nodes:
        raise ValueError(f"{name!r} is not an edge of the graph (expected 'src->receiver', e.g. 'a0.h1->a1.h0.k')")
    return src, dst, receiver


def _check_suffix(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"cannot save or load a circuit as {path.suffix or 'a file without suffix'!r} ({path}); "
                         f"supported: {', '.join(SUFFIXES)}")
    return path


def _ranked(graph: Graph, scores: Mapping[str, float], absolute: bool = True) -> tuple[dict[str, float], list[str]]:
    """``scores`` as floats in graph order, checked to cover exactly ``graph.components``, and the
    components ranked by |score| (or score), ties in graph order (``sorted`` is stable)."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping component -> float, got {type(scores).__name__}")
    known = set(graph.components)
    if unknown := [k for k in scores if k not in known]:
        raise ValueError(f"{len(unknown)} unknown components in scores, e.g. {unknown[:5]}; a {graph.level!r}-level "
                         f"graph has components like {list(graph.components[:3])}")
    if missing := [c for c in graph.components if c not in scores]:
        raise ValueError(f"scores must cover every component of the graph (a circuit keeps them all to recompute "
                         f"curves); {len(missing)} missing, e.g. {missing[:5]}")
    scores = {c: float(scores[c]) for c in graph.components}  # finiteness: checked by Circuit
    return scores, sorted(graph.components, key=lambda c: -abs(scores[c]) if absolute else -scores[c])


def select(graph: Graph, scores: Mapping[str, float], *, top_k: int | None = None, threshold: float | None = None,
           absolute: bool = True, provenance: Mapping[str, Any] | None = None) -> Circuit:
    """The ``top_k`` components of largest score, or those with score >= ``threshold``.

    Args:
        scores: component -> attribution score for every one of ``graph.components``.
        top_k / threshold: exactly one of them; ``0 <= top_k <= len(graph)``.
        absolute: rank by |score| (default) or by the signed score. Ties go by graph order.
        provenance: method, metric, corruption, dataset hash, ...; the selection rule is added.
    Returns: a ``Circuit``, its components in graph order.
    """
    if (top_k is None) == (threshold is None):
        raise ValueError("give exactly one of top_k and threshold")
    scores, ranked = _ranked(graph, scores, absolute)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= len(ranked):
            raise ValueError(f"top_k must be an integer in [0, {len(ranked)}] (the graph's size), got {top_k!r}")
        chosen, rule = ranked[:top_k], f"top_k={int(top_k)}"
    else:
        threshold = check_float(threshold, "threshold")
        chosen = [c for c in ranked if (abs(scores[c]) if absolute else scores[c]) >= threshold]
        rule = f"threshold={threshold:g}"
    return Circuit.from_graph(graph, chosen, scores, {**(provenance or {}), "selection": rule, "absolute": absolute})


def select_greedy(graph: Graph, scores: Mapping[str, float], evaluate: Callable[[Circuit], float],
                  target: float = 0.9, provenance: Mapping[str, Any] | None = None) -> Circuit:
    """The smallest circuit of top-|score| components with ``evaluate(circuit) >= target``.

    ``evaluate`` (typically faithfulness) costs a patched forward pass or more. Adding components
    one at a time costs one evaluation per step; instead k is searched by doubling (1, 2, 4, ...)
    then bisection: O(log n) evaluations, at most about 2 log2(n) + 2. This assumes ``evaluate``
    grows roughly monotonically with k, as faithfulness usually (not always: Miller et al. 2024)
    does; otherwise k may not be the smallest, but the circuit still meets the target. The
    ``[k, value]`` pairs evaluated are kept in ``provenance["greedy_trace"]``.
    Raises ValueError when even the full graph stays below ``target``.
    """
    target = check_float(target, "target", owner="select_greedy")  # NaN would compare False everywhere
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function Circuit -> float (e.g. its faithfulness), got "
                        f"{type(evaluate).__name__}")
    scores, ranked = _ranked(graph, scores)
    n, seen = len(ranked), {}
    prov = {**(provenance or {}), "selection": "greedy", "target": target, "absolute": True}

    def value(k: int) -> float:  # evaluate the top-k circuit once
        if k not in seen:
            seen[k] = float(evaluate(Circuit.from_graph(graph, ranked[:k], scores, prov | {"selection": f"top_k={k}"})))
        return seen[k]

    lo, hi = -1, min(1, n)  # lo: largest k known below the target (-1: none); hi: the k tried next
    while value(hi) < target:  # doubling
        if hi == n:
            raise ValueError(f"even all {n} components reach only {seen[n]:.4g} < target {target}; "
                             "lower the target, or check the metric and the corruption")
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:  # bisection: value(lo) < target <= value(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if value(mid) >= target else (mid, hi)
    trace = {"greedy_value": seen[hi], "greedy_trace": [[k, v] for k, v in sorted(seen.items())]}
    return Circuit.from_graph(graph, ranked[:hi], scores, {**prov, **trace})


def faithfulness_curve(graph: Graph, scores: Mapping[str, float], evaluate: Callable[[Circuit], float],
                       sizes: Iterable[int] | None = None) -> dict[str, Any]:
    """``evaluate`` of the top-|score| circuits over sizes k, and the area under that curve.

    Miller et al. 2024 ("Transformer circuit faithfulness metrics are not robust") report
    faithfulness over circuit sizes rather than at one k. Pure given ``evaluate`` (one call per
    size). ``sizes``: in [0, n]; default 21 (fewer for small graphs) spread over [0, n], ends included.
    Returns ``{"sizes": [k], "fraction": [k/n], "faithfulness": [value], "area": a}``, with
    a = trapezoid integral of value over k/n in [0, 1] (0.5 for value = k/n); when ``sizes`` omit
    0 or n it covers only the fractions given (NaN for one size).
    """
    scores, ranked = _ranked(graph, scores)
    n = len(ranked)
    if sizes is None:
        sizes = np.round(np.linspace(0, n, 21)).astype(int).tolist()
    elif isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"sizes must be a list of circuit sizes in [0, {n}], got {sizes!r}")
    elif bad := [k for k in sizes if isinstance(k, bool) or not isinstance(k, (int, np.integer))]:
        raise TypeError(f"sizes must be integers (numbers of components) in [0, {n}], got {bad[:5]}")
    sizes = sorted({int(k) for k in sizes})
    if not sizes or sizes[0] < 0 or sizes[-1] > n:
        raise ValueError(f"sizes must be a non-empty set of integers in [0, {n}], got {sizes}")
    faith = [float(evaluate(Circuit.from_graph(graph, ranked[:k], scores, {"selection": f"top_k={k}"}))) for k in sizes]
    fraction = [k / n if n else 0.0 for k in sizes]
    area = float(np.trapezoid(faith, fraction)) if len(sizes) > 1 else float("nan")
    return {"sizes": sizes, "fraction": fraction, "faithfulness": faith, "area": area}


def faithfulness(metric_circuit: float, metric_empty: float, metric_full: float) -> float:
    """Faithfulness F(C) = (m(C) - m(empty)) / (m(full) - m(empty)) of a circuit C under a metric m.

    As in Conmy et al. 2023 ("Towards automated circuit discovery") and Hanna et al. 2024 ("Have
    faith in faithfulness"): ``empty`` has every component corrupted (F = 0), ``full`` is the clean
    model (F = 1); values outside [0, 1] happen and mean something (C beats the full model).
    >>> faithfulness(0.8, 0.0, 1.0)
    0.8
    """
    c, e, f = float(metric_circuit), float(metric_empty), float(metric_full)
    if not all(map(math.isfinite, (c, e, f))):
        raise ValueError(f"faithfulness needs finite metrics, got m(C)={c}, m(empty)={e}, m(full)={f}")
    if abs(f - e) < 1e-12:
        raise ValueError(f"faithfulness is undefined: m(full)={f:.6g} equals m(empty)={e:.6g}: the corruption does "
                         "not change the metric; choose corrupted inputs (or a metric) the model answers differently")
    return (c - e) / (f - e)
