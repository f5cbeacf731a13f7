"""Overlap of circuits: set and score statistics, each against a random-circuit baseline.

Motivation: Merullo et al. 2023 ("Circuit component reuse across tasks in transformer language
models") found about 78% of the in-circuit attention heads shared between the IOI and Colored
Objects circuits of GPT-2. Whether such a number means *reuse* depends on how large the circuits
are relative to the model: two random circuits that each hold half the heads share half of them
on average. Every statistic here therefore comes with its value for random circuits of the same
sizes drawn from the same graph, and a permutation p-value.

For component sets A, B (the ``components`` of two circuits, or plain sets of component names:
``overlap`` takes either), out of the n components of a graph:

- Jaccard |A∩B| / |A∪B|; overlap coefficient |A∩B| / min(|A|, |B|); Dice 2|A∩B| / (|A| + |B|);
  containment |A∩B| / |A| (how much of A lies in B) and |A∩B| / |B|.
  Empty sets: a 0/0 is 1 when both sets are empty (they are identical) and 0 when only one is
  (an empty circuit shares nothing), for every statistic.
- From the scores of *all* components (so independent of which k were selected): weighted Jaccard
  Σ_i min(a_i, b_i) / Σ_i max(a_i, b_i) with a_i = |s_i| / Σ_j |s_j| (an all-zero score vector
  stays zero), and Spearman's rank correlation (average ranks for ties) of |score| (or the signed
  score with ``absolute=False``); NaN when either side is constant.

Limits: the baselines test against *uniformly* random circuits, a weak null: circuits found by any
method on one model share the components that matter for everything (the embedding-adjacent edges,
the last MLP), so "above chance" is necessary, not sufficient, for task-specific reuse; compare
with circuits of an unrelated task too. Set statistics of two circuits found at different top-k
mix the effect of size; see ``overlap_vs_k``.

>>> import mechgrok as mg
>>> from mechgrok.circuits.graph import graph
>>> jaccard(range(1, 11), range(6, 16)), overlap_coefficient(range(1, 11), range(6, 16))
(0.3333333333333333, 0.5)
>>> g = graph(mg.models.mlp(mg.tasks.modular_arithmetic(p=7, train_frac=0.5), width=6), "neuron")
>>> scores = {f"m0.n{i}": float(i) for i in range(6)}
>>> a, b = mg.circuits.select(g, scores, top_k=3), mg.circuits.select(g, scores, top_k=2)
>>> r = overlap(a, b, baseline=100, seed=0)
>>> r["jaccard"]["value"], r["containment_b_in_a"]["value"], r["spearman"]["value"]
(0.6666666666666666, 1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mechgrok._config import check_int
from mechgrok._stats import average_ranks
from mechgrok.circuits.circuit import Circuit
from mechgrok.components import Component, base, is_head, is_mlp, is_neuron, node_of, parse, parse_edge

__all__ = ["jaccard", "overlap_coefficient", "dice", "containment", "set_overlap", "weighted_jaccard", "spearman",
           "score_overlap",
           "project", "overlap", "expected_jaccard", "overlap_vs_k", "overlap_matrix", "BY", "SET_STATS",
           "SCORE_STATS"]

#: Granularities of ``project`` / ``overlap(by=...)``.
BY = ("components", "nodes", "heads", "mlps", "neurons")
#: Statistics of the component sets (functions of |A|, |B|, |A∩B|) and of the full score vectors.
SET_STATS = ("jaccard", "overlap_coefficient", "dice", "containment_a_in_b", "containment_b_in_a", "intersection")
SCORE_STATS = ("weighted_jaccard", "spearman")
_MIRROR = {"containment_a_in_b": "containment_b_in_a", "containment_b_in_a": "containment_a_in_b"}
_KEEP = {"nodes": lambda n: is_head(n) or is_mlp(n), "heads": is_head, "mlps": is_mlp, "neurons": is_neuron}
_CHUNK = 1 << 22  # elements per block of permutation draws (32 MiB of int64)


def _set_stats(ka, kb, inter) -> dict[str, np.ndarray]:
    """Every set statistic from sizes |A|, |B| and |A∩B| (arrays broadcast), with the 0/0 rule."""
    ka, kb, inter = (np.asarray(x, dtype=float) for x in (ka, kb, inter))
    both_empty = (ka == 0) & (kb == 0)

    def ratio(num, den):  # num / den; 0/0 -> 1 if both sets are empty, else 0
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_empty, 1.0, 0.0))

    return {"jaccard": ratio(inter, ka + kb - inter), "overlap_coefficient": ratio(inter, np.minimum(ka, kb)),
            "dice": ratio(2 * inter, ka + kb), "containment_a_in_b": ratio(inter, ka),
            "containment_b_in_a": ratio(inter, kb), "intersection": inter}


def _as_set(x: Circuit | Iterable[Hashable]) -> set:
    return set(x.components) if isinstance(x, Circuit) else set(x)


def set_overlap(a: Circuit | Iterable[Hashable], b: Circuit | Iterable[Hashable]) -> dict[str, float]:
    """Every set statistic (``SET_STATS``) of two sets, or of the ``components`` of two circuits."""
    a, b = _as_set(a), _as_set(b)
    return {k: float(v) for k, v in _set_stats(len(a), len(b), len(a & b)).items()}


def jaccard(a, b) -> float:
    """|A∩B| / |A∪B| (1 if both are empty). ``a``, ``b``: sets (any iterables) or Circuits."""
    return set_overlap(a, b)["jaccard"]


def overlap_coefficient(a, b) -> float:
    """Szymkiewicz-Simpson |A∩B| / min(|A|, |B|): 1 when one set contains the other (0 if one is empty)."""
    return set_overlap(a, b)["overlap_coefficient"]


def dice(a, b) -> float:
    """Dice-Sørensen 2|A∩B| / (|A| + |B|) (1 if both are empty)."""
    return set_overlap(a, b)["dice"]


def containment(a, b) -> float:
    """|A∩B| / |A|: the fraction of A that lies in B (1 if both are empty, 0 if only A is)."""
    return set_overlap(a, b)["containment_a_in_b"]


def _score_vectors(a: Circuit | Mapping[str, float], b: Circuit | Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The scores of a and b as aligned float arrays (a's key order); ValueError unless same keys."""
    sa, sb = (x.scores if isinstance(x, Circuit) else x for x in (a, b))
    if set(sa) != set(sb):
        only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        raise ValueError(f"score statistics need circuits over the same graph (the same scored components); "
                         f"{len(only_a)} only in the first (e.g. {only_a[:3]}), {len(only_b)} only in the second "
                         f"(e.g. {only_b[:3]}). Circuits of one model at different levels compare by='nodes' or "
                         "by='heads' (see project)")
    return np.array(list(sa.values()), dtype=float), np.array([sb[k] for k in sa], dtype=float)


def _normalised(x: np.ndarray) -> np.ndarray:  # |x| / Σ|x|, zeros stay zeros
    return np.abs(x) / (np.abs(x).sum() or 1.0)


def _wj(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:  # rows of wb against wa; 0/0 -> 1
    num, den = np.minimum(wa, wb).sum(-1), np.maximum(wa, wb).sum(-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def _centred_ranks(x: np.ndarray, absolute: bool) -> tuple[np.ndarray, float]:
    r = average_ranks(np.abs(x) if absolute else x)
    r = r - r.mean() if len(r) else r
    return r, float(np.sqrt(r @ r))


def weighted_jaccard(a: Circuit | Mapping[str, float], b: Circuit | Mapping[str, float]) -> float:
    """Σ min(a_i, b_i) / Σ max(a_i, b_i) of the |scores| of every component, each normalised to sum 1.

    1 for proportional scores, 0 for disjoint supports. ``a``, ``b``: circuits over the same graph
    (or score mappings with the same keys); ValueError otherwise."""
    sa, sb = _score_vectors(a, b)
    return float(_wj(_normalised(sa), _normalised(sb)))


def spearman(a: Circuit | Mapping[str, float], b: Circuit | Mapping[str, float], absolute: bool = True) -> float:
    """Spearman rank correlation of the scores of every component (Pearson of average ranks).

    ``absolute``: rank |score| (the ranking ``select`` uses; default) or the signed score.
    NaN when either score vector is constant (or has fewer than 2 components)."""
    sa, sb = _score_vectors(a, b)
    (ra, na), (rb, nb) = _centred_ranks(sa, absolute), _centred_ranks(sb, absolute)
    return float(ra @ rb / (na * nb)) if na > 0 and nb > 0 else math.nan


def _edge_nodes(edge: str) -> tuple[str, str]:
    """``"a0.h1->a1.h0.k@2"`` -> ``("a0.h1", "a1.h0@2")``."""
    src, receiver = parse_edge(edge)
    return src, node_of(receiver)


def _mlp_of(node: str) -> str:  # "m1.n7@2" -> "m1@2"; anything else unchanged
    if not is_neuron(node):
        return node
    c = parse(node)
    return Component("mlp", c.layer, position=c.position).name


def project(circuit: Circuit, by: str = "nodes") -> Circuit:
    """The circuit seen at another granularity: a new ``Circuit``, the original untouched.

    ``by``: "components" (unchanged); "nodes" (heads and MLPs), "heads" or "mlps": a node-level
    circuit whose components are the nodes an edge-level circuit's edges touch, the MLPs holding a
    neuron-level circuit's neurons, or a node-level circuit's own nodes of that kind; "neurons":
    the neurons of a neuron-level circuit (its heads dropped).
    Scores, for every node of the view: where several components map to one node (edge level:
    the edges into or out of it; neuron level: an MLP's neurons) the sum of their |score|; where
    the view only drops components, the original signed scores. The graph's nodes become the
    node-level ones (neurons collapsed into their MLP), so circuits found at different levels of
    one model compare at ``by="nodes"`` or ``"heads"``. ValueError for neurons of an edge- or
    node-level circuit.
    """
    if by not in BY:
        raise ValueError(f"unknown granularity by={by!r}; choose one of {BY}")
    if by == "components":
        return circuit
    if by == "neurons" and circuit.level != "neuron":
        raise ValueError(f"a {circuit.level}-level circuit has no neurons; by='neurons' needs a neuron-level circuit "
                         "(use by='nodes', 'heads' or 'mlps')")
    nodes, layer = circuit.graph_nodes, dict(circuit.graph_layer)
    if circuit.level == "edge":
        scores = {n: 0.0 for n in nodes if base(n) not in ("input", "logits")}
        for edge, s in circuit.scores.items():
            for n in _edge_nodes(edge):
                if n in scores:
                    scores[n] += abs(s)
        chosen = {n for edge in circuit.components for n in _edge_nodes(edge)}
    elif circuit.level == "neuron" and by != "neurons":
        nodes = tuple(dict.fromkeys(map(_mlp_of, nodes)))  # neurons follow their layer's heads: order kept
        layer = {_mlp_of(n): v for n, v in layer.items()}
        scores = dict.fromkeys((_mlp_of(c) for c in circuit.scores), 0.0)
        for c, s in circuit.scores.items():
            scores[_mlp_of(c)] += abs(s)
        chosen = {_mlp_of(c) for c in circuit.components}
    else:  # the view drops components only
        scores, chosen = dict(circuit.scores), set(circuit.components)
    keep = _KEEP[by]
    scores = {n: v for n, v in scores.items() if keep(n)}
    return Circuit("neuron" if by == "neurons" else "node", tuple(n for n in scores if n in chosen), scores, nodes,
                   layer, {**circuit.provenance, "projection": f"{circuit.level}->{by}"})


def _summary(value: float, draws: np.ndarray) -> dict[str, float]:
    """Value, baseline mean / std / 5th and 95th percentiles, and p = (1 + #{draw >= value}) / (1 + D)."""
    if draws is None:
        return {"value": value}
    if not math.isfinite(value) or not np.isfinite(draws).all():
        return {"value": value, **dict.fromkeys(("baseline_mean", "baseline_std", "p05", "p95", "p_value"), math.nan)}
    p05, p95 = np.percentile(draws, [5, 95])
    hits = int((draws >= value - 1e-12 * max(1.0, abs(value))).sum())  # ">=" up to rounding
    return {"value": value, "baseline_mean": float(draws.mean()), "baseline_std": float(draws.std(ddof=1)),
            "p05": float(p05), "p95": float(p95), "p_value": (1 + hits) / (1 + len(draws))}


def _score_draws(sa: np.ndarray, sb: np.ndarray, n_draws: int, rng: np.random.Generator, absolute: bool):
    """Weighted Jaccard and Spearman with b's scores randomly permuted across components, [n_draws] each."""
    n = len(sa)
    wa, wb = _normalised(sa), _normalised(sb)
    (ra, na), (rb, nb) = _centred_ranks(sa, absolute), _centred_ranks(sb, absolute)
    wj, rho = [], []
    rows = max(1, _CHUNK // max(n, 1))
    for start in range(0, n_draws, rows):
        perm = rng.permuted(np.tile(np.arange(n), (min(rows, n_draws - start), 1)), axis=1)  # [rows, n]
        wj.append(_wj(wa, wb[perm]))
        rho.append(rb[perm] @ ra / (na * nb) if na > 0 and nb > 0 else np.full(len(perm), math.nan))
    return np.concatenate(wj), np.concatenate(rho)


def _names(x: Any, side: str) -> set[str]:
    """A plain set (list, tuple, ...) of component or edge names, checked with ``mechgrok.components``."""
    if isinstance(x, (str, bytes)) or isinstance(x, Mapping) or not isinstance(x, Iterable):
        what = ("a mapping (scores? select a Circuit from them with mechgrok.circuits.select)"
                if isinstance(x, Mapping) else f"the string {x!r} (write [{x!r}])" if isinstance(x, str)
                else type(x).__name__)
        raise TypeError(f"overlap compares Circuits or sets of component names such as {{'a0.h1', 'm0.n5'}}; "
                        f"{side} is {what}")
    names = set()
    for item in x:
        name = item.name if isinstance(item, Component) else item
        if not isinstance(name, str):
            raise TypeError(f"overlap compares Circuits or sets of component names; {side} holds {item!r} "
                            f"({type(item).__name__}); for scores over numbered components use "
                            "mechgrok.circuits.score_overlap")
        parse_edge(name) if "->" in name else parse(name)  # ValueError naming the valid forms
        names.add(name)
    return names


def _project_names(names: set[str], by: str) -> set[str]:
    """``project`` for a plain set of names: edges become the nodes they join, neurons their MLP,
    then ``by`` keeps one kind (``input`` and ``logits`` are never components)."""
    if by == "components":
        return names
    if by == "neurons":
        return {n for n in names if is_neuron(n)}
    nodes = {m for n in names for m in (_edge_nodes(n) if "->" in n else (_mlp_of(n),))}
    return {n for n in nodes if _KEEP[by](n)}


def _overlap(a: Circuit | Iterable[str], b: Circuit | Iterable[str], by: str, baseline: int | None, seed: int,
             stats: Sequence[str], absolute: bool = True, n: int | None = None) -> dict[str, Any]:
    if isinstance(a, Circuit) and isinstance(b, Circuit):
        if n is not None:
            raise ValueError(f"n={n!r} is for plain sets; two circuits take n from their graph (leave n=None)")
        pa, pb = project(a, by), project(b, by)
        sa, sb = _score_vectors(pa, pb)  # checks: same graph
        inter = len(set(pa.components) & set(pb.components))
        out = _compare(sa, sb, len(pa), len(pb), inter, baseline, seed, stats, absolute)
        return {"by": by, "level": (a.level, b.level), **out}
    return _overlap_sets(a, b, by, baseline, seed, stats, n)


def _overlap_sets(a: Circuit | Iterable[str], b: Circuit | Iterable[str], by: str, baseline: int | None, seed: int,
                  stats: Sequence[str], n: int | None) -> dict[str, Any]:
    """``overlap`` where one side or both are plain sets of names: set statistics only."""
    if by not in BY:
        raise ValueError(f"unknown granularity by={by!r}; choose one of {BY}")
    sides, universe = [], None
    for x, side in ((a, "a"), (b, "b")):
        if isinstance(x, Circuit):
            if n is not None:
                raise ValueError(f"n={n!r} is for two plain sets; with a Circuit, n is the size of its graph "
                                 "(leave n=None)")
            px = project(x, by)
            sides.append(set(px.components))
            universe = set(px.scores)
        else:
            sides.append(_project_names(_names(x, side), by))
    sa, sb = sides
    if universe is not None:
        if unknown := sorted((sa | sb) - universe):
            raise ValueError(f"{len(unknown)} names of the set are not components of the circuit's graph"
                             f"{'' if by == 'components' else f' at by={by!r}'}, e.g. {unknown[:3]}; compare "
                             f"names of one graph (it has components like {sorted(universe)[:3]})")
        n = len(universe)
    elif n is not None:
        n = check_int(n, "n", low=0, owner="overlap (the number of components the sets were chosen from)")
        if n < len(sa | sb):
            raise ValueError(f"n={n} is smaller than the {len(sa | sb)} names of the two sets; give the number of "
                             "components they were chosen from, e.g. len(mechgrok.circuits.graph(model, level))")
    elif baseline:
        raise ValueError("plain sets have no graph to draw random circuits from: give n= (the number of components "
                         "they were chosen from, e.g. n=len(mechgrok.circuits.graph(model, level))) or baseline=0 for "
                         "the statistics alone")
    out = _compare(None, None, len(sa), len(sb), len(sa & sb), baseline, seed,
                   [st for st in stats if st in SET_STATS], True, n=n)
    return {"by": by, "level": tuple(x.level if isinstance(x, Circuit) else None for x in (a, b)), **out}


def _compare(sa: np.ndarray | None, sb: np.ndarray | None, ka: int, kb: int, inter: int, baseline: int | None,
             seed: int, stats: Sequence[str], absolute: bool, n: int | None = None) -> dict[str, Any]:
    """The statistics of two selections of sizes ka, kb sharing ``inter`` of n (default len(sa))
    scored components, with their random baselines; ``sa is None``: set statistics only, and ``n``
    may be None when ``baseline`` is 0."""
    baseline = check_int(0 if baseline is None else baseline, "baseline", low=0)
    seed = check_int(seed, "seed", low=0)
    if baseline and baseline < 20:
        raise ValueError(f"baseline={baseline} draws is too few for percentiles and p-values; use at least 20 "
                         "(or 0 for no baseline)")
    n = len(sa) if n is None and sa is not None else n
    set_rng, score_rng = map(np.random.default_rng, np.random.SeedSequence(seed).spawn(2))
    out: dict[str, Any] = {"n": n, "size_a": ka, "size_b": kb, "union": ka + kb - inter,
                           "n_draws": int(baseline or 0), "seed": seed}
    observed, draws = _set_stats(ka, kb, inter), {}
    if baseline:  # |A∩B| of uniformly random k_a- and k_b-subsets of n is hypergeometric: drawn exactly
        rand_inter = set_rng.hypergeometric(ka, n - ka, kb, size=baseline) if ka and kb else np.zeros(baseline, int)
        draws = _set_stats(ka, kb, rand_inter)
    for s in (s for s in SET_STATS if s in stats):
        out[s] = _summary(float(observed[s]), draws.get(s))
    if sa is not None and any(s in stats for s in SCORE_STATS):
        wj, rho = _score_draws(sa, sb, baseline, score_rng, absolute) if baseline else (None, None)
        if "weighted_jaccard" in stats:
            out["weighted_jaccard"] = _summary(float(_wj(_normalised(sa), _normalised(sb))), wj)
        if "spearman" in stats:
            (ra, na), (rb, nb) = _centred_ranks(sa, absolute), _centred_ranks(sb, absolute)
            out["spearman"] = _summary(float(ra @ rb / (na * nb)) if na > 0 and nb > 0 else math.nan, rho)
    return out


def score_overlap(scores_a, scores_b, selected_a: Iterable[int], selected_b: Iterable[int], *,
                  baseline: int = 1000, seed: int = 0, absolute: bool = True) -> dict[str, Any]:
    """``overlap`` for anything scored over the same n components that is not a ``Circuit``, such as
    the features of one SAE scored for two tasks (``mechgrok.sae.feature_overlap``).

    Args:
        scores_a, scores_b: ``[n]`` scores of the same components (arrays or tensors).
        selected_a, selected_b: indices in ``[0, n)`` of each side's selected components.
        baseline, seed, absolute: as in ``overlap``.

    Returns:
        ``{"n", "size_a", "size_b", "union", "n_draws", "seed"}`` and, for each of
        ``SET_STATS + SCORE_STATS``, ``{"value", "baseline_mean", "baseline_std", "p05", "p95", "p_value"}``.
    """
    sa, sb = (np.asarray(x, dtype=float).reshape(-1) for x in (scores_a, scores_b))
    if sa.shape != sb.shape:
        raise ValueError(f"score vectors must have the same length, got {sa.size} and {sb.size}")
    ia, ib = (_indices(x, name) for x, name in ((selected_a, "selected_a"), (selected_b, "selected_b")))
    bad = sorted(i for i in ia | ib if not 0 <= i < sa.size)
    if bad:
        raise ValueError(f"selected indices must lie in [0, {sa.size}); got {bad[:5]}")
    return _compare(sa, sb, len(ia), len(ib), len(ia & ib), baseline, seed, SET_STATS + SCORE_STATS, absolute)


def _indices(x: Iterable[int], name: str) -> set[int]:
    """Integer indices (a list, array or tensor), refusing floats and bools rather than truncating them."""
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else list(x)).reshape(-1)
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be integer component indices, got dtype {arr.dtype} (e.g. {arr[:3].tolist()})")
    return {int(i) for i in arr}


def overlap(a: Circuit | Iterable[str], b: Circuit | Iterable[str], *, by: str = "components", baseline: int = 1000,
            seed: int = 0, absolute: bool = True, n: int | None = None) -> dict[str, Any]:
    """Every overlap statistic of two circuits of one graph, each beside random circuits.

    Args:
        a, b: circuits over the same graph (after ``project(., by)``: the same scored components),
            or plain sets (lists, ...) of component names such as ``{"a0.h1", "m0.n5"}`` or edge
            names ``"a0.h1->a1.h0.k"`` (``mechgrok.components``), e.g. a circuit from a paper.
            A plain set has no scores, so only the set statistics (``SET_STATS``) are computed;
            ``by`` maps it as ``project`` maps a circuit (edges to the nodes they join, neurons to
            their MLP, then one kind kept). Against a Circuit, its names must be components of the
            circuit's graph (after ``by``), whose size is n.
        by: granularity, one of ``BY`` (see ``project``).
        baseline: number of random draws (>= 20), or 0 for the values alone.
            Set statistics: random circuits of sizes |A| and |B| drawn uniformly from the n
            components; every set statistic is a function of |A∩B|, hypergeometric(n, |A|, |B|)
            with mean |A||B|/n, so |A∩B| is drawn from that law directly (exact, O(draws)).
            Score statistics: the scores of b permuted uniformly across components.
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same draws.
        absolute: Spearman on |score| (default) or signed scores.
        n: for two plain sets, the number of components they were chosen from (the graph's size,
            ``len(mechgrok.circuits.graph(model, level))``), needed for the baseline; with
            ``baseline=0`` it may stay None. Not given with a Circuit: its graph says.
    Returns: ``{"by", "level": (a.level, b.level), "n", "size_a", "size_b", "union", "n_draws", "seed"}``
        and for each of ``SET_STATS + SCORE_STATS`` (``SET_STATS`` only if a side is a plain set; its
        level is None) a dict ``{"value", "baseline_mean", "baseline_std", "p05", "p95", "p_value"}``
        (only ``value`` when ``baseline=0``) with p_value = (1 + #{random >= value}) / (1 + draws),
        in (0, 1]; NaN where the value is.

    >>> r = overlap({"a0.h1", "a1.h0", "m1"}, ["a0.h1", "m1"], n=20, baseline=0)
    >>> r["jaccard"], r["containment_b_in_a"], "spearman" in r
    ({'value': 0.6666666666666666}, {'value': 1.0}, False)
    """
    return _overlap(a, b, by, baseline, seed, SET_STATS + SCORE_STATS, absolute, n)


def expected_jaccard(size_a: int, size_b: int, n: int) -> float:
    """E[Jaccard] of uniformly random subsets of sizes ``size_a``, ``size_b`` of n components.

    Exact: the sum over the hypergeometric law of i = |A∩B| (mean size_a·size_b/n) of
    i / (size_a + size_b - i). For size_a = size_b = k, close to (k²/n) / (2k - k²/n) = k / (2n - k).
    """
    size_a, size_b, n = (check_int(v, k, low=0) for k, v in (("size_a", size_a), ("size_b", size_b), ("n", n)))
    if not 0 <= size_a <= n or not 0 <= size_b <= n:
        raise ValueError(f"sizes must lie in [0, n={n}], got {size_a} and {size_b}")
    if size_a == 0 or size_b == 0:
        return float(size_a == size_b)
    lc = lambda m, r: math.lgamma(m + 1) - math.lgamma(r + 1) - math.lgamma(m - r + 1)  # noqa: E731 log C(m, r)
    return sum(math.exp(lc(size_a, i) + lc(n - size_a, size_b - i) - lc(n, size_b)) * i / (size_a + size_b - i)
               for i in range(max(0, size_a + size_b - n), min(size_a, size_b) + 1))


def overlap_vs_k(a: Circuit, b: Circuit, ks: Iterable[int] | None = None, *, by: str = "components") -> dict[str, Any]:
    """Jaccard of the top-k components of a and b (re-selected by |score| from their full scores).

    ``ks``: sizes in [0, n]; default up to 21 spread over [1, n]. Ties in |score| go by graph order,
    as in ``select``. Returns ``{"k": [...], "n", "by", "intersection": [...], "jaccard": [...],
    "random_intersection": [k²/n], "random_jaccard": [expected_jaccard(k, k, n)]}``; at k = n
    everything is 1 (both circuits are the whole graph).
    """
    if not isinstance(a, Circuit) or not isinstance(b, Circuit):
        raise TypeError(f"overlap_vs_k re-selects the top k of each circuit's scores, so it needs two Circuits, got "
                        f"{type(a).__name__} and {type(b).__name__}; compare plain sets of names with overlap")
    sa, sb = _score_vectors(project(a, by), project(b, by))
    n = len(sa)
    ks = None if ks is None else list(ks)
    if ks is not None and (bad := [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer))]):
        raise TypeError(f"ks must be integer circuit sizes in [0, n={n}], got {bad[:5]}")
    ks = sorted({int(k) for k in (np.round(np.linspace(1, n, min(n, 21))) if ks is None else ks)})
    if ks and (ks[0] < 0 or ks[-1] > n):
        raise ValueError(f"ks must lie in [0, n={n}], got {ks}")
    order_a, order_b = (np.argsort(-np.abs(s), kind="stable") for s in (sa, sb))  # scores in graph order
    inter = [len(set(order_a[:k].tolist()) & set(order_b[:k].tolist())) for k in ks]
    return {"k": ks, "n": n, "by": by, "intersection": inter,
            "jaccard": [float(v) for v in _set_stats(ks, ks, inter)["jaccard"]] if ks else [],
            "random_intersection": [k * k / n for k in ks], "random_jaccard": [expected_jaccard(k, k, n) for k in ks]}


def overlap_matrix(circuits: Mapping[str, Circuit | Iterable[str]], stat: str = "jaccard", *, by: str = "components",
                   baseline: int = 1000, seed: int = 0, n: int | None = None) -> dict[str, Any]:
    """``stat`` (one of ``SET_STATS + SCORE_STATS``) for every ordered pair of circuits.

    Row i, column j holds stat(circuits[i], circuits[j]) (containment_a_in_b: the fraction of
    circuit i in circuit j). Each unordered pair is computed once with ``seed`` and mirrored, so
    the matrix is symmetric for symmetric statistics. Values may also be plain sets of component
    names, as in ``overlap`` (``n``: as there; set statistics only). Returns ``{"names", "stat",
    "by", "n_draws", "matrix", "baseline_mean", "p_values"}`` (lists of lists; p-values None when
    ``baseline=0``).
    """
    if stat not in SET_STATS + SCORE_STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose one of {SET_STATS + SCORE_STATS}")
    if stat in SCORE_STATS and (sets := [k for k, c in circuits.items() if not isinstance(c, Circuit)]):
        raise ValueError(f"{stat} compares scores, which the plain sets {sets[:3]} do not have; use Circuits, or one "
                         f"of {SET_STATS}")
    names, m = list(circuits), len(circuits)
    value, mean, p = ([[None] * m for _ in range(m)] for _ in range(3))
    for i in range(m):
        for j in range(i, m):
            a, b = circuits[names[i]], circuits[names[j]]
            pair_n = n if not (isinstance(a, Circuit) or isinstance(b, Circuit)) else None
            r = _overlap(a, b, by, baseline, seed, (stat, _MIRROR.get(stat, stat)), n=pair_n)
            for (u, v), s in (((i, j), stat), ((j, i), _MIRROR.get(stat, stat))):
                value[u][v], mean[u][v], p[u][v] = (r[s].get(key) for key in ("value", "baseline_mean", "p_value"))
    return {"names": names, "stat": stat, "by": by, "n_draws": int(baseline or 0), "matrix": value,
            "baseline_mean": mean, "p_values": p}
