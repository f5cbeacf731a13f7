"""Sweeps: grid points, settings resolution, phases, resumable local runs, the Ray backend, the CLI."""

import json

import pytest

import mechgrok as mg
from mechgrok import sweeps
from mechgrok.cli import main

TINY = {"p": [11], "width": [24], "steps": [30], "eval_every": [10], "checkpoint_every": [10]}


def test_points_and_configure():
    assert sweeps.points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    task, model, cfg = sweeps.configure("doshi-mlp", {"weight_decay": 3.0, "corrupt_frac": 0.2, "width": 50,
                                                      "seed": 7})
    assert cfg.weight_decay == 3.0 and task["corrupt_frac"] == 0.2 and model["kwargs"]["width"] == 50
    assert task["seed"] == model["kwargs"]["seed"] == cfg.seed == 7
    assert sweeps.configure("doshi-mlp", {"train.seed": 3})[2].seed == 3
    with pytest.raises(ValueError, match="unknown setting 'wd'"):
        sweeps.configure("doshi-mlp", {"wd": 1})
    with pytest.raises(ValueError, match="no model setting"):
        sweeps.configure("doshi-mlp", {"model.corrupt_frac": 0.1})
    with pytest.raises(ValueError, match="non-empty list"):
        sweeps.points({"a": []})
    with pytest.raises(ValueError, match="TrainConfig"):  # invalid values fail before anything trains
        mg.sweep("doshi-mlp", {"weight_decay": [-1.0]}, out="unused", progress=False)


@pytest.mark.parametrize("row, expected", [
    ({"train_clean_acc": 1.0, "train_corrupted_acc": 0.95, "train_corrupted_true_acc": 0.05, "test_acc": 0.98},
     "coexistence"),
    ({"train_clean_acc": 1.0, "train_corrupted_acc": 0.6, "train_corrupted_true_acc": 0.4, "test_acc": 0.99},
     "partial inversion"),
    ({"train_clean_acc": 1.0, "train_corrupted_acc": 0.0, "train_corrupted_true_acc": 1.0, "test_acc": 1.0},
     "full inversion"),
    ({"train_clean_acc": 1.0, "train_corrupted_acc": 1.0, "train_corrupted_true_acc": 0.0, "test_acc": 0.05},
     "memorization"),
    ({"train_clean_acc": 0.1, "train_corrupted_acc": 0.0, "train_corrupted_true_acc": 0.1, "test_acc": 0.1},
     "forgetting"),
    ({"train_clean_acc": 1.0, "train_corrupted_acc": 0.5, "train_corrupted_true_acc": 0.3, "test_acc": 0.6},
     "confusion"),
    ({"train_clean_acc": 1.0, "train_corrupted_acc": None, "train_corrupted_true_acc": None, "test_acc": 0.99},
     "generalization"),
])
def test_phase_rule(row, expected):
    assert sweeps.phase(row) == expected


def test_local_sweep_is_resumable(tmp_path):
    grid = TINY | {"weight_decay": [0.0, 1.0], "corrupt_frac": [0.0, 0.3]}
    out = tmp_path / "sw"
    table = mg.sweep("doshi-mlp", grid, out=out, workers=1, progress=False)
    assert len(table) == 4 and list(table.weight_decay) == [0.0, 0.0, 1.0, 1.0]
    assert table.seconds.notna().all() and set(table.phase) <= set(sweeps.PHASES)
    for row in table.itertuples():
        run = mg.Run(out / row.run)
        assert run.config["train"]["weight_decay"] == row.weight_decay
        assert run.config["task"]["corrupt_frac"] == row.corrupt_frac and run.steps()[-1] == 30
    stamps = {row.run: (out / row.run / "history.jsonl").stat().st_mtime_ns for row in table.itertuples()}
    again = mg.sweep("doshi-mlp", grid, out=out, workers=2, progress=False)  # nothing left to train
    assert again.seconds.isna().all()
    assert all((out / r / "history.jsonl").stat().st_mtime_ns == t for r, t in stamps.items())
    cols = ["run", "test_acc", "train_corrupted_acc", "phase"]
    assert again[cols].equals(table[cols]) and mg.gather(out)[cols].equals(table[cols])
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[0].startswith("p,width,steps")
    with pytest.raises(FileExistsError, match="another sweep"):
        mg.sweep("doshi-mlp", grid | {"seed": [1]}, out=out, progress=False)
    assert mg.sweep_figure(table, "weight_decay", "corrupt_frac").axes


def test_interrupted_point_resumes(tmp_path):
    grid = TINY | {"weight_decay": [0.0]}
    out = tmp_path / "sw"
    task_cfg, spec, cfg = sweeps.configure("doshi-mlp", sweeps.points(grid)[0])
    task = mg.tasks.from_config(task_cfg)
    folder = out / sweeps._name(sweeps.points(grid)[0])
    mg.train(mg.models.mlp(task, **spec["kwargs"]), task, cfg, out=folder, progress=False, stop_at=10)  # "killed"
    table = mg.sweep("doshi-mlp", grid, out=out, workers=1, progress=False)
    whole = mg.sweep("doshi-mlp", grid, out=tmp_path / "fresh", workers=1, progress=False)
    assert table.test_acc.tolist() == whole.test_acc.tolist() and table.step.tolist() == [30]


def test_ray_backend_matches_local(tmp_path):
    pytest.importorskip("ray")
    grid = TINY | {"corrupt_frac": [0.0, 0.3]}
    local = mg.sweep("doshi-mlp", grid, out=tmp_path / "local", workers=1, progress=False)
    ray_t = mg.sweep("doshi-mlp", grid, out=tmp_path / "ray", backend="ray", progress=False)
    cols = ["run", "train_acc", "train_corrupted_acc", "test_acc", "test_loss", "weight_norm", "phase"]
    assert ray_t[cols].equals(local[cols])


def test_cli_sweep(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["-q", "sweep", "--preset", "doshi-mlp", "--out", str(out), "--workers", "1", "--no-progress",
            "--x", "weight_decay", "--y", "corrupt_frac"]
    args += [f"--grid={k}={v[0]}" for k, v in TINY.items()] + ["--grid", "weight_decay=0,1", "--grid",
                                                                "corrupt_frac=0.2"]
    assert main(args) == 0
    assert (out / "phase_diagram.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "sweep.json").read_text())["grid"]["weight_decay"] == [0, 1]
    assert main(["sweep", "--out", str(tmp_path / "x"), "--grid", "weight_decay"]) == 2
    assert "--grid expects KEY=V1,V2" in capsys.readouterr().err
