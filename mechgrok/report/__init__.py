"""Self-contained HTML / Markdown reports of a run folder.

``build(run)`` reads the run folder alone (``config.json``, ``history.jsonl``, ``analysis/*.json``;
it never trains or loads a model unless a section does) and writes, atomically:

- ``RUN/report.html``: one file, inline CSS, figures as base64 PNG data URIs, no external URL;
- ``RUN/report.md`` with its figures as PNG files in ``RUN/report_files/``;
- ``RUN/report.json``: the key numbers of every section (``sections[anchor]["numbers"]``).

Sections are registered functions; see ``mechgrok.report.sections`` for how to add one.

Usage::

    import mechgrok as mg
    mg.report.build("runs/demo")        # -> Path("runs/demo/report.html")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mechgrok._io import atomic_dir, atomic_write_text, to_jsonable
from mechgrok.report.html import fmt, render_html, render_markdown
from mechgrok.report.sections import (SECTIONS, Figure, Section, SectionFn, Table, first_step, section, slugify,
                                      unregister)
from mechgrok.run import Run

import mechgrok.analyses  # noqa: E402,F401  (registers the analyses' report sections)

__all__ = ["build", "Section", "Figure", "Table", "section", "unregister", "SECTIONS", "first_step"]

log = logging.getLogger(__name__)
REPORT_FORMAT = "mechgrok.report/1"


_TL_KEYS = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
            "normalization_type", "positional_embedding_type", "gated_mlp", "parallel_attn_mlp", "attn_only")


def _summary(config: dict[str, Any]) -> list[tuple[str, str]]:
    """One line each for the task, the model and the training settings (for the report header)."""
    def kv(d: dict[str, Any], keys: Sequence[str] | None = None) -> str:
        keys = [k for k in (keys or d) if k in d]
        return ", ".join(f"{k}={fmt(d[k])}" for k in keys)

    lines = []
    if task := config.get("task"):
        lines.append(("Task", f"`{task.get('kind', '?')}` ({kv({k: v for k, v in task.items() if k != 'kind'})})"))
    if model := config.get("model"):
        if model.get("kind") == "hooked_transformer":  # any transformer-lens model: its config's sizes
            tl = model.get("config", {})
            where = (model.get("source") or {}).get("architecture") or tl.get("original_architecture")
            lines.append(("Model", f"`HookedTransformer`{f' from `{where}`' if where else ''} ({kv(tl, _TL_KEYS)})"))
        else:
            lines.append(("Model", f"`{model.get('kind', '?')}` ({kv(model.get('kwargs', {}))})"))
    if train := config.get("train"):
        lines.append(("Training", kv(train, ["steps", "optimizer", "lr", "weight_decay", "betas",
                                            "warmup", "batch_size", "loss", "dropout", "seed"])))
    return lines


def _describe(config: dict[str, Any]) -> str:
    """A short line for a run: its task and its model."""
    task, model = config.get("task", {}), config.get("model", {})
    if task.get("kind") == "multi_task":
        what = " / ".join(f"{op} mod {p}" for op, p in task["specs"])
    elif task.get("kind") == "modular_arithmetic":
        what = f"{task.get('op')} mod {task.get('p')}"
    else:
        what = f"`{task.get('kind', '?')}`"
    parts = [what]
    if "train_frac" in task:
        parts.append(f"{task['train_frac']:.0%} of the pairs for training")
    if task.get("corrupt_frac"):
        parts.append(f"{task['corrupt_frac']:.0%} of their labels corrupted")
    kw = model.get("kwargs", {})
    size = (f"{kw.get('n_layers', '?')}-layer, d_model {kw.get('d_model', '?')}" if model.get("kind") == "transformer"
            else f"width {kw.get('width', '?')}" if "width" in kw else "")
    return ", ".join(parts) + f"; {model.get('kind', 'model')}" + (f" ({size})" if size else "")


def _summary_section(groups: Sequence[tuple[Run, Sequence[Section]]]) -> Section | None:
    """The report's first section: each section's headline, per run, linked to the section."""
    paragraphs, own = [], groups[0][0]
    groups = [(r, group) for r, group in groups if any(s.error is None for s in group)]  # a damaged run: none
    for r, group in groups:
        lines = [f"- [{s.title.split(': ', 1)[-1] if r is not own else s.title}](#{s.anchor}): {s.headline}"
                 for s in group if s.headline and s.error is None]
        if lines:
            paragraphs += [f"**{r.name}**: {_describe(r.config)}.", "\n".join(lines)]
    if not paragraphs:
        return None
    intro = ("What each analysis found, one line each, with its key numbers (also in `report.json`); the linked "
             "sections show the settings, figures and tables behind them.")
    runs = [r for r, _ in groups if _history(r)]
    figures = [Figure.from_mpl(_curves(runs), "Train and test accuracy of each run (corrupted training examples "
                               "against their corrupted labels where there are any); log step axis.",
                               name="summary-accuracy")] if runs else []
    return Section("Summary", anchor="summary", text="\n\n".join([intro, *paragraphs]), figures=figures)


def _history(run: Run) -> list[dict[str, Any]]:
    """The run's history, or none when it cannot be read (its Training section shows the error)."""
    try:
        return run.history()
    except (OSError, ValueError):
        return []


def _curves(runs: Sequence[Run]):
    """One panel per run: train, test (and corrupted-label) accuracy against step + 1."""
    import numpy as np

    from mechgrok.report.figures import new_figure

    fig, axes = new_figure(len(runs), width=min(4.2 * len(runs), 13.0), height=3.2)
    for ax, r in zip(axes, runs):
        hist = r.history()
        x = np.array([h["step"] for h in hist], dtype=float) + 1
        for key, label in (("train_acc", "train"), ("test_acc", "test"), ("train_corrupted_acc", "corrupted")):
            y = np.array([np.nan if h.get(key) is None else h[key] for h in hist], dtype=float)
            if np.isfinite(y).any():
                ax.plot(x, y, label=label, linewidth=1.5)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(r.name, fontsize="medium", parse_math=False)  # a folder name is not mathtext
        ax.set_xlabel("step + 1")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", framealpha=0.85, edgecolor="none")
    axes[0].set_ylabel("accuracy")
    return fig


def _run_section(fn: SectionFn, run: Run) -> Section | None:
    """Call one section function; an exception becomes an error Section (and a logged traceback)."""
    name = getattr(fn, "__name__", "section").strip("_").replace("_", " ")
    title = getattr(fn, "report_title", None) or name.capitalize()
    try:
        result = fn(run)
        if result is not None and not isinstance(result, Section):
            raise TypeError(f"section function {fn.__name__!r} returned {type(result).__name__}; "
                            "return a mechgrok.report.Section, or None when its data are absent")
        return result
    except Exception as e:
        log.exception("report section %r failed on %s; shown as an error box", title, run.path)
        return Section(title, error=f"{type(e).__name__}: {e}")


def nested_runs(run: Run) -> list[Run]:
    """Run folders directly inside ``run`` (each with its own ``config.json``), by name."""
    return [Run(d) for d in sorted(run.path.iterdir()) if d.is_dir() and (d / "config.json").exists()]


def build(run: Run | str | Path, sections: Sequence[SectionFn] | None = None) -> Path:
    """Write ``report.html``, ``report.md`` (+ ``report_files/``) and ``report.json`` into the run.

    Args:
        run: a ``Run`` or the path of a run folder (it must hold a ``config.json``).
        sections: section functions to run, in this order (default: every registered one,
            ordered by ``order``). Use it for a one-off report with an extra or fewer sections.

    Runs nested in the folder (``RUN/NAME/config.json``, as the demo writes ``runs/demo/doshi-mlp``)
    get their sections too, after the run's own, with titles prefixed by ``NAME:``.

    Returns:
        The path of ``report.html``.
    """
    run = run if isinstance(run, Run) else Run(run)
    config = run.config  # a folder that is not a run is an error of the caller, not an error box
    fns = SECTIONS if sections is None else sections
    groups = [(run, [s for s in (_run_section(fn, run) for fn in fns) if s is not None])]
    for sub in nested_runs(run):  # e.g. the demo's runs/demo/doshi-mlp: its sections follow, prefixed
        try:
            sub.config  # noqa: B018  (a damaged nested run: one error box, not one per section)
        except (OSError, ValueError) as e:
            log.warning("report: cannot read the nested run %s: %s", sub.path, e)
            error = Section(f"{sub.name}: run", error=f"the nested run {sub.path} cannot be read: {e}; repair its "
                            "config.json or move the folder out of this run")
            error.group = sub.name
            groups.append((sub, [error]))
            continue
        group = []
        for s in (_run_section(fn, sub) for fn in fns):
            if s is not None:
                s.title = f"{sub.name}: {s.title}"
                s.anchor = slugify(s.title)
                s.group = sub.name
                for fig in s.figures:
                    fig.name = f"{sub.name}-{fig.name}" if fig.name else ""
                group.append(s)
        groups.append((sub, group))
    results = [s for _, group in groups for s in group]
    seen: dict[str, int] = {"summary": 1}
    for s in results:  # unique anchors, GitHub style: "x", "x-1", "x-2"
        n = seen.get(s.anchor, 0)
        seen[s.anchor] = n + 1
        if n:
            s.anchor = f"{s.anchor}-{n}"

    if summary := _summary_section(groups):
        results.insert(0, summary)

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"mechgrok report: {run.name}"
    meta = [*_summary(config), ("Run folder", f"`{run.path}`"), ("Generated", generated)]

    figure_paths: list[list[str]] = []
    with atomic_dir(run.path / "report_files") as tmp:
        used: set[str] = set()
        for s in results:
            paths = []
            for i, fig in enumerate(s.figures, 1):
                stem = slugify(fig.name) if fig.name else f"{s.anchor}-{i}"
                while stem in used:
                    stem += "-x"
                used.add(stem)
                (tmp / f"{stem}.png").write_bytes(fig.png)
                paths.append(f"report_files/{stem}.png")
            figure_paths.append(paths)

    atomic_write_text(run.path / "report.md", render_markdown(title, meta, results, figure_paths))
    report_json = {"format": REPORT_FORMAT, "run": run.name, "generated": generated,
                   "summary": {k: v.replace("`", "") for k, v in _summary(config)},
                   "sections": {s.anchor: {"title": s.title, "headline": s.headline or None, "numbers": s.numbers,
                                           "error": s.error} for s in results}}
    atomic_write_text(run.path / "report.json", json.dumps(to_jsonable(report_json), indent=2, allow_nan=False))
    out = run.path / "report.html"
    atomic_write_text(out, render_html(title, meta, results))
    log.info("wrote %s (%d sections, %d failed)", out, len(results), sum(s.error is not None for s in results))
    return out
