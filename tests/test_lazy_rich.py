"""Tests for mechgrok.measures.ntk and the analysis ``lazy_rich`` (Kumar, Bordelon, Gershman and Pehlevan
2024), and for the lazy-training options of ``TrainConfig`` (``output_scale``, ``center_output``).

The hand-checkable models are Doshi MLPs in float64, whose tangent kernel has a closed form: with
``x`` the one-hot input, ``h = x W_in`` and ``C`` outputs,

- linear activation, ``f = h W_out``: ``K_ij = (x_i·x_j) ‖W_out‖²_F + C (h_i·h_j)``;
- square activation, ``f = h² W_out``: ``K_ij = 4 (x_i·x_j) Σ_u h_iu h_ju ‖W_out[u]‖² + C (h_i²·h_j²)``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import mechgrok as mg
from mechgrok import checkpoints
from mechgrok.analyses.lazy_rich import (
    LazyRichAnalysis,
    lazy_rich_analysis,
    lazy_rich_applies,
    lazy_rich_section,
    log_spaced_steps,
)
from mechgrok.losses import loss_fn
from mechgrok.measures.ntk import (
    LazyRichOverTraining,
    balanced_rows,
    empirical_ntk,
    feature_movement,
    kernel_distance,
    kernel_target_alignment,
    layer_of,
    lazy_rich_over_training,
)

P = 5


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=P, op="add", train_frac=0.6, seed=0)


def mlp(task, act="linear", width=6, seed=0):
    return mg.models.mlp(task, width=width, act=act, seed=seed).double()


def onehot(task, rows):
    x = task.inputs[rows]
    return torch.cat([torch.nn.functional.one_hot(x[:, 0], P), torch.nn.functional.one_hot(x[:, 1], P)], -1).double()


# ---------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("act", ["linear", "square"])
def test_ntk_of_a_two_layer_mlp_matches_its_closed_form(task, act):
    model = mlp(task, act)
    rows = torch.arange(12)
    x, W_in, W_out = onehot(task, rows), model.blocks[0].mlp.W_in.detach(), model.blocks[0].mlp.W_out.detach()
    h = x @ W_in  # [n, width]
    if act == "linear":
        want = (x @ x.T) * (W_out**2).sum() + P * (h @ h.T)
    else:
        want = 4 * (x @ x.T) * ((h * (W_out**2).sum(1)) @ h.T) + P * ((h**2) @ (h**2).T)
    got = empirical_ntk(model, task.inputs[rows])
    assert got.dtype == torch.float64 and got.shape == (12, 12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(model, task.inputs[rows], output_scale=3.0), 9 * want, rtol=1e-12,
                               atol=1e-12)
    # examples in blocks (max_floats below one output for all examples): the same kernel
    torch.testing.assert_close(empirical_ntk(model, task.inputs[rows], max_floats=200), want, rtol=1e-12, atol=1e-12)


def test_ntk_of_a_transformer_matches_per_output_autograd(task):
    model = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=1).double()
    x = task.inputs[:5]
    params = [p for p in model.parameters() if p.requires_grad]
    J = torch.zeros(5, P, sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(5):
        out = mg.models.final_logits(model, x[i:i + 1])[0]
        for c in range(P):
            g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            J[i, c] = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, g)])
    want = torch.einsum("icp,jcp->ij", J, J)
    torch.testing.assert_close(empirical_ntk(model, x), want, rtol=1e-10, atol=1e-10)
    assert model.training  # the model's mode is restored (it runs in eval mode inside)


def test_projection_is_exact_when_output_gradients_are_orthogonal_and_unbiased_otherwise(task):
    model = mlp(task, "linear")
    x = task.inputs[:8]
    exact = empirical_ntk(model, x)
    # with only W_out trainable, the gradients of different outputs are orthogonal: every ±1/√k
    # projection gives K exactly (Σ_r v_rc² = 1), whatever the seed
    model.blocks[0].mlp.W_in.requires_grad_(False)
    h = onehot(task, torch.arange(8)) @ model.blocks[0].mlp.W_in.detach()
    only_out = empirical_ntk(model, x)
    torch.testing.assert_close(only_out, P * (h @ h.T), rtol=1e-12, atol=1e-12)  # frozen W_in left out
    for seed in range(3):
        torch.testing.assert_close(empirical_ntk(model, x, outputs=2, seed=seed), only_out, rtol=1e-12, atol=1e-12)
    model.blocks[0].mlp.W_in.requires_grad_(True)
    # the full model: a projection is an estimate; its mean over seeds approaches K
    draws = [empirical_ntk(model, x, outputs=2, seed=s) for s in range(200)]
    assert not torch.allclose(draws[0], exact)
    mean = torch.stack(draws).mean(0)
    assert float((mean - exact).norm() / exact.norm()) < 0.05


def test_masks_leave_masked_weights_out(task):
    model = mlp(task, "linear")
    x = task.inputs[:6]
    masks = {"blocks.0.mlp.W_in": torch.zeros(2 * P, 6)}
    masked = empirical_ntk(model, x, masks=masks)
    model.blocks[0].mlp.W_in.requires_grad_(False)
    torch.testing.assert_close(masked, empirical_ntk(model, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        empirical_ntk(model, x, masks=masks)  # W_in is frozen now


def test_ntk_refuses_bad_arguments(task):
    model = mlp(task)
    with pytest.raises(TypeError, match="torch tensor"):
        empirical_ntk(model, [[1, 2, 5]])
    with pytest.raises(ValueError, match="outputs"):
        empirical_ntk(model, task.inputs[:3], outputs=0)
    with pytest.raises(ValueError, match="output_scale"):
        empirical_ntk(model, task.inputs[:3], output_scale=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(model, task.inputs[:3])


# ---------------------------------------------------------------------------- alignment, distance


def test_alignment_on_constructed_kernels():
    y = torch.tensor([0, 0, 1, 1])
    Y = torch.nn.functional.one_hot(y).double()
    T = Y @ Y.T
    for centered in (True, False):
        assert kernel_target_alignment(T, y, centered=centered) == pytest.approx(1.0, abs=1e-15)
        assert kernel_target_alignment(7.5 * T, y, centered=centered) == pytest.approx(1.0, abs=1e-15)
    # HYYᵀH ∝ uuᵀ with u = (1, 1, -1, -1); K = wwᵀ with w = (1, -1, 1, -1) ⟂ u and ⟂ 1
    w = torch.tensor([1.0, -1, 1, -1])
    assert kernel_target_alignment(torch.outer(w, w), y) == pytest.approx(0.0, abs=1e-15)
    # by hand: K = I, H I H = H, ⟨H, HTH⟩ = ‖HY‖² = 2, ‖H‖ = √3, ‖HTH‖ = 2  -> 1/√3;
    # uncentred: ⟨I, T⟩ = 4, ‖I‖ = 2, ‖T‖ = √8 -> 1/√2
    assert kernel_target_alignment(torch.eye(4), y) == pytest.approx(1 / math.sqrt(3), rel=1e-14)
    assert kernel_target_alignment(torch.eye(4), y, centered=False) == pytest.approx(1 / math.sqrt(2), rel=1e-14)
    # scale invariance on a random PSD kernel; a constant added to K changes only the uncentred form
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, generator=g, dtype=torch.float64)
    K = A @ A.T
    assert kernel_target_alignment(3 * K, y) == pytest.approx(kernel_target_alignment(K, y), rel=1e-13)
    assert kernel_target_alignment(K + 5.0, y) == pytest.approx(kernel_target_alignment(K, y), rel=1e-12)
    assert kernel_target_alignment(K + 5.0, y, centered=False) != pytest.approx(
        kernel_target_alignment(K, y, centered=False), rel=1e-3)
    # float targets: one regression target, the paper's yᵀKy / (‖K‖ ‖y‖²)
    t = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    assert kernel_target_alignment(K, t, centered=False) == pytest.approx(float(t @ K @ t / (K.norm() * (t @ t))),
                                                                          rel=1e-13)
    assert math.isnan(kernel_target_alignment(K, torch.zeros(4, dtype=torch.long)))  # one class: T_c = 0


def test_alignment_and_distance_refuse_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        kernel_target_alignment(torch.ones(3, 4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="rows"):
        kernel_target_alignment(torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        kernel_target_alignment(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="centered"):
        kernel_target_alignment(torch.eye(2), torch.tensor([0, 1]), centered=1)
    with pytest.raises(ValueError, match="same examples"):
        kernel_distance(torch.eye(2), torch.eye(3))


def test_kernel_distance_by_hand():
    assert kernel_distance(4 * torch.eye(3), torch.eye(3)) == pytest.approx(0.0, abs=1e-15)
    assert kernel_distance(torch.diag(torch.tensor([1.0, 0])), torch.diag(torch.tensor([0.0, 1]))) == 1.0
    # ⟨K, K0⟩ = 1, ‖K‖ = √2, ‖K0‖ = 1
    assert kernel_distance(torch.eye(2), torch.diag(torch.tensor([1.0, 0]))) == pytest.approx(1 - 1 / math.sqrt(2))
    # centred: a constant block added to either kernel does not count; uncentred it dominates
    g = torch.Generator().manual_seed(1)
    A, B = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    K, K0 = A @ A.T, B @ B.T
    far = kernel_distance(K, K0, centered=True)
    assert kernel_distance(K + 100.0, K0 + 50.0, centered=True) == pytest.approx(far, rel=1e-12)
    assert kernel_distance(K + 100.0, K0 + 50.0) < 0.01 < far


def test_movement_is_zero_at_init_and_known_for_a_constructed_change(task):
    init = mlp(task)
    assert feature_movement(init, init, task.inputs[:6]).relative == 0.0
    moved = mlp(task)
    W = moved.blocks[0].mlp.W_out
    with torch.no_grad():
        W[0, 0] += 0.5
    fm = feature_movement(moved, init, task.inputs[:6])
    total0 = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in init.parameters()))
    assert fm.relative == pytest.approx(0.5 / total0, rel=1e-12)
    assert fm.per_parameter["blocks.0.mlp.W_in"] == 0.0
    w_out0 = float(init.blocks[0].mlp.W_out.detach().norm())
    assert fm.per_parameter["blocks.0.mlp.W_out"] == pytest.approx(0.5 / w_out0)
    assert fm.per_layer == {"blocks.0.mlp.W_in": 0.0, "blocks.0.mlp.W_out": fm.per_parameter["blocks.0.mlp.W_out"]}
    assert fm.kernel_distance > 0
    assert feature_movement(moved, init).kernel_distance is None
    assert layer_of("blocks.0.attn.b_Q") == "blocks.0.attn.W_Q" and layer_of("0.bias") == "0"
    assert layer_of("embed.W_E") == "embed.W_E"


def test_balanced_rows_take_per_class_examples_of_random_classes(task):
    rows = balanced_rows(task.labels, task.train, n=6, per_class=2, seed=0)
    assert len(rows) == 6 and bool(task.train[rows].all())
    assert sorted(torch.bincount(task.labels[rows]).tolist())[-3:] == [2, 2, 2]
    assert torch.equal(rows, balanced_rows(task.labels, task.train, n=6, per_class=2, seed=0))
    assert len(balanced_rows(task.labels, task.train, n=10**6, per_class=100, seed=0)) == int(task.train.sum())


# ---------------------------------------------------------------------------- TrainConfig's α options


def cfg(**kw):
    base = dict(steps=6, lr=1e-2, weight_decay=0.1, eval_every=2, checkpoint_every=2)
    return mg.TrainConfig(**{**base, **kw})


def test_centred_predictor_is_zero_at_step_0(task, tmp_path):
    run = mg.train(mlp(task, "square"), task, cfg(output_scale=4.0, center_output=True), out=tmp_path / "c",
                   progress=False)
    h0 = run.history()[0]
    n = int(task.train.sum())
    zeros = torch.zeros(n, P, dtype=torch.float64)
    assert h0["train_loss"] == float(loss_fn("cross_entropy")(zeros, task.labels[task.train]))  # logits exactly 0
    assert h0["train_loss"] == pytest.approx(math.log(P), rel=1e-15)  # log(d_out), up to the mean's rounding
    assert h0["test_loss"] == pytest.approx(math.log(P), rel=1e-15)
    assert h0["train_acc"] == pytest.approx(float((task.labels[task.train] == 0).double().mean()))  # argmax of 0s
    plain = mg.train(mlp(task, "square"), task, cfg(), out=tmp_path / "p", progress=False)
    assert plain.history()[0]["train_loss"] != pytest.approx(math.log(P), rel=1e-6)


def test_training_gradient_is_that_of_the_scaled_centred_loss(task, tmp_path):
    """The gradients of the first two backward passes of ``mg.train`` (hooked on the parameters) equal
    the gradient of ``ℓ(α(f − f₀), y) / α²``: by hand (closed form of the x² MLP) and by autograd."""
    alpha = 3.0
    model = mlp(task, "square")
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads: dict[str, list] = {k: [] for k in init}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: grads[name].append(g.detach().clone()))
    run = mg.train(model, task, cfg(steps=2, checkpoint_every=1, output_scale=alpha, center_output=True),
                   out=tmp_path / "g", progress=False)
    x, y = onehot(task, task.train.nonzero().squeeze(1)), task.labels[task.train]
    n, Y = len(y), torch.nn.functional.one_hot(y, P).double()

    def f(W_in, W_out):
        return ((x @ W_in) ** 2) @ W_out  # [n, C]

    f0 = f(init["blocks.0.mlp.W_in"], init["blocks.0.mlp.W_out"])
    for step in (0, 1):
        state = checkpoints.read(run.checkpoint(step))  # the weights that step's gradient was taken at (float64)
        W_in = state["blocks.0.mlp.W_in"].clone().requires_grad_(True)
        W_out = state["blocks.0.mlp.W_out"].clone().requires_grad_(True)
        z = alpha * (f(W_in, W_out) - f0)
        loss = torch.nn.functional.cross_entropy(z, y) / alpha**2
        g_in, g_out = torch.autograd.grad(loss, [W_in, W_out])
        # by hand: ∂/∂f = α (softmax(z) − Y) / (n α²); f = h² W_out, h = x W_in
        G = (torch.softmax(z.detach(), -1) - Y) / (n * alpha)
        h = x @ W_in.detach()
        hand_out = (h**2).T @ G
        hand_in = x.T @ ((G @ W_out.detach().T) * 2 * h)
        for got, auto, hand in ((grads["blocks.0.mlp.W_in"][step], g_in, hand_in),
                                (grads["blocks.0.mlp.W_out"][step], g_out, hand_out)):
            torch.testing.assert_close(got, auto, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got, hand, rtol=1e-12, atol=1e-14)
    assert len(grads["blocks.0.mlp.W_in"]) == 2


def test_centred_run_resumes_bitwise(task, tmp_path):
    c = cfg(steps=8, output_scale=2.0, center_output=True)
    full = mg.train(mlp(task, "square").float(), task, c, out=tmp_path / "full", progress=False)
    mg.train(mlp(task, "square").float(), task, c, out=tmp_path / "part", progress=False, stop_at=4)
    part = mg.train(mg.Run(tmp_path / "part").load_model(4), task, c, out=tmp_path / "part", progress=False)
    a, b = checkpoints.read(full.checkpoint(8)), checkpoints.read(part.checkpoint(8))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in full.history()]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in part.history()]


def test_centred_float64_run_resumes_bitwise(task, tmp_path):
    """On a resume f(x; θ₀) comes from the step-0 checkpoint loaded into a copy of the model itself, so a
    float64 model keeps its float64 f₀ (Run.load_model would build a float32 one)."""
    c = cfg(steps=6, output_scale=3.0, center_output=True)
    full_model = mlp(task, "square").double()
    full = mg.train(full_model, task, c, out=tmp_path / "full", progress=False)
    part_model = mlp(task, "square").double()
    mg.train(part_model, task, c, out=tmp_path / "part", progress=False, stop_at=3)
    mg.train(part_model, task, c, out=tmp_path / "part", progress=False)
    assert all(p.dtype == torch.float64 for p in part_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), part_model.parameters()))
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in full.history()]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in mg.Run(tmp_path / "part").history()]


def test_output_scale_options_are_validated_and_omitted_at_default():
    for bad in (0, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="output_scale"):
            mg.TrainConfig(output_scale=bad)
    with pytest.raises(TypeError, match="output_scale"):
        mg.TrainConfig(output_scale="2")
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="center_output"):
            mg.TrainConfig(center_output=bad)
    d = mg.TrainConfig().to_dict()
    assert "output_scale" not in d and "center_output" not in d  # old run folders keep matching
    c = mg.TrainConfig(output_scale=2, center_output=True)
    assert c.output_scale == 2.0 and isinstance(c.output_scale, float)
    assert c.to_dict()["output_scale"] == 2.0 and c.to_dict()["center_output"] is True
    assert mg.TrainConfig.from_dict(c.to_dict()) == c
    assert mg.TrainConfig.from_dict(d) == mg.TrainConfig()


def test_a_sequence_task_is_refused(tmp_path):
    corpus = mg.tasks.lm_corpus(n_structured=16, n_planted=2, repeats=(1,), n_held_out=1, seq_len=6, d_vocab=8, seed=0)
    model = mg.models.transformer(corpus, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0)
    for kw in (dict(output_scale=2.0), dict(center_output=True)):
        with pytest.raises(ValueError, match="SequenceTask"):
            mg.train(model, corpus, mg.TrainConfig(steps=1, **kw), out=tmp_path / "lm", progress=False)


# ---------------------------------------------------------------------------- over training, analysis


@pytest.fixture(scope="module")
def lazy_run(task, tmp_path_factory):
    c = mg.TrainConfig(steps=40, lr=3e-2, weight_decay=0.5, eval_every=10, checkpoint_every=10, output_scale=2.0,
                       center_output=True)
    return mg.train(mg.models.mlp(task, width=16, act="square", seed=0), task, c,
                    out=tmp_path_factory.mktemp("lazy") / "run", progress=False)


def test_over_training_on_a_tiny_run(lazy_run, task):
    res = lazy_rich_over_training(lazy_run, n_examples=12, per_class=3, progress=False)
    assert res.steps == (0, 10, 20, 30, 40) and res.output_scale == 2.0 and res.center_output
    assert res.weight_movement[0] == 0.0 and res.kernel_distance[0] == pytest.approx(0.0, abs=1e-12)
    assert res.kernel_distance_centered[0] == pytest.approx(0.0, abs=1e-12) and res.kernel_distance_centered[-1] > 0
    assert all(v > 0 for v in res.weight_movement[1:]) and res.kernel_distance[-1] > 0
    assert len(res.train_rows) == 12 and bool(task.train[list(res.train_rows)].all())
    assert not bool(task.train[list(res.test_rows)].any())
    assert all(-1 <= a <= 1 for a in res.alignment_train + res.alignment_test)
    hist = {r["step"]: r for r in lazy_run.history()}
    assert res.test_acc == tuple(hist[s]["test_acc"] for s in res.steps)  # the trained predictor's, from the history
    # the predictor's kernel: α² times the network's, on the same examples
    K0 = empirical_ntk(lazy_run.load_model(0), task.inputs[list(res.train_rows)])
    assert res.kernel_norm[0] == pytest.approx(4 * float(K0.norm()) / 12, rel=1e-9)
    assert res.alignment_train[0] == pytest.approx(kernel_target_alignment(K0, task.labels[list(res.train_rows)]))
    assert set(res.movement_per_layer) == {"blocks.0.mlp.W_in", "blocks.0.mlp.W_out"}
    back = LazyRichOverTraining.from_dict(json.loads(json.dumps(res.to_dict(), allow_nan=False)))
    assert back == res
    sub = lazy_rich_over_training(lazy_run, steps=[20], n_examples=12, per_class=3, progress=False)
    assert sub.steps == (0, 20) and sub.at(20) == res.at(20)
    with pytest.raises(ValueError, match="no checkpoints at steps"):
        lazy_rich_over_training(lazy_run, steps=[15], progress=False)
    with pytest.raises(ValueError, match="format"):
        LazyRichOverTraining.from_dict({"format": "x"})


def test_analysis_round_trip_and_section(lazy_run):
    assert lazy_rich_applies(lazy_run) is None
    a = lazy_rich_analysis(lazy_run, n_examples=12, max_checkpoints=4, progress=False)
    assert a.over_training["steps"] == [0, 10, 20, 40] and a.over_training["outputs"] is None
    assert a.n_parameters == 2 * P * 16 + 16 * P and a.d_out == P
    back = LazyRichAnalysis.from_json(json.loads(json.dumps(a.to_json(), allow_nan=False)))
    assert back == a and back.result().steps == (0, 10, 20, 40)
    lazy_run.write_analysis("lazy_rich", a.to_json())
    sec = lazy_rich_section(lazy_run)
    assert sec.title == "Lazy and rich training" and len(sec.figures) == 2
    assert all(f.png.startswith(b"\x89PNG") for f in sec.figures)
    assert "α = 2" in sec.text and sec.numbers["output_scale"] == 2.0
    assert sec.tables[0].rows[0][0] == "0 (initialization)"
    assert log_spaced_steps(list(range(0, 1001, 10)), 5) == [0, 10, 50, 220, 1000]


def test_analysis_skips_with_its_reason(task, tmp_path):
    corpus = mg.tasks.lm_corpus(n_structured=16, n_planted=2, repeats=(1,), n_held_out=1, seq_len=6, d_vocab=8, seed=0)
    lm = mg.train(mg.models.transformer(corpus, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0), corpus,
                  mg.TrainConfig(steps=0), out=tmp_path / "lm", progress=False)
    assert "SequenceTask" in lazy_rich_applies(lm)
    assert lazy_rich_section(lm) is None  # no result, no section of its own; the report says why instead
    from mechgrok.analyses.not_run import not_run_section

    why = not_run_section(lm).numbers["lazy_rich"]
    assert why.startswith("does not apply:") and "SequenceTask" in why
    big = mg.train(mg.models.mlp(task, width=30_000, act="square"), task, mg.TrainConfig(steps=0),
                   out=tmp_path / "big", progress=False)
    assert "cut-off of 250,000" in lazy_rich_applies(big)
    with pytest.raises(TypeError, match="SequenceTask"):
        lazy_rich_over_training(lm, progress=False)
