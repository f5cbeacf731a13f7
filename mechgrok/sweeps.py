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

**Folders**: each point trains into ``out/<key=value,...>`` in grid order, with every value at full
precision: integers as written, floats as Python's ``repr`` writes them (``lr=0.010000001``,
``weight_decay=1.0``, ``lr=1e-05``), ``true`` / ``false`` / ``null``, and strings of letters, digits and
``_ . + -`` as they are (``act=relu``) unless they read as JSON (the string ``"1"`` is not the number 1).
A point with any other value (a list, a string with other characters, ``..``) or a name over 200
characters goes into ``out/<key_value,...>-<12 hex digits>``: a readable part (without ``=``, so it never
equals a plain name) and a SHA-256 prefix of the point's JSON. Every name passes
``mechgrok._io.safe_name``, so no grid value, and no crafted ``sweep.json``, can place a folder outside
``out``. Two points of one grid never share a folder: a grid whose points give the same folder or the
same run (``{"lr": [0.01, 0.01]}``, ``{"lr": [1, 1.0]}``) is refused.

**Resumable**: a point's folder is finished when its ``config.json`` holds exactly the point's task,
model and train config and its last checkpoint and history row reach ``steps``; it is read back, not
retrained. A killed one resumes from its last checkpoint (``mechgrok.train``), so rerunning the same
call after an interruption redoes nothing that finished. A point folder that holds another config (or
anything that is not a run) is an error naming it, never reused. Results from any machine are
gathered from the folders alone (``gather``).

**Validated first**: every point's task, model and ``TrainConfig`` are built (which checks every value)
and every existing point folder is checked before ``sweep.json`` or any folder is written; a sweep
folder that this call created is removed again if the call fails before any point finished.

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

import hashlib
import itertools
import json
import logging
import numbers
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mechgrok._config import check_int
from mechgrok._io import atomic_write_text, child_path, safe_name
from mechgrok.train import TrainConfig

__all__ = ["sweep", "gather", "phase", "sweep_figure", "points", "PHASES", "BACKENDS"]

log = logging.getLogger(__name__)

PHASES = ("coexistence", "partial inversion", "full inversion", "generalization", "memorization", "confusion",
          "forgetting")
BACKENDS = ("local", "ray")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
_RUN_KEYS = ("task", "model", "train")  # the parts of a run's config.json that a point fixes
_TOKEN = re.compile(r"^[A-Za-z0-9_.+-]+$")  # a value or key written as is in a folder name


def points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"the grid must be a non-empty dict of setting -> values, e.g. {{'weight_decay': [0, 1]}}, "
                         f"got {grid!r}")
    for key, values in grid.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"grid keys must be setting names (strings), got {key!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _encode(value: Any) -> str | None:
    """``value`` as written in a folder name (full precision, distinct types stay distinct), or None
    when it cannot be written there safely (then the name is hashed)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # null / true / false
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return json.dumps(float(value))  # repr: the shortest text that reads back as this float
    if isinstance(value, str) and _TOKEN.match(value) and not _is_json(value):
        return value  # not a JSON literal, so never the text of a number, true/false or null
    return None


def _label(point: Mapping[str, Any]) -> str:
    """``key=value,...`` for messages."""
    return ",".join(f"{k}={v!r}" for k, v in point.items())


def _name(point: Mapping[str, Any]) -> str:
    """The folder name of a point (scheme in the module docstring); always passes ``safe_name``.

    Within one grid (same keys, same order) distinct points get distinct names: keys and plain values
    hold no ``,`` or ``=``, plain values are injective, and hashed names hold no ``=``.
    """
    enc = {k: (_encode(v) if _TOKEN.match(k) else None) for k, v in point.items()}
    if all(e is not None for e in enc.values()):
        try:
            return safe_name(",".join(f"{k}={e}" for k, e in enc.items()), what="sweep point folder")
        except ValueError:
            pass  # too long, "..", or a key that starts with "." / "-": hash it
    blob = json.dumps([[k, v] for k, v in point.items()], default=repr, allow_nan=True)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
    readable = ",".join(f"{k}_{v}" for k, v in point.items())
    readable = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9_.,+-]", "_", readable))[:150].strip(".,+-") or "point"
    return safe_name(f"{readable}-{digest}", what="sweep point folder")


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


def _build(preset: str, point: Mapping[str, Any]):
    """The task, a fresh model and the TrainConfig of a point."""
    from mechgrok import models, tasks

    task_cfg, model_spec, cfg = configure(preset, point)
    task = tasks.from_config(task_cfg)
    builder = {"transformer": models.transformer, "mlp": models.mlp}[model_spec["kind"]]
    return task, builder(task, **model_spec["kwargs"]), cfg


@dataclass(frozen=True)
class _Point:
    settings: dict[str, Any]  # the grid's values at this point
    name: str  # its folder name inside the sweep folder
    config: dict[str, Any]  # {"task", "model", "train"} exactly as mechgrok.train writes them into config.json


def _plan(preset: Any, grid: Any, source: Path | None = None) -> list[_Point]:
    """Every point of the grid with its folder name and run config, each point's task, model and
    TrainConfig built (so every value is checked); duplicate points are refused. Writes nothing."""
    from mechgrok import models, presets

    where = f"{source}: " if source is not None else ""
    if not isinstance(preset, str):
        raise TypeError(f"{where}preset must be a preset name (a string), got {preset!r}")
    presets.get(preset)  # an unknown preset fails once, not once per point
    try:
        todo = points(grid)
        json.dumps({k: list(v) for k, v in grid.items()})
    except TypeError as e:
        raise TypeError(f"{where}{e}; grid values must be numbers, strings, true/false/null or lists of them") from e
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    plan, seen_names, seen_runs = [], {}, {}
    for settings in todo:
        try:
            task, model, cfg = _build(preset, settings)
            config = json.loads(json.dumps({"task": task.config, "model": models.spec(model), "train": cfg.to_dict()}))
        except TypeError as e:
            raise TypeError(f"{where}sweep point {_label(settings)}: {e}; change this value in the grid") from e
        except Exception as e:  # noqa: BLE001 - any builder error becomes one message naming the point
            raise ValueError(f"{where}sweep point {_label(settings)}: {e}; change this value in the grid") from e
        name = _name(settings)
        run_key = json.dumps(_canonical(config), sort_keys=True)
        for seen, key in ((seen_names, name), (seen_runs, run_key)):
            if key in seen:
                raise ValueError(f"{where}the grid has the same point twice ({_label(seen[key])} and "
                                 f"{_label(settings)} configure the same run); remove the duplicate value")
            seen[key] = settings
        plan.append(_Point(dict(settings), name, config))
    return plan


def _canonical(value: Any) -> Any:
    """``value`` with integral floats as ints, so that configs equal under ``==`` get one JSON text."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _state(folder: Path, point: _Point) -> str:
    """``"new"`` (nothing there yet), ``"started"`` (this point's run, not finished) or ``"finished"``;
    an error for a folder that holds anything else, naming it."""
    from mechgrok.run import Run

    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise FileExistsError(f"{folder} (the folder of sweep point {_label(point.settings)}) is a file; "
                              "move it away or sweep into another folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        if any(folder.iterdir()):
            raise FileExistsError(f"{folder} (the folder of sweep point {_label(point.settings)}) is not a "
                                  "mechgrok run (no config.json); move it away or delete it to train the point")
        return "new"
    try:
        saved = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is damaged ({e}); delete {folder} to retrain sweep point "
                         f"{_label(point.settings)}") from e
    got = {k: saved.get(k) for k in _RUN_KEYS} if isinstance(saved, dict) else saved
    if got != point.config:
        diff = "; ".join(_diff(got, point.config)[:6]) or "not a run config"
        raise FileExistsError(f"{folder} holds a run with another config than sweep point {_label(point.settings)} "
                              f"({diff}); delete or move that folder to train the point, or sweep into another folder")
    run, steps = Run(folder), point.config["train"]["steps"]
    try:
        done = bool(run.steps()) and run.steps()[-1] >= steps and bool(hist := run.history()) \
            and hist[-1]["step"] >= steps
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}: cannot read its history ({e}); delete the folder to retrain sweep point "
                         f"{_label(point.settings)}") from e
    return "finished" if done else "started"


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
    """The results row of a point, read from its own folder's history."""
    from mechgrok.run import Run

    last = Run(folder).history()[-1]
    row = dict(point) | {"run": folder.name, "step": last["step"]}
    for key in ("train_acc", "train_clean_acc", "train_corrupted_acc", "train_corrupted_true_acc", "test_acc",
                "test_loss", "weight_norm"):
        row[key] = last.get(key)
    row["phase"] = phase(last)
    row["seconds"] = seconds
    return row


def _run_point(preset: str, point: dict[str, Any], folder: str) -> dict[str, Any]:
    """Train one point (``mechgrok.train`` resumes a started one and refuses a folder with another
    config); returns its summary row. Runs in a worker."""
    import torch

    from mechgrok.train import train

    torch.set_num_threads(1)
    t = time.perf_counter()
    task, model, cfg = _build(preset, point)
    train(model, task, cfg, out=Path(folder), progress=False)
    return _summary(point, Path(folder), time.perf_counter() - t)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; give the sweep a folder (new or a sweep's)")
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} is a mechgrok run folder (it has config.json), not a sweep folder; "
                              "choose another folder for the sweep")


def _read_call(meta: Path) -> dict[str, Any]:
    try:
        call = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta} is damaged ({e}); delete it (the run folders are kept) or choose another "
                         "folder") from e
    if not isinstance(call, dict) or not {"preset", "grid"} <= set(call):
        raise ValueError(f"{meta} is not a sweep description (expected {{'preset': ..., 'grid': {{...}}}}); "
                         "delete it or choose another folder")
    return call


def sweep(preset: str, grid: Mapping[str, Sequence[Any]], *, out: str | Path, backend: str = "local",
          workers: int | None = None, address: str | None = None, progress: bool = True):
    """Train ``preset`` at every point of ``grid`` and return the results table.

    Args:
        preset: a ``mechgrok.presets`` name (``"doshi-mlp"``, ``"demo"``, ...).
        grid: setting -> list of values (see the module docstring for the names).
        out: folder of the sweep: one run folder per point (names in the module docstring),
            ``sweep.json`` (the call) and ``results.csv`` / ``results.json``. A folder holding another
            sweep, a run folder and a file are refused.
        backend: ``"local"`` (processes on this machine) or ``"ray"``.
        workers: local worker processes, an integer >= 1 (default 2; 1 runs in this process). Workers
            are spawned, so a script that calls ``sweep`` must guard it with
            ``if __name__ == "__main__":`` (notebooks need nothing).
        address: Ray cluster address (``None``: a local Ray instance).

    Returns:
        a pandas DataFrame, one row per point in grid order: the settings, the final accuracies per
        split, ``weight_norm``, ``phase``, ``run`` (folder name), ``seconds`` (None if read back).

    Every value, every point folder and ``out`` are checked before anything is written (module docstring).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    workers = 2 if workers is None else check_int(workers, "workers", low=1, owner="sweep")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"sweep: address must be a Ray address string or None, got {address!r}")
    out = Path(out)
    _check_out(out)
    plan = _plan(preset, grid)
    call = json.loads(json.dumps({"preset": preset, "grid": {k: list(v) for k, v in grid.items()}}))
    meta = out / "sweep.json"
    if meta.exists() and (before := _read_call(meta)) != call:
        raise FileExistsError(f"{out} holds another sweep ({before}); choose another folder")
    folders = [child_path(out, pt.name, what="sweep point folder") for pt in plan]
    states = [_state(f, pt) for f, pt in zip(folders, plan)]  # refuses foreign folders before anything is written

    created, had_meta = not out.exists(), meta.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_text(meta, json.dumps(call, indent=1))
        rows = [_summary(pt.settings, f, None) if s == "finished" else None for pt, f, s in zip(plan, folders, states)]
        left = [i for i, r in enumerate(rows) if r is None]
        if len(left) < len(plan):
            log.info("sweep %s: %d of %d points already finished in %s", preset, len(plan) - len(left), len(plan), out)
        bar = tqdm(total=len(plan), initial=len(plan) - len(left), desc=f"sweep {preset}", disable=not progress)
        todo = [(plan[i].settings, str(folders[i])) for i in left]
        if left and backend == "ray":
            for i, row in zip(left, _ray_map(preset, [t[0] for t in todo], [t[1] for t in todo], address, bar)):
                rows[i] = row
        elif left and min(workers, len(left)) <= 1:
            for i, (pt, f) in zip(left, todo):
                rows[i] = _run_point(preset, pt, f)
                bar.update()
        elif left:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=min(workers, len(left)), mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_run_point, preset, pt, f): i for i, (pt, f) in zip(left, todo)}
                try:
                    for fut in as_completed(futures):
                        rows[futures[fut]] = fut.result()
                        bar.update()
                except BaseException:
                    for fut in futures:  # fail fast: points not started yet are not trained
                        fut.cancel()
                    raise
        bar.close()
    except Exception:
        if not any(_finished_quietly(f, pt) for f, pt in zip(folders, plan)):  # nothing trained: leave nothing
            for f, s in zip(folders, states):
                if s == "new":
                    shutil.rmtree(f, ignore_errors=True)
            if not had_meta:
                meta.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise
    table = pd.DataFrame(rows)
    _write(out, table)
    return table


def _finished_quietly(folder: Path, point: _Point) -> bool:
    try:
        return _state(folder, point) == "finished"
    except (OSError, ValueError):
        return False


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
    only; nothing is trained). Useful when points ran on several machines.

    Folder names are rebuilt from ``sweep.json`` by the same scheme as ``sweep`` (checked by
    ``safe_name``, so a crafted file cannot point outside ``out``), and a point folder is read only
    when its ``config.json`` matches the point; one that holds another config is an error naming it.
    """
    import pandas as pd

    out = Path(out)
    meta = out / "sweep.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{out} is not a sweep folder (no sweep.json)")
    call = _read_call(meta)
    rows = []
    for pt in _plan(call["preset"], call["grid"], source=meta):
        folder = child_path(out, pt.name, what="sweep point folder", source=meta)
        if _state(folder, pt) == "finished":
            rows.append(_summary(pt.settings, folder, None))
    return pd.DataFrame(rows)


def _ticks(values: list) -> list[str]:
    """Axis labels: ``:g`` where that tells the values apart, full precision where it does not."""
    short = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return short if len(set(short)) == len(short) else [repr(v) if isinstance(v, float) else str(v) for v in values]


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
    ax.set_xticks(range(len(xs)), _ticks(xs))
    ax.set_yticks(range(len(ys)), _ticks(ys))
    ax.legend(handles=[Patch(color=_PHASE_COLOURS[p], alpha=0.75, label=p) for p in PHASES if p in seen],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return fig
