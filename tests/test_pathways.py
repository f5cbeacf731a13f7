"""Expert pathways of mixture-of-experts models (Li et al. 2025; mechgrok.measures.pathways): the edit
distance against hand-computed cases and a plain dynamic programme, routing read from a tiny MoE whose
router is set by hand, the consistency of a constructed case, the measure over a tiny trained run, and
the analysis ``moe_pathways`` (skipped for a dense run, with its reason; its result through its JSON)."""

import json
import logging
import math

import numpy as np
import pytest
import torch

import mechgrok as mg
from mechgrok.analyses import ANALYSES
from mechgrok.analyses.pathways import MoEPathwaysAnalysis, moe_pathways_section
from mechgrok.measures.pathways import (ExpertPathways, PathwaysOverTraining, _correlations, _shuffled,
                                        expert_pathways, moe_layers, pathway_consistency, pathway_distance,
                                        pathway_edit_distance, pathways_over_training, usage_entropy)

# ---------------------------------------------------------------------------- edit distance


def _reference_edit_distance(a, b):
    """The textbook O(n m) table, one cell at a time."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def test_edit_distance_of_hand_computed_cases():
    assert pathway_edit_distance(list(b"kitten"), list(b"sitting")) == 3  # k->s, e->i, insert g
    assert pathway_edit_distance([0, 1, 2], [0, 1, 2]) == 0
    assert pathway_edit_distance([0, 1, 2], [0, 2]) == 1  # delete 1
    assert pathway_edit_distance([3, 1, 3], [1, 3, 1]) == 2  # delete the first 3, append 1
    assert pathway_edit_distance([], [4, 5]) == 2 and pathway_edit_distance([4, 5], []) == 2
    assert pathway_edit_distance([12], [1, 2]) == 2  # expert 12 is one symbol, not the digits 1 and 2
    assert pathway_edit_distance(torch.tensor([0, 1, 2, 2, 0, 1]), np.array([1, 1, 2, 0, 0, 1])) == 2


def test_edit_distance_batches_match_the_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (60, 9), generator=g)
    b = torch.randint(0, 4, (60, 7), generator=g)
    got = pathway_edit_distance(a, b)
    assert got.dtype == torch.int64 and got.shape == (60,)
    assert got.tolist() == [_reference_edit_distance(x.tolist(), y.tolist()) for x, y in zip(a, b)]


def test_edit_distance_refuses_what_is_not_a_pathway():
    with pytest.raises(TypeError, match="integer expert indices"):
        pathway_edit_distance([0.5, 1.0], [1, 2])
    with pytest.raises(ValueError, match="both be sequences or both batches"):
        pathway_edit_distance([1, 2], [[1, 2]])
    with pytest.raises(ValueError, match="pair them row by row"):
        pathway_edit_distance(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one sequence \[n\] or a batch"):
        pathway_edit_distance(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------- routing set by hand

E, SCALE = 3, 5.0
PERM = (2, 0, 1)  # layer 1 sends what layer 0 sent to expert j to expert PERM[j]


def _hand_moe(task, k=1):
    """A 2-layer MoE whose routing is known: attention and layer 0's experts write nothing, token t embeds
    as 5·u_{t mod 3} (+ 2·u_{(t+1) mod 3} for k = 2), layer 0's router is the identity on u_0..u_2 and
    layer 1's row e is u_{PERM⁻¹(e)} + u_{3+e} (the extra direction changes no routing decision)."""
    model = mg.models.transformer(task, n_layers=2, d_model=6, n_heads=2, d_mlp=4, num_experts=E,
                                  experts_per_token=k, seed=0)
    u = torch.eye(6)
    with torch.no_grad():
        for t in range(model.cfg.d_vocab):
            model.embed.W_E[t] = SCALE * u[t % E] + (2.0 * u[(t + 1) % E] if k == 2 else 0.0)
        model.pos_embed.W_pos.zero_()
        for block in model.blocks:
            block.attn.W_O.zero_()
            block.attn.b_O.zero_()
        for expert in model.blocks[0].mlp.experts:
            expert.W_out.weight.zero_()
        model.blocks[0].mlp.W_gate.weight.copy_(u[:E])
        for j, e in enumerate(PERM):
            model.blocks[1].mlp.W_gate.weight[e] = u[j] + u[3 + e]
    return model


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=5, op="add", train_frac=0.6, seed=0)  # inputs (a, b, 5)


def test_expert_choices_of_a_hand_set_router(task):
    model = _hand_moe(task)
    pw = expert_pathways(model, task, split="all")
    assert pw.layers == (0, 1) and pw.positions == (0, 1, 2) and pw.num_experts == E
    assert pw.indices.shape == (25, 2, 3, 1)
    tokens = task.inputs % E  # [N, 3]
    assert torch.equal(pw.indices[:, 0, :, 0], tokens)
    assert torch.equal(pw.indices[:, 1, :, 0], torch.tensor(PERM)[tokens])
    top = math.exp(SCALE) / (math.exp(SCALE) + E - 1)  # softmax of (5, 0, 0)
    assert torch.allclose(pw.weights, torch.full_like(pw.weights, top), atol=1e-6)
    # (0, 1, =5): layer 0 -> 0, 1, 2; layer 1 -> 2, 0, 1.  (1, 1, =5): 1, 1, 2; 0, 0, 1
    rows = {tuple(x.tolist()): i for i, x in enumerate(task.inputs)}
    seqs = pw.sequences()
    assert seqs[rows[(0, 1, 5)]].tolist() == [0, 1, 2, 2, 0, 1]
    assert seqs[rows[(1, 1, 5)]].tolist() == [1, 1, 2, 0, 0, 1]
    pairs = torch.tensor([[rows[(0, 1, 5)], rows[(1, 1, 5)]], [rows[(0, 1, 5)], rows[(0, 1, 5)]]])
    assert pathway_distance(pw, pairs) == pytest.approx((2 + 0) / 2)
    last = expert_pathways(model, task, split="all", position="last")  # '=' (5 -> expert 2, then 1) everywhere
    assert last.indices.shape == (25, 2, 1, 1) and set(last.sequences().flatten().tolist()) == {1, 2}
    assert pathway_distance(last, pairs) == 0.0


def test_top2_experts_are_sorted_in_the_pathway(task):
    pw = expert_pathways(_hand_moe(task, k=2), task, split="all", position=0)  # operand a only
    a = task.inputs[:, 0]
    assert torch.equal(pw.indices[:, 0, 0], torch.stack([a % E, (a + 1) % E], 1))  # highest weight first
    assert torch.equal(pw.sequences()[:, :2], torch.stack([a % E, (a + 1) % E], 1).sort(1).values)
    assert torch.all(pw.weights[:, 0, 0, 0] > pw.weights[:, 0, 0, 1])


def test_consistency_of_a_constructed_case(task):
    pw = expert_pathways(_hand_moe(task), task, split="all")
    # router embedding: layer 0 is (w/3) Σ_t u_{j_t}, layer 1 (w/3) Σ_t (u_{j_t} + u_{3+PERM[j_t]}): cos = 1/√2
    router = pathway_consistency(pw, embedding="router")
    assert torch.allclose(router, torch.full((25,), 1 / math.sqrt(2), dtype=torch.float64), atol=1e-6)
    # output embedding: layer 0's experts write nothing, so its cosine is 0/0
    assert torch.isnan(pathway_consistency(pw)).all()
    with pytest.raises(ValueError, match="embedding must be one of"):
        pathway_consistency(pw, embedding="logits")


def test_embeddings_match_the_raw_hooks(task):
    model = mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=8, num_experts=4,
                                  experts_per_token=2, seed=3)
    pw = expert_pathways(model, task, batch_size=4)  # several batches
    _, cache = model.run_with_cache(task.inputs[task.train])
    for i, layer in enumerate(pw.layers):
        assert torch.allclose(pw.output[:, i], cache[f"blocks.{layer}.hook_mlp_out"].mean(1), atol=1e-6)
        logits = cache[f"blocks.{layer}.hook_resid_mid"] @ model.blocks[layer].mlp.W_gate.weight.T  # [n, 3, 4], no LN
        w, idx = logits.softmax(-1).topk(2, dim=-1)
        assert torch.equal(pw.indices[:, i], idx) and torch.allclose(pw.weights[:, i], w, atol=1e-6)
        gate = model.blocks[layer].mlp.W_gate.weight
        assert torch.allclose(pw.router[:, i], (w[..., None] * gate[idx]).sum(2).mean(1), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(pw.output[:, 0].double(), pw.output[:, 1].double(), dim=-1)
    assert torch.allclose(pathway_consistency(pw), cos)


def test_one_moe_layer_has_no_consistency_and_usage_entropy_is_known(task):
    one = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=8, num_experts=2, experts_per_token=1)
    assert torch.isnan(pathway_consistency(expert_pathways(one, task))).all()
    idx = torch.zeros(4, 1, 1, 1, dtype=torch.long)
    blank = dict(weights=torch.ones(4, 1, 1, 1), output=torch.zeros(4, 1, 2), router=torch.zeros(4, 1, 2),
                 layers=(0,), positions=(2,), num_experts=4)
    assert usage_entropy(ExpertPathways(indices=idx, **blank)) == 0.0  # a collapsed router
    even = torch.tensor([0, 1, 2, 3]).reshape(4, 1, 1, 1)
    assert usage_entropy(ExpertPathways(indices=even, **blank)) == pytest.approx(1.0)


def test_dense_models_and_bad_arguments_are_refused(task):
    dense = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=8)
    with pytest.raises(TypeError, match="dense MLPs.*num_experts=4, experts_per_token=1"):
        expert_pathways(dense, task)
    with pytest.raises(TypeError, match="no MLPs"):
        moe_layers(mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, attn_only=True))
    with pytest.raises(TypeError, match="got a HookedMLP"):
        expert_pathways(mg.models.mlp(task, width=4), task)
    moe = _hand_moe(task)
    with pytest.raises(ValueError, match="outside the 3 positions"):
        expert_pathways(moe, task, position=3)
    with pytest.raises(TypeError, match="position must be"):
        expert_pathways(moe, task, position="first")
    with pytest.raises(ValueError, match="token ids"):
        expert_pathways(moe, task.inputs.float())
    with pytest.raises(ValueError, match="pairs must be integer indices"):
        pathway_distance(expert_pathways(moe, task), torch.tensor([[0, 99]]))


def test_expert_pathways_of_a_language_model_corpus():
    corpus = mg.tasks.lm_corpus(n_structured=16, n_planted=0, n_held_out=0, seq_len=8, d_vocab=16, seed=0)
    model = mg.models.transformer(corpus, n_layers=2, d_model=8, n_heads=2, d_mlp=8, num_experts=3,
                                  experts_per_token=1)
    pw = expert_pathways(model, corpus)
    assert pw.indices.shape == (int(corpus.train.sum()), 2, 8, 1) and pw.sequences().shape[1] == 16


def test_the_shuffled_control_keeps_each_slots_experts():
    seqs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])  # 3 examples, 2 slots of k = 2
    perms = torch.tensor([[2, 0, 1], [1, 2, 0]])  # slot 0 of row i from example perms[0, i], slot 1 from perms[1, i]
    assert _shuffled(seqs, perms, 2).tolist() == [[8, 9, 6, 7], [0, 1, 10, 11], [4, 5, 2, 3]]
    identity = torch.arange(3).expand(2, 3)
    assert torch.equal(_shuffled(seqs, identity, 2), seqs)


def test_correlations_of_known_series():
    c = _correlations([1, 2, 3, 4], [1, 3, 2, 4])
    assert c["pearson"] == pytest.approx(0.8) and c["spearman"] == pytest.approx(0.8) and c["n"] == 4
    assert _correlations([1, 2, float("nan"), 4], [2, 4, 5, 8]) == {"pearson": pytest.approx(1.0),
                                                                  "spearman": pytest.approx(1.0), "n": 3}
    assert _correlations([1, 1, 1], [1, 2, 3])["pearson"] is None  # a constant series


# ---------------------------------------------------------------------------- over training, and the analysis


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, task):
    model = mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=8, num_experts=3,
                                  experts_per_token=1, seed=0)
    return mg.train(model, task, mg.TrainConfig(steps=30, lr=1e-2, eval_every=10, checkpoint_every=10),
                    out=tmp_path_factory.mktemp("pathways") / "moe", progress=False)


def test_moe_run_loads_back_and_trains(moe_run, task):
    model = moe_run.load_model()
    assert moe_layers(model) == (0, 1)
    assert mg.models.spec(model)["kwargs"]["num_experts"] == 3
    assert moe_run.steps() == [0, 10, 20, 30]
    assert moe_run.history()[-1]["train_loss"] < moe_run.history()[0]["train_loss"]


def test_pathways_over_training(moe_run, task):
    res = pathways_over_training(moe_run, n_examples=100, n_pairs=40, progress=False)
    n_train = int(task.train.sum())
    assert res.steps == (0, 10, 20, 30) and res.n_examples == n_train and res.n_pairs == 40
    assert res.pathway_length == 2 * 3 * 1 and res.layers == (0, 1) and res.num_experts == 3
    hist = {r["step"]: r for r in moe_run.history()}
    assert res.test_acc == tuple(hist[s]["test_acc"] for s in res.steps)
    assert res.train_acc == tuple(hist[s]["train_acc"] for s in res.steps)
    assert all(0 <= d <= res.pathway_length for d in res.edit_distance + res.edit_distance_same_answer
               + res.edit_distance_shuffled)
    # every training example is in the sample here, so the last consistency is that of the whole split
    last = expert_pathways(moe_run.load_model(30), task)
    assert res.consistency[-1] == pytest.approx(float(pathway_consistency(last).nanmean()))
    assert res.consistency_router[-1] == pytest.approx(float(pathway_consistency(last, embedding="router").nanmean()))
    assert res.usage_entropy[-1] == pytest.approx(usage_entropy(last))
    for m in ("edit_distance", "consistency", "consistency_router"):
        assert res.correlations[m] == _correlations(getattr(res, m), res.test_acc)
    d = json.loads(json.dumps(res.to_dict()))
    assert PathwaysOverTraining.from_dict(d).to_dict() == res.to_dict()
    with pytest.raises(ValueError, match="not a pathways-over-training result"):
        PathwaysOverTraining.from_dict({**d, "format": "x"})
    with pytest.raises(ValueError, match=r"no checkpoints at steps \[5\]"):
        pathways_over_training(moe_run, steps=[5], progress=False)


def test_the_analysis_skips_a_dense_run_with_its_reason(tmp_path, task, caplog):
    dense = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=8)
    run = mg.train(dense, task, mg.TrainConfig(steps=2, eval_every=1, checkpoint_every=1), out=tmp_path / "dense",
                   progress=False)
    reason = ANALYSES["moe_pathways"].applies(run)
    assert "need a mixture-of-experts model" in reason and "HookedTransformer has none" in reason
    with caplog.at_level(logging.INFO, logger="mechgrok.analyze"):
        assert mg.analyze(run, only=["moe_pathways"], progress=False) == {}
    assert "'moe_pathways'" in caplog.text and "mixture-of-experts" in caplog.text
    assert moe_pathways_section(run) is None  # no result, no section


def test_the_analysis_result_round_trips_and_has_a_section(moe_run):
    assert ANALYSES["moe_pathways"].applies(moe_run) is None
    written = mg.analyze(moe_run, only=["moe_pathways"], progress=False)
    loaded = MoEPathwaysAnalysis.load(moe_run)
    assert loaded.to_json() == json.loads(written["moe_pathways"].read_text())
    assert MoEPathwaysAnalysis.from_json(loaded.to_json()) == loaded
    assert loaded.over_training().steps == (0, 10, 20, 30)
    sec = moe_pathways_section(moe_run)
    assert sec.title == "MoE expert pathways" and len(sec.figures) == 1 and sec.figures[0].png[:4] == b"\x89PNG"
    assert "Correlation with test accuracy over the 4 checkpoints" in sec.text and "Spearman" in sec.headline
    assert set(sec.numbers["correlations"]) == {"edit_distance", "edit_distance_same_answer", "edit_distance_shuffled",
                                                "consistency", "consistency_router", "usage_entropy"}


def test_every_analysis_on_an_moe_run_applies_or_says_why_and_the_report_builds(moe_run, caplog):
    """An MoE model has no single MLP neuron layer: the neuron-reading analyses skip it with that reason
    instead of failing, ``moe_pathways`` runs, and the report renders its section."""
    with caplog.at_level(logging.INFO, logger="mechgrok.analyze"):
        written = mg.analyze(moe_run, progress=False)
    assert "moe_pathways" in written
    for name in ("progress", "neurons", "circuits", "sae", "influence"):
        assert name not in written
        assert f"analysis {name!r}" in caplog.text
    assert caplog.text.count("no single MLP neuron layer") == 5
    assert "analysis 'lazy_rich'" in caplog.text and "data-dependent choice" in caplog.text
    html = mg.report.build(moe_run).read_text()
    assert "MoE expert pathways" in html
