"""Ablation studies: train a preset over a grid of settings, one run folder per point, and gather
the final metrics and a phase label into a table.

Typical use::

    table = mg.sweep("doshi-mlp", {"weight_decay": [0, 1, 3], "corrupt_frac": [0.1, 0.3], "seed": [0, 1]},
                     out="runs/sweep", workers=2)     # a pandas DataFrame; also runs/sweep/results.csv
    mg.sweep_figure(table, x="weight_decay", y="corrupt_frac")   # the phase diagram

**Settings** are keys of the preset's task config (``corrupt_frac``, ``train_frac``, ``p``, ...),
of its model (``width``, ``d_model``, ...) or of ``TrainConfig`` (``weight_decay``, ``lr``, ``steps``,
``dropout``, ...); prefix ``task.``, ``model.`` or ``train.`` to say which when a name is in several.
A bare ``seed`` sets all three seeds (data split and corruption, initialisation, batch order).

**Resumable**: each point trains into ``out/<key=value,...>``; a finished run is read back, not
retrained, and a killed one resumes from its last checkpoint (``mechgrok.train``), so rerunning the
same call after an interruption redoes nothing that finished. Results from any machine are
gathered from the folders alone (``gather``).

**Backends**: ``"local"`` runs ``workers`` processes on this machine (spawned, one torch thread
each); ``"ray"`` submits one task per point to a Ray cluster (``pip install 'mechgrok[ray]'``;
``address=None`` starts a local Ray instance, ``"auto"`` or ``"ray://host:10001"`` joins a
cluster whose workers see the same ``out`` folder, e.g. on a shared file system).

**Phases** (Doshi et al. 2023, "To grok or not to grok", Fig. 1; rule in ``phase``), from the
final accuracies:

- ``coexistence``: generalizes (test ≥ 0.9) and still fits the corrupted labels (corrupted-label
  accuracy ≥ 0.9) — memorization with generalization;
- ``partial inversion``: generalizes, and the corrupted examples are split between their
  corrupted and their true labels;
- ``full inversion``: generalizes, and predicts the *true* label on ≥ 0.9 of the corrupted examples;
- ``memorization``: fits the training set (clean and corrupted ≥ 0.9) without generalizing (test < 0.5);
- ``forgetting``: fits not even the clean training examples (clean train < 0.5), e.g. when weight
  decay is too strong;
- ``confusion``: anything else with test < 0.9 (partly generalizing, partly fitting).

Without corrupted labels only ``generalization`` (test ≥ 0.9), ``memorization``, ``forgetting``
and ``confusion`` apply.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import fields
from pathlib import Path
from typing import Any

from mechgrok._io import atomic_write_text
from mechgrok.train import TrainConfig

__all__ = ["sweep", "gather", "phase", "sweep_figure", "points", "PHASES", "BACKENDS"]

log = logging.getLogger(__name__)

PHASES = ("coexistence", "partial inversion", "full inversion", "generalization", "memorization", "confusion",
          "forgetting")
BACKENDS = ("local", "ray")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    if not grid:
        raise ValueError("the grid is empty; give at least one setting, e.g. {'weight_decay': [0, 1]}")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _name(point: Mapping[str, Any]) -> str:
    """A folder name for a point: ``weight_decay=1,corrupt_frac=0.2`` (characters safe on any OS)."""
    def fmt(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    name = ",".join(f"{k}={fmt(v)}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in name)


def configure(preset: str, point: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], TrainConfig]:
    """The preset's task config, model spec and TrainConfig with ``point``'s settings applied."""
    from mechgrok import presets

    p = presets.get(preset)
    task_cfg, model_kw, train_kw = dict(p.task), dict(p.model["kwargs"]), p.train.to_dict()
    for key, value in point.items():
        where, _, name = key.rpartition(".")
        if key == "seed":
            task_cfg["seed"], model_kw["seed"], train_kw["seed"] = value, value, value
            continue
        homes = [h for h, d in (("task", task_cfg), ("model", model_kw), ("train", train_kw))
                 if name in d or (h == "train" and name in _TRAIN_FIELDS)]
        if where:
            if where not in ("task", "model", "train"):
                raise ValueError(f"unknown prefix in {key!r}; use task., model. or train.")
            if where not in homes:
                raise ValueError(f"{key!r}: preset {preset!r} has no {where} setting {name!r}")
            homes = [where]
        if not homes:
            raise ValueError(f"unknown setting {key!r} for preset {preset!r}: not a task setting "
                             f"({sorted(task_cfg)}), a model setting ({sorted(model_kw)}) or a TrainConfig field")
        if len(homes) > 1:
            raise ValueError(f"setting {key!r} is ambiguous ({homes}); prefix it, e.g. {homes[0]}.{name}")
        {"task": task_cfg, "model": model_kw, "train": train_kw}[homes[0]][name] = value
    return task_cfg, {"kind": p.model["kind"], "kwargs": model_kw}, TrainConfig.from_dict(train_kw)


def phase(final: Mapping[str, Any]) -> str:
    """The phase of a run from its last history row (``train_clean_acc``, ``train_corrupted_acc``,
    ``train_corrupted_true_acc``, ``test_acc``); rule in the module docstring."""
    def acc(key: str) -> float | None:
        v = final.get(key)
        return None if v is None or v != v else float(v)  # NaN (empty split) -> None

    clean, corr, true, test = (acc(k) for k in ("train_clean_acc", "train_corrupted_acc",
                                                "train_corrupted_true_acc", "test_acc"))
    clean = clean if clean is not None else acc("train_acc")
    if clean is not None and clean < 0.5:
        return "forgetting"
    if test is not None and test >= 0.9:
        if corr is None:
            return "generalization"
        if corr >= 0.9:
            return "coexistence"
        return "full inversion" if true is not None and true >= 0.9 else "partial inversion"
    if test is not None and test < 0.5 and (corr is None or corr >= 0.9) and (clean is None or clean >= 0.9):
        return "memorization"
    return "confusion"


def _summary(point: Mapping[str, Any], folder: Path, seconds: float | None) -> dict[str, Any]:
    from mechgrok.run import Run

    run = Run(folder)
    last = run.history()[-1]
    row = dict(point) | {"run": folder.name, "step": last["step"]}
    for key in ("train_acc", "train_clean_acc", "train_corrupted_acc", "train_corrupted_true_acc", "test_acc",
                "test_loss", "weight_norm"):
        row[key] = last.get(key)
    row["phase"] = phase(last)
    row["seconds"] = seconds
    return row


def _finished(folder: Path, steps: int) -> bool:
    from mechgrok.run import Run

    if not (folder / "history.jsonl").exists():
        return False
    run = Run(folder)
    return bool(run.steps()) and run.steps()[-1] >= steps and bool(run.history()) and run.history()[-1]["step"] >= steps


def _run_point(preset: str, point: dict[str, Any], folder: str) -> dict[str, Any]:
    """Train one point (or read it back when finished); returns its summary row. Runs in a worker."""
    import torch

    from mechgrok import models, tasks
    from mechgrok.train import train

    torch.set_num_threads(1)
    folder_ = Path(folder)
    task_cfg, model_spec, cfg = configure(preset, point)
    if _finished(folder_, cfg.steps):
        return _summary(point, folder_, None)
    t = time.perf_counter()
    task = tasks.from_config(task_cfg)
    builder = {"transformer": models.transformer, "mlp": models.mlp}[model_spec["kind"]]
    train(builder(task, **model_spec["kwargs"]), task, cfg, out=folder_, progress=False)
    return _summary(point, folder_, time.perf_counter() - t)


def sweep(preset: str, grid: Mapping[str, Sequence[Any]], *, out: str | Path, backend: str = "local",
          workers: int | None = None, address: str | None = None, progress: bool = True):
    """Train ``preset`` at every point of ``grid`` and return the results table.

    Args:
        preset: a ``mechgrok.presets`` name (``"doshi-mlp"``, ``"demo"``, ...).
        grid: setting -> list of values (see the module docstring for the names).
        out: folder of the sweep: one run folder per point, ``sweep.json`` (the call) and
            ``results.csv`` / ``results.json``. A folder holding another sweep is refused.
        backend: ``"local"`` (processes on this machine) or ``"ray"``.
        workers: local worker processes (default 2; 1 runs in this process). Workers are spawned,
            so a script that calls ``sweep`` must guard it with ``if __name__ == "__main__":``
            (notebooks need nothing).
        address: Ray cluster address (``None``: a local Ray instance).

    Returns:
        a pandas DataFrame, one row per point in grid order: the settings, the final accuracies per
        split, ``weight_norm``, ``phase``, ``run`` (folder name), ``seconds`` (None if read back).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    todo = points(grid)
    for pt in todo:  # validate every point before training any
        configure(preset, pt)
    out = Path(out)
    call = {"preset": preset, "grid": {k: list(v) for k, v in grid.items()}}
    meta = out / "sweep.json"
    if meta.exists():
        before = json.loads(meta.read_text())
        if before != call:
            raise FileExistsError(f"{out} holds another sweep ({before}); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps(call, indent=1))
    folders = [str(out / _name(pt)) for pt in todo]
    rows: list[dict[str, Any] | None] = [None] * len(todo)
    for i, (pt, f) in enumerate(zip(todo, folders)):  # finished points are read back here, not in workers
        if _finished(Path(f), configure(preset, pt)[2].steps):
            rows[i] = _summary(pt, Path(f), None)
    left = [i for i, r in enumerate(rows) if r is None]
    if len(left) < len(todo):
        log.info("sweep %s: %d of %d points already finished in %s", preset, len(todo) - len(left), len(todo), out)
    bar = tqdm(total=len(todo), initial=len(todo) - len(left), desc=f"sweep {preset}", disable=not progress)
    if left and backend == "ray":
        for i, row in zip(left, _ray_map(preset, [todo[i] for i in left], [folders[i] for i in left], address, bar)):
            rows[i] = row
    elif left and min(workers or 2, len(left)) <= 1:
        for i in left:
            rows[i] = _run_point(preset, todo[i], folders[i])
            bar.update()
    elif left:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=min(workers or 2, len(left)), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, preset, todo[i], folders[i]): i for i in left}
            for fut in as_completed(futures):
                rows[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    _write(out, table)
    return table


def _ray_map(preset: str, todo: list[dict[str, Any]], folders: list[str], address: str | None, bar) -> list:
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs ray: pip install 'mechgrok[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": 2}))
    try:
        remote = ray.remote(num_cpus=1)(_run_point)
        refs = [remote.remote(preset, pt, f) for pt, f in zip(todo, folders)]
        rows: list = [None] * len(refs)
        pending = {ref: i for i, ref in enumerate(refs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                rows[pending.pop(ref)] = ray.get(ref)
                bar.update()
        return rows
    finally:
        if started:
            ray.shutdown()


def _write(out: Path, table) -> None:
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    atomic_write_text(out / "results.json", table.to_json(orient="records", indent=1))


def gather(out: str | Path):
    """The results table of a sweep folder, rebuilt from its run folders alone (finished points
    only; nothing is trained). Useful when points ran on several machines."""
    import pandas as pd

    out = Path(out)
    meta = out / "sweep.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{out} is not a sweep folder (no sweep.json)")
    call = json.loads(meta.read_text())
    rows = []
    for pt in points(call["grid"]):
        folder = out / _name(pt)
        if _finished(folder, configure(call["preset"], pt)[2].steps):
            rows.append(_summary(pt, folder, None))
    return pd.DataFrame(rows)


_PHASE_COLOURS = {"coexistence": "tab:purple", "partial inversion": "tab:blue", "full inversion": "tab:green",
                  "generalization": "tab:olive", "memorization": "tab:red", "confusion": "tab:orange",
                  "forgetting": "0.6"}


def sweep_figure(table, x: str, y: str, *, title: str = ""):
    """Phase diagram: one cell per (x, y) value pair, coloured by the most common phase over the
    other settings (e.g. seeds), annotated with it and the mean test accuracy. Returns a
    matplotlib Figure (no pyplot)."""
    import numpy as np
    from matplotlib.patches import Patch, Rectangle

    from mechgrok.report.figures import new_figure

    for col in (x, y, "phase", "test_acc"):
        if col not in table.columns:
            raise ValueError(f"the table has no column {col!r}; columns: {list(table.columns)}")
    xs, ys = sorted(table[x].unique()), sorted(table[y].unique())
    fig, (ax,) = new_figure(width=2.6 + 1.2 * len(xs), height=1.6 + 0.8 * len(ys))
    fig.subplots_adjust(left=0.16, right=0.7, bottom=0.16, top=0.88)
    seen = set()
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            cell = table[(table[x] == xv) & (table[y] == yv)]
            if cell.empty:
                continue
            ph = cell["phase"].mode().iloc[0]
            seen.add(ph)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color=_PHASE_COLOURS.get(ph, "white"), alpha=0.75))
            ax.text(j, i, f"{ph}\ntest {np.nanmean(cell['test_acc'].astype(float)):.2f}", ha="center",
                    va="center", fontsize=7)
    ax.set(xlim=(-0.5, len(xs) - 0.5), ylim=(-0.5, len(ys) - 0.5), xlabel=x, ylabel=y, title=title or "phases")
    ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" if isinstance(v, float) else str(v) for v in ys])
    ax.legend(handles=[Patch(color=_PHASE_COLOURS[p], alpha=0.75, label=p) for p in PHASES if p in seen],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return fig
