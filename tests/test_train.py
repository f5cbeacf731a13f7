import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mechgrok as mg
from mechgrok import losses, models
from mechgrok.train import HISTORY_KEYS, _orthogonalize_grads


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, corrupt_frac=0.2, seed=0)


def tiny(task, seed=0):
    return models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=seed)


def blank(task):
    """A model of the run's spec whose weights are all zero: resuming must restore everything."""
    model = tiny(task)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_preset_test_groks(tmp_path):
    """The `test` preset shows grokking: train accuracy 100% long before test accuracy passes 95%."""
    task, model, cfg = mg.presets.build("test")
    run = mg.train(model, task, cfg, out=tmp_path / "run", progress=False)
    h = run.history()
    memorized = next(r["step"] for r in h if r["train_acc"] == 1.0)
    generalized = next(r["step"] for r in h if r["test_acc"] > 0.95)
    assert generalized >= 5 * memorized
    assert mg.evaluate(model, task)["test"]["acc"] > 0.95


def test_history_and_run_folder(tmp_path, task):
    cfg = mg.TrainConfig(steps=30, lr=1e-2, eval_every=10, checkpoint_every=20)
    run = mg.train(tiny(task), task, cfg, out=tmp_path / "r", progress=False)
    h = run.history()
    assert [r["step"] for r in h] == [0, 10, 20, 30]
    assert set(HISTORY_KEYS) == set(h[0])
    assert run.steps() == [0, 20, 30]
    assert json.loads((run.path / "config.json").read_text())["train"]["lr"] == 1e-2
    assert torch.equal(run.task().labels, task.labels)
    model = run.load_model()
    ev = mg.evaluate(model, task)
    last = h[-1]
    for split in ("train", "test", "train_clean", "train_corrupted", "train_corrupted_true"):
        assert math.isclose(ev[split]["acc"], last[f"{split}_acc"], abs_tol=1e-12)
        assert math.isclose(ev[split]["loss"], last[f"{split}_loss"], rel_tol=1e-9)


def test_evaluate_splits_by_hand(task):
    model = tiny(task)
    ev = mg.evaluate(model, task)
    pred = models.final_logits(model, task.inputs).argmax(-1)
    c = task.train_corrupted
    assert ev["train_corrupted"]["acc"] == pytest.approx(float((pred[c] == task.labels[c]).float().mean()))
    assert ev["train_corrupted_true"]["acc"] == pytest.approx(float((pred[c] == task.true_labels[c]).float().mean()))
    assert ev["test"]["acc"] == pytest.approx(float((pred[task.test] == task.true_labels[task.test]).float().mean()))
    clean = mg.tasks.modular_arithmetic(p=11, train_frac=0.5)
    assert math.isnan(mg.evaluate(tiny(clean), clean)["train_corrupted"]["acc"])


@pytest.mark.parametrize("extra", [
    dict(),
    dict(batch_size=16, dropout=0.1, optimizer="adamw_orthograd", loss="stablemax", warmup=10),
])
def test_resume_is_bitwise_identical(tmp_path, task, extra):
    cfg = mg.TrainConfig(steps=60, lr=1e-2, eval_every=10, checkpoint_every=20, **extra)
    full = tiny(task)
    mg.train(full, task, cfg, out=tmp_path / "full", progress=False)
    part = tiny(task)
    mg.train(part, task, cfg, out=tmp_path / "part", progress=False, stop_at=40)
    assert mg.Run(tmp_path / "part").steps()[-1] == 40
    resumed = blank(task)
    run = mg.train(resumed, task, cfg, out=tmp_path / "part", progress=False)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    hist_full = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in mg.Run(tmp_path / "full").history()]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in run.history()] == hist_full
    # training a finished run again loads its last weights and rewrites nothing
    files = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    again = blank(task)
    mg.train(again, task, cfg, out=run.path, progress=False)
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == files
    for k, v in weights(full).items():
        assert torch.equal(v, weights(again)[k]), k


_KILL_SCRIPT = """
import sys, mechgrok as mg
task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, corrupt_frac=0.2, seed=0)
model = mg.models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=0)
mg.train(model, task, mg.TrainConfig(steps=int(sys.argv[2]), lr=1e-2, eval_every=50, checkpoint_every=50),
         out=sys.argv[1], progress=False)
"""


def test_killed_process_resumes_bitwise(tmp_path, task):
    """SIGKILL a training process after its first checkpoints; resuming matches an uninterrupted run."""
    steps = 1000
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), str(steps)])
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_000100.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, "training process ended early"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = mg.Run(out).steps()[-1]
    assert killed_at < steps, "the process finished before it was killed; raise `steps`"
    cfg = mg.TrainConfig(steps=steps, lr=1e-2, eval_every=50, checkpoint_every=50)
    resumed = blank(task)
    mg.train(resumed, task, cfg, out=out, progress=False)
    full = tiny(task)
    mg.train(full, task, cfg, out=tmp_path / "full", progress=False)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k


def test_refuses_run_with_other_config(tmp_path, task):
    out = tmp_path / "r"
    mg.train(tiny(task), task, mg.TrainConfig(steps=5, lr=1e-2), out=out, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"different config \(train.lr: 0.01 -> 0.001\).*overwrite=True"):
        mg.train(tiny(task), task, mg.TrainConfig(steps=5, lr=1e-3), out=out, progress=False)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}  # nothing lost
    run = mg.train(tiny(task), task, mg.TrainConfig(steps=5, lr=1e-3), out=out, overwrite=True, progress=False)
    assert run.config["train"]["lr"] == 1e-3


def test_refuses_foreign_folder(tmp_path, task):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a mechgrok run"):
        mg.train(tiny(task), task, mg.TrainConfig(steps=2), out=tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_truncated_checkpoint_is_a_clear_error(tmp_path, task):
    out = tmp_path / "r"
    cfg = mg.TrainConfig(steps=20, lr=1e-2, checkpoint_every=10)
    mg.train(tiny(task), task, cfg, out=out, progress=False, stop_at=10)
    ckpt = mg.Run(out).checkpoint(10)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ValueError, match="step_000010.safetensors is damaged or truncated"):
        mg.train(tiny(task), task, cfg, out=out, progress=False)
    with pytest.raises(ValueError, match="damaged or truncated"):
        mg.Run(out).load_model(10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=-1), "steps must be a non-negative integer"),
    (dict(lr=0), "lr must be positive"),
    (dict(betas=(0.9, 1.2)), "betas must be two numbers"),
    (dict(loss="hinge"), "unknown loss 'hinge'"),
    (dict(optimizer="sgd"), "optimizer must be"),
    (dict(dropout=1.0), "dropout must lie in"),
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(eval_every=0), "eval_every must be >= 1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mg.TrainConfig(**kwargs)


def test_config_roundtrip_and_unknown_field():
    cfg = mg.TrainConfig(steps=10, betas=[0.8, 0.9])
    assert mg.TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields \\['stepz'\\]"):
        mg.TrainConfig.from_dict({"stepz": 3})


def test_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 5), torch.randint(0, 5, (7,))
    s = torch.where(logits >= 0, logits + 1, 1 / (1 - logits)).double()
    ref = -torch.log(s[torch.arange(7), labels] / s.sum(1)).mean()
    assert torch.allclose(losses.stablemax_cross_entropy(logits, labels), ref)
    assert losses.cross_entropy(logits, labels).dtype == torch.float64
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    assert torch.allclose(losses.mse(logits, labels), ((logits.double() - onehot) ** 2).mean())
    big = torch.zeros(2, 5)
    big[:, 0] = 200.0
    assert losses.softmax_collapse(big, torch.tensor([0, 1])) == 0.5


def test_orthograd_projection():
    p = torch.nn.Parameter(torch.randn(4, 3))
    g = torch.randn(4, 3)
    p.grad = g.clone()
    _orthogonalize_grads([p])
    assert abs(float((p.grad * p.detach()).sum())) < 1e-5
    assert torch.allclose(p.grad.norm(), g.norm())
