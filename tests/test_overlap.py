"""Overlap statistics: hand-made sets, circuits of tiny seeded models, baselines, projections, figures."""

import importlib
import math

import numpy as np
import pytest

import mechgrok as mg
from mechgrok._stats import average_ranks
from mechgrok.circuits.circuit import select
from mechgrok.circuits.graph import graph
from mechgrok.report.figures import fig_to_png

PNG = b"\x89PNG\r\n\x1a\n"
# the module, not the function ``overlap`` that mechgrok.circuits may export under the same name
ov = importlib.import_module("mechgrok.circuits.overlap")
figs = importlib.import_module("mechgrok.circuits.overlap_figures")


@pytest.fixture(scope="module")
def graphs():
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5)
    model = mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=16)
    other = mg.models.transformer(task, n_layers=2, d_model=8, n_heads=1, d_mlp=16)
    return {level: graph(model, level) for level in ("edge", "node", "neuron")} | {"other": graph(other, "edge")}


def scores(g, seed):
    rng = np.random.default_rng(seed)
    return {c: float(v) for c, v in zip(g.components, rng.normal(size=len(g)))}


def circuit(g, seed, k):
    return select(g, scores(g, seed), top_k=k)


# --- sets -------------------------------------------------------------------------------------

def test_hand_made_sets():
    a, b = set(range(1, 11)), set(range(6, 16))
    r = ov.set_overlap(a, b)
    assert r["jaccard"] == pytest.approx(1 / 3) and ov.jaccard(a, b) == pytest.approx(1 / 3)
    assert ov.overlap_coefficient(a, b) == 0.5 and ov.dice(a, b) == 0.5
    assert ov.containment(a, b) == 0.5 and ov.containment(b, a) == 0.5
    assert r["containment_b_in_a"] == 0.5 and r["intersection"] == 5
    assert ov.overlap_coefficient({1, 2}, {1, 2, 3, 4}) == 1.0 and ov.containment({1, 2, 3, 4}, {1, 2}) == 0.5


def test_identical_disjoint_and_empty_sets():
    stats = [s for s in ov.SET_STATS if s != "intersection"]
    assert all(v == 1.0 for s, v in ov.set_overlap({1, 2, 3}, [3, 2, 1]).items() if s in stats)
    assert all(ov.set_overlap({1, 2}, {3, 4})[s] == 0.0 for s in stats)
    assert all(ov.set_overlap(set(), [])[s] == 1.0 for s in stats)  # both empty: identical
    assert all(ov.set_overlap(set(), {1})[s] == 0.0 for s in stats)  # one empty: shares nothing
    assert all(ov.set_overlap({1}, ())[s] == 0.0 for s in stats)


# --- circuits ---------------------------------------------------------------------------------

def test_identical_circuits(graphs):
    a = circuit(graphs["edge"], 0, 10)
    assert ov.jaccard(a, a) == 1.0 and ov.weighted_jaccard(a, a) == 1.0
    assert ov.spearman(a, a) == pytest.approx(1.0) and ov.spearman(a, a, absolute=False) == pytest.approx(1.0)
    r = ov.overlap(a, a, baseline=500, seed=0)
    for s in ov.SET_STATS + ov.SCORE_STATS:
        if s != "intersection":
            assert r[s]["value"] == pytest.approx(1.0)
        assert r[s]["p_value"] <= 1 / 501 + 1e-9, s
        assert r[s]["p05"] <= r[s]["baseline_mean"] <= r[s]["p95"]
    assert (r["n"], r["size_a"], r["size_b"], r["union"], r["n_draws"]) == (len(graphs["edge"]), 10, 10, 10, 500)


def test_score_statistics_against_references(graphs):
    g = graphs["edge"]
    sa, sb = scores(g, 1), scores(g, 2)
    sb = {c: round(v, 1) for c, v in sb.items()}  # ties
    a, b = np.abs(list(sa.values())), np.abs(list(sb.values()))
    a, b = a / a.sum(), b / b.sum()
    assert ov.weighted_jaccard(sa, sb) == pytest.approx(np.minimum(a, b).sum() / np.maximum(a, b).sum())
    stats = pytest.importorskip("scipy.stats")
    assert ov.spearman(sa, sb) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert ov.spearman(sa, sb, absolute=False) == pytest.approx(
        stats.spearmanr(list(sa.values()), list(sb.values())).statistic)
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    assert np.array_equal(average_ranks(x), stats.rankdata(x))
    assert math.isnan(ov.spearman({"m0": 1.0, "m1": 1.0}, {"m0": 1.0, "m1": 2.0}))  # constant side


def test_baseline_matches_hypergeometric(graphs):
    g = graphs["edge"]
    n, ka, kb, draws = len(g), 12, 20, 4000
    r = ov.overlap(circuit(g, 3, ka), circuit(g, 4, kb), baseline=draws, seed=5)
    inter = r["intersection"]
    expected = ka * kb / n
    var = ka * kb * (n - ka) * (n - kb) / (n * n * (n - 1))  # hypergeometric variance
    assert abs(inter["baseline_mean"] - expected) < 4 * math.sqrt(var / draws)
    assert inter["baseline_std"] == pytest.approx(math.sqrt(var), rel=0.1)
    assert r["jaccard"]["baseline_mean"] == pytest.approx(ov.expected_jaccard(ka, kb, n), abs=4 * r["jaccard"][
        "baseline_std"] / math.sqrt(draws))
    # the score baseline permutes b's scores: Spearman centred on 0, weighted Jaccard below 1
    assert abs(r["spearman"]["baseline_mean"]) < 4 * r["spearman"]["baseline_std"] / math.sqrt(draws) + 1e-3
    assert r["weighted_jaccard"]["p95"] < 1


def test_score_overlap_equals_overlap_of_the_circuits(graphs):
    g = graphs["edge"]
    a, b = circuit(g, 3, 12), circuit(g, 4, 20)
    keys = list(a.scores)
    pos = {k: i for i, k in enumerate(keys)}
    r = ov.score_overlap([a.scores[k] for k in keys], [b.scores[k] for k in keys], [pos[c] for c in a.components],
                         [pos[c] for c in b.components], baseline=500, seed=5)
    want = ov.overlap(a, b, baseline=500, seed=5)
    assert r == {k: v for k, v in want.items() if k not in ("by", "level")}
    with pytest.raises(ValueError, match="same length"):
        ov.score_overlap([1.0, 2.0], [1.0], [0], [0])
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        ov.score_overlap([1.0, 2.0], [1.0, 0.5], [0, 2], [0])


def test_random_circuits_are_not_significant(graphs):
    g = graphs["edge"]
    ps = [ov.overlap(circuit(g, 10 + i, 12), circuit(g, 100 + i, 12), baseline=200, seed=i) for i in range(10)]
    for r in ps:
        assert all(0 < r[s]["p_value"] <= 1 for s in ov.SET_STATS + ov.SCORE_STATS)
    assert ps[0]["jaccard"]["p_value"] > 0.05 and ps[0]["spearman"]["p_value"] > 0.05
    assert np.median([r["jaccard"]["p_value"] for r in ps]) > 0.2
    assert np.median([r["spearman"]["p_value"] for r in ps]) > 0.2


def test_deterministic_and_validated(graphs):
    a, b = circuit(graphs["edge"], 0, 8), circuit(graphs["edge"], 1, 15)
    assert ov.overlap(a, b, baseline=50, seed=3) == ov.overlap(a, b, baseline=50, seed=3)
    assert ov.overlap(a, b, baseline=0)["jaccard"] == {"value": ov.jaccard(a, b)}
    with pytest.raises(ValueError, match="at least 20"):
        ov.overlap(a, b, baseline=5)
    with pytest.raises(ValueError, match="unknown granularity"):
        ov.overlap(a, b, by="layers")


def test_mismatched_graphs_raise(graphs):
    a, other = circuit(graphs["edge"], 0, 8), circuit(graphs["other"], 0, 8)
    for f in (ov.weighted_jaccard, ov.spearman, ov.overlap, ov.overlap_vs_k):
        with pytest.raises(ValueError, match="same graph"):
            f(a, other)
    with pytest.raises(ValueError, match="by='nodes'"):  # edge vs node level: compare by nodes
        ov.overlap(a, circuit(graphs["node"], 0, 3), baseline=0)


# --- granularity ------------------------------------------------------------------------------

def test_project_edge_circuit(graphs):
    a = circuit(graphs["edge"], 0, 6)
    nodes = ov.project(a, "nodes")
    assert nodes.level == "node" and set(nodes.components) == set(a.nodes) - {"input", "logits"}
    assert set(nodes.scores) == {"a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"}
    touching = [e for e in a.scores if "a1.h0" in e.split("->")[0] or e.split("->")[1].startswith("a1.h0")]
    assert nodes.scores["a1.h0"] == pytest.approx(sum(abs(a.scores[e]) for e in touching))
    heads = ov.project(a, "heads")
    assert set(heads.components) == {c for c in nodes.components if c.startswith("a")}
    assert set(ov.project(a, "mlps").scores) == {"m0", "m1"}
    assert ov.project(a, "components") is a and a.level == "edge"  # the original is untouched
    with pytest.raises(ValueError, match="no neurons"):
        ov.project(a, "neurons")


def test_project_node_and_neuron_circuits(graphs):
    node, neuron = circuit(graphs["node"], 0, 3), circuit(graphs["neuron"], 0, 10)
    heads = ov.project(node, "heads")
    assert set(heads.components) == {c for c in node.components if c.startswith("a")}
    assert all(heads.scores[h] == node.scores[h] for h in heads.scores)  # a restriction keeps signed scores
    assert set(ov.project(node, "mlps").scores) == {"m0", "m1"}
    mlps = ov.project(neuron, "mlps")
    assert set(mlps.components) == {c.split(".")[0] for c in neuron.components if ".n" in c}
    assert mlps.scores["m1"] == pytest.approx(sum(abs(v) for c, v in neuron.scores.items() if c.startswith("m1.")))
    assert "m0" in mlps.graph_nodes and not any(".n" in n for n in mlps.graph_nodes)
    neurons = ov.project(neuron, "neurons")
    assert neurons.level == "neuron" and set(neurons.components) == {c for c in neuron.components if ".n" in c}
    # circuits found at different levels of one model compare by nodes / heads
    edge = circuit(graphs["edge"], 0, 12)
    for by in ("nodes", "heads", "mlps"):
        r = ov.overlap(edge, neuron, by=by, baseline=50)
        assert r["by"] == by and r["level"] == ("edge", "neuron") and 0 <= r["jaccard"]["value"] <= 1
    assert ov.overlap(node, node, by="heads", baseline=0)["n"] == 4


# --- overlap vs k, matrix, figures -----------------------------------------------------------

def test_overlap_vs_k(graphs):
    g = graphs["edge"]
    n = len(g)
    a, b = circuit(g, 0, 5), circuit(g, 1, 5)
    r = ov.overlap_vs_k(a, b)
    assert r["k"][0] == 1 and r["k"][-1] == n and r["n"] == n
    assert r["jaccard"][-1] == 1.0 and r["random_jaccard"][-1] == pytest.approx(1.0)
    assert r["random_intersection"] == [k * k / n for k in r["k"]]
    for k, j in zip(r["k"], r["jaccard"]):  # matches selecting the top-k circuits directly
        assert j == pytest.approx(ov.jaccard(select(g, a.scores, top_k=k), select(g, b.scores, top_k=k)))
    same = ov.overlap_vs_k(a, a, ks=[0, 3, 7])
    assert same["jaccard"] == [1.0, 1.0, 1.0] and same["random_jaccard"][0] == 1.0
    assert ov.expected_jaccard(3, 3, 3) == pytest.approx(1.0) and ov.expected_jaccard(0, 2, 5) == 0.0
    assert ov.expected_jaccard(5, 5, 40) == pytest.approx(5 / 75, rel=0.2)  # ~ k / (2n - k)
    with pytest.raises(ValueError, match="ks must lie"):
        ov.overlap_vs_k(a, b, ks=[n + 1])
    fig = figs.overlap_vs_k_figure({"a vs b": r, "a vs a": same}, title="top-k")
    assert fig_to_png(fig).startswith(PNG)


def test_overlap_matrix_and_heatmap(graphs):
    g = graphs["edge"]
    circs = {"add": circuit(g, 0, 10), "sub": circuit(g, 1, 6), "mul": circuit(g, 2, 14)}
    m = ov.overlap_matrix(circs, "jaccard", baseline=100)
    assert m["names"] == ["add", "sub", "mul"] and len(m["matrix"]) == 3
    assert all(m["matrix"][i][i] == 1.0 for i in range(3))
    assert m["matrix"][0][1] == m["matrix"][1][0] == ov.jaccard(circs["add"], circs["sub"])
    assert all(0 < p <= 1 for row in m["p_values"] for p in row)
    c = ov.overlap_matrix(circs, "containment_a_in_b", baseline=0)
    assert c["matrix"][0][2] == ov.containment(circs["add"], circs["mul"]) and c["p_values"][0][1] is None
    assert c["matrix"][2][0] == ov.containment(circs["mul"], circs["add"])
    with pytest.raises(ValueError, match="unknown statistic"):
        ov.overlap_matrix(circs, "cosine")
    for matrix in (m, c, ov.overlap_matrix(circs, "spearman", baseline=20)):
        assert fig_to_png(figs.overlap_heatmap(matrix)).startswith(PNG)


@pytest.mark.parametrize("level", ["edge", "node", "neuron"])
def test_draw_shared_marks_the_shared_components(graphs, level):
    g = graphs[level]
    k = max(2, len(g) // 3)
    circs = {"add": circuit(g, 0, k), "sub": circuit(g, 1, k), "mul": circuit(g, 2, k)}
    fig = figs.draw_shared(circs, style="graph", title="three tasks")
    assert len(fig.axes) == 3 and fig_to_png(fig).startswith(PNG)
    for ax, (name, c) in zip(fig.axes, circs.items()):
        others = set().union(*(set(o.components) for n, o in circs.items() if n != name))
        shared = len(set(c.components) & others)
        assert ax.get_title() == f"{name}: {len(c)} components, {shared} shared"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert (f"shared ({shared})" in legend) == (shared > 0)
    if level != "edge":  # node boxes outlined heavily: exactly the drawn components that are shared
        boxes = [t for t in fig.axes[0].texts if t.get_bbox_patch() is not None]
        outlined = {t.get_text() for t in boxes if t.get_bbox_patch().get_linewidth() > 2}
        shared = set(circs["add"].components) & (set(circs["sub"].components) | set(circs["mul"].components))
        assert outlined and outlined == shared & {t.get_text() for t in boxes}


def test_draw_shared_grid(graphs):
    g = graphs["neuron"]
    circs = {"add": circuit(g, 0, 12), "sub": circuit(g, 1, 12), "mul": circuit(g, 2, 5)}
    fig = figs.draw_shared(circs)  # auto: a neuron-level circuit is drawn as a grid
    assert fig_to_png(fig).startswith(PNG)
    ax = fig.axes[0]
    cells = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    union = set().union(*(set(c.components) for c in circs.values()))
    assert cells.shape == (3, len(union))
    assert [int(n) for n in np.isfinite(cells).sum(axis=1)] == [len(c) for c in circs.values()]
    held = np.isfinite(cells).sum(axis=0)
    assert list(held) == sorted(held, reverse=True)  # columns grouped: held by the most circuits first
    labels = [t.get_text() for t in ax.texts]
    for k in set(held.tolist()):
        name = f"in all {k}" if k == 3 else f"in {k}" if k > 1 else "in one"
        assert f"{name}\n({int((held == k).sum())})" in labels
    assert np.nanmax(np.abs(cells)) == 1.0  # each circuit's strongest member at full colour


def test_draw_shared_validates(graphs):
    with pytest.raises(ValueError, match="at least two"):
        figs.draw_shared({"add": circuit(graphs["edge"], 0, 3)})
    with pytest.raises(ValueError, match="different graphs"):
        figs.draw_shared({"a": circuit(graphs["edge"], 0, 3), "b": circuit(graphs["other"], 0, 3)})
    with pytest.raises(ValueError, match="unknown style"):
        figs.draw_shared({"a": circuit(graphs["edge"], 0, 3), "b": circuit(graphs["edge"], 1, 3)}, style="venn")
