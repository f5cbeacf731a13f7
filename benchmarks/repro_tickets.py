"""Grokking tickets (Minegishi, Iwasawa and Matsuo, arXiv:2310.19470), side by side (docs/reproductions.md).

The paper's claims: the magnitude-pruning mask of the *generalized* model, applied to the initial
weights and retrained (a grokking ticket), generalizes much sooner than the dense model; sooner than
random masks of the same sparsity; sooner than dense models whose initial weights have the ticket's
L1 or L2 norm (so the speed-up is not weight norm alone); and masks taken at the memorization or the
transition checkpoint do not speed it up.

1. Base runs: the ``test`` preset (1-layer transformer, a + b mod 47, 40% training data, AdamW lr 1e-2,
   weight decay 1, full batch, 1,500 steps), checkpoints every 50 steps, model seeds 0-3 (the same data split).
2. For each base run (two processes, one seed each): ``mg.tickets.ticket_sweep`` at sparsities 0.3, 0.5, 0.7, 0.9
   (fraction pruned, global magnitude pruning of every weight matrix) over ticket, random mask (same
   count per parameter), dense with the ticket's L1 norm and with its L2 norm (the dense model itself is
   the base run); then tickets at 0.5 and 0.7 from the memorization checkpoint (first step with train
   accuracy 1) and from the transition checkpoint (the checkpoint nearest the midpoint between the
   memorization and generalization steps). Every retraining uses the base run's TrainConfig.
3. The ``tickets`` analysis (mask overlap over training, no retraining) on seed 0, and its cost per
   checkpoint against one forward pass.

Writes ``benchmarks/results/repro_tickets.json`` and ``docs/img/tickets.png``. 84 training runs of 1,500
steps: about 10-12 minutes on 2 idle cores (~15 s a run); 36 minutes were measured on the shared VM under
load (33-55 s a run). Finished folders under ``--out`` are read back; ``SEEDS = (0, 1)`` halves it::

    .venv/bin/python benchmarks/repro_tickets.py --out /tmp/repro_tickets
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
PRESET = "test"
SEEDS = (0, 1, 2, 3)
SPARSITIES = (0.3, 0.5, 0.7, 0.9)
PHASE_SPARSITIES = (0.5, 0.7)
KINDS = ("ticket", "random", "dense", "dense_l1", "dense_l2")
CKPT_EVERY = 50


def _curve(run) -> dict:
    hist = run.history()
    return {"step": [r["step"] for r in hist], "test_acc": [r["test_acc"] for r in hist],
            "train_acc": [r["train_acc"] for r in hist], "seconds": hist[-1]["elapsed_s"]}


def run_seed(seed: int, out: str) -> dict:
    """Base run, sweep and phase-mask tickets of one model seed (in a worker process)."""
    import mechgrok as mg
    from mechgrok import tickets as tk

    out = Path(out) / f"seed{seed}"
    preset = mg.presets.get(PRESET)
    task = mg.tasks.from_config(preset.task)
    model = mg.models.transformer(task, **{**preset.model["kwargs"], "seed": seed})
    cfg = preset.train.replace(checkpoint_every=CKPT_EVERY, seed=seed)
    t0 = time.perf_counter()
    base = mg.train(model, task, cfg, out=out / "base", progress=False)
    base_s = time.perf_counter() - t0
    d = tk.grokking_delay(base)
    res = {"seed": seed, "base": {**d.to_dict(), "wall_seconds": base_s, **_curve(base)}}
    t0 = time.perf_counter()
    sweep = tk.ticket_sweep(base, SPARSITIES, kinds=KINDS, out=out / "sweep", progress=False)
    res["sweep_seconds"] = time.perf_counter() - t0
    res["sweep"] = sweep.to_dict()
    steps = base.steps()
    mem = next(s for s in steps if s >= d.memorized)
    mid = (d.memorized + d.generalized) / 2 if d.generalized is not None else None
    trans = min((s for s in steps if s > mem), key=lambda s: abs(s - mid)) if mid is not None else None
    res["phase_steps"] = {"memorization": mem, "transition": trans}
    res["phases"] = {}
    for label, step in res["phase_steps"].items():
        if step is None:
            continue
        ps = tk.ticket_sweep(base, PHASE_SPARSITIES, kinds=("ticket",), step=step, out=out / label, progress=False)
        res["phases"][label] = ps.to_dict()
    curves = {}
    for name, sw in [("sweep", res["sweep"]), *res["phases"].items()]:
        for p in sw["points"]:
            folder = base.path if p["run"] == "<source>" else out / name / p["run"]
            curves[f"{name}/{p['run']}"] = _curve(mg.Run(folder))
    res["curves"] = curves
    return res



def costs(run) -> dict:
    """Seconds of the ``tickets`` analysis per checkpoint and of its parts, against one forward pass."""
    import mechgrok as mg
    from mechgrok import tickets as tk
    from mechgrok.analyses.tickets import TICKET_SPARSITIES, ticket_analysis

    task, step = run.task(), run.steps()[-1]
    model = run.load_model(step)
    model.eval()
    x_all, x_train = task.inputs, task.inputs[task.train]
    final = tk.magnitude_masks(model, TICKET_SPARSITIES)

    def forward(x):
        with torch.no_grad():
            mg.models.final_logits(model, x)

    t = {"forward_all": median_seconds(lambda: forward(x_all)), "forward_train": median_seconds(lambda: forward(x_train)),
         "load_model": median_seconds(lambda: run.load_model(step)),
         "magnitude_masks_3_sparsities": median_seconds(lambda: tk.magnitude_masks(model, TICKET_SPARSITIES)),
         "mask_overlap_3": median_seconds(lambda: [tk.mask_overlap(f, f) for f in final])}
    n = len(run.steps())
    t["ticket_analysis_total"] = median_seconds(lambda: ticket_analysis(run, progress=False), reps=3)
    t["ticket_analysis_per_checkpoint"] = t["ticket_analysis_total"] / n
    return {"seconds": t, "n_checkpoints": n, "n_all": int(x_all.shape[0]), "n_train": int(x_train.shape[0]),
            "n_weights": sum(int(m.numel()) for m in final[0].values()),
            "ratio_to_forward_all": {k: v / t["forward_all"] for k, v in t.items()},
            "note": "one forward = final-position logits over all p^2 examples, no gradient; per checkpoint the "
                    "analysis loads the checkpoint, sorts the magnitudes once for the three sparsities and compares "
                    "two masks per sparsity (final and previous checkpoint)"}


def _gen(points, kind, sparsity=None):
    return [p["generalized"] for p in points if p["kind"] == kind and (sparsity is None or p["sparsity"] == sparsity)]


def _field(points, kind, sparsity, key):
    return next(p[key] for p in points if p["kind"] == kind and (sparsity is None or p["sparsity"] == sparsity))


def table(res: dict, key: str = "generalized") -> dict:
    """``key`` ("generalized" or "delay") per condition, one entry per seed (None: not within the budget)."""
    rows = {}
    for r in res["seeds"]:
        pts = r["sweep"]["points"]
        rows.setdefault("dense", []).append(_field(pts, "dense", None, key))
        for kind in ("ticket", "random", "dense_l1", "dense_l2"):
            for s in SPARSITIES:
                rows.setdefault(f"{kind} {s:g}", []).append(_field(pts, kind, s, key))
        for label in ("memorization", "transition"):
            for s in PHASE_SPARSITIES:
                ps = r["phases"].get(label)
                rows.setdefault(f"ticket {s:g} from the {label} checkpoint", []).append(
                    None if ps is None else _field(ps["points"], "ticket", s, key))
    return rows


def _figure(res: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = res["settings"]["train"]["steps"]
    never = budget * 1.06  # where "not within the budget" is drawn
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    ax = axes[0, 0]
    n = len(res["seeds"])

    def _median(ys):  # never = +inf, so a median of "never" stays never
        v = sorted(math.inf if y is None else y for y in ys)
        m = (v[(n - 1) // 2] + v[n // 2]) / 2
        return never if math.isinf(m) else m

    styles = {"ticket": ("C0", "o", 0.0), "random": ("C1", "s", 0.012), "dense_l1": ("C2", "^", 0.024),
              "dense_l2": ("C3", "v", 0.036)}
    for kind, (colour, marker, dx) in styles.items():
        per = [[_gen(r["sweep"]["points"], kind, sp)[0] for r in res["seeds"]] for sp in SPARSITIES]
        ax.plot([sp + dx for sp in SPARSITIES], [_median(ys) for ys in per], color=colour, marker=marker, lw=1.8,
                label=f"{kind} (median)")
        for sp, ys in zip(SPARSITIES, per):
            ax.scatter([sp + dx] * n, [never if y is None else y for y in ys], color=colour, marker=marker, s=14,
                       alpha=0.35)
    dense = [_gen(r["sweep"]["points"], "dense")[0] for r in res["seeds"]]
    ax.axhline(_median(dense), color="k", lw=1.4, label="dense = base run (median)")
    for y in dense:
        ax.axhline(y, color="k", lw=0.6, alpha=0.3)
    for label, marker, colour, dx in (("memorization", "x", "C4", -0.02), ("transition", "+", "C5", -0.035)):
        per = [[None if label not in r["phases"] else _gen(r["phases"][label]["points"], "ticket", sp)[0]
                for r in res["seeds"]] for sp in PHASE_SPARSITIES]
        ax.scatter([sp + dx for sp in PHASE_SPARSITIES], [_median(ys) for ys in per], color=colour, marker=marker,
                   s=70, zorder=3, label=f"ticket from the {label} ckpt (median)")
        for sp, ys in zip(PHASE_SPARSITIES, per):
            ax.scatter([sp + dx] * n, [never if y is None else y for y in ys], color=colour, marker=marker, s=18,
                       alpha=0.35)
    ax.axhline(never, color="0.6", lw=0.8, ls=":")
    ax.text(SPARSITIES[0], never + 25, f"never (within {budget:,} steps)", fontsize=7, color="0.4")
    ax.set_xlabel("sparsity (fraction pruned)")
    ax.set_ylabel("first step with test acc ≥ 0.95")
    ax.set_title(f"generalization step, {n} seeds (faint: each seed; line: median)", fontsize=9)
    ax.legend(fontsize=6.5, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    r0 = res["seeds"][0]
    for ax, s in ((axes[0, 1], 0.5), (axes[1, 0], 0.7)):
        step = r0["sweep"]["source_step"]
        names = {"dense (base)": "sweep/<source>", f"ticket {s:g}": f"sweep/ticket_s{s:g}_step{step}",
                 f"random {s:g}": f"sweep/random_s{s:g}_step{step}_seed0",
                 f"dense, ticket's L1 ({s:g})": f"sweep/dense_l1_s{s:g}_step{step}",
                 f"dense, ticket's L2 ({s:g})": f"sweep/dense_l2_s{s:g}_step{step}"}
        for label in ("memorization", "transition"):
            if label in r0["phases"]:
                names[f"ticket {s:g} from {label}"] = f"{label}/ticket_s{s:g}_step{r0['phase_steps'][label]}"
        for (label, key), colour in zip(names.items(), ("k", "C0", "C1", "C2", "C3", "C4", "C5")):
            c = r0["curves"][key]
            ax.plot(c["step"], c["test_acc"], color=colour, label=label, lw=1.4)
        ax.set_title(f"test accuracy, sparsity {s:g} (seed 0)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    an = res["analysis"]
    for i, s in enumerate(an["sparsities"]):
        ax.plot(an["steps"], an["kept_of_final"][i], color=f"C{i}", label=f"sparsity {s:g}")
        ax.axhline(1 - s, color=f"C{i}", ls=":", lw=1)
    for label, x, colour in (("memorized", an["memorized"], "0.35"), ("generalized", an["generalized"], "tab:purple")):
        if x is not None:
            ax.axvline(x, color=colour, ls="--", lw=1, label=label)
    ax.set_title("share of the final mask kept by each checkpoint's mask (seed 0; dotted: random)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Grokking tickets on a + b mod 47 (1-layer transformer, d_model 32, 40% training data, wd 1)",
                 fontsize=11)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/repro_tickets"), help="folder of the runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:  # 2 cores
        seeds = list(pool.map(run_seed, SEEDS, [str(args.out)] * len(SEEDS)))
    import mechgrok as mg
    from mechgrok.analyses.tickets import ticket_analysis

    base0 = mg.Run(args.out / "seed0" / "base")
    preset = mg.presets.get(PRESET)
    res = {"preset": PRESET, "seeds": seeds, "sparsities": SPARSITIES, "phase_sparsities": PHASE_SPARSITIES,
           "settings": {"task": preset.task, "model": preset.model,
                        "train": preset.train.replace(checkpoint_every=CKPT_EVERY).to_dict(),
                        "seeds": "model init and batch seed = the seed; the task split is seed 0 in both"},
           "machine": {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__,
                       "threads": 1}}
    res["analysis"] = ticket_analysis(base0, progress=False).to_json()
    res["costs"] = costs(base0)
    res["table"] = table(res)
    res["delay_table"] = table(res, "delay")
    res["total_seconds"] = time.perf_counter() - t0
    out = HERE / "results" / "repro_tickets.json"
    out.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    _figure(res, HERE.parent / "docs" / "img" / "tickets.png")
    for r in seeds:
        print(f"seed {r['seed']}: base memorized {r['base']['memorized']} generalized {r['base']['generalized']} "
              f"({r['base']['wall_seconds']:.0f} s); masks at memorization {r['phase_steps']['memorization']}, "
              f"transition {r['phase_steps']['transition']}")
    for name, gens in res["table"].items():
        print(f"{name:44s} generalized at {gens}  delay {res['delay_table'][name]}")
    c = res["costs"]
    print(f"tickets analysis: {c['seconds']['ticket_analysis_per_checkpoint'] * 1e3:.1f} ms per checkpoint = "
          f"{c['ratio_to_forward_all']['ticket_analysis_per_checkpoint']:.1f} x one forward over {c['n_all']} examples "
          f"({c['seconds']['forward_all'] * 1e3:.1f} ms)")
    print(f"total {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
