"""Sweeps: grid points, settings resolution, folder names, validation before writing, phases, resumable
local runs, the Ray backend, the CLI."""

import json

import pytest

import mechgrok as mg
from mechgrok import cli, sweeps
from mechgrok._io import child_path, safe_name
from mechgrok.cli import main

TINY = {"p": [11], "width": [24], "steps": [30], "eval_every": [10], "checkpoint_every": [10]}
FAST = {"p": [11], "steps": [20], "eval_every": [10], "checkpoint_every": [10]}  # the "test" transformer, ~1 s a point


def test_points_and_configure(tmp_path):
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
        mg.sweep("doshi-mlp", {"weight_decay": [-1.0]}, out=tmp_path / "unused", progress=False)
    assert not (tmp_path / "unused").exists()


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


@pytest.mark.slow(seconds=70)
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


# ---------------------------------------------------------------------------- folder names (issue 13)


def test_folder_names_keep_full_precision_and_never_collide(tmp_path):
    assert sweeps._name({"steps": 20, "lr": 0.01}) == "steps=20,lr=0.01"
    assert sweeps._name({"steps": 20, "lr": 0.010000001}) == "steps=20,lr=0.010000001"
    assert sweeps._name({"lr": 1e-5, "weight_decay": 1.0, "bias": True}) == "lr=1e-05,weight_decay=1.0,bias=true"
    # values of one setting that read alike (number / string / bool / null, close floats, separators,
    # path tricks, lists, over-long names) all get distinct names, each safe and inside the sweep folder
    values = [0.01, 0.010000001, 1, 1.0, "1", True, "true", "True", None, "null", "relu", "a,b=c", "a_b_c",
              "../../x", "..", "/tmp/y", "x/../../y", [0.9, 0.98], "a" * 300, "a" * 301, -0.0, 0.0, 1e-300]
    names = [sweeps._name({"k": v, "seed": 0}) for v in values]
    assert len(set(names)) == len(values)
    for name in names:
        assert safe_name(name) == name and child_path(tmp_path, name).parent == tmp_path
    assert sweeps._name({"k": "../../x"}).endswith("-" + sweeps._name({"k": "../../x"})[-12:])  # hashed
    assert "=" not in sweeps._name({"k": "../../x"})  # a hashed name never equals a plain one
    # two points of one grid that would be one run, or one folder, are refused before anything is written
    for grid in ({"lr": [0.01, 0.01]}, {"lr": [1, 1.0]}, {"seed": [0], "train.seed": [0, 0]}):
        with pytest.raises(ValueError, match="same point twice.*remove the duplicate"):
            mg.sweep("test", grid, out=tmp_path / "dup", workers=1, progress=False)
    assert not (tmp_path / "dup").exists()


def test_close_values_train_into_their_own_folders_and_rows(tmp_path):
    out = tmp_path / "sw"
    lrs = [0.01, 0.010000001, 0.001]
    table = mg.sweep("test", FAST | {"lr": lrs}, out=out, workers=1, progress=False)
    assert list(table.run) == [f"p=11,steps=20,eval_every=10,checkpoint_every=10,lr={lr!r}" for lr in lrs]
    for row in table.itertuples():  # every row carries the numbers of its own folder
        run = mg.Run(out / row.run)
        assert run.config["train"]["lr"] == row.lr
        last = run.history()[-1]
        assert (row.step, row.test_loss, row.train_acc) == (last["step"], last["test_loss"], last["train_acc"])
    assert table.test_loss[0] != table.test_loss[2]  # lr 1e-2 and 1e-3 trained differently
    assert mg.gather(out)[["run", "test_loss"]].equals(table[["run", "test_loss"]])
    assert len((out / "results.csv").read_text().splitlines()) == 4


def test_a_folder_with_another_config_is_an_error_not_reused(tmp_path):
    out = tmp_path / "sw"
    grid = FAST | {"lr": [0.01]}
    folder = out / sweeps._name(sweeps.points(grid)[0])
    task_cfg, spec, cfg = sweeps.configure("test", sweeps.points(grid)[0])
    task = mg.tasks.from_config(task_cfg)
    # the same steps, another learning rate: the old check (steps only) read this run back as the point
    mg.train(mg.models.transformer(task, **spec["kwargs"]), task, cfg.replace(lr=0.02), out=folder, progress=False)
    before = (folder / "history.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=r"lr=0\.01.*another config.*train\.lr: 0\.02 -> 0\.01"):
        mg.sweep("test", grid, out=out, workers=1, progress=False)
    assert (folder / "history.jsonl").read_bytes() == before and not (out / "sweep.json").exists()
    (out / "sweep.json").write_text(json.dumps({"preset": "test", "grid": grid}))
    with pytest.raises(FileExistsError, match="another config"):
        mg.gather(out)
    (folder / "config.json").unlink()  # a folder that is not a run is not trained into either
    with pytest.raises(FileExistsError, match="not a mechgrok run"):
        mg.sweep("test", grid, out=out, workers=1, progress=False)


def test_settings_are_validated_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    with pytest.raises(ValueError, match="sweep point p=1,steps=20.*: p must be an integer"):
        mg.sweep("test", FAST | {"p": [1]}, out=out, workers=1, progress=False)
    assert not out.exists()
    with pytest.raises((TypeError, ValueError), match="sweep point .*lr=.abc.: .*change this value"):
        mg.sweep("test", FAST | {"lr": [0.01, "abc"]}, out=out, workers=1, progress=False)
    for setting, value in (("steps", True), ("eval_every", 2.5), ("lr", float("inf")), ("lr", "1e-3"),
                           ("weight_decay", float("nan"))):  # TrainConfig's checks, named by point
        with pytest.raises((TypeError, ValueError), match=f"sweep point .*{setting}=.*TrainConfig: {setting}"):
            mg.sweep("test", FAST | {setting: [value]}, out=out, workers=1, progress=False)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises((TypeError, ValueError), match="sweep: workers must be"):
            mg.sweep("test", FAST, out=out, workers=bad, progress=False)
    with pytest.raises(ValueError, match="unknown backend"):
        mg.sweep("test", FAST, out=out, backend="slurm", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        mg.sweep("nope", FAST, out=out, progress=False)
    assert not out.exists()
    (tmp_path / "a_file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        mg.sweep("test", FAST, out=tmp_path / "a_file.txt", progress=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is a mechgrok run folder"):
        mg.sweep("test", FAST, out=tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]
    # the corrected call then runs: nothing of the failed ones was left behind to refuse it
    assert len(mg.sweep("test", FAST, out=out, workers=1, progress=False)) == 1

    def boom(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sweeps, "_run_point", boom)  # a failure after sweep.json, before any point finished
    with pytest.raises(RuntimeError, match="disk on fire"):
        mg.sweep("test", FAST | {"lr": [0.02]}, out=tmp_path / "new", workers=1, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        mg.sweep("test", FAST | {"lr": [0.02]}, out=tmp_path / "mine", workers=1, progress=False)
    assert list((tmp_path / "mine").iterdir()) == []


def test_gather_checks_names_from_a_crafted_sweep_json(tmp_path):
    out = tmp_path / "sweeps" / "sw"
    out.mkdir(parents=True)
    meta = out / "sweep.json"
    for grid in ({"op": ["../../../victim"]}, {"op": ["/tmp/y"]}, {"steps": [20], "p": ["../x"]},
                 {"../../x": [1]}):
        meta.write_text(json.dumps({"preset": "test", "grid": grid}))
        with pytest.raises(ValueError, match="sweep.json"):
            mg.gather(out)
    for text in ("{", "[]", json.dumps({"preset": "test"}), json.dumps({"preset": "test", "grid": {"lr": 0.1}}),
                 json.dumps({"preset": ["test"], "grid": {"lr": [0.1]}})):
        meta.write_text(text)
        with pytest.raises((ValueError, TypeError), match="sweep.json"):
            mg.gather(out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sw", "sweep.json", "sweeps"]  # nothing written
    # a valid value that cannot be written in a name is hashed into a folder inside the sweep
    name = sweeps._name({"op": "../../../victim"})
    assert child_path(out, name).parent == out and "/" not in name and ".." not in name


def test_cli_sweep_flags_are_checked_before_training(tmp_path, capsys):
    out = tmp_path / "sw"
    base = ["sweep", "--preset", "test", "--out", str(out), "--workers", "1", "--no-progress",
            "--grid", "steps=20", "--grid", "p=11"]
    cases = [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--grid", "steps=30"], "--grid steps is given twice; give all its values in one flag: --grid steps=20,30"),
        (["--grid", "lr=0.01,,0.02"], "has an empty value"),
        (["--grid", "=1"], "--grid expects KEY=V1,V2"),
        (["--x", "p"], "--x needs --y"),
        (["--y", "p"], "--y needs --x"),
        (["--x", "p", "--y", "lr"], "--y 'lr' is not a setting of the grid; choose one of ['steps', 'p']"),
        (["--x", "p", "--y", "p"], "--x and --y both name 'p'"),
        (["--grid", "lr=abc"], "sweep point steps=20,p=11,lr='abc'"),
        (["--grid", "weight_decay=-1"], "sweep point steps=20,p=11,weight_decay=-1: TrainConfig: weight_decay must be"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not out.exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["sweep", "--preset", "test", "--out", str(run), "--grid", "steps=20"]) == 2
    assert "is a mechgrok run folder" in capsys.readouterr().err
    (tmp_path / "a_file.txt").write_text("x")
    assert main(["sweep", "--preset", "test", "--out", str(tmp_path / "a_file.txt"), "--grid", "steps=20"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert cli._parse_grid(["lr=1e-3,0.010000001", "act=relu,true,null"]) == {
        "lr": [0.001, 0.010000001], "act": ["relu", True, None]}
