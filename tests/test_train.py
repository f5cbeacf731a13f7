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
from mechgrok._training import orthogonalize_grads as _orthogonalize_grads
from mechgrok.train import HISTORY_KEYS, TrainingDiverged


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


@pytest.mark.slow(seconds=37)
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


@pytest.mark.slow(seconds=26)
def test_killed_process_resumes_bitwise(tmp_path, task):
    """SIGKILL a training process after its first checkpoints; resuming matches an uninterrupted run."""
    steps = 500  # the child is killed at step ~100; 400 more steps are seconds of margin
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


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=-1), ValueError, "steps must be a non-negative integer"),
    (dict(steps=True), TypeError, r"steps must be a non-negative integer .*, got True \(bool\)"),
    (dict(steps=10.0), TypeError, "steps must be a non-negative integer"),
    (dict(lr=0), ValueError, "lr must be positive"),
    (dict(lr=math.inf), ValueError, "lr must be positive and finite"),
    (dict(lr=math.nan), ValueError, "lr must be positive and finite"),
    (dict(lr="1e-3"), TypeError, r"lr must be positive and finite .*, got '1e-3' \(str\)"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(weight_decay=math.inf), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(betas=(0.9, 1.2)), ValueError, "betas must be two numbers"),
    (dict(betas=(0.9,)), ValueError, r"betas must be two numbers in \[0, 1\), e.g. \(0.9, 0.98\), got \(0.9,\)"),
    (dict(betas=(0.9, 0.98, 0.99)), ValueError, "betas must be two numbers"),
    (dict(betas="0.9,0.98"), TypeError, "betas must be two numbers"),
    (dict(betas=(0.9, "0.98")), TypeError, r"betas must be two numbers .*got \(0.9, '0.98'\)"),
    (dict(betas=(0.9, math.nan)), ValueError, "betas must be two numbers"),
    (dict(warmup=-1), ValueError, "warmup must be an integer >= 0"),
    (dict(warmup=0.5), TypeError, "warmup must be an integer >= 0"),
    (dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    (dict(loss=3), TypeError, "loss must be a string"),
    (dict(optimizer="sgd"), ValueError, "optimizer must be"),
    (dict(dropout=1.0), ValueError, r"dropout must be a number that lies in \[0, 1\)"),
    (dict(dropout=math.nan), ValueError, "dropout must be a number that lies in"),
    (dict(dropout="0.1"), TypeError, "dropout must be a number"),
    (dict(batch_size=0), ValueError, "batch_size must be positive"),
    (dict(batch_size=1.5), TypeError, "batch_size must be positive"),
    (dict(batch_size=True), TypeError, "batch_size must be positive"),
    (dict(eval_every=0), ValueError, "eval_every must be an integer >= 1"),
    (dict(eval_every=2.5), TypeError, r"eval_every must be an integer >= 1, got 2.5 \(float\)"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every must be an integer >= 1"),
    (dict(checkpoint_every=False), TypeError, "checkpoint_every must be an integer >= 1"),
    (dict(threads=0), ValueError, "threads must be an integer >= 1 or None"),
    (dict(threads=True), TypeError, "threads must be an integer >= 1 or None"),
    (dict(seed=-1), ValueError, "seed must be an integer in"),
    (dict(seed=1.5), TypeError, "seed must be an integer in"),
])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=f"TrainConfig: {match}"):
        mg.TrainConfig(**kwargs)


def test_config_normalises_numbers():
    """Numbers of other types become plain int / float, so config.json is plain JSON."""
    import numpy as np

    cfg = mg.TrainConfig(lr=1, steps=np.int64(5), dropout=np.float32(0.25), betas=[0, np.float64(0.5)],
                         batch_size=None, threads=None)
    assert type(cfg.lr) is float and type(cfg.steps) is int and type(cfg.dropout) is float
    assert cfg.betas == (0.0, 0.5) and all(type(b) is float for b in cfg.betas)
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_cli_set_with_a_bad_value_is_one_clear_line(tmp_path, capsys):
    from mechgrok.cli import main

    assert main(["-q", "train", "--preset", "test", "--set", "lr=abc", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "TrainConfig: lr must be positive and finite" in err and "got 'abc' (str)" in err
    assert "not supported" not in err and not (tmp_path / "r").exists()


def test_diverging_loss_stops_with_the_step(tmp_path, task):
    """A loss that is no longer finite ends training at once, naming the step and a lower lr."""
    out = tmp_path / "r"
    cfg = mg.TrainConfig(steps=200, lr=1e6, eval_every=10, checkpoint_every=10)
    with pytest.raises(TrainingDiverged,
                       match=r"loss became (nan|inf) at step \d+ .*lower lr \(e.g. lr=100000"):
        mg.train(tiny(task), task, cfg, out=out, progress=False)
    run = mg.Run(out)
    assert run.steps()[-1] < 50  # it stopped, rather than training on to step 200
    assert not (out / ".lock").exists()  # the lock is released on the error
    mg.train(tiny(task), task, cfg.replace(lr=1e-2, steps=10), out=out, overwrite=True, progress=False)


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


# ---------------------------------------------------------------------------- damaged checkpoints


def flip_payload_byte(file, where=0.5):
    """Flip one bit in the tensor bytes of a safetensors file, leaving its header intact."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    i = start + int((len(data) - start) * where)
    data[i] ^= 0x10
    file.write_bytes(bytes(data))


def test_checkpoint_records_its_content_hash(tmp_path, task):
    from safetensors import safe_open

    from mechgrok import checkpoints

    run = mg.train(tiny(task), task, mg.TrainConfig(steps=5, lr=1e-2), out=tmp_path / "r", progress=False)
    with safe_open(str(run.checkpoint(5)), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == checkpoints.CHECKPOINT_FORMAT
    assert meta["sha256"] == checkpoints.content_hash(tensors)
    tensors["rng/train"] = tensors["rng/train"].clone()
    tensors["rng/train"][0] ^= 1
    assert checkpoints.content_hash(tensors) != meta["sha256"]


def test_bit_flipped_checkpoint_is_refused_then_resumed_past(tmp_path, task):
    """A bit flipped in the newest checkpoint's tensors is an error naming the file and saying how to
    resume; resume="intact" moves it aside and retrains from the newest intact one, bitwise."""
    from mechgrok.checkpoints import DamagedCheckpoint

    cfg = mg.TrainConfig(steps=40, lr=1e-2, eval_every=10, checkpoint_every=20)
    full = tiny(task)
    ref = mg.train(full, task, cfg, out=tmp_path / "full", progress=False)
    out = tmp_path / "r"
    mg.train(tiny(task), task, cfg, out=out, progress=False)
    ckpt = mg.Run(out).checkpoint(40)
    flip_payload_byte(ckpt)
    damaged = ckpt.read_bytes()
    with pytest.raises(DamagedCheckpoint, match=r"step_000040.safetensors is damaged: its tensors do not match the "
                                                r"sha256.*load another step \(available: \[0, 20, 40\]\)"):
        mg.Run(out).load_model()
    with pytest.raises(DamagedCheckpoint, match=r"step_000040.safetensors is damaged.*resume='intact'.*"
                                                r"--resume-intact.*newest intact checkpoint: step 20"):
        mg.train(blank(task), task, cfg, out=out, progress=False)
    assert ckpt.read_bytes() == damaged  # nothing moved without being asked
    resumed = blank(task)
    run = mg.train(resumed, task, cfg, out=out, progress=False, resume="intact")
    assert (out / "checkpoints" / "damaged" / "step_000040.safetensors").read_bytes() == damaged
    assert run.steps() == [0, 20, 40] and mg.Run(out).load_model() is not None
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    no_time = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in ref.history()]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in run.history()] == no_time


def test_truncated_checkpoint_is_a_clear_error(tmp_path, task):
    out = tmp_path / "r"
    cfg = mg.TrainConfig(steps=20, lr=1e-2, checkpoint_every=10)
    mg.train(tiny(task), task, cfg, out=out, progress=False, stop_at=10)
    ckpt = mg.Run(out).checkpoint(10)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ValueError, match="step_000010.safetensors is damaged or truncated.*newest intact "
                                         "checkpoint: step 0"):
        mg.train(tiny(task), task, cfg, out=out, progress=False)
    with pytest.raises(ValueError, match="damaged or truncated"):
        mg.Run(out).load_model(10)
    run = mg.train(blank(task), task, cfg, out=out, progress=False, resume="intact")
    assert run.steps() == [0, 10, 20] and (out / "checkpoints" / "damaged" / "step_000010.safetensors").exists()


def test_checkpoint_without_a_hash_loads_with_a_warning(tmp_path, task, caplog):
    """Checkpoints written before hashes existed are read unverified, and say so."""
    from safetensors.torch import save_file

    from mechgrok._io import read_safetensors

    run = mg.train(tiny(task), task, mg.TrainConfig(steps=5, lr=1e-2), out=tmp_path / "r", progress=False)
    tensors = read_safetensors(run.checkpoint(5))
    save_file(tensors, str(run.checkpoint(5)))  # no metadata, as an older mechgrok wrote it
    with caplog.at_level("WARNING"):
        model = run.load_model(5)
    assert "step_000005.safetensors has no content hash" in caplog.text and "unverified" in caplog.text
    assert torch.equal(dict(model.named_parameters())["embed.W_E"], tensors["embed.W_E"])


def test_status_line_scores_the_weights_not_the_history(tmp_path, caplog):
    """`mechgrok train`'s closing line evaluates the loaded checkpoint: a history claiming 100% changes nothing."""
    from mechgrok.cli import main

    out = tmp_path / "r"
    argv = ["train", "--preset", "test", "--steps", "20", "--set", "eval_every=10", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    rows[-1].update(train_acc=1.0, test_acc=1.0)
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.clear()
    with caplog.at_level("INFO", logger="mechgrok"):
        assert main(argv) == 0
    run = mg.Run(out)
    ev = mg.evaluate(run.load_model(), run.task())
    assert ev["test"]["acc"] < 0.9
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("done:"))
    assert line.startswith(f"done: train acc {ev['train']['acc']:.3f}, test acc {ev['test']['acc']:.3f} at step 20")
    assert "step_000020.safetensors" in line


def test_cli_resume_intact(tmp_path):
    """`_train` passes --resume-intact on as resume="intact"."""
    import argparse

    from mechgrok import cli

    out = tmp_path / "r"
    ns = argparse.Namespace(preset="test", out=str(out), steps=20, set=["checkpoint_every=10"], overwrite=False,
                            no_progress=True)
    cli._train(ns)
    flip_payload_byte(mg.Run(out).checkpoint(20))
    with pytest.raises(ValueError, match="--resume-intact"):
        cli._train(ns)
    cli._train(argparse.Namespace(**vars(ns), resume_intact=True))
    assert (out / "checkpoints" / "damaged" / "step_000020.safetensors").exists()
    assert mg.Run(out).steps() == [0, 10, 20]


# ---------------------------------------------------------------------------- history integrity


def _rows(run):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in run.history()]


@pytest.fixture
def finished(tmp_path, task):
    """A finished run of 40 steps (rows every 10, checkpoints every 20) and a copy of its files."""
    cfg = mg.TrainConfig(steps=40, lr=1e-2, eval_every=10, checkpoint_every=20)
    model = tiny(task)
    run = mg.train(model, task, cfg, out=tmp_path / "r", progress=False)
    return run, cfg, weights(model), _rows(run)


def test_deleted_history_is_detected_not_replaced(finished, task):
    run, cfg, final, rows = finished
    (run.path / "history.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"history.jsonl is missing, but .* has checkpoints up to step 40: "
                                                r"restore the file, or train again with resume='intact'"):
        mg.train(blank(task), task, cfg, out=run.path, progress=False)
    assert not (run.path / "history.jsonl").exists()  # not replaced by a one-row history
    with pytest.raises(FileNotFoundError, match="history.jsonl is missing"):
        mg.Run(run.path).history()
    model = blank(task)
    mg.train(model, task, cfg, out=run.path, progress=False, resume="intact")  # recomputed from step 0
    assert _rows(mg.Run(run.path)) == rows
    assert all(torch.equal(v, weights(model)[k]) for k, v in final.items())


def test_torn_last_history_line_is_recomputed(finished, task):
    """A kill while the last row was written leaves a cut line; training the complete run again
    restores that row instead of refusing with a JSONDecodeError."""
    run, cfg, final, rows = finished
    f = run.path / "history.jsonl"
    f.write_bytes(f.read_bytes()[:-25])
    ckpts = {p: p.read_bytes() for p in (run.path / "checkpoints").iterdir()}
    assert len(mg.Run(run.path).history()) == 4  # readers leave the cut row out
    model = blank(task)
    mg.train(model, task, cfg, out=run.path, progress=False)
    assert _rows(mg.Run(run.path)) == rows and f.read_text().endswith("\n")
    assert {p: p.read_bytes() for p in (run.path / "checkpoints").iterdir()} == ckpts
    assert all(torch.equal(v, weights(model)[k]) for k, v in final.items())


def test_damaged_middle_history_line_is_refused(finished, task):
    run, cfg, final, rows = finished
    f = run.path / "history.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:30] + "\n"
    f.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"history.jsonl is damaged at line 2: not valid JSON.*resume='intact'"):
        mg.train(blank(task), task, cfg, out=run.path, progress=False)
    with pytest.raises(ValueError, match=r"history.jsonl is damaged at line 2"):
        mg.Run(run.path).history()
    model = blank(task)
    mg.train(model, task, cfg, out=run.path, progress=False, resume="intact")  # from step 0: rows 10.. are lost
    assert _rows(mg.Run(run.path)) == rows
    assert all(torch.equal(v, weights(model)[k]) for k, v in final.items())


def test_cut_history_lacking_rows_is_refused(finished, task):
    run, cfg, final, rows = finished
    f = run.path / "history.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:2]))  # rows of steps 0 and 10 only
    with pytest.raises(ValueError, match=r"lacks the rows of steps \[20, 30\]"):
        mg.train(blank(task), task, cfg, out=run.path, progress=False)
    model = blank(task)
    mg.train(model, task, cfg, out=run.path, progress=False, resume="intact")  # from step 20
    assert _rows(mg.Run(run.path)) == rows
    assert all(torch.equal(v, weights(model)[k]) for k, v in final.items())


def test_truncated_config_names_the_file(finished, task):
    run, cfg, _, _ = finished
    f = run.path / "config.json"
    f.write_text(f.read_text()[:120])
    with pytest.raises(ValueError, match=r"config.json is damaged or truncated \(not valid JSON: .* at line \d+ "
                                         r"column \d+\); restore it"):
        mg.Run(run.path).config
    with pytest.raises(ValueError, match=r"config.json is damaged or truncated .*overwrite=True"):
        mg.train(tiny(task), task, cfg, out=run.path, progress=False)
    again = mg.train(tiny(task), task, cfg, out=run.path, progress=False, overwrite=True)
    assert again.config["train"]["steps"] == 40 and again.steps() == [0, 20, 40]


def test_damaged_analysis_json_names_the_file(finished):
    run = finished[0]
    (run.path / "analysis").mkdir()
    (run.path / "analysis" / "neurons.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"neurons.json is damaged or truncated.*--only neurons"):
        run.read_analysis("neurons")
