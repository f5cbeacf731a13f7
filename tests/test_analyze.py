import json
import shutil
from pathlib import Path

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


@pytest.fixture(scope="module")
def analysed(corrupted_run):
    """``corrupted_run`` with every analysis written (name -> file); tests needing them ask for this,
    so none depends on the order tests run in."""
    return analyze(corrupted_run, progress=False)


@pytest.mark.slow(seconds=10)
def test_analyze_writes_json_and_report(corrupted_run, analysed):
    written = analysed
    assert set(written) == {"progress", "lazy_rich", "neurons", "circuits", "sae", "influence", "tickets"}
    prog = json.loads(written["progress"].read_text())
    assert prog["step"] == corrupted_run.steps()
    neurons = json.loads(written["neurons"].read_text())
    assert set(neurons["groups"]) == {"ipr", "memorization"} and len(neurons["scores"]["ipr"]) == 32
    assert {r["order"] for r in neurons["sweeps"]["ipr"]} == {"low-first", "random", "high-first"}
    html = mg.report.build(corrupted_run).read_text()
    for title in ("Progress measures", "Neurons", "Circuits", "SAE features", "Influential training examples",
                  "Training"):
        assert f">{title}</h2>" in html
    numbers = json.loads((corrupted_run.path / "report.json").read_text())
    assert numbers["sections"]["neurons"]["error"] is None and numbers["sections"]["progress-measures"]["error"] is None


@pytest.mark.slow(seconds=8)
def test_nested_run_sections(corrupted_run, analysed, tmp_path):
    outer = tmp_path / "outer"
    task, model, cfg = mg.presets.build("test", steps=10)
    mg.train(model, task, cfg.replace(eval_every=5), out=outer, progress=False)
    shutil.copytree(corrupted_run.path, outer / "mlp")
    html = mg.report.build(outer).read_text()
    assert ">mlp: Training</h2>" in html and ">Training</h2>" in html
    toc = html[html.index('<nav class="toc">'):html.index("</nav>")]  # the nested run's sections under its name
    assert '<li>mlp<ol><li><a href="#mlp-run-configuration">Run configuration</a></li>' in toc
    summary = html[html.index('<section id="summary">'):html.index('<section id="run-configuration">')]
    assert '<li><a href="#mlp-training">Training</a>' in summary and '<a href="#mlp-neurons">Neurons</a>' in summary
    assert "<strong>mlp</strong>: add mod 13, 60% of the pairs for training, 20% of their labels corrupted; mlp" in summary
    numbers = json.loads((outer / "report.json").read_text())["sections"]
    for anchor in ("mlp-neurons", "mlp-sae-features", "mlp-influential-training-examples", "mlp-circuits"):
        assert numbers[anchor]["headline"] and numbers[anchor]["headline"] in html.replace("<strong>", "**").replace(
            "</strong>", "**").replace("&#x27;", "'")


def test_cli_analyze_only_and_errors(corrupted_run, capsys):
    assert main(["-q", "analyze", str(corrupted_run.path), "--only", "neurons", "--no-progress", "--no-report"]) == 0
    assert main(["analyze", str(corrupted_run.path), "--only", "sea"]) == 2
    assert "unknown analyses ['sea']" in capsys.readouterr().err


def test_influence_analysis(corrupted_run):
    from mechgrok._stats import auroc
    from mechgrok.analyses import influence_analysis

    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [2, 3]) == 0.125 and auroc([], [1]) is None
    data = influence_analysis(corrupted_run, n_queries=8, k=5, progress=False)
    task = corrupted_run.task()
    assert data.base_rates["frac_corrupted"] == int(task.train_corrupted.sum()) / int(task.train.sum())
    last = data.steps[str(corrupted_run.steps()[-1])]
    assert set(last["groups"]) == {"corrupted train", "test"}
    n_train = int(task.train.sum())
    for r in last["groups"].values():
        assert r["n_queries"] == 8 and 0 <= r["frac_corrupted"] <= 1 and len(r["example"]["top"]) == 5
        recall = r["tfidf_recall"]  # candidate sets of 50 and of the whole training set (fewer than 200)
        assert set(recall) == {f"{t}@{k}" for t in ("tokens", "tokens+answer") for k in (50, n_train)}
        assert recall[f"tokens@{n_train}"] == {"recall": 1.0, "random": 1.0}
        assert 0 <= recall["tokens+answer@50"]["recall"] <= 1 and recall["tokens@50"]["random"] == 50 / n_train
    si = last["self_influence"]
    assert len(si["clean"]) + len(si["corrupted"]) == int(task.train.sum()) and min(si["clean"] + si["corrupted"]) >= 0
    assert 0 <= si["auroc_corrupted"] <= 1
    ek = mg.influence.EKFAC.load(corrupted_run.path / data.factors, corrupted_run.load_model(corrupted_run.steps()[-1]),
                                 task)
    assert ek.fitted


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "run"
    task = mg.tasks.multi_task([("add", 5), ("sub", 5)], train_frac=0.6, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0)
    mg.train(model, task, mg.TrainConfig(steps=2, lr=1e-2, eval_every=1, checkpoint_every=1), out=out, progress=False)
    return mg.Run(out)


def test_crafted_sub_task_names_write_nothing_outside_the_run(multi_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(multi_run.path, run)
    meta_file = run / "task" / "task.json"
    meta_file.write_text(json.dumps(json.loads(meta_file.read_text()) | {"task_names": ["../../../../x", "/tmp/y"]}))
    escaped = [(run / "analysis" / "overlap" / "../../../../x.json").resolve(), Path("/tmp/y.json")]
    before = [f.exists() for f in escaped]
    assert main(["-q", "analyze", str(run), "--only", "overlap", "--no-report", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("mechgrok: error:") == 1
    assert f"sub-task name '../../../../x' in {meta_file} cannot be used as a file name" in err
    assert [f.exists() for f in escaped] == before and not (run / "analysis" / "overlap").exists()


def test_overlap_analysis_checks_names_itself(multi_run, monkeypatch):
    """Defense in depth: a Task that skipped its own checks still cannot make the analysis write outside."""
    from mechgrok.analyses import overlap_analysis

    task = multi_run.task()
    object.__setattr__(task, "task_names", ("add", "../../escape"))  # bypasses Task's validation
    monkeypatch.setattr(mg.Run, "task", lambda self: task)
    with pytest.raises(ValueError, match=r"sub-task name '\.\./\.\./escape' in .*task\.json cannot be used"):
        overlap_analysis(multi_run, features=False, progress=False)
    assert not (multi_run.path / "escape.json").exists() and not (multi_run.path / "analysis" / "overlap").exists()
