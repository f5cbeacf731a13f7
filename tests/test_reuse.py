import sys

import pytest

import mechgrok as mg
from mechgrok.circuits.graph import graph


@pytest.fixture(scope="module")
def multi():
    task = mg.tasks.multi_task([("add", 7), ("sub", 7)], train_frac=0.5, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    return task, model


def test_contrast_per_task(multi):
    task, _ = multi
    clean, corrupted, labels, _ = mg.circuits.contrast(task, "test", n=10, task_name="sub")
    assert (clean[:, 1] == 7 + 1).all() and (corrupted[:, 1] == 7 + 1).all()
    with pytest.raises(ValueError, match="unknown task 'mul'"):
        mg.circuits.contrast(task, "test", task_name="mul")


def test_cross_faithfulness_endpoints(multi):
    task, model = multi
    g = graph(model, "node")
    scores = {c: 1.0 for c in g.components}
    full = mg.circuits.select(g, scores, top_k=len(g.components))
    empty = mg.circuits.select(g, scores, top_k=0)
    one = mg.circuits.select(g, {c: float(i) for i, c in enumerate(g.components)}, top_k=1)
    res = mg.circuits.cross_faithfulness(model, {"add": full, "sub": empty}, task, n=20, n_random=3)
    assert res["names"] == ["add", "sub"]
    assert res["faithfulness"][0] == pytest.approx([1.0, 1.0], abs=1e-5)  # the full circuit on both tasks
    assert res["faithfulness"][1] == pytest.approx([0.0, 0.0], abs=1e-5)  # the empty one
    assert res["random_mean"][0] == pytest.approx([1.0, 1.0], abs=1e-5)  # random circuits of full size = full
    res2 = mg.circuits.cross_faithfulness(model, {"add": one, "sub": one}, task, n=20, n_random=3)
    assert res2["faithfulness"][0][1] == pytest.approx(res2["faithfulness"][1][1])
    with pytest.raises(ValueError, match="share one level"):
        mg.circuits.cross_faithfulness(model, {"add": full, "sub": mg.circuits.select(graph(model, "edge"),
                                       {c: 1.0 for c in graph(model, "edge").components}, top_k=2)}, task)


def test_evaluate_by_task_and_history(multi, tmp_path):
    task, model = multi
    per = mg.evaluate(model, task, by_task=True)
    assert set(per) == {"add", "sub"}
    overall = mg.evaluate(model, task)
    n_add, n_sub = (int((task.test & (task.task_ids == i)).sum()) for i in (0, 1))
    mixed = (per["add"]["test"]["acc"] * n_add + per["sub"]["test"]["acc"] * n_sub) / (n_add + n_sub)
    assert mixed == pytest.approx(overall["test"]["acc"])
    run = mg.train(mg.models.transformer(task, d_model=16, n_heads=2, d_mlp=32), task,
                   mg.TrainConfig(steps=4, eval_every=2), out=tmp_path / "r", progress=False)
    assert {"add/test_acc", "sub/train_acc"} <= set(run.history()[-1])


def test_overlap_over_training_bookkeeping(tmp_path):
    task = mg.tasks.modular_arithmetic(p=11, train_frac=0.5, seed=0)
    model = mg.models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=0)
    run = mg.train(model, task, mg.TrainConfig(steps=60, lr=1e-2, eval_every=10, checkpoint_every=20),
                   out=tmp_path / "r", progress=False)
    res = mg.circuits.overlap_over_training(run, top_k=8, n=32, progress=False)
    assert res["steps"] == run.steps() and len(res["components"]) == len(res["steps"])
    assert res["jaccard_final"][-1] == 1.0 and all(len(c) == 8 for c in res["components"])
    if res["memorization_step"] is not None:
        i = res["steps"].index(res["memorization_step"])
        assert res["jaccard_memorization"][i] == 1.0
    assert 0 < res["random_jaccard"] < 1


def test_disjoint_halves_overlap_above_baseline():
    """The same task's circuit found from two disjoint halves of its held-out data overlaps far
    above random circuits of the same size (shipped test-preset model, neuron level)."""
    from pathlib import Path

    model = mg.models.load(Path(__file__).resolve().parents[1] / "circuits" / "test" / "model")
    task = mg.presets.build("test")[0]
    clean, corrupted, labels, _ = mg.circuits.contrast(task, "test", n=400, seed=0)
    circs = []
    for half in (slice(0, 200), slice(200, 400)):
        metric = mg.circuits.metrics.generalization(labels[half])
        circs.append(mg.circuits.discover(model, clean[half], corrupted[half], metric, method="eap-ig",
                                          level="neuron", top_k=20, progress=False))
    res = mg.circuits.overlap(circs[0], circs[1], baseline=1000, seed=0)
    assert res["jaccard"]["value"] > res["jaccard"]["p95"] and res["jaccard"]["p_value"] < 0.01
    assert res["spearman"]["value"] > 0.5


@pytest.mark.slow(seconds=7)
def test_overlap_analysis_and_report(tmp_path, monkeypatch):
    task = mg.tasks.multi_task([("add", 7), ("sub", 7)], train_frac=0.6, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    run = mg.train(model, task, mg.TrainConfig(steps=60, lr=1e-2, eval_every=20, checkpoint_every=20),
                   out=tmp_path / "multi", progress=False)
    # this 60-step model has learned neither operation: by default nothing would be compared
    # (test_overlap_skips_unlearned_operations); here every operation counts as learned, to test the machinery
    monkeypatch.setattr(sys.modules["mechgrok.analyses.overlap"], "LEARNED_ACC", 0.0)
    written = mg.analyze(run, only=["overlap", "circuits", "progress"], progress=False)
    assert set(written) == {"overlap", "circuits", "progress"}
    import json

    data = json.loads(written["overlap"].read_text())
    assert data["names"] == ["add", "sub"] and set(data["pairs"]) == {"add|sub"}
    assert len(data["cross_faithfulness"]["faithfulness"]) == 2
    assert all(mg.circuits.Circuit.load(run.path / f).provenance["task"] == name for name, f in data["files"].items())
    html = mg.report.build(run).read_text()
    assert ">Circuit overlap across tasks</h2>" in html and 'class="error"' not in html
    ev = mg.evaluate(run.load_model(run.steps()[-1]), task, by_task=True)  # the report's numbers are the model's
    assert data["accuracy"]["sub"]["test"] == ev["sub"]["test"]["acc"]
    assert f"sub train {ev['sub']['train']['acc']:.2f} / test {ev['sub']['test']['acc']:.2f}" in html
    fe = data["features"]  # the same question for SAE features
    assert set(fe["pairs"]) == {"add|sub"} and set(fe["features"]) == {"add", "sub"}
    assert fe["ablation"]["original"]["sub"] == ev["sub"]["test"]["acc"]
    assert (run.path / fe["folder"] / "sae_weights.safetensors").exists()
    assert "SAE features shared by the operations" in html
    assert f"Of their SAE features: add–sub {fe['pairs']['add|sub']['jaccard']['value']:.2f}" in html
    assert (run.path / "report_files" / "overlap-circuits.png").exists()
    single = mg.tasks.modular_arithmetic(p=7, train_frac=0.5)
    r2 = mg.train(mg.models.transformer(single, d_model=16, n_heads=2, d_mlp=32), single,
                  mg.TrainConfig(steps=4, eval_every=2), out=tmp_path / "single", progress=False)
    assert "overlap" not in mg.analyze(r2, only=["overlap"], progress=False)


def test_overlap_skips_unlearned_operations(tmp_path):
    """Circuits of an operation the model has not generalized are not presented as findings: an
    operation under the learned threshold is left out, and with fewer than two learned nothing is compared."""
    import json

    from mechgrok.analyses import overlap_analysis

    task = mg.tasks.multi_task([("add", 7), ("sub", 7), ("mul", 7)], train_frac=0.6, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    run = mg.train(model, task, mg.TrainConfig(steps=40, lr=1e-2, eval_every=20, checkpoint_every=20),
                   out=tmp_path / "multi", progress=False)
    acc = {k: v["test"]["acc"] for k, v in mg.evaluate(run.load_model(40), task, by_task=True).items()}
    assert max(acc.values()) < 0.95  # 40 steps: nothing learned
    data = overlap_analysis(run, features=False, progress=False)
    assert data.names == [] and data.not_learned == ["add", "sub", "mul"] and data.skipped is not None
    assert data.pairs is None and not (run.path / "analysis" / "overlap").exists()
    run.write_analysis("overlap", data.to_json())
    html = mg.report.build(run).read_text()
    assert "Not computed" in html and 'class="error"' not in html
    # a threshold between the operations' accuracies: only those above it are compared
    order = sorted(acc, key=acc.get)
    cut = (acc[order[0]] + acc[order[1]]) / 2
    assert acc[order[0]] < cut < acc[order[1]]  # measured: add 0.05, sub 0.20, mul 0.30 (distinct)
    data = overlap_analysis(run, features=False, learned_acc=cut, progress=False)
    assert data.not_learned == [order[0]] and set(data.names) == set(order[1:])
    assert set(data.pairs) == {"|".join(n for n in task.task_names if n in order[1:])}
    assert json.dumps(data.to_json())  # JSON-ready
    with pytest.raises(ValueError, match="learned_acc"):
        overlap_analysis(run, learned_acc=1.5, progress=False)
