"""The ``mechgrok`` command: train, analyze, report, demo.

    mechgrok train --preset demo --out runs/demo [--steps 2000] [--set lr=1e-3] [--overwrite]
    mechgrok analyze runs/demo [--only neurons]
    mechgrok report runs/demo
    mechgrok demo [--out runs/demo] [--workers 2]   # also trains runs/demo/doshi-mlp and runs/demo/multi
    mechgrok sweep --preset doshi-mlp --grid weight_decay=0,1,3,10 --grid corrupt_frac=0.2,0.35 \
        --out runs/sweep [--workers 2] [--backend ray --address auto] [--x weight_decay --y corrupt_frac]
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("mechgrok")


def _parse_sets(pairs: list[str]) -> dict:
    """``["lr=1e-3", "optimizer=adamw"]`` -> ``{"lr": 0.001, "optimizer": "adamw"}``: a value is read as
    JSON where it parses (numbers, true/false/null, lists) and kept as a string otherwise. The values are
    not checked here: the config they go into (``TrainConfig``) checks each one and names it."""
    out: dict = {}
    given: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. --set lr=1e-3), got {pair!r}")
        if key != key.strip():
            raise ValueError(f"--set {pair!r}: no spaces around the key; write --set {key.strip()}={value}")
        if key in out:
            raise ValueError(f"--set {key} is given twice (--set {given[key]} and --set {pair}); keep one")
        given[key] = pair
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _train(args: argparse.Namespace) -> Path:
    """Train (or resume) a preset; the status line scores the weights of the last checkpoint as loaded
    from disk (hash-checked), not the history, so it cannot vouch for weights that were damaged."""
    from mechgrok import presets, train
    from mechgrok.train import evaluate

    overrides = _parse_sets(args.set)
    if args.steps is not None:
        overrides["steps"] = args.steps
    task, model, cfg = presets.build(args.preset, **overrides)
    out = Path(args.out or f"runs/{args.preset}")
    log.info("training preset %r into %s (%s)", args.preset, out, task.summary())
    resume = "intact" if getattr(args, "resume_intact", False) else "last"
    run = train(model, task, cfg, out=out, overwrite=args.overwrite, progress=not args.no_progress, resume=resume)
    step = run.steps()[-1]
    ev = evaluate(run.load_model(step), task, loss=cfg.loss)
    log.info("done: train acc %.3f, test acc %.3f at step %d (evaluated from %s)", ev["train"]["acc"],
             ev["test"]["acc"], step, run.checkpoint(step))
    return run.path


def _report(args: argparse.Namespace) -> Path:
    from mechgrok import report

    path = report.build(args.run)
    log.info("wrote %s", path)
    return path


def _analyze(args: argparse.Namespace) -> Path:
    from mechgrok.analyze import analyze

    written = analyze(args.run, only=args.only, progress=not args.no_progress)
    for name, path in written.items():
        log.info("%s -> %s", name, path)
    if not args.no_report:
        from mechgrok import report

        return report.build(args.run)
    return Path(args.run)


class DemoRun(NamedTuple):
    """One run of ``mechgrok demo``: a preset, its folder inside ``--out`` ("" = the outer run), the
    analyses to run (None = all) and, for quick checks, a step budget replacing the preset's."""

    preset: str
    folder: str
    only: tuple[str, ...] | None = None
    steps: int | None = None


# The demo's runs, longest first so that two workers finish together (the doshi-mlp run on one
# worker; demo, then demo-multi on the other; times in docs/benchmarks.md).
DEMO_RUNS: tuple[DemoRun, ...] = (
    DemoRun("doshi-mlp", "doshi-mlp"),
    DemoRun("demo", ""),
    DemoRun("demo-multi", "multi", ("progress", "overlap")),
)


def _demo_run(preset: str, folder: str, only: tuple[str, ...] | None, steps: int | None, progress: bool,
              level: int | None = None) -> str:
    """Train (or resume) one demo run and run the analyses it lacks (those written after its last
    checkpoint are kept); a worker process's job (hence the logging setup)."""
    from mechgrok.analyses import ANALYSES
    from mechgrok.analyze import analyze
    from mechgrok.run import Run

    if level is not None:  # a worker process: log at the parent's level, saying which run each line is about
        logging.basicConfig(level=level, format=f"[{preset}] %(message)s", force=True)
    ns = argparse.Namespace(preset=preset, out=folder, steps=steps, set=[], overwrite=False, no_progress=not progress)
    t0 = time.perf_counter()
    run = Run(_train(ns))
    last = run.checkpoint(run.steps()[-1]).stat().st_mtime
    done = [n for n in (only or ANALYSES) if (f := run.path / "analysis" / f"{n}.json").exists()
            and f.stat().st_mtime > last]
    if done:
        log.info("keeping the analyses %s of %s (rerun them with: mechgrok analyze %s)", done, run.path, run.path)
    todo = [n for n in (only or ANALYSES) if n not in done]
    if todo:
        analyze(run, only=todo, progress=progress)
    log.info("trained and analysed %s in %.0f s", run.path, time.perf_counter() - t0)
    return str(run.path)


def _demo(args: argparse.Namespace) -> Path:
    """Train (or resume) the demo transformer, the Doshi MLP and the multi-operation transformer (the
    latter two inside the first's folder), analyse them, write one report. With ``--workers 2`` (the
    default on a machine with two or more cores) the runs train in two spawned processes, one torch
    thread each, and only one-line messages are shown; ``--workers 1`` runs them here with progress bars."""
    from mechgrok import presets, report, train
    from mechgrok._config import check_int
    from mechgrok.run import Run

    out = Path(args.out)
    workers = check_int(args.workers, "--workers", low=1) if args.workers is not None else min(2, os.cpu_count() or 1)
    for sub in ["", *(r.folder for r in DEMO_RUNS if r.folder)]:  # before anything trains: say what is in the way
        folder = out / sub
        if folder.exists() and not folder.is_dir():
            what = "a nested run" if sub else "its run"
            raise FileExistsError(f"{folder} is a file, where the demo keeps {what}; choose another --out (or move "
                                  "the file away)")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").exists():
            raise FileExistsError(f"{folder} exists and is not a mechgrok run; choose another --out (the demo never "
                                  "writes into a folder it did not make)")
        if (folder / "config.json").exists():
            try:
                Run(folder).config  # noqa: B018  (a damaged run: one line here, not a worker's traceback later)
            except (OSError, ValueError) as e:
                where = "" if str(folder / "config.json") in str(e) else f"{folder / 'config.json'}: "
                raise ValueError(f"{where}{e}; repair the file, or delete {folder} to train it again") from e
    if not (out / "config.json").exists():  # the outer run folder first: the nested runs then live inside it
        outer = next(r for r in DEMO_RUNS if not r.folder)
        task, model, cfg = presets.build(outer.preset, **({} if outer.steps is None else {"steps": outer.steps}))
        train(model, task, cfg, out=out, progress=False, stop_at=0)
    jobs = [(r.preset, str(out / r.folder) if r.folder else str(out), r.only, r.steps) for r in DEMO_RUNS]
    level = logging.getLogger().getEffectiveLevel()
    if workers == 1:
        for job in jobs:
            _demo_run(*job, progress=not args.no_progress)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        log.info("training and analysing %d runs in %d worker processes (about 5-8 minutes on 2 cores)",
                 len(jobs), workers)
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_demo_run, *job, False, level) for job in jobs]
            try:
                for fut in as_completed(futures):
                    fut.result()  # re-raises a worker's error here
            except BrokenProcessPool as e:
                raise ChildProcessError(f"a demo worker process died ({e}; killed, or out of memory?); rerun the "
                                        "same command to resume, or use --workers 1") from e
            finally:
                for fut in futures:  # after an error, runs not started yet are not started
                    fut.cancel()
    path = report.build(out)  # includes the nested runs' sections
    log.info("report: %s", path)
    return path


def _parse_grid(pairs: list[str]) -> dict:
    """``["lr=1e-3,1e-2", "seed=0,1"]`` -> ``{"lr": [0.001, 0.01], "seed": [0, 1]}``. Values are read as
    JSON where they parse (numbers, true/false/null) and kept as strings otherwise; ``mechgrok.sweeps``
    then checks every value against the config it goes into."""
    grid: dict[str, list] = {}
    texts: dict[str, str] = {}
    for pair in pairs:
        key, _, values = pair.partition("=")
        if not key or not values:
            raise ValueError(f"--grid expects KEY=V1,V2,..., got {pair!r}")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice; give all its values in one flag: "
                             f"--grid {key}={texts[key]},{values}")
        texts[key] = values
        items = values.split(",")
        if not all(items):
            raise ValueError(f"--grid {pair!r} has an empty value; separate the values by single commas, "
                             f"e.g. --grid {key}=1,2")
        grid[key] = []
        for v in items:
            try:
                grid[key].append(json.loads(v))
            except json.JSONDecodeError:
                grid[key].append(v)
    return grid


def _sweep(args: argparse.Namespace) -> Path:
    from mechgrok import sweeps
    from mechgrok._config import check_int

    grid = _parse_grid(args.grid)
    check_int(args.workers, "--workers", low=1)
    if (args.x is None) != (args.y is None):
        given, missing = ("--x", "--y") if args.y is None else ("--y", "--x")
        raise ValueError(f"{given} needs {missing}: the phase diagram has two axes; give both (e.g. "
                         "--x weight_decay --y corrupt_frac) or neither")
    for flag, name in (("--x", args.x), ("--y", args.y)):
        if name is not None and name not in grid:
            raise ValueError(f"{flag} {name!r} is not a setting of the grid; choose one of {list(grid)}")
    if args.x is not None and args.x == args.y:
        raise ValueError(f"--x and --y both name {args.x!r}; choose two different settings of the grid")
    out = Path(args.out)
    table = sweeps.sweep(args.preset, grid, out=out, backend=args.backend, workers=args.workers,
                         address=args.address, progress=not args.no_progress)
    log.info("%s", table[[*grid, "phase", "test_acc"]].to_string(index=False))
    if args.x is not None:
        from mechgrok._io import atomic_write_bytes
        from mechgrok.report.figures import fig_to_png

        atomic_write_bytes(out / "phase_diagram.png", fig_to_png(sweeps.sweep_figure(table, args.x, args.y)))
    return out / "results.csv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mechgrok", description=__doc__.split("\n")[0])
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a preset into a run folder (resumes a killed run)")
    t.add_argument("--preset", default="demo", help="demo | test | doshi-mlp | multi | demo-multi | composition | lm | nanda (default: demo)")
    t.add_argument("--out", help="run folder (default: runs/PRESET)")
    t.add_argument("--steps", type=int, help="override the number of training steps")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --set lr=1e-3 --set weight_decay=0.5")
    t.add_argument("--overwrite", action="store_true", help="replace a run folder made with another config")
    t.add_argument("--resume-intact", action="store_true",
                   help="resume from the newest intact checkpoint; damaged ones are moved to checkpoints/damaged/")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    r = sub.add_parser("report", help="write RUN/report.html and RUN/report.md from a run folder")
    r.add_argument("run", help="run folder")
    r.set_defaults(func=_report)

    a = sub.add_parser("analyze", help="run the analyses of a run (analysis/*.json) and rebuild its report")
    a.add_argument("run", help="run folder")
    a.add_argument("--only", action="append", metavar="NAME", help="run only this analysis (repeatable): "
                   "progress, neurons, circuits, overlap, sae, influence")
    a.add_argument("--no-report", action="store_true", help="do not rebuild the report")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=_analyze)

    w = sub.add_parser("sweep", help="train a preset over a grid of settings (resumable); results.csv + phases")
    w.add_argument("--preset", default="doshi-mlp", help="preset to vary (default: doshi-mlp)")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a setting and its values, e.g. --grid weight_decay=0,1,3 (repeatable, once per setting)")
    w.add_argument("--out", required=True, help="sweep folder (one run folder per point); not a run folder or a file")
    w.add_argument("--workers", type=int, default=2, help="local worker processes, >= 1 (default 2)")
    w.add_argument("--backend", default="local", choices=["local", "ray"], help="local processes or a Ray cluster")
    w.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    w.add_argument("--x", help="grid setting on the phase diagram's x axis (with --y: writes OUT/phase_diagram.png)")
    w.add_argument("--y", help="grid setting on the phase diagram's y axis (with --x)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_sweep)

    d = sub.add_parser("demo", help="train (or resume) the demo runs, analyse them, write their reports")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--workers", type=int, help="processes training the runs (default: 2 where there are 2+ cores)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    return p


_OS_HINTS = {  # errno -> what to do
    errno.ENOSPC: "the disk is full: free some space, or choose a folder on another disk, and rerun "
                  "(a run resumes from its last checkpoint)",
    errno.EDQUOT: "the disk quota is used up: free some space, or choose another folder, and rerun",
    errno.EACCES: "no permission to use this path: choose another folder, or fix its permissions",
    errno.EPERM: "no permission to use this path: choose another folder, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another folder",
    errno.EISDIR: "this is a folder where a file was expected: choose another path",
    errno.ENOENT: "it does not exist: check the path",
    errno.EEXIST: "it already exists: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def _error_line(e: BaseException) -> str:
    """One line for an error the user can act on: what went wrong, on which file, and what to do."""
    from safetensors import SafetensorError

    if isinstance(e, OSError) and e.errno is not None:  # from the OS: name the file, say what to do
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        hint = _OS_HINTS.get(e.errno, "check the path and rerun")
        if e.errno == errno.EEXIST and e.filename is not None and os.path.isfile(e.filename):  # mkdir on a file
            hint = "this is a file where a folder is needed: move it away, or choose another folder"
        return f"{files + ': ' if files else ''}{e.strerror or e} [Errno {e.errno}]; {hint}"
    if isinstance(e, SafetensorError):  # "... I/O error: No space left on device (os error 28) at path "...""
        code = re.search(r"os error (\d+)", str(e))
        hint = _OS_HINTS.get(int(code.group(1)), "") if code else ""
        return (f"a tensor file could not be read or written ({e}); "
                + (hint or "if it is damaged, delete it (a run falls back to an earlier checkpoint) and rerun"))
    if isinstance(e, json.JSONDecodeError):  # mechgrok's readers name the file; this is the last resort
        return f"a JSON file is damaged or truncated ({e}); restore or delete it and rerun"
    if isinstance(e, UnicodeDecodeError):
        return f"a text file holds bytes that are not UTF-8 ({e}); it is damaged: restore or delete it and rerun"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """The ``mechgrok`` command. Exit codes: 0 done, 2 an error explained in one line on stderr,
    130 interrupted (Ctrl-C; rerun the same command to resume)."""
    from safetensors import SafetensorError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("mechgrok: interrupted; rerun the same command to resume (finished checkpoints and analyses are kept)",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, SafetensorError) as e:  # OSError: full disk, permissions, files
        print(f"mechgrok: error: {_error_line(e)}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
