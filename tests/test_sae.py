"""SAE features: training through sae-lens, saving in its format, evaluation, labels, interventions.

Models and SAEs are tiny and untrained or briefly trained; the science checks use SAEs built by
hand, whose features are known exactly.
"""

import math

import pytest
import torch

import mechgrok as mg

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

HOOK = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def setup():
    task = mg.tasks.modular_arithmetic(p=11, train_frac=0.6, corrupt_frac=0.3, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    mlp = mg.models.mlp(task, width=24, seed=0)
    return task, model, mlp


def tiny(model, task, tmp_path, name="sae", **kw):
    opts = dict(hook=HOOK, d_sae=48, k=4, steps=40, batch_size=32, seed=0, progress=False, out=tmp_path / name)
    return mg.sae.train(model, task, **(opts | kw))


def identity_sae(d: int, hook: str = HOOK, position=None):  # noqa: D103
    """A ReLU SAE whose features are the coordinates of the activation: W_enc = W_dec = I."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d, d_sae=d, metadata=SAEMetadata(hook_name=hook, mechgrok_position=position))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


# --- training, saving, loading ----------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(mg.sae.ARCHITECTURES))
def test_train_saves_in_sae_lens_format(setup, tmp_path, arch):
    task, model, _ = setup
    sae = tiny(model, task, tmp_path, architecture=arch)
    folder = tmp_path / "sae"
    assert {"cfg.json", "sae_weights.safetensors", "training_log.json"} <= {f.name for f in folder.iterdir()}
    assert type(sae).__name__ == mg.sae.ARCHITECTURES[arch][2]
    assert mg.sae.site(sae) == (HOOK, -1) and sae.cfg.metadata.mechgrok_architecture == arch
    plain = sae_lens.SAE.load_from_disk(str(folder))  # plain sae-lens, no mechgrok involved
    x = mg.sae.activations(model, task, HOOK)
    with torch.no_grad():
        assert torch.equal(plain.encode(x), sae.encode(x))
        assert torch.equal(plain.decode(plain.encode(x)), sae.decode(sae.encode(x)))
    log = __import__("json").loads((folder / "training_log.json").read_text())
    assert log[-1]["step"] == 39 and 0 <= log[-1]["l0"] <= 48


def test_seeded_and_fed_from_disk(setup, tmp_path):
    task, model, _ = setup
    a = tiny(model, task, tmp_path, "a", seed=3)
    b = tiny(model, task, tmp_path, "b", seed=3)
    c = tiny(model, task, tmp_path, "c", seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.W_enc, c.W_enc)
    mg.capture(model, task.inputs, [HOOK], out=tmp_path / "acts", progress=False)
    d = mg.sae.train(hook=HOOK, acts=tmp_path / "acts", d_sae=48, k=4, steps=40, batch_size=32, seed=3,
                     progress=False, out=tmp_path / "d")
    assert all(torch.equal(a.state_dict()[k], d.state_dict()[k]) for k in a.state_dict())
    state = torch.get_rng_state()
    tiny(model, task, tmp_path, "e")
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_config_object_equals_keywords_and_is_recorded(setup, tmp_path):
    task, model, _ = setup
    cfg = mg.sae.SAEConfig(d_sae=48, k=4, steps=40, batch_size=32, seed=3)
    a = mg.sae.train(model, task, HOOK, cfg, progress=False, out=tmp_path / "a")
    b = tiny(model, task, tmp_path, "b", seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert mg.sae.load(tmp_path / "a").cfg.metadata.mechgrok_config == cfg.to_dict()  # saved with the SAE
    # keywords override the config; names that are not fields are sae-lens options
    c = cfg.replace(k=8, aux_loss_coefficient=0.5)
    assert c.k == 8 and c.options == {"aux_loss_coefficient": 0.5} and cfg.k == 4
    assert mg.sae.SAEConfig.from_dict(c.to_dict()) == c
    d = mg.sae.train(model, task, HOOK, cfg, k=8, progress=False, out=tmp_path / "d")
    assert d.cfg.metadata.mechgrok_config["k"] == 8
    with pytest.raises(ValueError, match="SAEConfig: steps must be a positive integer"):
        mg.sae.SAEConfig(steps=0)
    with pytest.raises(ValueError, match="unknown fields"):
        mg.sae.SAEConfig.from_dict({"width": 3})
    with pytest.raises(TypeError, match="SAEConfig"):
        mg.sae.train(model, task, HOOK, {"d_sae": 48})


def test_training_learns(setup, tmp_path):
    task, model, _ = setup
    sae = tiny(model, task, tmp_path, architecture="topk", steps=300, d_sae=64, k=8)
    ev = mg.sae.evaluate(model, sae, task)
    assert ev["by_split"]["all"]["explained_variance"] > 0.8 and ev["by_split"]["all"]["l0"] == 8


def test_bad_input(setup, tmp_path):
    task, model, _ = setup
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny(model, task, tmp_path, architecture="gated")
    with pytest.raises(ValueError, match="k=64"):
        tiny(model, task, tmp_path, k=64)
    with pytest.raises(ValueError, match="batch_size"):
        tiny(model, task, tmp_path, batch_size=10_000)
    with pytest.raises(ValueError, match="unknown split"):
        tiny(model, task, tmp_path, split="val")
    with pytest.raises(ValueError, match="bad option"):
        tiny(model, task, tmp_path, architecture="standard", no_such_field=1)
    with pytest.raises(ValueError, match="position"):
        tiny(model, task, tmp_path, position=None)
    with pytest.raises(Exception, match="unknown hook"):
        tiny(model, task, tmp_path, hook="blocks.0.mlp.hook_pst")
    tiny(model, task, tmp_path, "kept")
    before = (tmp_path / "kept" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny(model, task, tmp_path, "kept", seed=1)
    assert (tmp_path / "kept" / "sae_weights.safetensors").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="not a saved SAE"):
        mg.sae.load(tmp_path)


# --- interventions ----------------------------------------------------------------------------

def test_splice_and_ablate_match_manual_hooks(setup):
    task, model, _ = setup
    sae = identity_sae(32, position=-1)
    x = task.inputs[:40]
    base = mg.models.final_logits(model, x)
    assert torch.equal(mg.models.final_logits(mg.sae.ablate(model, sae, []), x), base)
    assert torch.allclose(mg.models.final_logits(mg.sae.splice(model, sae), x), base, atol=1e-5)  # ReLU(post) = post
    drop = [1, 5, 7]

    def zero(act, hook):
        act = act.clone()
        act[:, -1, drop] = 0
        return act

    manual = model.run_with_hooks(x, fwd_hooks=[(HOOK, zero)])[:, -1]
    assert torch.allclose(mg.models.final_logits(mg.sae.ablate(model, sae, drop), x), manual, atol=1e-5)
    double = mg.models.final_logits(mg.sae.ablate(model, sae, drop, scale=2.0), x)
    assert not torch.allclose(double, base)
    assert torch.equal(mg.models.final_logits(model, x), base)  # the original is untouched
    with pytest.raises(ValueError, match="feature indices"):
        mg.sae.ablate(model, sae, [32])


def test_ablation_study(setup):
    task, _, mlp = setup
    sae = identity_sae(24)
    study = mg.sae.ablation_study(mlp, sae, task, {"few": [0, 1, 2]}, n_random=3, seed=5)
    g = study["groups"]["few"]
    assert g["n"] == 3 and len(g["random"]["draws"]) == 3
    assert g["ablated"] == mg.evaluate(mg.sae.ablate(mlp, sae, [0, 1, 2]), task)
    again = mg.sae.ablation_study(mlp, sae, task, {"few": [0, 1, 2]}, n_random=3, seed=5)
    assert again["groups"]["few"]["random"] == g["random"]
    assert study["none"] == mg.evaluate(mlp, task)


# --- evaluation and features ------------------------------------------------------------------

def test_evaluate_matches_definitions(setup, tmp_path):
    task, model, _ = setup
    sae = tiny(model, task, tmp_path, steps=60)
    ev = mg.sae.evaluate(model, sae, task)
    x = mg.sae.activations(model, task, HOOK)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    test = task.mask("test")
    ev_test = 1 - ((x - x_hat)[test] ** 2).sum() / ((x[test] - x[test].mean(0)) ** 2).sum()
    assert math.isclose(ev["by_split"]["test"]["explained_variance"], float(ev_test), rel_tol=1e-5)
    assert math.isclose(ev["by_split"]["all"]["l0"], float((f > 0).sum(1).float().mean()), rel_tol=1e-6)
    assert ev["dead_fraction"] == float(((f > 0).sum(0) == 0).float().mean())
    assert ev["spliced"] == mg.evaluate(mg.sae.splice(model, sae), task)
    perfect = mg.sae.evaluate(model, identity_sae(32, position=-1), task)
    assert perfect["by_split"]["all"]["explained_variance"] > 1 - 1e-6
    assert all(abs(v - 1) < 1e-3 for v in perfect["loss_recovered"].values() if v is not None)


def test_push_equals_direct_memorization_score(setup):
    # With an identity SAE on an MLP's hidden layer, each feature is a neuron and the path to the
    # logits is linear, so the attribution is exact: it must equal the neurons' direct score.
    task, _, mlp = setup
    stats = mg.sae.features(mlp, identity_sae(24), task)
    expected = mg.neurons.memorization_score(mlp, task)
    assert torch.allclose(stats.corrupted_push, expected, rtol=1e-4, atol=1e-6)


def test_labels_on_known_features(setup):
    task, _, mlp = setup
    stats = mg.sae.features(mlp, identity_sae(24), task)
    acts = stats.acts.double()
    corr, train = task.mask("train_corrupted"), task.mask("train")
    share = acts[corr].sum(0) / acts[train].sum(0)
    assert torch.allclose(stats.corrupted_share.double(), share, equal_nan=True)
    # η² by hand for one feature
    a, y = acts[:, 3], task.true_labels
    means = torch.stack([a[y == c].mean() if bool((y == c).any()) else a.mean() for c in range(int(y.max()) + 1)])
    eta = float(((means[y] - a.mean()) ** 2).sum() / ((a - a.mean()) ** 2).sum())
    assert math.isclose(float(stats.answer_share[3]), eta, rel_tol=1e-4)
    for f, lab in enumerate(stats.labels):
        mem = bool(share[f] >= (1 + stats.base_rate) / 2) and bool(stats.corrupted_push[f] > 0)
        assert (lab == "memorizing") == mem
    counts = stats.counts()
    assert sum(counts[k] for k in mg.sae.LABELS) == 24
    row = stats.table(k=2)[0]
    assert row["label"] in mg.sae.LABELS and len(row["top_examples"]) == 5
    assert stats.top_examples(0, 3).tolist() == torch.argsort(stats.acts[:, 0], descending=True, stable=True)[:3].tolist()


def test_grid_and_answer_features_are_found():
    # A hand-built MLP (square activation) on a + b mod 13 and a hand-built SAE with two features:
    # f0 = cos²(3a), a pure frequency 6 over the (a, b) grid that does not depend on the answer;
    # f1 = relu(cos(3(a + b))), a function of the answer alone (η² = 1), periodic with frequency 3
    # over the answer (cos(k(a+b)) = [(ca+cb)² − (ca−cb)² − (sa+sb)² + (sa−sb)²] / 4).
    from sae_lens import StandardSAE, StandardSAEConfig

    p, k = 13, 3
    task = mg.tasks.modular_arithmetic(p=p, train_frac=0.5, seed=0)
    mlp = mg.models.mlp(task, width=5, act="square", seed=0)
    ang = 2 * math.pi * k * torch.arange(p) / p
    c, s_ = torch.cos(ang), torch.sin(ang)
    with torch.no_grad():
        W = mlp.blocks[0].mlp.W_in  # [2p, 5]: rows one-hot a, then one-hot b
        W.zero_()
        W[:p, 0] = c
        for unit, (u, sign) in enumerate([(c, 1), (c, -1), (s_, 1), (s_, -1)], start=1):
            W[:p, unit], W[p:, unit] = u, sign * u
    cfg = StandardSAEConfig(d_in=5, d_sae=2, metadata=SAEMetadata(hook_name=HOOK, mechgrok_position=None))
    sae = StandardSAE(cfg).eval()
    with torch.no_grad():
        sae.W_enc.zero_(), sae.b_enc.zero_(), sae.b_dec.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.W_enc[1:, 1] = torch.tensor([1.0, -1.0, -1.0, 1.0]) / 4
        sae.W_dec.copy_(torch.linalg.pinv(sae.W_enc))
    stats = mg.sae.features(mlp, sae, task)
    assert int(stats.dominant_freq[0]) == 2 * k and float(stats.freq_fraction[0]) > 1 - 1e-6
    assert float(stats.answer_share[0]) < 0.2
    assert float(stats.answer_share[1]) > 1 - 1e-6 and int(stats.dominant_freq[1]) == k
    relu_cos_share = (1 / 8) / (1 / 8 + sum((2 / (math.pi * (n * n - 1))) ** 2 / 2 for n in range(2, 40, 2)))
    assert abs(float(stats.freq_fraction[1]) - relu_cos_share) < 0.03  # fundamental of relu(cos)
    assert stats.labels == ["generalizing", "generalizing"]
    assert stats.spectra.shape == (2, p // 2 + 1) and int(stats.spectra[1].argmax()) == k
    assert float(stats.spectra[1].sum()) <= 1 + 1e-5 and float(stats.spectra[0, 2 * k]) > 1 - 1e-5
    assert stats.counts()["dead"] == 0


def test_analysis_over_training_and_report(tmp_path):
    task = mg.tasks.modular_arithmetic(p=11, train_frac=0.5, corrupt_frac=0.2, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    run = mg.train(model, task, mg.TrainConfig(steps=40, eval_every=20, checkpoint_every=20), out=tmp_path / "r",
                   progress=False)
    from mechgrok.analyses import sae_analysis

    data = sae_analysis(run, steps=60, training_sae_steps=30, n_random=2, n_training_steps=2, progress=False)
    assert data.hook == HOOK and data.settings["d_sae"] == 64 and data.settings["k"] == 4
    assert data.over_training["steps"] == [0, 20] and len(data.over_training["l0"]) == 2
    assert sum(data.counts[k] for k in mg.sae.LABELS) == 64
    assert (run.path / "analysis" / "sae" / "final" / "cfg.json").is_file()
    assert (run.path / "analysis" / "sae" / "step_000020" / "cfg.json").is_file()
    run.write_analysis("sae", data.to_json())
    html = mg.report.build(run).read_text()
    assert ">SAE features</h2>" in html and 'class="error"' not in html
    assert mg.sae.pick_steps([0, 10, 20, 30, 40], 3) == [0, 20, 40]
    with pytest.raises(ValueError, match="no checkpoints at steps"):
        mg.sae.over_training(run, HOOK, [7], steps=10, progress=False)


# --- features shared across tasks ---------------------------------------------------------------
def test_task_attribution_is_the_mean_ablation_effect_and_overlap(tmp_path):
    task = mg.tasks.multi_task([("add", 7), ("sub", 7)], train_frac=0.6, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    mg.train(model, task, mg.TrainConfig(steps=150, lr=1e-2, eval_every=50, checkpoint_every=150), progress=False)
    sae = mg.sae.train(model, task, HOOK, d_sae=48, k=4, steps=80, batch_size=32, progress=False, out=tmp_path / "s")
    attr = mg.sae.task_attribution(model, sae, task, "sub")
    idx = task.test.nonzero().flatten()
    idx = idx[task.task_ids[idx] == 1]
    y = task.labels[idx]
    with torch.no_grad():
        acts = sae.encode(mg.sae.activations(model, task, HOOK)[idx])

    @torch.no_grad()
    def metric(m):
        logits = m(task.inputs[idx])[:, -1].double()
        return float((logits.gather(1, y[:, None]).squeeze(1) - logits.mean(1)).mean())

    base = metric(model)
    for f in attr.abs().topk(3).indices.tolist():  # the last layer's MLP reaches the logits linearly: exact
        mean_f = float(acts[:, f].mean())
        ablated = mg.sae.edit(model, sae, lambda x, f=f: x + ((mean_f - sae.encode(x)[:, f])[:, None] * sae.W_dec[f]))
        assert abs((metric(ablated) - base) - (-float(attr[f]))) < 1e-4 * max(1.0, abs(float(attr[f])))
    # every feature mean-ablated at once moves the metric by the total attribution (linearity again)
    means = acts.mean(0)
    everything = mg.sae.edit(model, sae, lambda x: x + (means - sae.encode(x)) @ sae.W_dec)
    assert abs((base - metric(everything)) - float(attr.sum())) < 1e-4 * max(1.0, abs(float(attr.sum())))

    scores = torch.tensor([0.5, -0.1, 2.0, 0.3, 0.0])  # total 2.7; by |score|: 2.0, 0.5, 0.3, -0.1, 0
    assert mg.sae.select_features(scores, target=0.7)[0].tolist() == [2]  # 2.0 / 2.7 = 0.74
    chosen, share = mg.sae.select_features(scores, target=0.8)
    assert chosen.tolist() == [2, 0] and share == pytest.approx(2.5 / 2.7)
    assert mg.sae.select_features(scores, target=1.0)[0].tolist() == [2, 0, 3]  # 2.8 / 2.7 >= 1
    assert mg.sae.select_features(-scores)[0].numel() == 5  # nothing to explain: every feature
    res = mg.sae.feature_overlap(model, sae, task, baseline=200)
    assert res["names"] == ["add", "sub"] and set(res["pairs"]) == {"add|sub"}
    pair = res["pairs"]["add|sub"]
    assert pair["size_a"] == len(res["features"]["add"]) and 0 <= pair["jaccard"]["value"] <= 1
    assert res["scores"]["sub"] == attr.tolist()
    with pytest.raises(ValueError, match="unknown task 'mul'"):
        mg.sae.task_attribution(model, sae, task, "mul")
