"""Tests for the numerics options of training: ``TrainConfig.loss_dtype`` (the precision of the loss and
its gradient, ``mechgrok.losses``) and ``TrainConfig.adam_eps`` (AdamW's epsilon), which reproduce the
settings of Prieto et al. 2025, "Grokking at the edge of numerical stability".

Hand-checkable cases: two-class logits ``(gap, 0)`` with label 0, whose loss is ``log(1 + e^{-gap})``
and whose float32 sum ``1 + e^{-gap}`` rounds to exactly 1 once ``e^{-gap} <= 2^-24`` (gap > 16.64);
and AdamW's first step from a zero state, ``Δθ = -lr · g / (|g| + eps)`` (bias-corrected moments
``m̂ = g``, ``v̂ = g²``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import mechgrok as mg
from mechgrok import losses
from mechgrok.train import TrainConfig


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.6, seed=0)


def tiny(task, seed=0):
    return mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=seed)


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------- the losses


def test_float32_loss_underflows_where_float64_does_not():
    gaps = torch.tensor([10.0, 20.0, 30.0])
    logits = torch.stack([gaps, torch.zeros(3)], dim=1)  # [3, 2], float32
    labels = torch.zeros(3, dtype=torch.long)
    f64 = losses.cross_entropy(logits, labels, reduction="none")
    f32 = losses.cross_entropy(logits, labels, reduction="none", dtype=torch.float32)
    assert f64.dtype == torch.float64 and f32.dtype == torch.float32
    exact = [math.log1p(math.exp(-g)) for g in (10.0, 20.0, 30.0)]  # 4.54e-5, 2.06e-9, 9.36e-14
    assert f64.tolist() == pytest.approx(exact, rel=1e-6)  # float64: the three are still > 0
    # float32: e^-10 = 4.5e-5 survives (to float32's relative accuracy); e^-20 and e^-30 < 2^-24 are absorbed
    assert float(f32[0]) == pytest.approx(exact[0], rel=1e-2) and f32[1:].tolist() == [0.0, 0.0]
    # ... and so is the gradient on the correct logit, p_0 - 1: exactly 0 in float32, -e^-gap / (1 + e^-gap) in
    # float64 (computed as exp(log p_0) - 1, so only to ~1e-16 / e^-gap relative: 1e-3 at gap 30)
    for dtype, want, rel in ((torch.float32, [0.0, 0.0], 0),
                             (torch.float64, [-math.exp(-20.0), -math.exp(-30.0)], 2e-3)):
        z = logits[1:].clone().requires_grad_(True)
        losses.cross_entropy(z, labels[1:], reduction="none", dtype=dtype).sum().backward()
        assert z.grad[:, 0].tolist() == pytest.approx(want, rel=rel, abs=0)


def test_loss_fn_binds_the_precision():
    logits, labels = torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0])
    assert losses.loss_fn("cross_entropy") is losses.cross_entropy  # float64: the registered function itself
    assert losses.loss_fn("cross_entropy", torch.float64) is losses.cross_entropy
    for name in losses.LOSSES:
        fn = losses.loss_fn(name, "float32")
        assert fn(logits, labels).dtype == torch.float32 and fn(logits, labels, reduction="none").shape == (1,)
        assert losses.loss_fn(name)(logits, labels).dtype == torch.float64
    assert float(losses.loss_fn("cross_entropy", "float32")(logits, labels)) == 0.0  # 2 e^-20 is absorbed
    assert float(losses.loss_fn("cross_entropy")(logits, labels)) == pytest.approx(2 * math.exp(-20), rel=1e-6)
    # StableMax does not collapse at this gap in either precision: s = (21, 1, 1), loss log(23/21)
    for dtype in ("float32", "float64"):
        assert float(losses.loss_fn("stablemax", dtype)(logits, labels)) == pytest.approx(math.log(23 / 21), rel=1e-6)
    t = losses.token_nll(logits[None], labels[None], dtype=torch.float32)  # [1, 1]
    assert t.dtype == torch.float32 and float(t) == 0.0
    with pytest.raises(ValueError, match=r"loss dtype must be one of \['float32', 'float64'\]"):
        losses.loss_fn("cross_entropy", "float16")
    with pytest.raises(ValueError, match="loss dtype must be one of"):
        losses.cross_entropy(logits, labels, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.loss_fn("hinge", "float32")


# ---------------------------------------------------------------------------- TrainConfig


def test_defaults_and_what_is_written():
    cfg = TrainConfig()
    assert cfg.loss_dtype == "float64" and cfg.adam_eps == 1e-8  # torch's AdamW default: old runs unchanged
    d = cfg.to_dict()
    # left out at their defaults, so run folders written before these fields keep matching and resuming
    assert "loss_dtype" not in d and "adam_eps" not in d
    old = {k: v for k, v in d.items()}  # what an older run folder's config.json holds
    assert TrainConfig.from_dict(old) == cfg
    new = TrainConfig(loss_dtype="float32", adam_eps=1e-25)
    d = new.to_dict()
    assert d["loss_dtype"] == "float32" and d["adam_eps"] == 1e-25
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == new
    assert new.replace(adam_eps=1e-8).to_dict().keys() == {*TrainConfig().to_dict(), "loss_dtype"}
    assert TrainConfig(adam_eps=1e-30).adam_eps == 1e-30 and isinstance(TrainConfig(adam_eps=1e-30).adam_eps, float)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"loss_dtype": "float16"}, ValueError, r"loss_dtype must be one of \['float32', 'float64'\].*got 'float16'"),
    ({"loss_dtype": "double"}, ValueError, "loss_dtype must be one of"),
    ({"loss_dtype": torch.float32}, TypeError, r"loss_dtype must be a string, got torch.float32 \(dtype\)"),
    ({"loss_dtype": 32}, TypeError, "loss_dtype must be a string"),
    ({"adam_eps": 0.0}, ValueError, r"adam_eps must be a number in \[1.18e-38, 1\).*got 0.0"),
    ({"adam_eps": -1e-8}, ValueError, "adam_eps must be a number in"),
    ({"adam_eps": 1e-40}, ValueError, "below float32's smallest normal number"),
    ({"adam_eps": 1.0}, ValueError, "adam_eps must be a number in"),
    ({"adam_eps": float("nan")}, ValueError, "adam_eps must be"),
    ({"adam_eps": float("inf")}, ValueError, "adam_eps must be"),
    ({"adam_eps": "1e-8"}, TypeError, r"adam_eps must be .*got '1e-8' \(str\)"),
    ({"adam_eps": True}, TypeError, "adam_eps must be"),
    ({"adam_eps": None}, TypeError, "adam_eps must be"),
])
def test_bad_values_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)


# ---------------------------------------------------------------------------- training


def test_adam_eps_reaches_the_optimizer(tmp_path, task):
    """One step of AdamW from a zero state moves each weight by -lr · g / (|g| + eps): with eps = 1e-3
    comparable to the gradients the step is visibly damped, by exactly the predicted amount."""
    lr, eps = 1e-2, 1e-3
    model = tiny(task)
    before = weights(model)
    x, y = task.inputs[task.train], task.labels[task.train]
    loss = losses.cross_entropy(mg.models.training_logits(model, x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    cfg = TrainConfig(steps=1, lr=lr, weight_decay=0.0, adam_eps=eps, eval_every=1, checkpoint_every=1)
    mg.train(model, task, cfg, out=tmp_path / "run", progress=False)
    damped = 0
    for name, w in weights(model).items():
        g = grads[name]
        want = before[name] - lr * g / (g.abs() + eps)
        assert torch.allclose(w, want, rtol=0, atol=1e-6), name
        damped += int(((g.abs() < eps) & ((w - before[name]).abs() < 0.5 * lr)).sum())
    assert damped > 0  # some steps are far below lr: eps mattered (with torch's 1e-8 they would be ~lr)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["adam_eps"] == eps


def _float32_loop(model, task, cfg, steps):
    """Prieto et al.'s setting by hand: full-batch AdamW on PyTorch's float32 cross-entropy."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            eps=cfg.adam_eps)
    x, y = task.inputs[task.train], task.labels[task.train]
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(mg.models.training_logits(model, x).float(), y).backward()
        opt.step()
    return model


@pytest.mark.slow(seconds=5)
def test_float32_run_matches_a_hand_loop_and_resumes_bitwise(tmp_path, task):
    cfg = TrainConfig(steps=60, lr=3e-2, weight_decay=0.0, loss_dtype="float32", adam_eps=1e-25, eval_every=10,
                      checkpoint_every=20)
    full = mg.train(tiny(task), task, cfg, out=tmp_path / "full", progress=False)
    end = weights(full.load_model())
    hand = weights(_float32_loop(tiny(task), task, cfg, 60))
    for k, v in end.items():
        assert torch.equal(v, hand[k]), k  # the same float32 loss, bit for bit
    saved = json.loads((full.path / "config.json").read_text())["train"]
    assert saved["loss_dtype"] == "float32" and saved["adam_eps"] == 1e-25
    assert TrainConfig.from_dict(saved) == cfg
    # the history's losses are the float32 loss (the one the optimizer saw), not a float64 recomputation
    hist = full.history()
    with torch.no_grad():
        lg = mg.models.final_logits(full.load_model(), task.inputs)[task.train]  # [n_train, d_out]
    y = task.labels[task.train]
    f32, f64 = float(losses.cross_entropy(lg, y, dtype=torch.float32)), float(losses.cross_entropy(lg, y))
    assert hist[-1]["train_loss"] == f32 != f64 and f32 == pytest.approx(f64, rel=1e-5)
    # killed at step 40 and resumed: bitwise the uninterrupted run
    mg.train(tiny(task), task, cfg, out=tmp_path / "part", progress=False, stop_at=40)
    blank = tiny(task)
    with torch.no_grad():  # resuming must restore every weight from the checkpoint
        for q in blank.parameters():
            q.zero_()
    resumed = mg.train(blank, task, cfg, out=tmp_path / "part", progress=False)
    for k, v in weights(resumed.load_model()).items():
        assert torch.equal(v, end[k]), k
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in hist]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in resumed.history()] == strip
    # another precision or epsilon is another run: refused in the same folder
    for change in ({"loss_dtype": "float64"}, {"adam_eps": 1e-8}):
        with pytest.raises(FileExistsError, match="different config"):
            mg.train(tiny(task), task, cfg.replace(**change), out=full.path, progress=False)


def test_default_run_folder_keeps_the_old_config(tmp_path, task):
    """A float64 run with torch's eps writes the config an older mechgrok wrote (no new keys), so
    folders trained before these options existed resume, and their config loads."""
    cfg = TrainConfig(steps=4, lr=1e-2, eval_every=2, checkpoint_every=2)
    run = mg.train(tiny(task), task, cfg, out=tmp_path / "run", progress=False, stop_at=2)
    saved = json.loads((run.path / "config.json").read_text())["train"]
    assert "loss_dtype" not in saved and "adam_eps" not in saved
    assert TrainConfig.from_dict(saved) == cfg
    run = mg.train(tiny(task), task, cfg, out=run.path, progress=False)  # resumes
    assert run.steps()[-1] == 4
