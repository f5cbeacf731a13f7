import json

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


def test_demo_runs_nested_runs_in_worker_processes(tmp_path, monkeypatch, capsys):
    from mechgrok import cli

    # the demo's structure (an outer run, a nested one, some analyses) on the few-second test preset
    monkeypatch.setattr(cli, "DEMO_RUNS", (("test", "inner", ("progress",)), ("test", "", ("progress", "neurons"))))
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 1500
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
