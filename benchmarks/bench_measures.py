"""Time ``mechgrok.measures.progress`` per checkpoint against one forward pass over the (a, b) grid.

Setup: the demo preset's model (p=59, 1 layer, d_model 64, 4 heads, d_mlp 256) trained for 200
steps with a checkpoint every 50 (5 checkpoints) into a temporary folder. The anchor is a plain
``model(grid)`` forward under ``torch.no_grad()`` over all 3481 pairs: the least any measure over
the grid must cost. Also timed, to show where the time goes: loading a checkpoint, the grid forward
with the neuron hook cached, and all measures of one checkpoint (``_measure``: losses, restricted /
excluded loss, Gini, weight norm, 2-D Fourier analysis of the neurons, neuron IPR).

One torch thread; medians of several trials after warm-up, interleaved in a seeded random order.

    python benchmarks/bench_measures.py [--quick]

Writes ``benchmarks/results/bench_measures.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import mechgrok as mg  # noqa: E402
from mechgrok.losses import loss_fn  # noqa: E402
from mechgrok.measures import grid_forward, progress, task_grid  # noqa: E402
from mechgrok.measures.progress import _measure  # noqa: E402

log = logging.getLogger("bench_measures")
RESULTS = Path(__file__).resolve().parent / "results"
HOOK = "blocks.0.mlp.hook_post"


def time_interleaved(methods: dict[str, Callable[[], object]], trials: int, warmup: int) -> dict[str, float]:
    """Median seconds per method; each round runs every method once in a seeded random order."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    rng = random.Random(0)
    for r in range(warmup + trials):
        for name in rng.sample(list(methods), len(methods)):
            t0 = time.perf_counter()
            methods[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(trials: int, warmup: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_measures."))
    try:
        task, model, cfg = mg.presets.build("demo", steps=200, checkpoint_every=50, eval_every=50)
        t0 = time.perf_counter()
        run = mg.train(model, task, cfg, out=folder / "run", progress=False)
        train_s = time.perf_counter() - t0
        n_ckpt = len(run.steps())
        final = run.load_model().eval()
        grid = task_grid(task)
        key = progress(run, progress=False)["key_frequencies"]
        freqs = key["freqs"] or [1, 2, 3]  # a 200-step model has no key frequencies yet; time with three
        fn = loss_fn(cfg.loss)

        def forward() -> None:
            with torch.no_grad():
                final(grid.inputs)

        methods: dict[str, Callable[[], object]] = {
            "forward over the grid (anchor)": forward,
            "grid_forward with the neuron hook": lambda: grid_forward(final, grid, [HOOK]),
            "run.load_model(step)": lambda: run.load_model(run.steps()[-1]),
            "all measures of one loaded checkpoint": lambda: _measure(final, task, grid, freqs, fn, HOOK),
            f"progress(run, freqs=...) / {n_ckpt} checkpoints": lambda: progress(run, freqs=freqs, progress=False),
            f"progress(run) / {n_ckpt} checkpoints (finds key freqs)": lambda: progress(run, progress=False),
        }
        med = time_interleaved(methods, trials, warmup)
        per = {k: v / n_ckpt if k.startswith("progress") else v for k, v in med.items()}
        return {"n_checkpoints": n_ckpt, "p": task.p, "n_pairs": task.p**2, "train_s": round(train_s, 2),
                "freqs_timed": freqs, "key_frequencies_found": key, "median_s": per}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def table(res: dict) -> str:
    f = res["median_s"]["forward over the grid (anchor)"]
    lines = ["| what | median ms (per checkpoint) | × forward |", "|---|---:|---:|"]
    for k, v in res["median_s"].items():
        lines.append(f"| {k} | {v * 1e3:.1f} | {v / f:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 trials instead of 11 (a smoke run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    trials, warmup = (3, 1) if args.quick else (11, 2)
    res = bench(trials, warmup)
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, "
               f"torch {torch.__version__} with 1 thread, Python {platform.python_version()}")
    ratio = res["median_s"][f"progress(run, freqs=...) / {res['n_checkpoints']} checkpoints"] / \
        res["median_s"]["forward over the grid (anchor)"]
    md = (f"# measures benchmark\n\nMachine: {machine}. Median of {trials} interleaved trials after {warmup} "
          f"warm-up round(s){' (--quick)' if args.quick else ''}. Model: the demo preset (p={res['p']}, "
          f"{res['n_pairs']} pairs, 1 layer, d_model 64, d_mlp 256) after 200 steps, {res['n_checkpoints']} "
          f"checkpoints; restricted/excluded loss timed with frequencies {res['freqs_timed']}.\n\n"
          + table(res) + f"\n\n`progress` costs **{ratio:.1f}×** one forward pass over the grid per checkpoint. "
          "It does one forward per checkpoint; the rest is the float64 2-D Fourier transform of the neurons "
          "([p, p, d_mlp] with the p×p basis on both sides), the per-axis power spectra for the neuron IPR, the "
          "float64 restricted/excluded projections and the cross-entropies. Finding the key frequencies "
          "evaluates the final checkpoint once more. This is a shared machine: medians move by about 10% "
          "between runs.\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_measures.md").write_text(md)
    (RESULTS / "bench_measures.json").write_text(json.dumps(
        {"machine": machine, "trials": trials, "warmup": warmup, "ratio_progress_per_checkpoint_to_forward": ratio,
         **res}, indent=2))
    log.info("\n%s", md)


if __name__ == "__main__":
    main()
