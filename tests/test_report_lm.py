"""A language-model run through analyze and report: its own sections, the answer-task analyses
left out as not applicable, nothing broken."""

import json

import pytest

import mechgrok as mg


@pytest.mark.slow(seconds=10)
def test_lm_run_analyses_and_report(tmp_path):
    task = mg.tasks.lm_corpus(n_structured=64, n_planted=8, repeats=(1, 20), n_held_out=8, seq_len=10, d_vocab=16)
    model = mg.models.transformer(task, n_layers=2, d_model=16, n_heads=2, d_mlp=32)
    run = mg.train(model, task, mg.TrainConfig(steps=60, lr=1e-2, batch_size=16, eval_every=20), out=tmp_path / "r",
                   progress=False)
    written = mg.analyze(run, progress=False)
    assert set(written) == {"memorization"}  # the others are for one-answer tasks
    data = run.read_analysis("memorization")
    assert set(data["auroc"]) == {"extractable", "loss", "self_influence"}
    assert set(data["auroc"]["loss"]) == {"planted_r1", "planted_r20"}
    assert data["by_repeats"][0]["group"] == "held_out_planted"
    assert 0 <= data["induction"]["strength"] <= 1
    # planted_r20 is k=2 extractable after these 60 steps (0.75 measured), so DEL runs on it
    assert data["deletion"]["group"] == "planted_r20" and data["deletion"]["before"] > 0
    assert set(data["deletion"]["curves"]) == set(mg.memorization.LOCALIZATION_METHODS)
    mg.report.build(run)
    report = json.loads((run.path / "report.json").read_text())
    sections = report["sections"]
    assert {"training-language-model", "memorized-sequences"} <= set(sections)
    assert "training" not in sections  # the one-answer training section does not claim an LM run
    assert all(not s.get("error") for s in sections.values()), [s.get("error") for s in sections.values()]
    md = (run.path / "report.md").read_text()
    assert "planted_r20" in md and "AUROC" in md and "DEL (Chang et al. 2024)" in md
