"""mechgrok.components: the one parser of component names (nodes, receivers, positions, edges)."""

import dataclasses
import importlib

import pytest

import mechgrok as mg
from mechgrok import components as C
from mechgrok.components import Component

# every name form, with what it parses to
FORMS = {
    "input": Component("input"),
    "logits": Component("logits"),
    "a0.h0": Component("head", 0, 0),
    "a12.h31": Component("head", 12, 31),
    "m0": Component("mlp", 0),
    "m7": Component("mlp", 7),
    "m0.n5": Component("neuron", 0, 5),
    "m3.n1023": Component("neuron", 3, 1023),
    "a1.h3.q": Component("head", 1, 3, "q"),
    "a1.h3.k": Component("head", 1, 3, "k"),
    "a1.h3.v": Component("head", 1, 3, "v"),
    "input@0": Component("input", position=0),
    "logits@15": Component("logits", position=15),
    "a0.h1@2": Component("head", 0, 1, position=2),
    "a1.h0.k@10": Component("head", 1, 0, "k", 10),
    "m2@3": Component("mlp", 2, position=3),
    "m1.n7@2": Component("neuron", 1, 7, position=2),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_parse_and_round_trip(name):
    c = C.parse(name)
    assert c == FORMS[name] and c.name == str(c) == name
    assert C.parse(c) is c and hash(c) == hash(FORMS[name])
    assert c.kind in C.KINDS
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.layer = 9


def test_parts_and_helpers():
    c = C.parse("a1.h0.k@2")
    assert (c.node.name, c.base.name, c.at(5).name, c.at(None).name) == ("a1.h0@2", "a1.h0.k", "a1.h0.k@5", "a1.h0.k")
    assert C.base("a1.h0.k@2") == "a1.h0.k" and C.base("m0") == "m0" and C.base("logits@3") == "logits"
    assert C.node_of("a1.h0.k@2") == "a1.h0@2" and C.node_of("m0.n5") == "m0.n5" and C.node_of("logits") == "logits"
    assert C.position_of("a0.h1@2") == 2 and C.position_of("a0.h1") is None
    assert C.at("a0.h1.q", 2) == "a0.h1.q@2"
    with pytest.raises(ValueError, match="already has a position"):
        C.at("a0.h1@1", 2)
    assert [C.layer_of(n, 4) for n in ("input", "a2.h1", "m3.n7@1", "logits@0")] == [-1, 2, 3, 4]


def test_predicates_are_node_kinds_and_never_raise():
    assert C.is_head("a0.h1") and C.is_head("a0.h1@2") and not C.is_head("a0.h1.q") and not C.is_head("m0")
    assert C.is_mlp("m0") and C.is_mlp("m1@2") and not C.is_mlp("m0.n1") and not C.is_mlp("a0.h1")
    assert C.is_neuron("m0.n1") and C.is_neuron("m0.n1@3") and not C.is_neuron("m0")
    for junk in ("", "x", "a01.h1", "a0.h1\n", None, 3, ["a0.h1"]):
        assert not (C.is_head(junk) or C.is_mlp(junk) or C.is_neuron(junk))
    assert C.HEAD.match("a3.h2@1") and not C.NEURON.match("m0.n1x")


@pytest.mark.parametrize("bad", ["", "a1", "h1", "a1.h", "a.h1", "a01.h1", "a1.h01", "m0.n", "m0.n05", "m-1",
                                 "m0.q", "m0.n1.k", "a0.h1.q.k", "a0.h1.x", "input.q", "logits.k", "inputs",
                                 "A0.H1", " a0.h1", "a0.h1 ", "a0.h1\n", "a0.h1@", "a0.h1@-1", "a0.h1@01",
                                 "a0.h1@2@3", "m٣", "blocks.0.mlp.hook_post"])
def test_malformed_names_say_the_valid_forms(bad):
    with pytest.raises(ValueError, match=r"is not a component name; valid forms: 'input', 'logits', 'a\{l\}\.h\{h\}'"):
        C.parse(bad)


def test_an_edge_is_not_a_component_name_and_non_strings_are_refused():
    with pytest.raises(ValueError, match="an edge name: use parse_edge"):
        C.parse("a0.h1->m0")
    for bad in (None, 3, ("a0", 1)):
        with pytest.raises(TypeError, match="must be a string"):
            C.parse(bad)
    with pytest.raises(TypeError, match="must be a string"):
        C.parse_edge(7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="attn"), "unknown component kind"),
    (dict(kind="head", layer=0), "integer index"),
    (dict(kind="head", layer=-1, index=0), "integer layer >= 0"),
    (dict(kind="head", layer=True, index=0), "integer layer"),
    (dict(kind="head", layer=0, index=0, port="o"), "only heads have ports"),
    (dict(kind="mlp", layer=0, port="q"), "only heads have ports"),
    (dict(kind="mlp", layer=0, index=3), "a neuron of it is kind 'neuron'"),
    (dict(kind="input", layer=0), "no layer, index or port"),
    (dict(kind="logits", position=-2), "position >= 0"),
])
def test_component_values_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Component(**kwargs)


@pytest.mark.parametrize("edge, parts", [
    ("input->a0.h0.q", ("input", "a0.h0.q")),
    ("a0.h1->a1.h0.k", ("a0.h1", "a1.h0.k")),
    ("a0.h1->m0", ("a0.h1", "m0")),
    ("m1->logits", ("m1", "logits")),
    ("input->m0.n3", ("input", "m0.n3")),  # a HookedMLP's neurons read the input
    ("m0.n3->logits", ("m0.n3", "logits")),
    ("a0.h1@0->a1.h0.k@2", ("a0.h1@0", "a1.h0.k@2")),
    ("input@1->logits@1", ("input@1", "logits@1")),
])
def test_parse_edge(edge, parts):
    assert C.parse_edge(edge) == parts
    assert f"{parts[0]}->{parts[1]}" == edge


@pytest.mark.parametrize("bad, match", [
    ("a0.h1", "not an edge name"),
    ("a0.h1-m0", "not an edge name"),
    ("logits->m0", "source of an edge"),
    ("a0.h1.q->m1", "source of an edge"),
    ("a0.h1->input", "receiver of an edge"),
    ("a0.h1->a1.h0", "receiver of an edge"),  # a head is read through q, k or v
    ("a0.h1@0->m1", "position on both ends"),
    ("a0.h1->m1@1", "position on both ends"),
    ("a0.h1->a1.h0.k->m1", "not a component name"),
    ("a0.x->m1", "not a component name"),
])
def test_malformed_edges(bad, match):
    with pytest.raises(ValueError, match=match):
        C.parse_edge(bad)


def test_every_name_of_real_graphs_parses_and_round_trips():
    task = mg.tasks.modular_arithmetic(p=5, train_frac=0.5)
    models = [mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=4), mg.models.mlp(task, width=3)]
    for model in models:
        for level in mg.circuits.LEVELS:
            for positions in (False, True) if model is models[0] else (False,):
                g = mg.circuits.graph(model, level, positions=positions)
                for n in g.nodes:
                    c = C.parse(n)
                    assert c.name == n and c.port is None and (c.position is not None) == positions
                    assert g.layer[n] == C.layer_of(n, g.n_layers if g.kind == "transformer" else 1)
                for e in g.edges:
                    assert C.parse_edge(e.name) == (e.src, e.receiver) and C.node_of(e.receiver) == e.dst


# --- mg.circuits.overlap on plain sets of names (the names checked here) ------------------------

@pytest.fixture(scope="module")
def circuits():
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5)
    model = mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=4)
    out = {}
    for level in ("edge", "node", "neuron"):
        g = mg.circuits.graph(model, level)
        out[level] = mg.circuits.select(g, {c: float(i % 7) - 3 for i, c in enumerate(g.components)}, top_k=5)
    return out


def test_overlap_of_plain_sets():
    a, b = {"a0.h1", "a1.h0", "m1"}, ["a0.h1", "m1"]
    r = mg.circuits.overlap(a, b, n=10, baseline=200, seed=1)
    assert (r["n"], r["size_a"], r["size_b"], r["union"], r["level"]) == (10, 3, 2, 3, (None, None))
    assert r["jaccard"]["value"] == pytest.approx(2 / 3) and r["containment_b_in_a"]["value"] == 1.0
    assert set(r) >= set(importlib.import_module("mechgrok.circuits.overlap").SET_STATS) and "spearman" not in r
    assert 0 < r["jaccard"]["p_value"] <= 1 and "baseline_mean" in r["jaccard"]
    assert r == mg.circuits.overlap(set(b) | {"a1.h0"}, b, n=10, baseline=200, seed=1)  # lists and sets alike
    alone = mg.circuits.overlap(a, b, baseline=0)
    assert alone["n"] is None and alone["jaccard"] == {"value": pytest.approx(2 / 3)}
    assert mg.circuits.overlap(a, [C.parse(n) for n in b], baseline=0) == alone  # Components count as their names
    # by= maps a set as project maps a circuit: edges to the nodes they join, neurons to their MLP
    edges = {"input->a0.h1.q", "a0.h1->m1", "m1->logits"}
    assert mg.circuits.overlap(edges, {"m1.n0", "m1.n3", "a0.h1"}, by="nodes", baseline=0)["jaccard"]["value"] == 1.0
    assert mg.circuits.overlap(edges, {"a0.h1"}, by="heads", baseline=0)["size_a"] == 1


def test_overlap_of_a_circuit_and_a_set(circuits):
    node = circuits["node"]
    chosen = list(node.components)
    r = mg.circuits.overlap(node, chosen[:3], baseline=100)
    assert (r["n"], r["size_a"], r["size_b"], r["level"]) == (len(node.scores), 5, 3, ("node", None))
    assert r["containment_b_in_a"]["value"] == 1.0 and "weighted_jaccard" not in r
    # a circuit's own components as a set: the set statistics of overlap(circuit, circuit)
    both = mg.circuits.overlap(node, node, baseline=100)
    assert {s: both[s] for s in ("jaccard", "dice")} == {s: mg.circuits.overlap(node, set(chosen), baseline=100)[s]
                                                         for s in ("jaccard", "dice")}
    heads = {c for c in chosen if C.is_head(c)}
    assert mg.circuits.overlap(circuits["edge"], heads, by="heads", baseline=0)["size_b"] == len(heads)
    with pytest.raises(ValueError, match="not components of the circuit's graph"):
        mg.circuits.overlap(node, {"a0.h1", "a7.h0"}, baseline=0)
    with pytest.raises(ValueError, match="not components of the circuit's graph"):
        mg.circuits.overlap(circuits["edge"], {"a0.h1"}, baseline=0)  # node names vs an edge circuit: use by=
    with pytest.raises(ValueError, match="n=4 is for two plain sets"):
        mg.circuits.overlap(node, chosen, n=4)


def test_overlap_of_sets_refuses_what_it_cannot_do(circuits):
    with pytest.raises(ValueError, match=r"give n= .*or baseline=0"):
        mg.circuits.overlap({"a0.h1"}, {"m0"})  # the default baseline needs the graph's size
    with pytest.raises(ValueError, match="smaller than the 2 names"):
        mg.circuits.overlap({"a0.h1"}, {"m0"}, n=1)
    with pytest.raises(ValueError, match="is not a component name; valid forms"):
        mg.circuits.overlap({"a0.h1", "a0h1"}, {"m0"}, baseline=0)  # a typo
    with pytest.raises(ValueError, match="receiver of an edge"):
        mg.circuits.overlap({"a0.h1->a1.h0"}, {"m0"}, baseline=0)
    with pytest.raises(TypeError, match="the string 'a0.h1'"):
        mg.circuits.overlap("a0.h1", {"m0"}, baseline=0)
    with pytest.raises(TypeError, match="a mapping"):
        mg.circuits.overlap({"a0.h1": 1.0}, {"m0"}, baseline=0)
    with pytest.raises(TypeError, match="score_overlap"):
        mg.circuits.overlap({1, 2}, {2}, baseline=0)
    with pytest.raises(ValueError, match="unknown granularity"):
        mg.circuits.overlap({"m0"}, {"m0"}, by="layers", baseline=0)
    with pytest.raises(ValueError, match="n=3 is for plain sets"):
        mg.circuits.overlap(circuits["node"], circuits["node"], n=3)
    with pytest.raises(TypeError, match="needs two Circuits"):
        mg.circuits.overlap_vs_k(circuits["node"], {"m0"})
    # every message names only public things
    for call in (lambda: mg.circuits.overlap({1}, {2}, baseline=0), lambda: mg.circuits.overlap({"m0"}, {"m0"})):
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        assert "set_overlap" not in str(e.value)  # not exported by mechgrok.circuits


def test_overlap_matrix_of_sets(circuits):
    sets = {"x": {"a0.h1", "m1"}, "y": {"m1"}, "z": {"a1.h0"}}
    r = mg.circuits.overlap_matrix(sets, "containment_a_in_b", n=8, baseline=50)
    assert r["matrix"][0][1] == 0.5 and r["matrix"][1][0] == 1.0 and r["p_values"][0][2] is not None
    with pytest.raises(ValueError, match="compares scores"):
        mg.circuits.overlap_matrix(sets, "spearman", baseline=0)
