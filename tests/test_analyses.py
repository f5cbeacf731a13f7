"""The analyses registry: typed results that round-trip through their JSON files, applicability
with a logged reason, and adding an analysis as one module (result, compute function, section)."""

import json
import logging
from dataclasses import dataclass
from typing import ClassVar

import pytest

import mechgrok as mg
from mechgrok.analyses import ANALYSES, CircuitAnalysis, NeuronAnalysis, Result, analysis, one_answer_task
from mechgrok.report.sections import Section, section, unregister


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    task = mg.tasks.modular_arithmetic(p=5, train_frac=0.6, corrupt_frac=0.2, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0)
    return mg.train(model, task, mg.TrainConfig(steps=4, lr=1e-2, eval_every=2, checkpoint_every=2),
                    out=tmp_path_factory.mktemp("analyses") / "run", progress=False)


@pytest.fixture(scope="module")
def analysed(run):
    """``run`` with progress, neurons and circuits written (name -> file), whichever test (and xdist
    worker) asks first."""
    return mg.analyze(run, only=["progress", "neurons", "circuits"], progress=False)


def test_results_round_trip_through_their_files(run, analysed):
    written = analysed
    assert set(written) == {"progress", "neurons", "circuits"}
    for name, path in written.items():
        cls = ANALYSES[name].result
        loaded = cls.load(run)
        assert type(loaded) is cls and cls.name == name
        assert loaded.to_json() == json.loads(path.read_text())  # one key per field, nothing lost
        assert cls.from_json(loaded.to_json()) == loaded
    neurons = NeuronAnalysis.load(run)
    assert neurons.step == run.steps()[-1] and set(neurons.scores) == {"ipr", "memorization"}
    assert len(neurons.scores["ipr"]) == 16


def test_from_json_says_how_to_rebuild(run, analysed):
    data = CircuitAnalysis.load(run).to_json()
    newer = data | {"a_field_from_a_newer_version": 1}
    assert CircuitAnalysis.from_json(newer) == CircuitAnalysis.from_json(data)  # unknown keys are ignored
    old = {k: v for k, v in data.items() if k != "ablate_memorizing_only"}  # an optional field: its default
    assert CircuitAnalysis.from_json(old).ablate_memorizing_only is None
    with pytest.raises(ValueError, match=r"lacks \['evaluate'\].*mechgrok analyze RUN --only circuits"):
        CircuitAnalysis.from_json({k: v for k, v in data.items() if k != "evaluate"})
    with pytest.raises(ValueError, match="holds list, not an object"):
        CircuitAnalysis.from_json([1, 2])
    (run.path / "analysis" / "circuits.json").write_text('{"method": "eap-ig"}')
    with pytest.raises(ValueError, match=r"circuits\.json lacks"):
        CircuitAnalysis.load(run)
    mg.analyze(run, only=["circuits"], progress=False)  # the fix the message gives
    assert CircuitAnalysis.load(run).method == "eap-ig"


def test_analyses_that_do_not_apply_are_skipped_with_the_reason(run, caplog):
    with caplog.at_level(logging.INFO, logger="mechgrok.analyze"):
        assert mg.analyze(run, only=["overlap", "memorization"], progress=False) == {}
    text = caplog.text
    assert "'overlap'" in text and "single operation" in text
    assert "'memorization'" in text and "language-model corpus; this run trains on a Task" in text
    assert not (run.path / "analysis" / "overlap.json").exists()


def test_an_analysis_is_one_module(run):
    """The recipe of mechgrok.analyses' docstring: a result, a registered function, a section."""

    @dataclass(frozen=True)
    class WeightNorm(Result):
        name: ClassVar[str] = "weight_norm_test"
        step: int
        norm: float

    @analysis(WeightNorm, applies=one_answer_task)
    def _weight_norm(run, progress):
        step = run.steps()[-1]
        return WeightNorm(step=step, norm=float(mg.measures.weight_norm(run.load_model(step))))

    @section(order=99, title="Weight norm", analysis="weight_norm_test")
    def weight_norm_section(run):
        data = WeightNorm.load(run)
        return None if data is None else Section("Weight norm", text=f"Norm {data.norm:.4f} at step {data.step}.")

    try:
        written = mg.analyze(run, only=["weight_norm_test"], progress=False)
        stored = WeightNorm.load(run)
        assert written == {"weight_norm_test": run.path / "analysis" / "weight_norm_test.json"}
        assert stored.norm == pytest.approx(float(mg.measures.weight_norm(run.load_model())), rel=1e-6)
        html = mg.report.build(run).read_text()
        assert ">Weight norm</h2>" in html and f"Norm {stored.norm:.4f} at step {stored.step}." in html
        assert 'class="error"' not in html
    finally:
        ANALYSES.pop("weight_norm_test")
        unregister(weight_norm_section)


def test_an_analysis_returning_the_wrong_type_is_an_error(run):
    @dataclass(frozen=True)
    class Count(Result):
        name: ClassVar[str] = "count_test"
        n: int

    @analysis(Count)
    def _count(run, progress):
        return {"n": 1}  # a dict, not a Count

    try:
        with pytest.raises(TypeError, match="returned dict, not Count"):
            mg.analyze(run, only=["count_test"], progress=False)
        assert not (run.path / "analysis" / "count_test.json").exists()
    finally:
        ANALYSES.pop("count_test")


def test_local_complexity_analysis_on_a_relu_mlp_only(run, tmp_path, caplog):
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.6, seed=0)
    relu = mg.train(mg.models.mlp(task, width=32, act="relu", bias=True, seed=0), task,
                    mg.TrainConfig(steps=20, lr=1e-2, eval_every=10, checkpoint_every=10), out=tmp_path / "relu",
                    progress=False)
    written = mg.analyze(relu, only=["local_complexity"], progress=False)
    data = mg.analyses.LocalComplexityAnalysis.load(relu)
    assert set(written) == {"local_complexity"} and data.radii == [0.1, 1.0]
    from mechgrok.measures.local_complexity import local_complexity_over_training

    direct = local_complexity_over_training(relu, radius=1.0, progress=False)
    assert data.results[1]["mean"]["train"] == pytest.approx(list(direct.mean["train"]))  # the measure's numbers
    assert data.results[1]["steps"] == [0, 10, 20]
    html = mg.report.build(relu).read_text()
    assert ">Local complexity</h2>" in html and 'class="error"' not in html
    with caplog.at_level(logging.INFO, logger="mechgrok.analyze"):  # the transformer run: not a ReLU MLP
        assert mg.analyze(run, only=["local_complexity"], progress=False) == {}
    assert "counts the linear regions of a ReLU MLP" in caplog.text


def test_the_report_lists_the_analyses_not_shown_with_why(tmp_path):
    """Every registered analysis without a result gets a row: the reason it does not apply, or the
    command that runs it; a run with every result has no such section."""
    from mechgrok.analyses import ANALYSES
    from mechgrok.analyses.not_run import not_run_section

    task = mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.5, seed=0)
    run = mg.train(mg.models.mlp(task, width=8, act="relu"), task, mg.TrainConfig(steps=2, eval_every=1,
                   checkpoint_every=1), out=tmp_path / "r", progress=False)
    sec = not_run_section(run)
    assert set(sec.numbers) == set(ANALYSES)
    assert sec.numbers["moe_pathways"].startswith("does not apply:") and "mixture-of-experts" in sec.numbers["moe_pathways"]
    assert sec.numbers["local_complexity"] == f"applies, not run yet: mechgrok analyze {run.path} --only local_complexity"
    mg.analyze(run, only=["local_complexity"], progress=False)
    assert "local_complexity" not in not_run_section(run).numbers
    html = mg.report.build(run).read_text()
    assert ">Analyses not shown</h2>" in html and "mixture-of-experts" in html
