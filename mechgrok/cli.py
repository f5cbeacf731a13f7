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
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("mechgrok")


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _train(args: argparse.Namespace) -> Path:
    from mechgrok import presets, train

    overrides = _parse_sets(args.set)
    if args.steps is not None:
        overrides["steps"] = args.steps
    task, model, cfg = presets.build(args.preset, **overrides)
    out = Path(args.out or f"runs/{args.preset}")
    log.info("training preset %r into %s (%s)", args.preset, out, task.summary())
    run = train(model, task, cfg, out=out, overwrite=args.overwrite, progress=not args.no_progress)
    last = run.history()[-1]
    log.info("done: train acc %.3f, test acc %.3f at step %d", last["train_acc"], last["test_acc"], last["step"])
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


# The demo's runs: (preset, folder inside --out, analyses; None = all), longest first so that two
# workers finish together (measured in two workers on 2 cores: doshi-mlp ~350 s; demo ~200 s, then
# demo-multi ~105 s).
DEMO_RUNS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("doshi-mlp", "doshi-mlp", None),
    ("demo", "", None),
    ("demo-multi", "multi", ("progress", "overlap")),
)


def _demo_run(preset: str, folder: str, only: tuple[str, ...] | None, progress: bool,
              level: int | None = None) -> str:
    """Train (or resume) one demo run and run the analyses it lacks (those written after its last
    checkpoint are kept); a worker process's job (hence the logging setup)."""
    from mechgrok.analyze import ANALYSES, analyze
    from mechgrok.run import Run

    if level is not None:  # a worker process: log at the parent's level, saying which run each line is about
        logging.basicConfig(level=level, format=f"[{preset}] %(message)s", force=True)
    ns = argparse.Namespace(preset=preset, out=folder, steps=None, set=[], overwrite=False, no_progress=not progress)
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

    out = Path(args.out)
    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise FileExistsError(f"{out} exists and is not a mechgrok run; choose another --out (the demo never "
                              "writes into a folder it did not make)")
    if not (out / "config.json").exists():  # the outer run folder first: the nested runs then live inside it
        task, model, cfg = presets.build(next(preset for preset, sub, _ in DEMO_RUNS if not sub))
        train(model, task, cfg, out=out, progress=False, stop_at=0)
    jobs = [(preset, str(out / sub) if sub else str(out), only) for preset, sub, only in DEMO_RUNS]
    level = logging.getLogger().getEffectiveLevel()
    if workers == 1:
        for job in jobs:
            _demo_run(*job, progress=not args.no_progress)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        log.info("training and analysing %d runs in %d worker processes (about 6 minutes on 2 cores)",
                 len(jobs), workers)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_demo_run, *job, False, level) for job in jobs]
            for fut in as_completed(futures):
                fut.result()  # re-raises a worker's error here
    path = report.build(out)  # includes the nested runs' sections
    log.info("report: %s", path)
    return path


def _parse_grid(pairs: list[str]) -> dict:
    grid = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[1]:
            raise ValueError(f"--grid expects KEY=V1,V2,..., got {pair!r}")
        key, values = pair.split("=", 1)
        grid[key] = [_parse_sets([f"{key}={v}"])[key] for v in values.split(",")]  # numbers parsed as JSON
    return grid


def _sweep(args: argparse.Namespace) -> Path:
    from mechgrok import sweeps

    grid = _parse_grid(args.grid)
    out = Path(args.out)
    table = sweeps.sweep(args.preset, grid, out=out, backend=args.backend, workers=args.workers,
                        address=args.address, progress=not args.no_progress)
    log.info("%s", table[[*grid, "phase", "test_acc"]].to_string(index=False))
    if args.x and args.y:
        from mechgrok._io import atomic_write_bytes
        from mechgrok.report.figures import fig_to_png

        atomic_write_bytes(out / "phase_diagram.png", fig_to_png(sweeps.sweep_figure(table, args.x, args.y)))
    return out / "results.csv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mechgrok", description=__doc__.split("\n")[0])
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a preset into a run folder (resumes a killed run)")
    t.add_argument("--preset", default="demo", help="demo | test | doshi-mlp | multi | demo-multi | composition | nanda (default: demo)")
    t.add_argument("--out", help="run folder (default: runs/PRESET)")
    t.add_argument("--steps", type=int, help="override the number of training steps")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --set lr=1e-3 --set weight_decay=0.5")
    t.add_argument("--overwrite", action="store_true", help="replace a run folder made with another config")
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
                   help="a setting and its values, e.g. --grid weight_decay=0,1,3 (repeatable)")
    w.add_argument("--out", required=True, help="sweep folder (one run folder per point)")
    w.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    w.add_argument("--backend", default="local", choices=["local", "ray"], help="local processes or a Ray cluster")
    w.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    w.add_argument("--x", help="setting on the phase diagram's x axis (writes OUT/phase_diagram.png with --y)")
    w.add_argument("--y", help="setting on the phase diagram's y axis")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_sweep)

    d = sub.add_parser("demo", help="train (or resume) the demo runs, analyse them, write their reports")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--workers", type=int, help="processes training the runs (default: 2 where there are 2+ cores)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        result = args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as e:
        print(f"mechgrok: error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
