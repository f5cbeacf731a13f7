"""Tests of the Circuit type, selection, faithfulness curves and circuit files."""

import copy
import dataclasses
import json
import math
import random

import networkx as nx
import pytest
from matplotlib.figure import Figure

import mechgrok as mg
from mechgrok.circuits.circuit import Circuit, faithfulness, faithfulness_curve, select, select_greedy
from mechgrok.circuits.graph import graph
from mechgrok.report.figures import fig_to_png


@pytest.fixture(scope="module")
def models():
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5)
    return {"transformer": mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=16),
            "mlp": mg.models.mlp(task, width=8)}


@pytest.fixture(scope="module")
def graphs(models):
    return {(kind, level): graph(model, level) for kind, model in models.items()
            for level in ("edge", "node", "neuron")}


def random_scores(g, seed=0):
    rng = random.Random(seed)
    return {c: rng.gauss(0.0, 1.0) for c in g.components}


PROV = {"method": "eap-ig", "metric": "logit_diff", "corruption": "resample", "dataset": "sha256:ab12",
        "step": 1200, "model": {"n_layers": 2, "d_model": 8}, "faithfulness": 0.87, "tags": ["a", "b"]}


# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("level", ["edge", "node", "neuron"])
def test_select_top_k_and_threshold(graphs, level):
    g = graphs["transformer", level]
    scores = random_scores(g)
    by_abs = sorted(g.components, key=lambda c: -abs(scores[c]))
    for k in (0, 1, 5, len(g)):
        c = select(g, scores, top_k=k)
        assert set(c.components) == set(by_abs[:k]) and len(c) == k
        assert list(c.components) == [x for x in g.components if x in c]  # graph order
        assert c.provenance["selection"] == f"top_k={k}" and c.provenance["level"] == level
    c = select(g, scores, threshold=1.0)
    assert set(c.components) == {x for x in g.components if abs(scores[x]) >= 1.0}
    assert c.provenance["selection"] == "threshold=1"
    signed = select(g, scores, top_k=3, absolute=False)
    assert set(signed.components) == set(sorted(g.components, key=lambda x: -scores[x])[:3])
    assert set(select(g, scores, threshold=0.5, absolute=False).components) == {
        x for x in g.components if scores[x] >= 0.5}
    assert dict(c.scores) == pytest.approx(scores) and c.graph_nodes == g.nodes


def test_select_ties_follow_graph_order(graphs):
    g = graphs["transformer", "edge"]
    scores = dict.fromkeys(g.components, 1.0) | {g.components[-1]: -2.0}
    c = select(g, scores, top_k=4)
    assert c.components == (g.components[0], g.components[1], g.components[2], g.components[-1])
    assert select(g, scores, top_k=4) == c  # deterministic


def test_select_validation(graphs):
    g = graphs["transformer", "node"]
    scores = random_scores(g)
    with pytest.raises(ValueError, match="exactly one"):
        select(g, scores)
    with pytest.raises(ValueError, match="exactly one"):
        select(g, scores, top_k=1, threshold=0.1)
    for bad in (-1, len(g) + 1, 1.5, True):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[0, 6\]"):
            select(g, scores, top_k=bad)
    with pytest.raises(ValueError, match="finite"):
        select(g, scores, threshold=math.nan)
    with pytest.raises(ValueError, match=r"unknown components.*'a0\.h7'.*components like"):
        select(g, scores | {"a0.h7": 1.0, "zz": 2.0}, top_k=1)
    with pytest.raises(ValueError, match=r"46 unknown components.*input->a0\.h0\.q.*components like"):  # edge names
        select(g, random_scores(graphs["transformer", "edge"]), top_k=1)
    with pytest.raises(ValueError, match=r"1 missing, e\.g\. \['m1'\]"):
        select(g, {k: v for k, v in scores.items() if k != "m1"}, top_k=1)
    with pytest.raises(ValueError, match="finite"):
        select(g, scores | {"m1": math.inf}, top_k=1)
    with pytest.raises(TypeError, match="mapping"):
        select(g, list(scores.values()), top_k=1)
    with pytest.raises(ValueError, match="not in the graph"):
        Circuit.from_graph(g, ["a0.h0", "m7"], scores)


# ---------------------------------------------------------------- the type
def test_circuit_is_immutable(graphs):
    g = graphs["transformer", "edge"]
    c = select(g, random_scores(g), top_k=5, provenance=PROV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.components = ()
    with pytest.raises(TypeError):
        c.scores[g.components[0]] = 5.0
    with pytest.raises(TypeError):
        c.graph_layer["input"] = 3
    with pytest.raises(TypeError):
        c.provenance["method"] = "acdc"
    with pytest.raises(TypeError):
        c.provenance["model"]["n_layers"] = 3
    assert c.provenance["tags"] == ("a", "b")  # lists are frozen as tuples
    d = c.with_provenance(faithfulness=0.5, method="eap")
    assert d is not c and d.provenance["faithfulness"] == 0.5 and c.provenance["faithfulness"] == 0.87
    assert d.components == c.components and d != c
    assert hash(c) == hash(select(g, random_scores(g), top_k=5, provenance=PROV)) and {c, d}


def test_nodes_edges_and_membership(graphs):
    g = graphs["transformer", "edge"]
    scores = dict.fromkeys(g.components, 0.0) | {"a0.h1->a1.h0.k": 3.0, "a0.h1->a1.h0.q": -2.0, "m1->logits": 1.0}
    c = select(g, scores, top_k=3)
    assert c.nodes == ("input", "a0.h1", "a1.h0", "m1", "logits")
    assert c.edges == (("a0.h1", "a1.h0"), ("m1", "logits"))  # q and k edges give one pair
    assert "a0.h1->a1.h0.k" in c and "a0.h1->a1.h0.v" not in c and len(c) == 3

    n = select(graphs["transformer", "node"], {"a0.h0": 1, "m0": 2, "a1.h0": 0, "a1.h1": 3, "a0.h1": 0, "m1": 0},
               top_k=3)
    assert n.components == ("a0.h0", "m0", "a1.h1") and n.nodes == ("input", "a0.h0", "m0", "a1.h1", "logits")
    assert set(n.edges) == {("input", "a0.h0"), ("input", "m0"), ("input", "a1.h1"), ("input", "logits"),
                            ("a0.h0", "m0"), ("a0.h0", "a1.h1"), ("a0.h0", "logits"), ("m0", "a1.h1"),
                            ("m0", "logits"), ("a1.h1", "logits")}
    m = select(graphs["mlp", "neuron"], random_scores(graphs["mlp", "neuron"]), top_k=2)
    (a, b) = m.components
    assert set(m.edges) == {("input", a), ("input", b), (a, "logits"), (b, "logits")}  # no skip in an MLP
    assert select(graphs["mlp", "node"], {"m0": 1.0}, top_k=0).edges == ()


def test_positions_edges(models):
    g = graph(models["transformer"], "node", positions=True)
    c = select(g, dict.fromkeys(g.components, 0.0) | {"a0.h0@1": 2.0, "m0@0": 1.5, "a1.h0@2": 1.0}, top_k=3)
    edges = set(c.edges)
    assert ("a0.h0@1", "a1.h0@2") in edges and ("m0@0", "a1.h0@2") in edges  # heads read earlier positions
    assert ("a0.h0@1", "m0@0") not in edges and ("input@0", "logits@0") in edges
    assert ("input@1", "logits@0") not in edges
    e = graph(models["transformer"], "edge", positions=True)
    ce = select(e, dict.fromkeys(e.components, 0.0) | {"a0.h1@0->a1.h0.k@2": 1.0}, top_k=1)
    assert ce.edges == (("a0.h1@0", "a1.h0@2"),)


def test_to_networkx(graphs):
    g = graphs["transformer", "edge"]
    scores = dict.fromkeys(g.components, 0.0) | {"a0.h1->a1.h0.k": 3.0, "a0.h1->a1.h0.q": -2.0, "m1->logits": 1.0}
    view = select(g, scores, top_k=3).to_networkx()
    assert isinstance(view, nx.DiGraph) and list(view.nodes) == ["input", "a0.h1", "a1.h0", "m1", "logits"]
    assert dict(view.nodes(data="layer")) == {"input": -1, "a0.h1": 0, "a1.h0": 1, "m1": 1, "logits": 2}
    assert view.edges["a0.h1", "a1.h0"] == {"score": 1.0, "receiver": "a1.h0.q,a1.h0.k"}
    assert view.edges["m1", "logits"] == {"score": 1.0, "receiver": "logits"}
    assert view.graph["level"] == "edge" and len(view.graph["scores"]) == len(g)
    gn = graphs["transformer", "neuron"]
    nv = select(gn, random_scores(gn), top_k=4).to_networkx()
    assert nv.number_of_nodes() == 6 and all("score" in nv.nodes[n] for n in list(nv.nodes)[1:-1])
    assert Circuit.from_networkx(nv) == select(gn, random_scores(gn), top_k=4)


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("suffix", [".json", ".graphml"])
@pytest.mark.parametrize("key", [("transformer", "edge"), ("transformer", "node"), ("transformer", "neuron"),
                                 ("mlp", "edge"), ("mlp", "neuron")])
def test_round_trip(graphs, tmp_path, suffix, key):
    g = graphs[key]
    c = select(g, random_scores(g, seed=3), top_k=min(5, len(g)), provenance=PROV)
    path = c.save(tmp_path / f"circuit{suffix}")
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    back = Circuit.load(path)
    assert back == c
    for f in dataclasses.fields(Circuit):
        assert getattr(back, f.name) == getattr(c, f.name), f.name
    assert all(back.scores[k] == c.scores[k] for k in c.scores)  # float precision exactly
    assert back.provenance["model"]["n_layers"] == 2 and back.provenance["tags"] == ("a", "b")


def test_json_is_node_link(graphs, tmp_path):
    g = graphs["transformer", "edge"]
    c = select(g, random_scores(g), top_k=4, provenance=PROV)
    data = json.loads(c.save(tmp_path / "c.json").read_text())
    assert {"nodes", "edges", "graph", "directed"} <= set(data) and data["directed"] is True
    assert data["graph"]["provenance"]["method"] == "eap-ig" and len(data["graph"]["scores"]) == len(g)
    assert nx.node_link_graph(data, edges="edges").number_of_edges() == len(c.edges)


def test_load_errors(graphs, tmp_path):
    g = graphs["transformer", "edge"]
    c = select(g, random_scores(g), top_k=4, provenance=PROV)
    text = c.save(tmp_path / "c.json").read_text()
    bad = tmp_path / "truncated.json"
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated.json is not a valid circuit file"):
        Circuit.load(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(nx.node_link_data(nx.path_graph(3), edges="edges")))
    with pytest.raises(ValueError, match="other.json.*not a mechgrok circuit"):
        Circuit.load(other)
    edited = json.loads(text)
    edited["graph"]["components"].append("a9.h9->logits")
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="edited.json"):
        Circuit.load(tmp_path / "edited.json")
    gml = c.save(tmp_path / "c.graphml")
    gml.write_text(gml.read_text()[:200])
    with pytest.raises(ValueError, match="c.graphml is not a valid circuit file"):
        Circuit.load(gml)
    for name in ("c.pkl", "c"):
        with pytest.raises(ValueError, match=r"supported: \.json, \.graphml"):
            c.save(tmp_path / name)
        with pytest.raises(ValueError, match=r"supported: \.json, \.graphml"):
            Circuit.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        Circuit.load(tmp_path / "missing.json")


# ---------------------------------------------------------------- drawing
@pytest.mark.parametrize("key", [("transformer", "edge"), ("transformer", "node"), ("transformer", "neuron"),
                                 ("mlp", "neuron")])
def test_draw(graphs, key):
    g = graphs[key]
    c = select(g, random_scores(g), top_k=min(6, len(g)), provenance=PROV)
    fig = c.draw()
    assert isinstance(fig, Figure)
    assert fig_to_png(fig, dpi=50)[:4] == b"\x89PNG"
    titles = [ax.get_title() for ax in fig.axes]
    assert any(f"{key[1]} level · {len(c)}/{len(g)} components · faithfulness 0.87" in t for t in titles)
    if key[1] == "neuron":  # unselected neurons are counted, not drawn
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert any(t.startswith("+") and "neurons" in t for t in texts) and not any(t == "m0.n99" for t in texts)


def test_draw_into_given_axes(graphs):
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    g = graphs["transformer", "node"]
    assert select(g, random_scores(g), top_k=0).draw(ax=ax) is fig


# ---------------------------------------------------------------- greedy and curves
def coverage(scores):
    """A synthetic monotone ``evaluate``: the fraction of the total |score| a circuit covers."""
    total = sum(abs(v) for v in scores.values())
    return lambda circuit: sum(abs(scores[c]) for c in circuit.components) / total


@pytest.mark.parametrize("target", [0.0, 0.3, 0.9, 0.99, 1.0])
def test_select_greedy_finds_smallest_k_in_log_calls(graphs, target):
    g = graphs["transformer", "edge"]  # 46 edges
    scores = random_scores(g, seed=1)
    evaluate, calls = coverage(scores), []
    c = select_greedy(g, scores, lambda circ: calls.append(len(circ)) or evaluate(circ), target=target,
                      provenance={"method": "eap"})
    brute = next(k for k in range(len(g) + 1) if evaluate(select(g, scores, top_k=k)) >= target)
    assert len(c) == brute and c == select(g, scores, top_k=brute).with_provenance(**dict(c.provenance))
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(len(g))) + 2  # O(log n), never twice
    assert c.provenance["selection"] == "greedy" and c.provenance["greedy_value"] >= target
    assert c.provenance["method"] == "eap" and [k for k, _ in c.provenance["greedy_trace"]] == sorted(calls)


def test_select_greedy_unreachable(graphs):
    g = graphs["mlp", "neuron"]
    with pytest.raises(ValueError, match=r"even all 8 components reach only 1 < target 1.5"):
        select_greedy(g, random_scores(g), coverage(random_scores(g)), target=1.5)


def test_faithfulness_curve(graphs):
    g = graphs["transformer", "edge"]
    scores, n = random_scores(g), len(g)
    linear = faithfulness_curve(g, scores, lambda c: len(c) / n)
    assert linear["sizes"][0] == 0 and linear["sizes"][-1] == n and 15 <= len(linear["sizes"]) <= 21
    assert linear["faithfulness"][0] == 0.0 and linear["faithfulness"][-1] == 1.0
    assert linear["fraction"] == [k / n for k in linear["sizes"]]
    assert linear["area"] == pytest.approx(0.5)
    cov = faithfulness_curve(g, scores, coverage(scores), sizes=[n, 0, 10, 10])
    assert cov["sizes"] == [0, 10, n] and cov["faithfulness"][-1] == pytest.approx(1.0)
    assert cov["area"] > 0.5  # top-|score| first: coverage grows faster than linearly
    assert faithfulness_curve(g, scores, coverage(scores), sizes=[n, 0, 10, 10]) == cov  # pure
    small = faithfulness_curve(graphs["mlp", "node"], {"m0": 1.0}, lambda c: len(c))
    assert small["sizes"] == [0, 1] and small["area"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"sizes must be .* in \[0, 46\]"):
        faithfulness_curve(g, scores, len, sizes=[0, 47])


def test_faithfulness_formula():
    assert faithfulness(0.8, 0.0, 1.0) == pytest.approx(0.8)
    assert faithfulness(2.0, 1.0, 3.0) == pytest.approx(0.5)
    assert faithfulness(1.0, 1.0, 3.0) == 0.0 and faithfulness(3.0, 1.0, 3.0) == 1.0
    assert faithfulness(-1.0, 2.0, -4.0) == pytest.approx(0.5)  # a metric that falls under the full model
    assert faithfulness(5.0, 1.0, 3.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="corruption does not change the metric"):
        faithfulness(0.5, 1.0, 1.0 + 1e-13)
    with pytest.raises(ValueError, match="finite"):
        faithfulness(math.nan, 0.0, 1.0)


def test_copy_returns_equal_circuit(graphs):
    g = graphs["transformer", "node"]
    c = select(g, random_scores(g), top_k=2, provenance=PROV)
    assert copy.copy(c) == c and copy.deepcopy({"c": c})["c"] is c
