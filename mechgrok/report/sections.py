"""Report sections: the types, the registry, and the built-in sections.

A section is a function ``(run: Run) -> Section | None`` registered with ``@section(order=...)``.
``mechgrok.report.build`` calls the registered sections in ascending ``order`` and renders what
they return; ``None`` means "my data are absent" (the section is left out), and an exception is
shown as an error box in the section's place (and logged) without stopping the report.

A section for an analysis lives in that analysis' module, beside its typed result
(``mechgrok/analyses/``; its docstring shows the whole recipe)::

    @section(order=45, title="Neuron IPR", analysis="ipr")
    def ipr_section(run):
        data = IPRAnalysis.load(run)          # None: the analysis was not run
        if data is None:
            return None
        return Section("Neuron IPR", text=f"Mean IPR: **{data.mean:.3f}**.", numbers={"mean": data.mean})

``analysis="ipr"`` tells the catch-all "Other analyses" section that ``analysis/ipr.json`` has a
section of its own. Sections that read no analysis (the training ones) live in this file. Figures:
``Figure.from_mpl(figures.line_figure(x, {...}), "caption")``; tables: ``Table(header, rows)``.
Built-in orders: 10 run configuration, 20 training, 30–80 the analyses, 1000 other analyses.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechgrok._io import child_path
from mechgrok.report.figures import fig_to_png, line_figure
from mechgrok.report.text import sig
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, Run, first_step

__all__ = ["Section", "Figure", "Table", "section", "unregister", "SECTIONS", "first_step", "series",
           "slugify", "read_analysis", "run_file", "MEMORIZED_ACC", "GENERALIZED_ACC", "is_sequence_run"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ types
@dataclass
class Figure:
    """A rendered figure: PNG bytes and a caption (Markdown-lite). ``name``: file stem in report_files/."""

    png: bytes
    caption: str = ""
    name: str = ""

    @classmethod
    def from_mpl(cls, fig, caption: str = "", name: str = "") -> Figure:
        return cls(fig_to_png(fig), caption, name)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    """What one section contributes: text, tables, figures, and its key numbers for report.json."""

    title: str
    anchor: str = ""  # HTML id; default: slugify(title)
    text: str = ""  # Markdown-lite: paragraphs, "- " bullets, **bold**, `code`
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set by build when the section function raised
    headline: str = ""  # the key result in one sentence with its numbers, for the report's summary
    group: str = ""  # set by build: the nested run a section belongs to ("" for the report's own run)

    def __post_init__(self):
        self.anchor = self.anchor or slugify(self.title)


def slugify(title: str) -> str:
    """GitHub-style heading anchor: ``"Run configuration"`` -> ``"run-configuration"``."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") or "section"


# --------------------------------------------------------------------------------- registry
SectionFn = Callable[[Run], "Section | None"]
#: The registered section functions, kept sorted by their ``order``.
SECTIONS: list[SectionFn] = []


def section(order: int = 100, *, title: str | None = None,
            analysis: str | Sequence[str] = ()) -> Callable[[SectionFn], SectionFn]:
    """Register a section function. Re-registering the same function (a reload) replaces it.

    Args:
        order: position in the report (ascending).
        title: the title shown when the function raises before it returns a Section.
        analysis: names of the ``analysis/*.json`` files this section presents.
    """
    claims = (analysis,) if isinstance(analysis, str) else tuple(analysis)

    def register(fn: SectionFn) -> SectionFn:
        fn.report_order, fn.report_title, fn.report_analyses = order, title, claims
        unregister(fn)
        SECTIONS.append(fn)
        SECTIONS.sort(key=lambda f: f.report_order)
        return fn

    return register


def unregister(fn: SectionFn) -> None:
    """Remove ``fn`` (matched by module and qualified name) from the registry, if present."""
    key = (fn.__module__, fn.__qualname__)
    SECTIONS[:] = [f for f in SECTIONS if (f.__module__, f.__qualname__) != key]


# ----------------------------------------------------------------------- reading the run folder
def read_analysis(run: Run, name: str) -> dict[str, Any] | None:
    """``run.read_analysis(name)``, with a damaged file named in the error (and how to rebuild it)."""
    try:
        return run.read_analysis(name)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{run.path / 'analysis' / f'{name}.json'} is damaged or truncated ({e}); rebuild it "
                         f"with: mechgrok analyze {run.path} --only {name}") from e


def run_file(run: Run, relative: Any, *, source: str) -> Path:
    """``run.path / relative`` for a path read from a run's file (``source``, e.g. ``analysis/circuits.json``),
    after checking that it stays inside the run: relative, and every part a plain name (``safe_name``)."""
    if not isinstance(relative, str) or not relative or relative.startswith("/") or "\\" in relative:
        raise ValueError(f"{run.path / source} refers to {relative!r}, which is not a path inside the run; "
                         f"rebuild {source} (mechgrok analyze {run.path})")
    path = run.path
    for part in relative.split("/"):
        path = child_path(path, part, what="file name", source=run.path / source)
    return path


# ---------------------------------------------------------------------------- history helpers
def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def series(history: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """``key`` over the history as float64 ``[n_evals]``; missing, None or NaN values become NaN."""
    return np.array([float(r[key]) if _finite(r.get(key)) else np.nan for r in history], dtype=np.float64)


# ------------------------------------------------------------------------ built-in sections
def _rows(d: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _rows(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", v])
    return rows


@section(order=10, title="Run configuration")
def run_configuration(run: Run) -> Section | None:
    cfg = run.config
    tables = []
    if task := cfg.get("task"):
        tables.append(Table(["setting", "value"], _rows(task), "Task"))
    if model := cfg.get("model"):
        rest = {k: v for k, v in model.items() if k != "kwargs"}
        tables.append(Table(["setting", "value"], _rows(rest) + _rows(model.get("kwargs", {})), "Model"))
    if train := cfg.get("train"):
        tables.append(Table(["setting", "value"], _rows(train), "Training"))
    if not tables:
        return None
    return Section("Run configuration", text="The settings recorded in the run's `config.json`.",
                   tables=tables, numbers={k: cfg.get(k) for k in ("task", "model", "train")})


_SPLITS = [  # (label, history key prefix, curve style)
    ("train", "train", {"color": "tab:blue"}),
    ("test", "test", {"color": "tab:orange"}),
    ("train, clean", "train_clean", {"color": "tab:green"}),
    ("train, corrupted vs corrupted label", "train_corrupted", {"color": "tab:red"}),
    ("train, corrupted vs true label", "train_corrupted_true", {"color": "tab:red", "linestyle": ":"}),
]
_STYLE = {label: style for label, _, style in _SPLITS}
_X_NOTE = "x axis: step + 1, log scale (step 0 sits at 1); dashed lines: memorization and generalization done."


def is_sequence_run(run: Run) -> bool:
    """Whether ``run`` trained on a language-model corpus (a ``SequenceTask``: next-token targets),
    read from the format of its saved task (no task folder: not one)."""
    from mechgrok.tasks.sequence import FORMAT  # noqa: PLC0415

    f = run.path / "task" / "task.json"
    if not f.is_file():
        return False
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the sections that load the task say what is wrong with it
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


@section(order=20, title="Training")
def training(run: Run) -> Section | None:
    hist = run.history()
    if not hist or is_sequence_run(run):  # a language-model run has its own (lm_training)
        return None
    x = series(hist, "step") + 1
    last_step = int(hist[-1]["step"])
    mem = first_step(hist, "train_acc", MEMORIZED_ACC)
    gen = first_step(hist, "test_acc", GENERALIZED_ACC)
    phases = {"memorization done": None if mem is None else mem + 1,
              "generalization done": None if gen is None else gen + 1}
    final = {k: (float(hist[-1][k]) if _finite(hist[-1].get(k)) else None)
             for k in [f"{p}_{m}" for _, p, _ in _SPLITS for m in ("loss", "acc")]
             + ["weight_norm", "softmax_collapse", "lr", "elapsed_s"]}
    corrupted = bool(np.isfinite(series(hist, "train_corrupted_acc")).any())
    test_acc = series(hist, "test_acc")
    best_test = float(np.nanmax(test_acc)) if np.isfinite(test_acc).any() else None

    text = [f"{len(hist)} evaluations from step {int(hist[0]['step'])} to step {last_step}. The figures plot "
            "against step + 1 on a log x axis, so that the evaluation before training (step 0) sits at 1; "
            "their dashed lines mark memorization done (train accuracy 100%) and generalization done "
            "(test accuracy ≥ 95%)."]
    if mem is None:
        text.append(f"Training accuracy **never reached 100%** within {last_step} steps "
                    f"(final {_pct(final['train_acc'])}).")
    else:
        text.append(f"Training accuracy first reached **100%** at step **{mem}** (memorization done; "
                    "threshold `train_acc ≥ 1 − 1e-9`, corrupted examples counted against their corrupted label).")
    if gen is None:
        text.append(f"Test accuracy **never reached 95%** within {last_step} steps "
                    f"(best {_pct(best_test)}, final {_pct(final['test_acc'])}): "
                    "the run had not generalized by its last evaluation.")
    else:
        text.append(f"Test accuracy first reached **95%** at step **{gen}** "
                    "(generalization done; `test_acc ≥ 0.95`).")
    delay = ratio = None
    if mem is not None and gen is not None:
        delay, ratio = gen - mem, (gen / mem if mem > 0 else None)
        if delay > 0:
            text.append(f"Grokking delay: generalization came **{delay} steps** after memorization"
                        + (f" (**{ratio:.1f}×** the memorization step)." if ratio else "."))
        else:
            text.append("Test accuracy reached 95% no later than training accuracy reached 100%: no grokking delay.")
    if corrupted:
        text.append(f"Corrupted training examples end at {_pct(final['train_corrupted_acc'])} accuracy against "
                    f"their corrupted labels and {_pct(final['train_corrupted_true_acc'])} against their true labels.")
    else:
        text.append("This run has no corrupted training labels, so the corrupted-example curves are left out.")

    rows = [[label, final[f"{p}_loss"], final[f"{p}_acc"]] for label, p, _ in _SPLITS
            if final[f"{p}_loss"] is not None or final[f"{p}_acc"] is not None]
    table = Table(["split", "loss", "accuracy"], rows, f"Final evaluation (step {last_step})")

    def curves(keys: Sequence[tuple[str, str]], **kw):
        return line_figure(x, {label: series(hist, key) for label, key in keys}, phases=phases, styles=_STYLE, **kw)

    figs = [
        Figure.from_mpl(curves([("train", "train_acc"), ("test", "test_acc")], ylabel="accuracy",
                               ylim=(-0.02, 1.02), title="Accuracy"),
                        f"Train and test accuracy. {_X_NOTE}", "training-accuracy"),
        Figure.from_mpl(curves([("train", "train_loss"), ("test", "test_loss")], ylabel="loss", logy=True,
                               title="Loss"),
                        f"Train and test loss (log–log; zero losses are not drawn). {_X_NOTE}", "training-loss"),
        Figure.from_mpl(curves([(label, f"{p}_acc") for label, p, _ in [*_SPLITS[2:], _SPLITS[1]]], ylabel="accuracy",
                               ylim=(-0.02, 1.02), title="Clean vs corrupted training examples"),
                        "Accuracy of the clean training examples, of the corrupted ones against their corrupted "
                        "(memorized) and their true labels, and on the test set"
                        + ("." if corrupted else " (no corrupted examples in this run, so their curves are absent).")
                        + f" {_X_NOTE}", "training-clean-vs-corrupted"),
        Figure.from_mpl(curves([("weight norm", "weight_norm")], ylabel="‖θ‖₂", title="Total weight norm"),
                        f"L2 norm of all parameters. {_X_NOTE}", "training-weight-norm"),
    ]
    if np.isfinite(series(hist, "softmax_collapse")).any():
        figs.append(Figure.from_mpl(
            curves([("softmax collapse", "softmax_collapse")], ylabel="fraction", ylim=(-0.02, 1.02),
                   title="Softmax collapse"),
            "Fraction of samples whose float32 softmax puts exactly 1 on the correct class "
            f"(Prieto et al. 2025). {_X_NOTE}", "training-softmax-collapse"))
    numbers = {"memorization_step": mem, "generalization_step": gen, "grokking_delay_steps": delay,
               "grokking_delay_ratio": ratio, "memorization_threshold": "train_acc >= 1 - 1e-9",
               "generalization_threshold": "test_acc >= 0.95", "n_evals": len(hist), "final_step": last_step,
               "best_test_acc": best_test, "has_corrupted": corrupted, "final": final}
    headline = ("fit its training set (train accuracy 100%) at step " + (f"**{mem}**" if mem is not None else
                                                                          "— never")
                + (f", generalized (test accuracy ≥ 95%) at step **{gen}**" if gen is not None
                   else f", never reached 95% test accuracy (best {_pct(best_test)})")
                + f"; at step {last_step} test accuracy is {_pct(final['test_acc'])}"
                + (f" and the corrupted examples' is {_pct(final['train_corrupted_acc'])} against their corrupted "
                   f"labels, {_pct(final['train_corrupted_true_acc'])} against their true ones" if corrupted else "")
                + ".")
    return Section("Training", text="\n\n".join(text), figures=figs, tables=[table], numbers=numbers,
                   headline=headline)


_MAX_ROWS = 40


class _Elided(str):
    """A placeholder such as ``[list of 100]`` for a value too long for a table (not a result)."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and not (len(value) <= 8 and all(_finite(v) or isinstance(v, str) for v in value)):
        return {prefix: _Elided(f"[list of {len(value)}]")}
    return {prefix or "value": value}


@section(order=1000, title="Other analyses")
def other_analyses(run: Run) -> Section | None:
    folder = run.path / "analysis"
    claimed = {name for fn in SECTIONS for name in getattr(fn, "report_analyses", ())}
    files = [f for f in sorted(folder.glob("*.json")) if f.stem not in claimed] if folder.is_dir() else []
    if not files:
        return None
    tables, numbers, unreadable = [], {}, []
    for f in files:
        try:
            flat = _flatten(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            log.warning("report: cannot read %s: %s", f, e)
            unreadable.append(f"`analysis/{f.name}` ({e})")
            continue
        items = list(flat.items())
        cut = f" (first {_MAX_ROWS} of {len(items)} entries)" if len(items) > _MAX_ROWS else ""
        tables.append(Table(["key", "value"], [list(kv) for kv in items[:_MAX_ROWS]], f"`analysis/{f.name}`{cut}"))
        numbers[f.stem] = {k: v for k, v in items[:_MAX_ROWS] if not isinstance(v, _Elided)}
    text = ("Results in `analysis/` that have no section of their own yet, flattened to key–value tables. "
            "To give one a section, see the docstring of `mechgrok.report.sections`.")
    if unreadable:
        text += "\n\nCould not be read: " + "; ".join(unreadable) + "."
    return Section("Other analyses", text=text, tables=tables, numbers=numbers)


@section(order=20, title="Training (language model)")
def lm_training(run: Run) -> Section | None:
    """Report section: next-token loss and exact match per group of a language-model run."""
    hist = run.history()
    if not hist or not is_sequence_run(run):
        return None
    groups = list(run.task().groups)
    x = series(hist, "step") + 1
    last = hist[-1]
    figs = [Figure.from_mpl(line_figure(x, {g: series(hist, f"{g}_loss") for g in groups}, ylabel="loss (nats/token)",
                                        logy=True, title="Next-token loss per group"),
                            "Mean loss per target token of each group of sequences over training (log–log).",
                            "lm-loss"),
            Figure.from_mpl(line_figure(x, {g: series(hist, f"{g}_exact") for g in groups}, ylabel="share",
                                        ylim=(-0.02, 1.02), title="Sequences with every target right"),
                            "Share of each group's sequences whose every target token is predicted right under "
                            "teacher forcing (`exact`).", "lm-exact")]
    rows = [[g, sig(last.get(f"{g}_loss")), sig(last.get(f"{g}_acc")), sig(last.get(f"{g}_exact"))] for g in groups]
    headline = (f"after {last['step']} steps: held-out structured loss {sig(last.get('test_loss'))} nats/token, "
                f"token accuracy {sig(last.get('test_acc'))}")
    return Section("Training (language model)", text="Next-token training over each sequence's target tokens; "
                   "rows repeated R times per epoch are in groups `planted_r{R}`.", figures=figs,
                   tables=[Table(["group", "loss", "token accuracy", "exact"], rows, f"At step {last['step']}.")],
                   numbers={"final": {k: v for k, v in last.items() if k != "step"}, "final_step": last["step"]},
                   headline=headline)
