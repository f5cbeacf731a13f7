"""Tests for mechgrok.measures.stability: softmax collapse and NLM alignment (Prieto et al. 2025).

The hand-checkable models are width-1, bias-free linear HookedMLPs on a hand-made Task, whose
logits are ``z_n = (W_in[a_n] + W_in[p + b_n]) · W_out[0]``: the logits (for softmax collapse) and the
loss gradient (for NLM alignment) can be written down exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import mechgrok as mg
from mechgrok import losses
from mechgrok.measures.stability import (
    StabilityOverTraining,
    collapsed,
    model_softmax_collapse,
    nlm_alignment,
    stability_over_training,
)
from mechgrok.models.hooked_mlp import HookedMLP
from mechgrok.tasks import Task

F32_GAP = 24 * math.log(2)  # 16.6355: e^{-gap} <= 2^-24, half an ulp of 1.0 in float32
F64_GAP = 53 * math.log(2)  # 36.7368: the same in float64


def _task(p: int, d_out: int, labels, train=None) -> Task:
    """Every pair (a, b) of Z_p, labels given per example (or one label for all)."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    inputs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)  # [p*p, 2]
    n = p * p
    y = torch.full((n,), labels) if isinstance(labels, int) else torch.as_tensor(labels)
    train = torch.ones(n, dtype=torch.bool) if train is None else train
    return Task(name="hand", inputs=inputs, labels=y, true_labels=y.clone(), train=train,
                train_corrupted=torch.zeros(n, dtype=torch.bool), task_ids=torch.zeros(n, dtype=torch.long),
                task_names=("hand",), d_vocab=p, d_vocab_out=d_out, p=p)


def _linear(p: int, w_in, w_out) -> HookedMLP:
    """Width-1 bias-free linear MLP with ``W_in [2p, 1]`` and ``W_out [1, d_out]`` set by hand."""
    w_out = torch.as_tensor(w_out, dtype=torch.float32).reshape(1, -1)
    model = HookedMLP(p=p, width=1, d_out=w_out.shape[1], act="linear")
    with torch.no_grad():
        model.blocks[0].mlp.W_in.copy_(torch.as_tensor(w_in, dtype=torch.float32).reshape(2 * p, 1))
        model.blocks[0].mlp.W_out.copy_(w_out)
    return model


# ---------------------------------------------------------------------------- softmax collapse


def test_collapse_thresholds_two_classes():
    # logits (gap, 0) with label 0: the float sum 1 + e^{-gap} is exactly 1 once e^{-gap} <= 2^-24 (float32)
    gaps = torch.tensor([0.0, 10.0, 16.5, 16.8, 17.0, 30.0, 36.6, 36.9, 50.0])
    assert F32_GAP == pytest.approx(16.6355, abs=1e-4) and F64_GAP == pytest.approx(36.7368, abs=1e-4)
    logits = torch.stack([gaps, torch.zeros_like(gaps)], dim=1).double()
    labels = torch.zeros(len(gaps), dtype=torch.long)
    assert collapsed(logits, labels).tolist() == [g > F32_GAP for g in gaps.tolist()]
    assert collapsed(logits, labels, torch.float64).tolist() == [g > F64_GAP for g in gaps.tolist()]
    # float16: half an ulp of 1 is 2^-11, so the gap is 11 ln 2 = 7.62
    assert collapsed(logits, labels, torch.float16).tolist() == [g > 11 * math.log(2) for g in gaps.tolist()]


def test_collapse_needs_the_correct_class_on_top():
    logits = torch.tensor([[0.0, 40.0], [40.0, 0.0], [40.0, 40.0]])
    # a confidently wrong example saturates its softmax too (the paper's logger counts it), but its
    # gradient is not small: only the correct class counts here. A tie sums to 2, never collapsed.
    assert collapsed(logits, torch.tensor([0, 0, 0])).tolist() == [False, True, False]
    assert collapsed(logits, torch.tensor([1, 1, 1])).tolist() == [True, False, False]


def test_collapse_many_classes():
    # 113 classes, the correct one `gap` above the other 112. An exact sum 1 + 112 e^{-gap} rounds to 1
    # once gap >= ln 112 + 16.64 = 21.35; torch's float32 sum adds the terms in blocks (absorbing some
    # on the way), so the threshold lies a little lower (between 20.5 and 21 here). It stays above 20, where
    # e^{-20} alone would be absorbed: the 112 small terms are not all added to 1 one by one.
    for gap, want in ((20.0, False), (20.5, False), (22.0, True), (25.0, True)):
        z = torch.zeros(1, 113)
        z[0, 5] = gap
        assert collapsed(z, torch.tensor([5])).item() is want
        ce = torch.nn.functional.cross_entropy(z, torch.tensor([5]), reduction="none")
        assert (float(ce) == 0.0) is want  # PyTorch's float32 loss: exactly 0 exactly when collapsed


def test_collapse_agrees_with_float32_loss_gradient_and_softmax():
    """Three other code paths: torch.softmax (losses.softmax_collapse), PyTorch's float32 cross-entropy
    (exactly 0) and its gradient on the correct logit (exactly 0); the other logits' gradients stay > 0."""
    g = torch.Generator().manual_seed(0)
    n, c = 3000, 47
    z = torch.randn(n, c, generator=g) * torch.linspace(1, 60, n)[:, None]  # top-2 gaps from ~0.5 to ~30
    y = torch.where(torch.rand(n, generator=g) < 0.9, z.argmax(-1), torch.randint(0, c, (n,), generator=g))
    sc = collapsed(z, y)
    assert 0.2 < float(sc.double().mean()) < 0.8  # both kinds are well represented
    p_y = torch.softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    assert torch.equal(sc, p_y == 1.0)
    assert losses.softmax_collapse(z, y) == pytest.approx(float(sc.double().mean()), abs=1e-7)  # a float32 mean
    # Prieto et al.'s formula, sum of exp(z - max) == 1 with the label on top: the same but for the few
    # examples right at the threshold, where the summation order decides
    paper = (torch.exp(z - z.max(-1, keepdim=True).values).sum(-1) == 1) & (z.argmax(-1) == y)
    assert int((paper != sc).sum()) <= 3
    zz = z.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(zz, y, reduction="none")  # float32, as in Prieto et al.'s setting
    ce.sum().backward()
    assert torch.equal(sc, ce.detach() == 0)
    grad_y = zz.grad.gather(-1, y[:, None]).squeeze(-1)
    assert torch.equal(sc, grad_y == 0)
    others = zz.grad[sc].clone()
    others[torch.arange(len(others)), y[sc]] = float("nan")
    off = others[~others.isnan()]
    assert bool((off >= 0).all()) and bool((off < 2**-24).all()) and bool((off > 0).any())  # tiny, not all zero
    # float64 (mechgrok's loss precision): the same logits collapse far less
    assert float(collapsed(z, y, torch.float64).double().mean()) < float(sc.double().mean()) / 2


def test_softmax_collapse_of_a_model_with_known_logits():
    p = 5
    gaps = [-40.0, 10.0, 16.5, 17.0, 40.0]  # logits (gap_a, 0) for every example with first operand a
    model = _linear(p, gaps + [0.0] * p, [1.0, 0.0])
    train = torch.arange(p * p) % 2 == 0
    task = _task(p, 2, 0, train=train)
    # label 0 everywhere: collapsed in float32 for a = 3, 4 (a = 0 saturates on the wrong class)
    assert model_softmax_collapse(model, task, split="all") == pytest.approx(2 / 5)
    assert model_softmax_collapse(model, task, split="all", dtype=torch.float64) == pytest.approx(1 / 5)
    a = task.inputs[:, 0]
    for split, mask in (("train", train), ("test", ~train)):
        want = float(((a[mask] == 3) | (a[mask] == 4)).double().mean())
        assert model_softmax_collapse(model, task, split=split) == pytest.approx(want)
    assert model_softmax_collapse(model, _task(p, 2, 1), split="all") == pytest.approx(1 / 5)  # label 1: only a = 0


# ---------------------------------------------------------------------------- NLM alignment


def _parallel_case(c: int, label: int, alpha: float = 0.3, p: int = 3):
    """W_out = α (c e_0 − 1), every W_in entry u = ‖W_out‖ / sqrt(2p), all p² examples labelled
    ``label``: every example has the logits 2u W_out, and the loss gradient is exactly parallel to θ
    (derivation in the test below)."""
    w = alpha * (c * torch.nn.functional.one_hot(torch.tensor(0), c).float() - 1)
    u = float(w.norm()) / math.sqrt(2 * p)
    return _linear(p, [u] * (2 * p), w), _task(p, c, label)


@pytest.mark.parametrize("c", [2, 3, 7])
def test_nlm_alignment_is_one_when_the_gradient_only_scales_the_weights(c):
    # ∂L/∂z_n = (softmax(2u w) − e_0) / N = −β (c e_0 − 1) / N with β = (1 − p_0)/(c − 1), so
    # ∇W_out = 2u·(−β/α) w and ∇W_in[k] = (1/p)⟨g, w⟩ = −αβ‖c e_0 − 1‖²/p = (−2uβ/α)·u when
    # u² = ‖w‖²/(2p): ∇θ = (−2uβ/α) θ, so the descent step −∇θ points along +θ.
    model, task = _parallel_case(c, label=0)
    assert nlm_alignment(model, task) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():  # scaling θ keeps it parallel: still 1 (and scaling up still lowers the loss)
        for q in model.parameters():
            q.mul_(1.7)
    assert nlm_alignment(model, task) == pytest.approx(1.0, abs=1e-6)
    z = model(task.inputs[:1])[0].detach()
    scale = math.sqrt(60 / float(z[0] - z[1]))  # logits scale as |θ|²: a gap of 60
    with torch.no_grad():  # ...until the float64 softmax collapses (logit gap > 36.7): the loss gradient on
        for q in model.parameters():  # the correct logit, p_0 - 1, rounds to 0 and the parallelism breaks
            q.mul_(scale)
    assert model_softmax_collapse(model, task, dtype=torch.float64) == 1.0
    assert nlm_alignment(model, task) < 0.99


def test_nlm_alignment_with_a_float32_loss_loses_the_collapsed_examples():
    # the parallel case (c = 3) at a logit gap of 25: float32 collapses (gap > 16.64 + ln 2), float64 does not.
    # The float64 gradient is still exactly parallel to θ. The float32 one has lost its correct-class part
    # (p_0 - 1 rounds to 0): ∂L/∂z = (0, q, q) with q = e^-25, so ∇W_out = 2u (0, q, q) and every
    # ∇W_in[k] = ⟨(0, q, q), W_out⟩ / p = -2αq / p. With ‖θ‖² = 2p u² + 6α² = 12α² (u² = 3α²/p):
    # ⟨−∇θ, θ⟩ = 8uαq and ‖∇θ‖² = 8q²(α²/p + u²) = 32 q²α²/p, so
    # cos = 8uαq / (q α² sqrt(384 / p)) = 1/√2.
    model, task = _parallel_case(3, label=0)
    z = model(task.inputs[:1])[0].detach()
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(math.sqrt(25 / float(z[0] - z[1])))  # logits scale as |θ|²
    assert model_softmax_collapse(model, task) == 1.0
    assert model_softmax_collapse(model, task, dtype=torch.float64) == 0.0
    assert nlm_alignment(model, task) == pytest.approx(1.0, abs=1e-6)
    f32 = nlm_alignment(model, task, loss_dtype="float32")
    assert f32 == pytest.approx(1 / math.sqrt(2), abs=1e-5)

    def float32_ce(logits, labels):  # the same loss, given as a function
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    assert nlm_alignment(model, task, loss=float32_ce) == pytest.approx(f32, abs=1e-6)
    with pytest.raises(ValueError, match="loss dtype must be one of"):
        nlm_alignment(model, task, loss_dtype="float16")


def test_nlm_alignment_is_minus_one_when_every_example_is_wrong():
    # two classes, W_out = α (1, −1), every label 1: ∂L/∂z = p_0 (1, −1) = (p_0/α) w, so ∇θ ∝ +θ
    model, task = _parallel_case(2, label=1)
    assert nlm_alignment(model, task) == pytest.approx(-1.0, abs=1e-6)


def test_nlm_alignment_is_zero_when_the_gradient_is_orthogonal():
    # W_out = 0: ∇W_in[k] ∝ ⟨g, W_out⟩ = 0, and ∇W_out = 2u g is orthogonal to θ (whose W_out part is 0)
    p = 3
    model, task = _linear(p, [0.4] * (2 * p), [0.0, 0.0, 0.0]), _task(p, 3, 1)
    assert nlm_alignment(model, task) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("act,degree", [("relu", 2), ("square", 3)])
def test_nlm_alignment_matches_euler_identity(act, degree):
    """A bias-free MLP is homogeneous (f(cθ) = c^k f(θ)), so ⟨∇L, θ⟩ = d/dc L(cθ)|₁ = k Σ_n ⟨∂L/∂z_n, z_n⟩:
    the dot product from the logits alone, against nlm_alignment's autograd one."""
    task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=1)
    model = mg.models.mlp(task, width=24, act=act, seed=2)
    x, y = task.inputs[task.train], task.labels[task.train]
    with torch.no_grad():
        z = model(x).double()  # [n, d_out]
    dz = (torch.softmax(z, -1) - torch.nn.functional.one_hot(y, z.shape[1]).double()) / len(y)  # ∂L/∂z_n
    dot = degree * float((dz * z).sum())
    loss = losses.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    wnorm = mg.measures.weight_norm(model)
    assert nlm_alignment(model, task) == pytest.approx(-dot / (gnorm * wnorm), rel=1e-5, abs=1e-7)


def test_nlm_alignment_leaves_the_model_alone_and_takes_a_loss_function():
    task = mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.5, seed=0)
    model = mg.models.mlp(task, width=16, act="relu", seed=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    value = nlm_alignment(model, task)
    assert model.training and all(q.grad is None for q in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def float32_ce(logits, labels):  # the paper's float32 loss, as a callable
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    assert nlm_alignment(model, task, loss=float32_ce) == pytest.approx(value, abs=1e-5)
    assert -1.0 <= nlm_alignment(model, task, loss="stablemax") <= 1.0


# ---------------------------------------------------------------------------- over training


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    """No weight decay, large lr: the logits grow until float32 softmax collapses on part of the training set."""
    task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    cfg = mg.TrainConfig(steps=400, lr=3e-2, weight_decay=0.0, eval_every=50, checkpoint_every=50)
    return mg.train(model, task, cfg, out=tmp_path_factory.mktemp("stability") / "run", progress=False)


@pytest.mark.slow(seconds=6)
def test_stability_over_training_matches_history(grown_run):
    run, task = grown_run, grown_run.task()
    res = stability_over_training(run, progress=False)
    assert isinstance(res, StabilityOverTraining) and res.steps == tuple(run.steps()) == tuple(range(0, 401, 50))
    hist = {r["step"]: r for r in run.history()}
    for i, s in enumerate(res.steps):  # the history's float32 SC comes from torch.softmax over train's own logits
        assert res.softmax_collapse[i] == pytest.approx(hist[s]["softmax_collapse"], abs=1e-7)  # a float32 mean
        assert res.train_acc[i] == pytest.approx(hist[s]["train_acc"], abs=1e-12)
        assert res.test_acc[i] == pytest.approx(hist[s]["test_acc"], abs=1e-12)
        assert res.weight_norm[i] == pytest.approx(hist[s]["weight_norm"], rel=1e-9)
        assert res.softmax_collapse_float64[i] <= res.softmax_collapse[i]
    assert res.softmax_collapse[0] == 0.0 and 0.1 < res.softmax_collapse[-1] < 1  # a non-vacuous comparison
    # fitted (train acc 1 from step 50), no weight decay: more and more of the step grows the weights
    # (measured 0.04 at step 50, 0.35 at step 400; a transformer is not homogeneous, so not near 1)
    assert res.train_acc[1] == 1.0 and res.nlm_alignment[-1] > res.nlm_alignment[1] + 0.2
    assert res.nlm_alignment[-1] == pytest.approx(nlm_alignment(run.load_model(400), task), abs=1e-6)  # float32 gradients; the two calls may use different thread counts
    assert res.first_step("softmax_collapse", 0.1) == next(s for s, v in zip(res.steps, res.softmax_collapse)
                                                          if v >= 0.1)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["steps"] == list(res.steps) and d["loss"] == "cross_entropy" and len(d["nlm_alignment"]) == 9
    assert res.loss_dtype == d["loss_dtype"] == "float64"
    only = stability_over_training(run, steps=[400, 0], progress=False)
    assert only.steps == (0, 400) and only.nlm_alignment[1] == res.nlm_alignment[-1]
    with pytest.raises(ValueError, match="no checkpoints at steps"):
        stability_over_training(run, steps=[25], progress=False)
    with pytest.raises(ValueError, match="unknown measure"):
        res.first_step("sc", 0.5)


def test_progress_columns_match_stability_over_training(grown_run):
    """mg.measures.progress carries float32 and float64 SC and the NLM alignment per checkpoint: the same
    numbers as stability_over_training (a single-operation task: the grid's training examples are the task's)."""
    res, st = mg.measures.progress(grown_run, progress=False), stability_over_training(grown_run, progress=False)
    assert {"softmax_collapse", "softmax_collapse_float64", "nlm_alignment"} <= set(mg.measures.PROGRESS_COLUMNS)
    assert res["step"] == list(st.steps)
    assert res["softmax_collapse"] == pytest.approx(list(st.softmax_collapse), abs=1e-7)  # a float32 mean
    assert res["softmax_collapse_float64"] == pytest.approx(list(st.softmax_collapse_float64), abs=1e-12)
    assert res["nlm_alignment"] == pytest.approx(list(st.nlm_alignment), abs=1e-12)
    assert res["meta"]["loss_dtype"] == "float64" and res["nlm_alignment"][-1] > 0.2


def test_measures_of_a_float32_run_use_its_loss_precision(tmp_path):
    task = mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.6, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0)
    cfg = mg.TrainConfig(steps=40, lr=3e-2, weight_decay=0.0, loss_dtype="float32", eval_every=20,
                         checkpoint_every=20)
    run = mg.train(model, task, cfg, out=tmp_path / "run", progress=False)
    st = stability_over_training(run, progress=False)
    want = [nlm_alignment(run.load_model(s), task, loss_dtype="float32") for s in st.steps]
    assert st.loss_dtype == "float32" and list(st.nlm_alignment) == pytest.approx(want, abs=1e-12)
    res = mg.measures.progress(run, progress=False)
    assert res["meta"]["loss_dtype"] == "float32" and res["nlm_alignment"] == pytest.approx(want, abs=1e-12)
    hist = {r["step"]: r for r in run.history()}
    assert res["train_loss"] == [hist[s]["train_loss"] for s in res["step"]]  # the same float32 loss, exactly


def test_both_softmax_collapse_names():
    # mg.measures.softmax_collapse: the float32 share from given logits (mechgrok.losses); the model-level
    # one is model_softmax_collapse. Both agree on a model's own logits.
    assert mg.measures.softmax_collapse is losses.softmax_collapse
    assert mg.measures.model_softmax_collapse is model_softmax_collapse
    p = 5
    model = _linear(p, [-40.0, 10.0, 16.5, 17.0, 40.0] + [0.0] * p, [1.0, 0.0])
    task = _task(p, 2, 0)
    logits = model(task.inputs).detach()
    assert model_softmax_collapse(model, task) == 0.4  # a = 3, 4
    assert mg.measures.softmax_collapse(logits, task.labels) == pytest.approx(0.4, abs=1e-7)  # a float32 mean
    for name in ("nlm_alignment", "stability_over_training", "StabilityOverTraining"):
        assert getattr(mg.measures, name) is getattr(mg.measures.stability, name)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    task = mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.5, seed=0)
    model = mg.models.mlp(task, width=8, seed=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        model_softmax_collapse(model, task, dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown split"):
        model_softmax_collapse(model, task, split="validation")
    with pytest.raises(ValueError, match="has no examples"):
        nlm_alignment(model, task, split="train_corrupted")
    with pytest.raises(TypeError, match="must be a mechgrok Task"):
        model_softmax_collapse(model, task.inputs)
    with pytest.raises(ValueError, match="do not match"):
        nlm_alignment(mg.models.mlp(p=5, d_out=5, width=8), task)
    with pytest.raises(ValueError, match="unknown loss"):
        nlm_alignment(model, task, loss="hinge")
    with pytest.raises(TypeError, match="loss must be a loss name"):
        nlm_alignment(model, task, loss=3)
    with pytest.raises(ValueError, match="must be a scalar"):
        nlm_alignment(model, task, loss=lambda z, y: losses.cross_entropy(z, y, reduction="none"))
    with pytest.raises(ValueError, match=r"logits must be \[batch, d_out\]"):
        collapsed(torch.zeros(3), torch.zeros(3, dtype=torch.long))
