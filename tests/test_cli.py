import errno
import json
import shutil

import pytest
from safetensors import SafetensorError

from mechgrok.cli import main


def test_train_then_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "train", "--preset", "test", "--steps", "20", "--set", "eval_every=10",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["eval_every"] == 10
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [0, 10, 20]
    assert main(["-q", "report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Training" in html and "data:image/png;base64," in html
    # a different config into the same folder is refused with a clear message, and nothing changes
    before = (out / "config.json").read_text()
    assert main(["-q", "train", "--preset", "test", "--steps", "30", "--out", str(out), "--no-progress"]) == 2
    assert "different config (train.eval_every: 10 -> 50; train.steps: 20 -> 30)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before


def test_bad_input_exit_codes(tmp_path, capsys):
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "test", "--set", "lr=-1", "--out", str(tmp_path / "y")]) == 2
    assert "lr must be positive" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a mechgrok run" in capsys.readouterr().err


@pytest.mark.slow(seconds=45)
def test_demo_runs_nested_runs_in_worker_processes(tmp_path, monkeypatch, capsys):
    from mechgrok import cli

    # the demo's structure (an outer run, a nested one, some analyses) on the test preset, shortened
    monkeypatch.setattr(cli, "DEMO_RUNS", (cli.DemoRun("test", "inner", ("progress",), steps=300),
                                           cli.DemoRun("test", "", ("progress", "neurons"), steps=300)))
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 300
    assert sorted(p.name for p in (out / "analysis").glob("*.json")) == ["neurons.json", "progress.json"]
    assert [p.name for p in (out / "inner" / "analysis").glob("*.json")] == ["progress.json"]
    html = (out / "report.html").read_text()
    assert ">inner: Training</h2>" in html and ">Neurons</h2>" in html
    # a rerun resumes: both runs are complete and analysed, so nothing is retrained or reanalysed
    kept = {p: p.read_bytes() for d in (out, out / "inner") for p in [d / "history.jsonl", *(d / "analysis").glob("*.json")]}
    (out / "analysis" / "neurons.json").unlink()  # as if killed during the analyses: only this one runs again
    assert main(["-q", "demo", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert {p: p.read_bytes() for p in kept} == kept
    assert main(["demo", "--out", str(out), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "notes")]) == 2
    assert "not a mechgrok run; choose another --out" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def _error_line(capsys) -> str:
    """The one line an error leaves on stderr (no traceback, nothing else from mechgrok)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("mechgrok: error:") == 1, err
    line = err[err.index("mechgrok: error:"):].rstrip("\n")
    assert "\n" not in line, err
    return line


def test_set_refuses_malformed_pairs(tmp_path, capsys):
    out = tmp_path / "x"
    for sets, match in [(["=1"], "--set expects KEY=VALUE (e.g. --set lr=1e-3), got '=1'"),
                        (["lr"], "--set expects KEY=VALUE"),
                        (["lr=1e-3", "lr=1e-2"], "--set lr is given twice (--set lr=1e-3 and --set lr=1e-2); keep one"),
                        ([" lr=1e-3"], "no spaces around the key; write --set lr=1e-3"),
                        (["lr=abc"], "lr must be")]:  # the value itself: TrainConfig's own check names it
        assert main(["-q", "train", "--preset", "test", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 2
        line = _error_line(capsys)
        assert match in line, line
    assert "'abc'" in line and not out.exists()


@pytest.mark.parametrize("error, want", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/r/report.html"),
     "/runs/r/report.html: No space left on device [Errno 28]; the disk is full: free some space"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/notes.txt/run"),
     "/notes.txt/run: Not a directory [Errno 20]; a part of this path is a file, not a folder: choose another folder"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/run"),
     "/root/run: Permission denied [Errno 13]; no permission to use this path: choose another folder"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device [Errno 28]; the disk is full"),
    (SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "/r/x"'),
     'a tensor file could not be read or written (Error while serializing: I/O error: No space left on device '
     '(os error 28) at path "/r/x"); the disk is full'),
    (json.JSONDecodeError("Expecting value", "{\n", 2), "a JSON file is damaged or truncated (Expecting value: "
                                                        "line 2 column 1 (char 2)); restore or delete it"),
    (FileExistsError("x exists; choose another --out"), "mechgrok: error: x exists; choose another --out"),
])
def test_os_and_file_errors_become_one_line(tmp_path, monkeypatch, capsys, error, want):
    from mechgrok import report

    def fail(run):
        raise error

    monkeypatch.setattr(report, "build", fail)
    assert main(["-q", "report", str(tmp_path)]) == 2
    assert want in _error_line(capsys)


def test_interrupt_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    from mechgrok import report

    def interrupt(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "build", interrupt)
    assert main(["report", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == "mechgrok: interrupted; rerun the same command to resume (finished checkpoints and analyses are kept)\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["-q", "train", "--preset", "test", "--steps", "4", "--set", "eval_every=2", "--set",
                 "checkpoint_every=2", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("damage, want", [
    (lambda r: (r / "task" / "task.json").write_text((r / "task" / "task.json").read_text()[:50]),
     "task/task.json is damaged or truncated ("),
    (lambda r: (r / "task" / "tensors.safetensors").write_bytes(b"\x00garbage" * 20),
     "task/tensors.safetensors is damaged or truncated"),
    (lambda r: (r / "analysis").write_text("a file where the analysis folder goes"),
     "/analysis: File exists [Errno 17]; this is a file where a folder is needed: move it away"),
])
def test_damaged_run_files_become_one_line(tiny_run, tmp_path, capsys, damage, want):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damage(run)
    assert main(["-q", "analyze", str(run), "--only", "neurons", "--no-report", "--no-progress"]) == 2
    line = _error_line(capsys)
    assert want in line and str(run) in line, line


def test_a_garbage_analysis_file_is_named_in_the_report(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "analysis").mkdir()
    (run / "analysis" / "neurons.json").write_text('{"layer": 0, "evalu')
    assert main(["-q", "report", str(run)]) == 0  # the report still builds: that section is an error box
    html = (run / "report.html").read_text()
    assert f"{run}/analysis/neurons.json is damaged or truncated" in html
    assert f"mechgrok analyze {run} --only neurons" in html


def test_demo_refuses_bad_workers_and_damaged_nested_runs(tmp_path, monkeypatch, capsys):
    import argparse

    from mechgrok import cli

    monkeypatch.setattr(cli, "DEMO_RUNS", (cli.DemoRun("test", "inner", ("progress",)), cli.DemoRun("test", "", ("progress",))))
    out = tmp_path / "demo"
    for workers, err, match in [(True, TypeError, "--workers must be an integer, got True"),
                                (1.5, TypeError, "--workers must be an integer"),
                                (0, ValueError, "--workers must be >= 1")]:
        with pytest.raises(err, match=match):
            cli._demo(argparse.Namespace(out=str(out), workers=workers, no_progress=True))
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"format": "mechgrok.run/1"}))  # an outer run, as the demo writes
    (out / "inner").write_text("not a folder")
    assert main(["-q", "demo", "--out", str(out), "--workers", "1", "--no-progress"]) == 2
    assert f"{out / 'inner'} is a file, where the demo keeps a nested run" in _error_line(capsys)
    (out / "inner").unlink()
    (out / "inner").mkdir()
    (out / "inner" / "config.json").write_text('{"format": "mechgrok.run/1", "task": {"kind": "modu')
    assert main(["-q", "demo", "--out", str(out), "--workers", "2", "--no-progress"]) == 2
    line = _error_line(capsys)
    assert str(out / "inner" / "config.json") in line and f"delete {out / 'inner'} to train it again" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "inner"]  # nothing was trained
    (out / "notes.txt").write_text("x")
    assert main(["-q", "demo", "--out", str(out / "notes.txt")]) == 2
    assert "notes.txt is a file, where the demo keeps its run; choose another --out" in _error_line(capsys)
