import json
import shutil

import pytest

import mechgrok as mg
from mechgrok.analyze import analyze
from mechgrok.cli import main


@pytest.fixture(scope="module")
def corrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mlp"
    task = mg.tasks.modular_arithmetic(p=13, op="add", train_frac=0.6, corrupt_frac=0.2, seed=0)
    model = mg.models.mlp(task, width=32, seed=0)
    mg.train(model, task, mg.TrainConfig(steps=60, lr=1e-2, loss="mse", eval_every=20, checkpoint_every=20),
             out=out, progress=False)
    return mg.Run(out)


def test_analyze_writes_json_and_report(corrupted_run):
    written = analyze(corrupted_run, progress=False)
    assert set(written) == {"progress", "neurons", "circuits", "sae"}
    prog = json.loads(written["progress"].read_text())
    assert prog["step"] == corrupted_run.steps()
    neurons = json.loads(written["neurons"].read_text())
    assert set(neurons["groups"]) == {"ipr", "memorization"} and len(neurons["scores"]["ipr"]) == 32
    assert {r["order"] for r in neurons["sweeps"]["ipr"]} == {"low-first", "random", "high-first"}
    html = mg.report.build(corrupted_run).read_text()
    for title in ("Progress measures", "Neurons", "Circuits", "SAE features", "Training"):
        assert f">{title}</h2>" in html
    numbers = json.loads((corrupted_run.path / "report.json").read_text())
    assert numbers["sections"]["neurons"]["error"] is None and numbers["sections"]["progress-measures"]["error"] is None


def test_nested_run_sections(corrupted_run, tmp_path):
    outer = tmp_path / "outer"
    task, model, cfg = mg.presets.build("test", steps=10)
    mg.train(model, task, cfg.replace(eval_every=5), out=outer, progress=False)
    shutil.copytree(corrupted_run.path, outer / "mlp")
    html = mg.report.build(outer).read_text()
    assert ">mlp: Training</h2>" in html and ">Training</h2>" in html


def test_cli_analyze_only_and_errors(corrupted_run, capsys):
    assert main(["-q", "analyze", str(corrupted_run.path), "--only", "neurons", "--no-progress", "--no-report"]) == 0
    assert main(["analyze", str(corrupted_run.path), "--only", "sea"]) == 2
    assert "unknown analyses ['sea']" in capsys.readouterr().err
