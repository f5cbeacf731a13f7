"""Grokking as the transition from lazy to rich training (Kumar, Bordelon, Gershman and Pehlevan 2024),
side by side (docs/reproductions.md).

The paper's claim: the output scale α of the centred predictor α·(f(x; θ) − f(x; θ₀)) controls
grokking; a larger α (lazier) delays generalization or removes it, a small α makes the delay vanish
(their Fig. 6b and 12 on Nanda et al.'s one-layer transformer with AdamW). For gradient descent they
scale the learning rate as η₀/α² (App. 8.1), which keeps the predictor's initial speed independent of
α; mechgrok divides the loss by α² instead (the same for GD). AdamW divides the gradient by its own
scale, so with AdamW the division does almost nothing: the predictor then starts α times faster and
the weights move at the learning rate whatever α is. The Adam counterpart of η₀/α² is lr₀/α (the
predictor's initial speed α·lr stays fixed). This script runs both, and controls:

1. ``lr = lr₀/α`` (the paper's rule, for Adam): α ∈ {0.5, 1, 4, 16}.
2. ``lr = lr₀`` (mechgrok's loss / α² alone): α ∈ {4, 16} (α = 1 is shared with 1).
3. Controls, α = 1 at the learning rates of α = 0.5 and α = 4 in 1: is a change the output scale's
   or only the learning rate's?

Setting: the ``test`` preset (a + b mod 47, 40% training data, 1-layer transformer d_model 32, 4 heads,
d_mlp 128, the same initial weights in every run), centred predictor, full-batch AdamW, weight decay 1.0,
lr₀ = 1e-2, 4,000 steps, evaluations and checkpoints every 50 steps. On 14 log-spaced checkpoints of
each run: ``mg.measures.lazy_rich_over_training`` (exact NTK on 96 class-balanced training and 96 test
examples: 12 classes × 8), and the share of the kernel's squared norm in its constant mode. Then the
cost of the measure per checkpoint against one forward pass.

Writes ``benchmarks/results/repro_lazy_rich.json`` and ``docs/img/lazy_rich.png``.
About 10 minutes on the shared 2-core CPU (two processes, one torch thread each; the runs are resumed
from ``--out`` when they are there)::

    .venv/bin/python benchmarks/repro_lazy_rich.py --out /tmp/repro_lazy_rich
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
LR0, STEPS, EVAL_EVERY, CKPT_EVERY = 1e-2, 4000, 50, 50
N_EXAMPLES, PER_CLASS, N_CHECKPOINTS = 96, 8, 14
TASK = {"kind": "modular_arithmetic", "p": 47, "op": "add", "train_frac": 0.4, "corrupt_frac": 0.0, "seed": 0}
MODEL = {"n_layers": 1, "d_model": 32, "n_heads": 4, "d_mlp": 128, "seed": 0}
# (name, group, alpha, lr)
RUNS = [("a0.5_lr/a", "lr = lr0/α", 0.5, LR0 / 0.5), ("a1", "lr = lr0/α", 1.0, LR0),
        ("a4_lr/a", "lr = lr0/α", 4.0, LR0 / 4), ("a16_lr/a", "lr = lr0/α", 16.0, LR0 / 16),
        ("a4_lr0", "lr = lr0", 4.0, LR0), ("a16_lr0", "lr = lr0", 16.0, LR0),
        ("a1_lr2e-2", "control: α = 1", 1.0, 2e-2), ("a1_lr2.5e-3", "control: α = 1", 1.0, 2.5e-3)]


def _train_and_measure(out: str, name: str, alpha: float, lr: float) -> dict:
    torch.set_num_threads(1)
    import mechgrok as mg  # noqa: PLC0415 (in the worker process)
    from mechgrok.analyses.lazy_rich import log_spaced_steps  # noqa: PLC0415
    from mechgrok.measures.ntk import empirical_ntk, lazy_rich_over_training  # noqa: PLC0415

    task = mg.tasks.from_config(TASK)
    model = mg.models.transformer(task, **MODEL)
    cfg = mg.TrainConfig(steps=STEPS, lr=lr, weight_decay=1.0, output_scale=alpha, center_output=True,
                         eval_every=EVAL_EVERY, checkpoint_every=CKPT_EVERY)
    t0 = time.perf_counter()
    run = mg.train(model, task, cfg, out=Path(out) / name.replace("/", "_per_"), progress=False)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = lazy_rich_over_training(run, log_spaced_steps(run.steps(), N_CHECKPOINTS), n_examples=N_EXAMPLES,
                                  per_class=PER_CLASS, progress=False)
    measure_s = time.perf_counter() - t1
    rows = list(res.train_rows)
    share = {}
    for step in (0, res.steps[-1]):  # (1ᵀK1 / n)² / ‖K‖²_F: the constant block's share of the kernel
        K = empirical_ntk(run.load_model(step), task.inputs[rows])
        share[str(step)] = float((K.sum() / len(rows)) ** 2 / (K**2).sum())
    hist = run.history()
    first = mg.run.first_step
    mem, gen = first(hist, "train_acc", mg.run.MEMORIZED_ACC), first(hist, "test_acc", mg.run.GENERALIZED_ACC)
    test_acc = [r["test_acc"] for r in hist]
    return {"name": name, "alpha": alpha, "lr": lr, "run": str(run.path), "train_seconds": train_s,
            "history_seconds": hist[-1]["elapsed_s"], "measure_seconds": measure_s,
            "measure_seconds_per_checkpoint": measure_s / len(res.steps),
            "memorized_step": mem, "generalized_step": gen, "gap": None if gen is None or mem is None else gen - mem,
            "first_test_acc_0.5": first(hist, "test_acc", 0.5),
            "final": {k: hist[-1][k] for k in ("train_acc", "test_acc", "train_loss", "test_loss", "weight_norm")},
            "max_test_acc": max(test_acc), "constant_mode_share": share,
            "history": {k: [r[k] for r in hist] for k in ("step", "train_acc", "test_acc", "train_loss", "test_loss")},
            "lazy_rich": res.to_dict()}



def _median3(fn) -> float:
    return median_seconds(fn, reps=3)  # 3 repetitions: the kernel calls take ~0.5 s each


def costs(run_path: str) -> dict:
    """Seconds of one forward pass, the NTK and the measure per checkpoint on the last checkpoint."""
    import mechgrok as mg  # noqa: PLC0415
    from mechgrok.measures.ntk import balanced_rows, empirical_ntk, lazy_rich_over_training  # noqa: PLC0415

    torch.set_num_threads(1)
    run = mg.Run(run_path)
    task, step = run.task(), run.steps()[-1]
    model = run.load_model(step)
    model.eval()
    rows = balanced_rows(task.labels, task.train, N_EXAMPLES, PER_CLASS, 0)
    x = task.inputs[rows]

    def forward(inputs):
        with torch.no_grad():
            mg.models.final_logits(model, inputs)

    n_params = sum(p.numel() for p in model.parameters())
    t = {"forward_all_examples": _median3(lambda: forward(task.inputs)),
         "forward_96": _median3(lambda: forward(x)),
         "empirical_ntk_96_exact": _median3(lambda: empirical_ntk(model, x)),
         "empirical_ntk_96_outputs_8": _median3(lambda: empirical_ntk(model, x, outputs=8)),
         "empirical_ntk_48_exact": _median3(lambda: empirical_ntk(model, x[:48])),
         "load_model": _median3(lambda: run.load_model(step)),
         "lazy_rich_over_training_per_checkpoint": _median3(
             lambda: lazy_rich_over_training(run, [step], n_examples=N_EXAMPLES, per_class=PER_CLASS,
                                             progress=False), reps=1) / 2}  # steps 0 and `step`
    return {"seconds": t, "n_parameters": n_params, "d_out": task.d_vocab_out,
            "n_examples_all": int(task.inputs.shape[0]),
            "ratio_to_forward_all": {k: v / t["forward_all_examples"] for k, v in t.items()},
            "ratio_to_forward_96": {k: v / t["forward_96"] for k, v in t.items()},
            "note": "lazy_rich_over_training per checkpoint = (one call on steps [0, last]) / 2: a model load and "
                    "two kernels (96 training and 96 test examples, every output) per checkpoint"}


def _figure(res: dict, file: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = res["runs"]
    colour = {0.5: "C2", 1.0: "C0", 4.0: "C1", 16.0: "C3"}
    style = {"lr = lr0/α": "-", "lr = lr0": "--", "control: α = 1": ":"}

    def label(r):
        return f"α={r['alpha']:g}, lr={r['lr']:.3g}"

    def draw(ax, r, x, y, **kw):
        ax.plot([s + 1 for s in x], y, color=colour[r["alpha"]] if r["group"] != "control: α = 1" else
                ("0.45" if r["lr"] > LR0 else "C5"), ls=style[r["group"]], label=label(r), **kw)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    for ax, groups, title in ((axes[0, 0], ("lr = lr0/α",), "test accuracy, lr = lr0/α (train: thin)"),
                              (axes[0, 1], ("lr = lr0", "control: α = 1"),
                               "test accuracy, lr = lr0 (dashed; α = 1: blue) and α = 1 controls (dotted)")):
        for r in runs:
            if r["group"] in groups or (r["name"] == "a1" and "lr = lr0" in groups):
                draw(ax, r, r["history"]["step"], r["history"]["test_acc"])
                if ax is axes[0, 0]:
                    draw(ax, r, r["history"]["step"], r["history"]["train_acc"], lw=0.7)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles[::2], labels[::2], fontsize=7)
    axes[0, 1].legend(fontsize=7)
    ax = axes[0, 2]
    for r in runs:
        never = STEPS * (1.06 + 0.06 * ["lr = lr0/α", "lr = lr0", "control: α = 1"].index(r["group"]))
        y = r["generalized_step"] if r["generalized_step"] is not None else never
        ax.scatter(r["lr"], y, color=colour[r["alpha"]], marker={"lr = lr0/α": "o", "lr = lr0": "s",
                                                                 "control: α = 1": "^"}[r["group"]], s=45)
        ax.annotate(f"α={r['alpha']:g}" + ("" if r["generalized_step"] is not None else " never"), (r["lr"], y),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(STEPS, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title("first step with test acc ≥ 0.95 against the learning rate\n(o: lr0/α, □: lr0, △: α = 1 "
                 "controls; above the grey line: not within 4,000 steps)", fontsize=9)
    for ax, key, title in ((axes[1, 0], "weight_movement", "‖θ − θ₀‖ / ‖θ₀‖"),
                           (axes[1, 1], "alignment_test", "centred NTK–label alignment, test examples"),
                           (axes[1, 2], "kernel_distance_centered", "centred kernel distance from step 0 "
                                                                    "(training examples)")):
        for r in runs:
            lr = r["lazy_rich"]
            draw(ax, r, lr["steps"], lr[key], marker=".", ms=4)
            if r["generalized_step"] is not None:
                ax.axvline(r["generalized_step"] + 1, color="0.85", lw=0.6, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("step + 1 (log); grey: a run generalized")
        ax.set_title(title, fontsize=9)
    axes[1, 0].legend(fontsize=6)
    fig.suptitle("a + b mod 47, 1-layer transformer, centred predictor α·(f − f₀), AdamW, weight decay 1.0, "
                 "lr0 = 1e-2", fontsize=11)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/repro_lazy_rich"), help="folder of the runs")
    ap.add_argument("--workers", type=int, default=2, help="training processes (one torch thread each)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    groups = {name: group for name, group, _, _ in RUNS}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train_and_measure, str(args.out), name, alpha, lr) for name, _, alpha, lr in RUNS]
        runs = [f.result() for f in futures]
    for r in runs:
        r["group"] = groups[r["name"]]
    res = {"paper": "Kumar, Bordelon, Gershman, Pehlevan 2024, arXiv:2310.06110 (ICLR 2024)",
           "settings": {"task": TASK, "model": MODEL, "lr0": LR0, "steps": STEPS, "eval_every": EVAL_EVERY,
                        "checkpoint_every": CKPT_EVERY, "weight_decay": 1.0, "center_output": True,
                        "n_examples": N_EXAMPLES, "per_class": PER_CLASS, "checkpoints_measured": N_CHECKPOINTS},
           "machine": {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__,
                       "threads": 1, "workers": args.workers},
           "runs": runs}
    res["costs"] = costs(next(r["run"] for r in runs if r["name"] == "a1"))
    res["total_seconds"] = time.perf_counter() - t0
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / "repro_lazy_rich.json"
    from mechgrok._io import to_jsonable  # noqa: PLC0415

    out.write_text(json.dumps(to_jsonable(res), indent=1, allow_nan=False) + "\n")
    _figure(res, HERE.parent / "docs" / "img" / "lazy_rich.png")
    print(f"{'run':14s} {'group':16s} {'α':>5s} {'lr':>8s} {'mem':>5s} {'gen':>5s} {'test':>6s} {'max':>6s} "
          f"{'move@mem':>9s} {'move@end':>9s} {'align0':>7s} {'alignE':>7s} {'kdist':>6s} {'kdistC':>6s}")
    for r in runs:
        lr = r["lazy_rich"]
        steps = lr["steps"]
        i_mem = next((i for i, s in enumerate(steps) if r["memorized_step"] is not None and s >= r["memorized_step"]),
                     None)
        print(f"{r['name']:14s} {r['group']:16s} {r['alpha']:5g} {r['lr']:8.2e} {str(r['memorized_step']):>5s} "
              f"{str(r['generalized_step']):>5s} {r['final']['test_acc']:6.3f} {r['max_test_acc']:6.3f} "
              f"{(lr['weight_movement'][i_mem] if i_mem is not None else float('nan')):9.3g} "
              f"{lr['weight_movement'][-1]:9.3g} {lr['alignment_test'][0]:7.3f} {lr['alignment_test'][-1]:7.3f} "
              f"{lr['kernel_distance'][-1]:6.3f} {lr['kernel_distance_centered'][-1]:6.3f}")
    c = res["costs"]
    print("costs (s):", {k: round(v, 4) for k, v in c["seconds"].items()})
    print("x one forward over all examples:", {k: round(v, 1) for k, v in c["ratio_to_forward_all"].items()})
    print(f"total {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
