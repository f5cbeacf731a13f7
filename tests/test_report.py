"""mechgrok.report: self-contained HTML, Markdown twin, report.json, the section registry."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mechgrok import report
from mechgrok.report import SECTIONS, Section, first_step, section, unregister
from mechgrok.run import RUN_FORMAT, Run

CONFIG = {
    "format": RUN_FORMAT,
    "task": {"kind": "modular_arithmetic", "p": 59, "op": "add", "train_frac": 0.3, "corrupt_frac": 0.1, "seed": 0},
    "model": {"kind": "transformer", "kwargs": {"n_layers": 1, "d_model": 64, "n_heads": 4, "d_mlp": 256}},
    "train": {"steps": 5900, "lr": 3e-3, "weight_decay": 1.0, "betas": [0.9, 0.98], "warmup": 10,
              "batch_size": None, "loss": "cross_entropy", "optimizer": "adamw", "dropout": 0.0,
              "eval_every": 100, "checkpoint_every": 1000, "seed": 0, "threads": 1},
}


def _test_acc(step: int, ceiling: float) -> float:
    if step < 1000:
        return 0.02
    if step < 3000:  # 0.02 -> 0.913 at step 2900: still below 95%
        return min(ceiling, 0.02 + 0.94 * (step - 1000) / 2000)
    return min(ceiling, 0.96 + 0.039 * (step - 3000) / 2900)


def _history(*, ceiling: float = 1.0, corrupted: bool = True, missing=None) -> list[dict]:
    """60 evaluations at steps 0, 100, ..., 5900: train acc 100% from step 100, test >= 95% from 3000."""
    rows = []
    for step in range(0, 6000, 100):
        train_acc = 0.02 if step == 0 else 1.0
        test_acc = _test_acc(step, ceiling)
        row = {"step": step, "train_loss": 4.0 if step == 0 else 1e-3 / (1 + step / 1000), "train_acc": train_acc,
               "test_loss": -math.log(max(test_acc, 1e-3)) + 0.01, "test_acc": test_acc,
               "train_clean_loss": 4.0 if step == 0 else 1e-3, "train_clean_acc": train_acc,
               "weight_norm": 40.0 - 3 * step / 1000, "softmax_collapse": min(1.0, step / 6000),
               "lr": 3e-3, "elapsed_s": step / 50}
        if corrupted:
            row.update(train_corrupted_loss=4.0 if step == 0 else 1e-2, train_corrupted_acc=train_acc,
                       train_corrupted_true_loss=8.0, train_corrupted_true_acc=min(0.5, step / 10000))
        else:
            row.update({k: missing for k in ("train_corrupted_loss", "train_corrupted_acc",
                                             "train_corrupted_true_loss", "train_corrupted_true_acc")})
        rows.append(row)
    return rows


def make_run(path: Path, history: list[dict] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    if history is not None:
        (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("run"), _history())
    out = report.build(run)
    assert out == run / "report.html"
    return run


def test_run_loads_the_fabricated_folder(built):
    run = Run(built)
    assert run.config["task"]["p"] == 59
    assert len(run.history()) == 60 and run.history()[0]["step"] == 0
    assert report.build(run) == built / "report.html"  # a Run works as well as a path


def test_html_is_self_contained(built):
    html = (built / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and 'src="//' not in html
    assert not re.search(r"""(src|href)=["'](?!#|data:)""", html)  # only in-page links and data URIs
    assert html.count('<img src="data:image/png;base64,') >= 4
    assert "<link" not in html and "<script" not in html and "@import" not in html


def test_html_has_header_toc_and_sections(built):
    html = (built / "report.html").read_text()
    assert "mechgrok report: " + built.name in html
    assert "modular_arithmetic" in html and "transformer" in html and "Generated" in html
    for title, anchor in [("Run configuration", "run-configuration"), ("Training", "training")]:
        assert f'<a href="#{anchor}">{title}</a>' in html
        assert f'<section id="{anchor}">' in html and f"<h2>{title}</h2>" in html
    assert html.index('<nav class="toc">') < html.index('<section id="run-configuration">')
    assert html.index('<section id="run-configuration">') < html.index('<section id="training">')


def test_markdown_references_existing_pngs(built):
    md = (built / "report.md").read_text()
    paths = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(paths) >= 4
    for p in paths:
        assert p.startswith("report_files/") and p.endswith(".png")
        assert (built / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in (built / "report_files").iterdir()) == sorted(Path(p).name for p in paths)
    assert "## Training" in md and "[Training](#training)" in md


def test_json_has_phase_steps(built):
    data = json.loads((built / "report.json").read_text())
    assert data["format"] == "mechgrok.report/1" and data["run"] == built.name
    n = data["sections"]["training"]["numbers"]
    assert n["memorization_step"] == 100 and n["generalization_step"] == 3000
    assert n["grokking_delay_steps"] == 2900 and n["grokking_delay_ratio"] == pytest.approx(30.0)
    assert n["final_step"] == 5900 and n["n_evals"] == 60 and n["has_corrupted"] is True
    assert n["final"]["train_acc"] == 1.0 and n["final"]["train_corrupted_true_acc"] == 0.5
    assert data["sections"]["run-configuration"]["numbers"]["task"]["p"] == 59
    text = (built / "report.html").read_text()
    assert "at step <strong>100</strong>" in text and "at step <strong>3000</strong>" in text


def test_never_generalizing_says_so(tmp_path):
    run = make_run(tmp_path, _history(ceiling=0.6))
    report.build(run)
    n = json.loads((run / "report.json").read_text())["sections"]["training"]["numbers"]
    assert n["memorization_step"] == 100
    assert n["generalization_step"] is None and n["grokking_delay_steps"] is None
    assert n["grokking_delay_ratio"] is None and n["best_test_acc"] == pytest.approx(0.6)
    assert "never reached 95%" in (run / "report.html").read_text()
    assert "never reached 95%" in (run / "report.md").read_text()


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_no_corrupted_examples(tmp_path, missing):
    run = make_run(tmp_path, _history(corrupted=False, missing=missing))
    report.build(run)
    data = json.loads((run / "report.json").read_text())  # strict JSON: NaN became null
    n = data["sections"]["training"]["numbers"]
    assert n["has_corrupted"] is False and n["final"]["train_corrupted_acc"] is None
    assert n["generalization_step"] == 3000
    html = (run / "report.html").read_text()
    assert "no corrupted training labels" in html and 'class="error"' not in html


def _boom(run):
    raise RuntimeError("deliberate failure <b>")


def test_failing_section_becomes_error_box(tmp_path):
    run = make_run(tmp_path, _history())
    report.build(run, sections=[*SECTIONS, _boom])
    html = (run / "report.html").read_text()
    assert html.count('class="error"') == 1
    assert "RuntimeError: deliberate failure &lt;b&gt;" in html  # escaped
    assert '<section id="training">' in html and '<a href="#boom">Boom</a>' in html
    data = json.loads((run / "report.json").read_text())
    assert data["sections"]["boom"]["error"] == "RuntimeError: deliberate failure <b>"
    assert data["sections"]["training"]["error"] is None
    md = (run / "report.md").read_text()
    assert "This section failed to build" in md and "> <pre>RuntimeError: deliberate failure &lt;b&gt;</pre>" in md


def test_registry_register_and_unregister(tmp_path):
    run = make_run(tmp_path, _history())
    before = list(SECTIONS)

    def exploding(run):
        raise ValueError("no data")

    fn = section(order=15)(exploding)
    try:
        assert SECTIONS.index(fn) == 1  # between configuration (10) and training (20)
        section(order=15)(exploding)  # re-registering replaces, never duplicates
        assert len(SECTIONS) == len(before) + 1
        report.build(run)
        html = (run / "report.html").read_text()
        assert html.index('id="run-configuration"') < html.index('id="exploding"') < html.index('id="training"')
    finally:
        unregister(fn)
    assert SECTIONS == before


def test_section_returning_none_is_left_out_and_text_is_escaped(tmp_path):
    run = make_run(tmp_path)  # no history: no training section
    custom = lambda run: Section("Custom", text="a <script> tag, **bold** and `x < y`\n\n- one\n- two\n\n"  # noqa: E731
                                 "[in page](#custom), [away](https://example.com), [js](javascript:x)")
    report.build(run, sections=[*SECTIONS, custom])
    html = (run / "report.html").read_text()
    assert 'id="training"' not in html and 'id="run-configuration"' in html
    assert "a &lt;script&gt; tag, <strong>bold</strong> and <code>x &lt; y</code>" in html
    assert '<a href="#custom">in page</a>, [away](https://example.com), [js](javascript:x)' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert "training" not in json.loads((run / "report.json").read_text())["sections"]


def test_unclaimed_analyses_are_shown(tmp_path):
    run = Run(make_run(tmp_path, _history()))
    run.write_analysis("fourier", {"key_frequencies": [4, 11, 17], "gini": 0.8, "per_step": list(range(100))})
    claim = section(order=30, analysis="claimed")(lambda run: None)
    run.write_analysis("claimed", {"x": 1})
    try:
        report.build(run)
    finally:
        unregister(claim)
    html = (tmp_path / "report.html").read_text()
    assert '<section id="other-analyses">' in html and "analysis/fourier.json" in html
    assert "analysis/claimed.json" not in html and "[list of 100]" in html
    n = json.loads((tmp_path / "report.json").read_text())["sections"]["other-analyses"]["numbers"]
    assert n == {"fourier": {"key_frequencies": [4, 11, 17], "gini": 0.8}}


def test_not_a_run_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        report.build(tmp_path)


def test_first_step():
    hist = [{"step": 0, "a": 0.1}, {"step": 5, "a": None}, {"step": 9, "a": float("nan")}, {"step": 12, "a": 0.97}]
    assert first_step(hist, "a", 0.95) == 12
    assert first_step(hist, "a", 0.1) == 0
    assert first_step(hist, "a", 0.99) is None
    assert first_step(hist, "missing", 0.0) is None


def test_summary_lists_each_sections_headline_with_a_link(built):
    html = (built / "report.html").read_text()
    data = json.loads((built / "report.json").read_text())
    training = data["sections"]["training"]
    n = training["numbers"]
    # the headline's numbers are the section's numbers
    assert f"at step **{n['memorization_step']}**" in training["headline"]
    assert f"at step **{n['generalization_step']}**" in training["headline"]
    assert f"test accuracy is {100 * n['final']['test_acc']:.1f}%" in training["headline"]
    summary = html[html.index('<section id="summary">'):html.index('<section id="run-configuration">')]
    assert '<li><a href="#training">Training</a>: fit its training set' in summary
    assert "add mod 59, 30% of the pairs for training, 10% of their labels corrupted" in summary
    assert list(data["sections"])[0] == "summary" and data["sections"]["run-configuration"]["headline"] is None
    assert summary.count('<img src="data:image/png;base64,') == 1  # every run's accuracy curves at a glance
    assert (built / "report_files" / "summary-accuracy.png").exists()


def test_no_summary_without_headlines(tmp_path):
    run = make_run(tmp_path)  # only the run configuration, which has no headline
    report.build(run)
    assert 'id="summary"' not in (run / "report.html").read_text()


def test_names_with_html_are_inert_in_html_and_markdown(tmp_path):
    """Folder and config names end up in both reports: no raw HTML, no links but in-page ones, in either."""
    outer = make_run(tmp_path / "<script>alert(1)", _history())  # a folder name cannot hold "/"
    cfg = json.loads((outer / "config.json").read_text())
    cfg["task"]["op"] = "<script>alert(2)</script>"
    cfg["model"]["kind"] = "<img src=x onerror=alert(3)>"
    cfg["train"]["optimizer"] = "[click](javascript:alert(4))"
    (outer / "config.json").write_text(json.dumps(cfg))
    inner = make_run(outer / "$\\bad$ <b>inner", _history())  # nested: its name titles sections, and a plot
    report.build(outer)
    html, md = (outer / "report.html").read_text(), (outer / "report.md").read_text()
    for text in (html, md):
        assert "<script" not in text and "<img src=x" not in text and "<b>" not in text
    assert not re.search(r"(?<!\\)\]\(javascript:", md) and '="javascript' not in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in md and "# mechgrok report: &lt;script&gt;alert(1)" in md
    assert "[click\\](javascript:alert(4))" in md  # shown as text, not a link
    assert "## $\\bad$ &lt;b&gt;inner: Training" in md and "&lt;b&gt;inner: Training</h2>" in html
    sections = json.loads((outer / "report.json").read_text())["sections"]
    assert sections["summary"]["error"] is None and f"{inner.name}: Training" in [s["title"] for s in sections.values()]


def test_damaged_nested_run_is_one_error_box(tmp_path):
    outer = make_run(tmp_path / "outer", _history())
    (make_run(outer / "inner") / "config.json").write_text('{"format": "mechgrok.run/1", "task": {"ki')
    report.build(outer)  # the report is still written
    html = (outer / "report.html").read_text()
    assert html.count('class="error"') == 1 and f"the nested run {outer / 'inner'} cannot be read" in html
    assert '<section id="training">' in html and '<section id="summary">' in html


@pytest.mark.parametrize("file", ["../outside.json", "/etc/passwd", "analysis/../../outside.json", 7])
def test_circuit_files_outside_the_run_are_refused(tmp_path, file):
    run = Run(make_run(tmp_path / "run", _history()))
    (tmp_path / "outside.json").write_text("{}")
    run.write_analysis("circuits", {"method": "eap-ig", "level": "neuron", "step": 1, "evaluate": {},
                                    "generalizing": {"file": file, "size": 1, "n_components": 2, "faithfulness": 0.9}})
    report.build(run)
    error = json.loads((run.path / "report.json").read_text())["sections"]["circuits"]["error"]
    assert "analysis/circuits.json" in error and ("cannot be used as a file name" in error
                                                   or "not a path inside the run" in error), error
