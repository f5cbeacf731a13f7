"""Time of the full cross-task analysis (`mechgrok analyze --only overlap`) on the multi-op preset.

The analysis: one circuit per operation (EAP-IG, neuron level, greedy to faithfulness 0.8), the
pairwise overlap statistics with 1,000-draw random baselines, overlap vs k, cross-task
faithfulness with 20 random circuits per cell, and one operation's circuit on 8 checkpoints.
Measured on a run of the `multi` preset (trained here for `--steps` steps unless `--run` is given;
the cost does not depend on how well the model is trained), 1 torch thread, median of `--trials`.

    python benchmarks/bench_overlap.py [--run runs/multi] [--steps 300] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mechgrok as mg
from mechgrok import circuits
from mechgrok.analyses import overlap_analysis


def _time(fn, trials: int) -> float:
    out = []
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="an existing multi-task run (default: train the multi preset briefly)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run = mg.Run(args.run)
        else:
            task, model, cfg = mg.presets.build("multi", steps=args.steps, checkpoint_every=max(1, args.steps // 8))
            run = mg.train(model, task, cfg, out=Path(tmp) / "multi", progress=False)
        task, model = run.task(), run.load_model()
        x, xc, y, _ = circuits.contrast(task, "test", task_name=task.task_names[0])
        forward = _time(lambda: mg.models.final_logits(model, x), 5)
        one = _time(lambda: circuits.discover(model, x, xc, circuits.metrics.generalization(y), level="neuron",
                                              target=0.8, progress=False), args.trials)
        full = _time(lambda: overlap_analysis(run, progress=False), args.trials)
    machine = f"{platform.machine()}, 1 torch thread, torch {torch.__version__}"
    rows = [("one forward over 256 examples", forward), ("one circuit (EAP-IG, greedy to F >= 0.8)", one),
            ("full cross-task analysis", full)]
    text = "\n".join([f"Overlap analysis on the multi preset ({len(task.task_names)} operations, "
                      f"{len(mg.circuits.graph(model, 'neuron').components)} neuron-level components; {machine}; "
                      f"median of {args.trials})", "", "| what | seconds | × one forward |", "|---|---:|---:|",
                      *[f"| {k} | {v:.3f} | {v / forward:.0f} |" for k, v in rows]])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_overlap.md").write_text(text + "\n")
    (out / "bench_overlap.json").write_text(json.dumps({"machine": machine, "rows": dict(rows)}, indent=2))


if __name__ == "__main__":
    main()
