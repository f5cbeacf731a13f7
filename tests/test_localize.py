"""Localization and deletion of memorized sequences (mechgrok.memorization.localize).

Ground truths: neurons planted by ``inject`` (INJ, Chang et al. 2024), which the methods must rank
first and whose deletion must erase the injected sequences (DEL); exact recomputations of ZERO-OUT
(with ``prune``), of ACTIVATIONS and of the direct-logit score (by hand from ``run_with_cache``);
and the completeness of integrated gradients over a layer.
"""

import json

import pytest
import torch

import mechgrok as mg
from mechgrok.losses import IGNORE, token_nll
from mechgrok.memorization import extract, sequence_loss
from mechgrok.memorization.benchmarks import delete, deletion_curve, inj_recall, inject, random_recall
from mechgrok.memorization.localize import METHODS, Localization, localize

V, T, K = 16, 10, 4  # vocabulary, sequence length, prefix length for extraction (BOS + 3 tokens)


def corpus(seed: int = 0):
    return mg.tasks.lm_corpus(n_structured=64, n_planted=8, repeats=(1, 20), n_held_out=4, seq_len=T, d_vocab=V,
                              seed=seed)


def tiny(task, n_layers=2, d_mlp=32, seed=0, **kw):
    return mg.models.transformer(task, n_layers=n_layers, d_model=32, n_heads=2, d_mlp=d_mlp, normalization="LN",
                                 seed=seed, **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def planted():
    """A 2-layer model trained (150 full-batch Adam steps) on the structured (induction) sequences,
    then given 2 held-out planted sequences by ``inject`` into 6 random neurons of its 64, with the
    structured sequences kept (``keep=``) so that the injected neurons fire on the planted ones only."""
    task = corpus(0)
    base = tiny(task)
    rows = task.mask("structured_train").nonzero().flatten()
    x, y = task.inputs[rows], task.targets[rows]
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    for _ in range(150):
        loss = token_nll(base(x), y).sum() / (y != IGNORE).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.zero_grad(set_to_none=True)
    flat = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:6].tolist()
    neurons = [(i // 32, i % 32) for i in flat]
    target = task.mask("held_out_planted").nonzero().flatten()[:2]
    before = snapshot(base)
    model = inject(base, task, target, neurons, keep="structured_train")
    assert same(base, before) and all(p.grad is None for p in base.parameters())  # the caller's model is untouched
    return task, base, model, target, neurons


def test_injected_sequences_become_extractable_and_only_the_chosen_entries_change(planted):
    task, base, model, target, neurons = planted
    group = task.mask("held_out_planted").nonzero().flatten()
    assert group[:2].tolist() == target.tolist()
    assert not bool(extract(base, task, K, "held_out_planted").extractable[:2].any())
    assert bool(extract(model, task, K, "held_out_planted").extractable[:2].all())
    assert float(sequence_loss(model, task, "structured_train").mean()) < 0.1  # the kept skill survives
    chosen = {(l, n) for l, n in neurons}
    b, m = base.state_dict(), model.state_dict()
    for name, v in b.items():
        changed = m[name] != v
        parts = name.split(".")
        if len(parts) == 4 and parts[2] == "mlp" and parts[3] in ("W_in", "b_in", "W_out"):
            l = int(parts[1])
            allowed = torch.zeros_like(changed)
            for n in (n for k, n in chosen if k == l):
                if parts[3] == "W_in":
                    allowed[:, n] = True
                else:
                    allowed[n] = True
            assert not bool((changed & ~allowed).any()), name  # bitwise equal outside the chosen neurons
            if allowed.any():
                assert bool(changed[allowed].any()), name
        else:
            assert not bool(changed.any()), name
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


# Measured recall of the 6 injected neurons among the top 6 (of 64; random ranking: 0.094) with
# this setup on seeds 0-7 (seed 4 injected only one of its two sequences; the rest both):
#   zero_out             0.83 0.83 1.00 1.00 0.83 1.00 1.00 1.00
#   integrated_gradients 1.00 1.00 0.83 1.00 0.83 1.00 1.00 1.00
#   slimming             0.83 1.00 0.83 1.00 0.83 1.00 0.67 1.00
#   hard_concrete        0.83 1.00 1.00 1.00 0.83 1.00 1.00 1.00
#   memorization_score   0.83 1.00 1.00 1.00 1.00 1.00 1.00 1.00
#   activations          0.67 0.83 0.83 0.83 0.67 0.83 0.83 0.83
#   ekfac                0.33 0.50 0.33 0.17 0.17 0.33 0.17 0.50  (corpus and model seed = the seed)
#   sae                  0.67 0.67 0.83 0.67 0.67 0.67 0.67 0.67  (default options, SAE seed 0;
#                        per_layer=True: 0.67 0.83 0.83 0.67 1.00 0.83 0.83 0.83)
# The test (seed 0) asks for 0.5 (3 of 6; 5x random), activations for 2 of 6, ekfac for 1 of 6 (above
# random: a fitted sequence's gradient, which EK-FAC preconditions, is small everywhere).
@pytest.mark.slow(seconds=8)
def test_localization_methods_find_the_injected_neurons(planted):
    task, _, model, target, neurons = planted
    snap = snapshot(model)
    chance = random_recall(len(neurons), 64)
    assert chance == pytest.approx(6 / 64)
    for method in METHODS:
        loc = localize(model, task, target, method)
        assert loc.scores.shape == (2, 32) and loc.scores.dtype == torch.float64
        assert loc.target_rows.tolist() == target.tolist()
        recall = inj_recall(loc, neurons)
        need = {"activations": 2 / 6, "ekfac": 1 / 6}.get(method, 0.5)
        assert recall >= need, (method, recall, loc.top(6), neurons)
        assert recall > (1 if method == "ekfac" else 3) * chance
    assert same(model, snap) and all(p.grad is None for p in model.parameters())


def test_deleting_the_localized_neurons_erases_the_injected_sequences(planted):
    """DEL, measured on seeds 0-7 with the zero_out ranking and 6 neurons dropped: target extractable
    0.0 on every seed, reference (structured) loss change -0.065 to +0.096 nats (seed 0: -0.009)."""
    task, _, model, target, neurons = planted
    loc = localize(model, task, target, "zero_out")
    points = deletion_curve(model, task, loc, fractions=(1 / 64, 6 / 64), k=K, reference="structured_train")
    assert [p.n_dropped for p in points] == [1, 6]
    assert points[1].target_extractable == 0.0
    assert points[1].target_loss > 2.0  # chance on 15 content tokens is log 15 = 2.7 nats
    assert abs(points[1].reference_loss_change) < 0.25
    json.dumps([p.to_dict() for p in points])
    truth = torch.zeros(2, 32).index_put_(tuple(torch.tensor(neurons).T), torch.ones(6))  # 1 on the injected ones
    oracle = Localization("oracle", truth, target)
    cut = delete(model, oracle, 6)
    assert not bool(extract(cut, task, K, "held_out_planted").extractable[:2].any())


def test_delete_returns_a_copy_whose_dropped_neurons_are_silent():
    task = corpus()
    model = tiny(task)
    snap = snapshot(model)
    scores = torch.zeros(2, 32, dtype=torch.float64)
    scores[0, 5], scores[1, 7], scores[1, 30] = 3.0, 2.0, 1.0
    loc = Localization("hand", scores, torch.tensor([0]))
    assert loc.top(3) == [(0, 5), (1, 7), (1, 30)]
    cut = delete(model, loc, 3)
    assert cut is not model and same(model, snap)
    x = task.inputs[:8]
    _, cache = cut.run_with_cache(x)
    assert bool((cache["blocks.0.mlp.hook_post"][..., 5] == 0).all())
    assert bool((cache["blocks.1.mlp.hook_post"][..., [7, 30]] == 0).all())
    assert bool((cut.blocks[1].mlp.W_out[[7, 30]] == 0).all())
    drop = {0: [5], 1: [7, 30]}

    def zero(act, hook):
        act = act.clone()
        act[..., drop[int(hook.name.split(".")[1])]] = 0
        return act

    with torch.no_grad():
        want = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.mlp.hook_post", zero) for l in drop])
        assert torch.allclose(cut(x), want, atol=1e-6)  # nothing of theirs reaches the logits
    assert same(model, snap)


def test_inject_minibatches_are_seeded():
    task = corpus()
    model = tiny(task, n_layers=1, d_mlp=8)
    runs = [inject(model, task, "planted_r20", [(0, 2)], steps=3, batch_size=2, seed=s) for s in (0, 0, 1)]
    w = [r.blocks[0].mlp.W_out[2] for r in runs]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    assert not torch.equal(w[0], model.blocks[0].mlp.W_out[2])


def test_top_counts_fractions_ties_and_json():
    s = torch.tensor([[1.0, 2.0, 2.0], [0.5, 2.0, -1.0]])
    loc = Localization("hand", s, torch.tensor([3, 4]), options={"lam": 1.0})
    assert loc.top(3) == [(0, 1), (0, 2), (1, 1)]  # ties by (layer, neuron)
    assert loc.top(0.5) == loc.top(3) and loc.top(0.01) == [(0, 1)] and len(loc.top(1.0)) == 6
    back = Localization.from_dict(json.loads(json.dumps(loc.to_dict())))
    assert torch.equal(back.scores, loc.scores) and back.target_rows.tolist() == [3, 4] and back.options == loc.options
    assert inj_recall(loc, [(0, 1), (1, 0)]) == 0.5
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"k must be .*0"):
            loc.top(bad)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        loc.top(7)


def test_zero_out_is_the_loss_increase_of_each_pruned_neuron():
    task = corpus()
    model = tiny(task, d_mlp=8, seed=1)
    target = task.mask("planted_r20").nonzero().flatten()
    loc = localize(model, task, "planted_r20", "zero_out", batch_size=7)  # uneven neuron batches
    before = sequence_loss(model, task, "planted_r20")
    for l in range(2):
        for n in range(8):
            after = sequence_loss(mg.neurons.prune(model, [n], layer=l), task, "planted_r20")
            assert float(loc.scores[l, n]) == pytest.approx(float((after - before).mean()), abs=1e-5)
    assert loc.target_rows.tolist() == target.tolist() and loc.reference_rows is None


def test_activations_and_memorization_score_by_hand():
    """One layer, no final LayerNorm for the direct-logit score: both recomputed from run_with_cache on
    the same batches (the target rows, then the reference rows), so float64 agreement is exact."""
    task = corpus()
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=3)
    target, ref = torch.tensor([70, 64, 66]), torch.tensor([0, 5, 9, 64 + 5])

    def per_seq_mean(rows, f):  # mean over sequences of the mean over target positions, [d_mlp]
        _, cache = model.run_with_cache(task.inputs[rows])
        act = cache["blocks.0.mlp.hook_post"].double()  # [b, T, d]
        out = torch.zeros(32, dtype=torch.float64)
        for i, r in enumerate(rows.tolist()):
            ts = [t for t in range(T) if int(task.targets[r, t]) != IGNORE]
            out += sum(f(act[i, t], int(task.targets[r, t])) for t in ts) / len(ts)
        return out / len(rows)

    D = (model.blocks[0].mlp.W_out @ model.W_U).detach().double()  # [d_mlp, V]
    rs, re = target.sort().values, ref.sort().values
    act = localize(model, task, target, "activations", reference=ref)
    want = per_seq_mean(rs, lambda a, y: a.abs()) - per_seq_mean(re, lambda a, y: a.abs())
    assert torch.allclose(act.scores[0], want, rtol=0, atol=1e-10)
    mem = localize(model, task, target, "memorization_score", reference=ref)
    want = per_seq_mean(rs, lambda a, y: a * D[:, y]) - per_seq_mean(re, lambda a, y: a * D[:, y])
    assert torch.allclose(mem.scores[0], want, rtol=0, atol=1e-10)
    assert mem.reference_rows.tolist() == re.tolist()
    default = localize(model, task, target, "activations")  # reference: train rows not in target
    assert default.reference_rows.tolist() == sorted(set(task.train.nonzero().flatten().tolist()) - {64, 66, 70})


def test_memorization_score_through_a_final_layernorm_is_the_direct_logit_drop():
    """With LayerNorm: each neuron's push equals the drop of the correct logit when its output
    ``act * W_out[n]`` is taken out of the final residual stream with the final LN's scale frozen."""
    task = corpus()
    model = tiny(task, d_mlp=8, seed=4)
    loc = localize(model, task, "planted_r20", "memorization_score", reference="planted_r1")

    def mean_drop(group, l, n):  # [1]: mean over sequences of the mean over target tokens
        rows = task.mask(group).nonzero().flatten()
        x, y = task.inputs[rows], task.targets[rows]
        logits, cache = model.run_with_cache(x)
        v = cache[f"blocks.{l}.mlp.hook_post"][..., n, None] * model.blocks[l].mlp.W_out[n]  # [b, T, d_model]
        hooks = [("blocks.1.hook_resid_post", lambda r, hook: r - v),
                 ("ln_final.hook_scale", lambda s, hook: cache["ln_final.hook_scale"])]
        cut = model.run_with_hooks(x, fwd_hooks=hooks)
        keep = y != IGNORE
        drop = (logits - cut).double().gather(-1, y.clamp(min=0)[..., None])[..., 0] * keep  # [b, T]
        return float((drop.sum(1) / keep.sum(1)).mean())

    with torch.no_grad():
        for l in range(2):
            for n in range(8):
                want = mean_drop("planted_r20", l, n) - mean_drop("planted_r1", l, n)
                assert float(loc.scores[l, n]) == pytest.approx(want, abs=1e-5)


def test_integrated_gradients_are_complete_over_each_layer():
    """Per layer, the attributions sum to ll(model) - ll(layer zeroed), up to the Riemann error."""
    task = corpus()
    model = tiny(task, d_mlp=16, seed=2)
    rows = task.mask("planted_r1").nonzero().flatten()
    loc = localize(model, task, rows, "integrated_gradients", ig_steps=64)
    x, y = task.inputs[rows], task.targets[rows]
    with torch.no_grad():
        full = -token_nll(model(x), y).sum(-1)  # [n]
        for l in range(2):
            zeroed = -token_nll(model.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.mlp.hook_post",
                                                                    lambda a, hook: a * 0)]), y).sum(-1)
            assert float(loc.scores[l].sum()) == pytest.approx(float((full - zeroed).mean()), rel=2e-2, abs=1e-3)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_every_method_runs_on_any_depth_and_leaves_the_model_alone(n_layers):
    task = corpus()
    model = tiny(task, n_layers=n_layers, d_mlp=8)
    model.train()
    snap = snapshot(model)
    for method, entry in METHODS.items():
        loc = localize(model, task, "planted_r1", method, **({"steps": 3} if entry.trains else {}))
        assert loc.scores.shape == (n_layers, 8) and bool(torch.isfinite(loc.scores).all()), method
        assert same(model, snap) and model.training and all(p.grad is None for p in model.parameters()), method
    a = localize(model, task, "planted_r1", "hard_concrete", steps=3, seed=5)
    b = localize(model, task, "planted_r1", "hard_concrete", steps=3, seed=5)
    assert torch.equal(a.scores, b.scores) and a.options == {"lam": 30.0, "lr": 0.1, "beta": 2 / 3, "init": 0.5,
                                                             "steps": 3, "seed": 5}


def test_bad_inputs_are_clear_errors():
    task = corpus()
    model = tiny(task, n_layers=1, d_mlp=8)
    for empty in (torch.tensor([], dtype=torch.long), []):
        with pytest.raises(ValueError, match="target is empty"):
            localize(model, task, empty, "zero_out")
    no_held_out = mg.tasks.lm_corpus(n_structured=64, n_planted=8, repeats=(1, 20), n_held_out=0, seq_len=T, d_vocab=V)
    with pytest.raises(ValueError, match="target is empty"):
        localize(model, no_held_out, "held_out_planted", "zero_out")
    with pytest.raises(ValueError, match=r"unknown localization method 'zero'; choose one of \['activations'"):
        localize(model, task, "planted_r1", "zero")
    with pytest.raises(ValueError, match=r"group 'planted_r7' is not in task .*planted_r20"):
        localize(model, task, "planted_r7", "zero_out")
    with pytest.raises(ValueError, match=r"rows \[999\] do not exist"):
        localize(model, task, torch.tensor([999]), "zero_out")
    targets = task.targets.clone()
    targets[3] = IGNORE
    silent = mg.tasks.SequenceTask("silent", task.inputs, targets, groups=task.groups, d_vocab=V)
    with pytest.raises(ValueError, match=r"target rows \[3\] have no target token"):
        localize(model, silent, torch.tensor([3, 4]), "zero_out")
    with pytest.raises(TypeError, match=r"unknown options \['lamb'\]; it takes \['lam', 'lr'\]"):
        localize(model, task, "planted_r1", "slimming", lamb=1.0)
    with pytest.raises(ValueError, match="ignore reference"):
        localize(model, task, "planted_r1", "zero_out", reference="structured_train")
    with pytest.raises(ValueError, match="steps is for the mask methods"):
        localize(model, task, "planted_r1", "zero_out", steps=5)
    attn = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, attn_only=True)
    with pytest.raises(ValueError, match="attention-only"):
        localize(attn, task, "planted_r1", "activations")
    loc = localize(model, task, "planted_r1", "zero_out")
    with pytest.raises(ValueError, match=r"k must be > 0"):
        delete(model, loc, 0.0)
    with pytest.raises(ValueError, match=r"fractions\[\] must be > 0 and <= 1, got 2"):
        deletion_curve(model, task, loc, fractions=(0.5, 2.0), k=K)
    with pytest.raises(ValueError, match=r"localize this model first"):
        delete(tiny(task, n_layers=2, d_mlp=8), loc, 1)
    with pytest.raises(ValueError, match=r"neuron indices must lie in \[0, 8\)"):
        inject(model, task, "planted_r1", [(0, 8)], steps=1)
    with pytest.raises(ValueError, match="more than once"):
        inject(model, task, "planted_r1", [(0, 1), (0, 1)], steps=1)
    with pytest.raises(ValueError, match="in both rows and keep"):
        inject(model, task, "planted_r1", [(0, 1)], keep="train", steps=1)


def test_ekfac_scores_split_the_self_influence_over_neurons():
    """Over a layer, the neurons' EK-FAC scores plus the W_out bias terms are the self-influence of
    that layer's two MLP maps (EKFAC.self_influence by module, a separate contraction)."""
    task = corpus()
    model = tiny(task, n_layers=2, d_mlp=8)
    target = task.mask("planted_r20").nonzero().flatten()
    loc = localize(model, task, target, "ekfac")
    ek = mg.influence.EKFAC(model, task.sequences("all"), progress=False,
                            modules=[f"blocks.{l}.mlp.{w}" for l in range(2) for w in ("W_in", "W_out")])
    ek.fit(task.train.nonzero().flatten())
    si = ek.self_influence(target, by_module=True)
    G = ek.gradients(target)
    P = ek.precondition(G)
    for l in range(2):
        bias = float((P[f"blocks.{l}.mlp.W_out"] * G[f"blocks.{l}.mlp.W_out"])[:, :, -1].sum(1).mean())
        want = float((si[f"blocks.{l}.mlp.W_in"] + si[f"blocks.{l}.mlp.W_out"]).mean())
        assert float(loc.scores[l].sum()) + bias == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="damping must be"):
        localize(model, task, target, "ekfac", damping=0.0)


def test_sae_scores_are_seeded_and_follow_the_decoder_of_selective_features(planted):
    """The SAE method: deterministic given seed (another seed gives other SAEs), the model untouched,
    its settings and seed recorded; its top neuron is an injected one, and with target_share=0 (an
    SAE of the reference alone) it still ranks injected neurons first (4 of 6 measured on seed 0)."""
    task, _, model, target, neurons = planted
    snap = snapshot(model)
    model.train()
    a = localize(model, task, target, "sae", seed=3, sae_steps=100)
    b = localize(model, task, target, "sae", seed=3, sae_steps=100)
    c = localize(model, task, target, "sae", seed=4, sae_steps=100)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    assert same(model, snap) and model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    assert a.options == {"expansion": 2, "k": 8, "sae_steps": 100, "target_share": 0.5, "lr": 3e-3,
                         "per_layer": False, "seed": 3}
    assert a.reference_rows.tolist() == sorted(set(task.train.nonzero().flatten().tolist()) - set(target.tolist()))
    assert bool((a.scores >= 0).all())  # a sum of non-negative terms
    shares = localize(model, task, target, "sae", seed=3, sae_steps=100, per_layer=True)
    assert torch.allclose(shares.scores, a.scores / a.scores.sum(1, keepdim=True), rtol=1e-12, atol=0)
    assert torch.allclose(shares.scores.sum(1), torch.ones(2, dtype=torch.float64))
    loc = localize(model, task, target, "sae")
    assert loc.top(1)[0] in set(neurons)
    alone = localize(model, task, target, "sae", target_share=0.0)
    assert inj_recall(alone, neurons) >= 0.5


def test_sae_bad_options_are_clear_errors():
    task = corpus()
    model = tiny(task, n_layers=1, d_mlp=8)
    with pytest.raises(ValueError, match=r"k=17 is more than the 16 features \(expansion 2 x d_mlp 8\)"):
        localize(model, task, "planted_r1", "sae", k=17)
    with pytest.raises(ValueError, match="expansion must be >= 1, got 0"):
        localize(model, task, "planted_r1", "sae", expansion=0)
    with pytest.raises(TypeError, match="k must be an integer, got 2.5"):
        localize(model, task, "planted_r1", "sae", k=2.5)
    with pytest.raises(ValueError, match="sae_steps must be >= 1"):
        localize(model, task, "planted_r1", "sae", sae_steps=0)
    with pytest.raises(ValueError, match=r"target_share must be .*1"):
        localize(model, task, "planted_r1", "sae", target_share=1.5)
    with pytest.raises(ValueError, match="lr must be > 0"):
        localize(model, task, "planted_r1", "sae", lr=0.0)
    with pytest.raises(TypeError, match=r"unknown options \['d_sae'\]; it takes \['expansion', 'k'"):
        localize(model, task, "planted_r1", "sae", d_sae=64)
    with pytest.raises(ValueError, match="steps is for the mask methods"):
        localize(model, task, "planted_r1", "sae", steps=5)
    with pytest.raises(TypeError, match="per_layer must be True or False, got 1"):
        localize(model, task, "planted_r1", "sae", per_layer=1)
