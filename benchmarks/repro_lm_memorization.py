"""Memorization in a small language model, end to end (docs/reproductions.md, "Memorized sequences").

1. Train the ``lm`` preset (or read ``--run`` if it is trained) and measure: k-extractability by
   repetition count against held-out planted sequences, generalization of the structured part,
   the memorization scores' AUROC per repetition count and their agreement.
2. The repeated-data sweep (Hernandez et al. 2022): the ``lm`` preset with planted sequences
   repeated 100 times, their number varied, so the repeated share of the training sequences goes
   from 0 to more than half; induction scores of each run; the figure
   ``docs/img/lm_repeated_data.png``.

Writes ``benchmarks/results/repro_lm_memorization.json``. About 15 minutes on a 2-core CPU::

    .venv/bin/python benchmarks/repro_lm_memorization.py --out /tmp/repro_lm [--skip-sweep]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechgrok as mg

HERE = Path(__file__).resolve().parent
N_PLANTED = (0, 8, 32, 96)  # x 100 repeats: 0, 9.8, 30 and 57% of an epoch's training sequences


def part1(run_dir: Path) -> dict:
    if not (run_dir / "config.json").exists() or not mg.Run(run_dir).steps() or \
            mg.Run(run_dir).steps()[-1] < mg.presets.get("lm").train.steps:
        task, model, cfg = mg.presets.build("lm")
        t0 = time.perf_counter()
        mg.train(model, task, cfg, out=run_dir, progress=False)
        train_s = time.perf_counter() - t0
    else:
        train_s = None
    run = mg.Run(run_dir)
    model, task = run.load_model(), run.task()
    last = run.history()[-1]
    out: dict = {"train_seconds": train_s, "train_seconds_in_history": last["elapsed_s"],
                 "final": {k: v for k, v in last.items() if k.endswith(("_loss", "_acc", "_exact"))}}
    groups = ["held_out_planted", "planted_r1", "planted_r10", "planted_r100", "test"]
    out["extractable"] = {str(k): {g: mg.memorization.extract(model, task, k, split=g).rate for g in groups}
                          for k in (2, 4, 8, 16)}
    t0 = time.perf_counter()
    s = mg.memorization.scores(model, task, k=8)
    out["scores_seconds"] = time.perf_counter() - t0
    out["auroc"] = s.auroc_by_group()
    out["agreement"] = s.agreement()
    out["by_repeats"] = s.by_repeats()
    ind = mg.measures.induction_scores(model, bos=task.d_vocab - 1)
    other = mg.measures.induction_scores(model, bos=task.d_vocab - 1, segment=11)
    out["induction"] = {"corpus_layout": ind.to_dict(), "segment_11": other.to_dict()}
    return out


def part2(out_dir: Path) -> dict:
    grid = {"n_planted": list(N_PLANTED), "repeats": [[100]]}
    t0 = time.perf_counter()
    table = mg.sweep("lm", grid, out=out_dir, workers=2, progress=False)
    seconds = time.perf_counter() - t0
    rows = []
    for _, r in table.iterrows():
        run = mg.Run(out_dir / r["run"])
        model, task = run.load_model(), run.task()
        n_rep = int(task.metadata["repeats"][task.groups.get("planted_r100", torch.zeros(task.n, dtype=torch.bool))]
                    .sum())
        per_epoch = int(task.metadata["repeats"][task.train].sum())
        ind = mg.measures.induction_scores(model, bos=task.d_vocab - 1)
        other = mg.measures.induction_scores(model, bos=task.d_vocab - 1, segment=11)
        last = run.history()[-1]
        rows.append({"n_planted": int(r["n_planted"]), "repeated_fraction": n_rep / per_epoch,
                     "prefix_matching": ind.strength, "prefix_matching_any_layer": float(ind.prefix_matching.max()),
                     "in_context_gain": ind.in_context_gain, "prefix_matching_segment_11": other.strength,
                     "in_context_gain_segment_11": other.in_context_gain, "test_loss": last["test_loss"],
                     "test_exact": last["test_exact"]})
    _figure(rows, HERE.parent / "docs" / "img" / "lm_repeated_data.png")
    return {"sweep_seconds": seconds, "rows": rows}


def _figure(rows: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["repeated_fraction"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(x, [r["prefix_matching_any_layer"] for r in rows], "o-", label="prefix matching (corpus layout)")
    axes[0].plot(x, [r["prefix_matching_segment_11"] for r in rows], "s--", label="prefix matching, segment 11")
    axes[0].set_ylabel("best head's prefix-matching score")
    axes[1].plot(x, [r["test_loss"] for r in rows], "o-", color="C2", label="held-out structured loss")
    axes[1].plot(x, [r["in_context_gain"] for r in rows], "s--", color="C3", label="in-context gain (nats)")
    for ax in axes:
        ax.set_xlabel("repeated share of training sequences")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("lm preset: planted sequences x100, their number varied (Hernandez et al. 2022)")
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/repro_lm", help="where the runs go")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    result = {"machine": "2-core x86 VM, CPU, torch threads 1", "part1": part1(out / "lm")}
    if not args.skip_sweep:
        result["part2"] = part2(out / "repeated")
    f = HERE / "results" / "repro_lm_memorization.json"
    f.write_text(json.dumps(result, indent=1, allow_nan=True))
    print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
