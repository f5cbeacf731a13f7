"""Grokking at the edge of numerical stability (Prieto et al. 2025), side by side (docs/reproductions.md).

1. One ``mg.sweep`` of the ``test`` preset (1-layer transformer, a + b mod 47) without weight decay
   over loss {cross_entropy, stablemax} x optimizer {adamw, adamw_orthograd (⊥Grad)}: the paper's
   three variants (softmax cross-entropy, StableMax, cross-entropy + ⊥Grad) and, since a grid is a
   product, StableMax + ⊥Grad as a fourth. mechgrok computes every loss in float64.
2. On every checkpoint of each run: train / test accuracy, softmax collapse (SC) in float32 and
   float64, and the NLM alignment cos(−∇L, θ) (``mg.measures.stability``).
3. THE PAPER'S FLOAT32 SETTING: a second ``mg.sweep`` with ``TrainConfig(loss_dtype="float32")`` (the
   loss and its backward in float32, where softmax collapse zeroes gradients) over loss
   {cross_entropy, stablemax} x AdamW ``adam_eps`` {1e-8 (torch's), 1e-25 (Prieto et al.'s)}, from
   the same initial weights and data. (mg.train with a float32 loss is checked bit for bit against a
   hand-written float32 loop in tests/test_train_numerics.py.)
4. The cost of each measure per checkpoint against one forward pass, and of the columns
   ``softmax_collapse_float64`` and ``nlm_alignment`` inside ``mg.measures.progress``.

Writes ``benchmarks/results/repro_numerical_stability.json`` and ``docs/img/numerical_stability.png``.
About 6 minutes on a 2-core CPU (the sweeps are resumed from ``--out`` when they are there)::

    .venv/bin/python benchmarks/repro_numerical_stability.py --out /tmp/repro_numerical_stability
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechgrok as mg
from mechgrok._io import to_jsonable
from mechgrok.losses import loss_fn
from mechgrok.measures.stability import (
    collapsed,
    model_softmax_collapse,
    nlm_alignment,
    nlm_alignment_on,
    stability_over_training,
)
from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
PRESET = "test"
STEPS, EVAL_EVERY, CKPT_EVERY = 3000, 50, 100
GRID = {"loss": ["cross_entropy", "stablemax"], "optimizer": ["adamw", "adamw_orthograd"], "weight_decay": [0.0],
        "train_frac": [0.7], "steps": [STEPS], "eval_every": [EVAL_EVERY], "checkpoint_every": [CKPT_EVERY]}
GRID_FLOAT32 = {"loss": ["cross_entropy", "stablemax"], "loss_dtype": ["float32"], "adam_eps": [1e-8, 1e-25],
                "weight_decay": [0.0], "train_frac": [0.7], "steps": [STEPS], "eval_every": [EVAL_EVERY],
                "checkpoint_every": [CKPT_EVERY]}
KEY_STEPS = (0, 100, 200, 500, 1000, 1500, 2000, 3000)
CHECK_STEPS = 500  # steps of the float64 loop compared against mg.train's checkpoints


def _name(row) -> str:
    name = {"cross_entropy": "cross-entropy", "stablemax": "StableMax"}[row["loss"]] + (
        " + ⊥Grad" if row.get("optimizer", "adamw") == "adamw_orthograd" else "")
    if row.get("loss_dtype", "float64") != "float64":
        name += f", {row['loss_dtype']} loss, eps {row['adam_eps']:g}"
    return name


def _first(steps, values, at_least: float) -> int | None:
    return next((s for s, v in zip(steps, values) if v is not None and v >= at_least), None)


def _at(steps, values, step: int):
    return dict(zip(steps, values)).get(step)


def sweep(out: Path, grid: dict) -> dict:
    t0 = time.perf_counter()
    table = mg.sweep(PRESET, grid, out=out, workers=2, progress=False)
    seconds = time.perf_counter() - t0
    variants = {}
    for _, row in table.iterrows():
        run = mg.Run(out / row["run"])
        hist = run.history()
        hs = [r["step"] for r in hist]
        t1 = time.perf_counter()
        st = stability_over_training(run, progress=False)
        measure_s = time.perf_counter() - t1
        train_acc, test_acc = [r["train_acc"] for r in hist], [r["test_acc"] for r in hist]
        fit = _first(hs, train_acc, 1.0)
        cfg = mg.TrainConfig.from_dict(run.config["train"])
        variants[_name(row)] = {
            "run": row["run"], "loss": cfg.loss, "optimizer": cfg.optimizer, "loss_dtype": cfg.loss_dtype,
            "adam_eps": cfg.adam_eps,
            "train_seconds": row["seconds"], "train_seconds_in_history": hist[-1]["elapsed_s"],
            "measure_seconds": measure_s,
            "final": {"train_acc": train_acc[-1], "test_acc": test_acc[-1], "train_loss": hist[-1]["train_loss"],
                      "weight_norm": hist[-1]["weight_norm"], "softmax_collapse": st.softmax_collapse[-1],
                      "softmax_collapse_float64": st.softmax_collapse_float64[-1],
                      "nlm_alignment": st.nlm_alignment[-1]},
            "step_train_acc_1": fit, "step_test_acc_0.95": _first(hs, test_acc, 0.95),
            "step_test_acc_0.9": _first(hs, test_acc, 0.9), "max_test_acc": max(test_acc),
            "step_sc_0.5": _first(hs, [r["softmax_collapse"] for r in hist], 0.5),
            "key_steps": {str(s): {"train_acc": _at(hs, train_acc, s), "test_acc": _at(hs, test_acc, s),
                                   "train_loss": _at(hs, [r["train_loss"] for r in hist], s),
                                   "softmax_collapse": _at(st.steps, st.softmax_collapse, s),
                                   "softmax_collapse_float64": _at(st.steps, st.softmax_collapse_float64, s),
                                   "nlm_alignment": _at(st.steps, st.nlm_alignment, s)} for s in KEY_STEPS},
            "history": {"step": hs, "train_acc": train_acc, "test_acc": test_acc,
                        "train_loss": [r["train_loss"] for r in hist],
                        "softmax_collapse": [r["softmax_collapse"] for r in hist],
                        "weight_norm": [r["weight_norm"] for r in hist]},
            "checkpoints": st.to_dict(),
        }
    return {"sweep_seconds": seconds, "variants": variants}



def costs(run: mg.Run) -> dict:
    """Median seconds of each measure on the last checkpoint, and its ratio to one forward pass; the
    share of ``mg.measures.progress``'s time per checkpoint that its stability columns add."""
    task, step = run.task(), run.steps()[-1]
    model = run.load_model(step)
    model.eval()
    x_train, y_train = task.inputs[task.train], task.labels[task.train]
    grid = mg.measures.task_grid(task)
    fn = loss_fn(run.config["train"].get("loss", "cross_entropy"), run.config["train"].get("loss_dtype", "float64"))
    with torch.no_grad():
        train_logits = mg.models.final_logits(model, x_train)  # [n_train, d_out]
    freqs = mg.measures.progress(run, steps=[step], progress=False)["key_frequencies"]["freqs"]

    def forward(x):
        with torch.no_grad():
            mg.models.final_logits(model, x)

    t = {"forward_train": median_seconds(lambda: forward(x_train)),
         "forward_all": median_seconds(lambda: forward(task.inputs)),
         "forward_grid_with_cache": median_seconds(lambda: mg.measures.grid_forward(model, grid, [mg.models.mlp_hook(0)])),
         "model_softmax_collapse": median_seconds(lambda: model_softmax_collapse(model, task)),
         "nlm_alignment": median_seconds(lambda: nlm_alignment(model, task)),
         "load_model": median_seconds(lambda: run.load_model(step)),
         "stability_over_training_per_checkpoint": median_seconds(
             lambda: stability_over_training(run, steps=[step], progress=False), reps=3),
         # inside mg.measures.progress, per checkpoint: its float64 SC (from the grid's logits, no forward of
         # its own) and its NLM alignment (a forward and backward over the training split)
         "progress_softmax_collapse_float64": median_seconds(lambda: collapsed(train_logits, y_train, torch.float64)),
         "progress_nlm_alignment": median_seconds(lambda: nlm_alignment_on(model, x_train, y_train, fn)),
         "progress_per_checkpoint": median_seconds(
             lambda: mg.measures.progress(run, steps=[step], freqs=freqs, progress=False), reps=3)}
    added = t["progress_softmax_collapse_float64"] + t["progress_nlm_alignment"]
    return {"seconds": t, "n_train": int(task.train.sum()), "n_all": int(task.inputs.shape[0]),
            "ratio_to_forward_train": {k: v / t["forward_train"] for k, v in t.items()},
            "progress_added_seconds": added, "progress_added_share": added / t["progress_per_checkpoint"],
            "note": "model_softmax_collapse and nlm_alignment read the training split; one forward pass = the same "
                    "examples, no gradient; stability_over_training per checkpoint = load + a forward over all "
                    "examples + a forward and backward over the training split; progress_per_checkpoint = one call "
                    "of mg.measures.progress on one checkpoint with the key frequencies given (load, a forward over "
                    "the p^2 grid with the MLP cache, Fourier measures, and the two stability columns)"}


def _figure(res: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = {**res["sweep"]["variants"], **res["float32"]["variants"]}
    fig, axes = plt.subplots(3, 3, figsize=(13, 9.6), sharex=True)
    for ax, (name, v) in zip(axes.flat, variants.items()):
        hist, ck = v["history"], v["checkpoints"]
        ax.plot(hist["step"], hist["train_acc"], color="C0", label="train acc")
        ax.plot(hist["step"], hist["test_acc"], color="C1", label="test acc")
        ax.plot(ck["steps"], ck["softmax_collapse"], color="C3", ls="--", label="softmax collapse (float32)")
        ax.plot(ck["steps"], ck["softmax_collapse_float64"], color="C5", ls="--", lw=1,
                label="softmax collapse (float64)")
        ax.plot(ck["steps"], ck["nlm_alignment"], color="C2", ls=":", lw=2, label="NLM: cos(−∇L, θ)")
        ax.set_title(name.replace(", float32", "\nfloat32"), fontsize=9)
        ax.set_ylim(-0.35, 1.05)
        ax.grid(alpha=0.3)
    ax = axes.flat[-1]
    colors = {("cross_entropy", "adamw"): "C0", ("cross_entropy", "adamw_orthograd"): "C1",
              ("stablemax", "adamw"): "C2", ("stablemax", "adamw_orthograd"): "C3"}
    for name, v in variants.items():
        ax.plot(v["history"]["step"], v["history"]["weight_norm"], color=colors[v["loss"], v["optimizer"]],
                ls="-" if v["loss_dtype"] == "float64" else ("--" if v["adam_eps"] == 1e-8 else ":"), label=name)
    ax.set_title("weight norm ‖θ‖ (dashed: float32 loss, dotted: + eps 1e-25)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    axes.flat[0].legend(fontsize=7, loc="center right")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("a + b mod 47, 1-layer transformer, 70% training data, no weight decay (losses in float64 unless "
                 "marked)", fontsize=11)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/repro_numerical_stability"), help="sweep folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    preset = mg.presets.get(PRESET)
    res = {"preset": PRESET, "grid": GRID, "grid_float32": GRID_FLOAT32,
           "settings": {"task": {**preset.task, "train_frac": 0.7}, "model": preset.model,
                        "train": preset.train.replace(weight_decay=0.0, steps=STEPS, eval_every=EVAL_EVERY,
                                                      checkpoint_every=CKPT_EVERY).to_dict()},
           "notes": ["the first sweep computes every loss in float64 (mg.train's default): softmax_collapse (float32) "
                     "of its runs is a diagnostic of logit scale, softmax_collapse_float64 is what would zero its "
                     "gradients; its AdamW eps is torch's 1e-8",
                     "the second sweep trains with TrainConfig(loss_dtype='float32'), the paper's precision, with "
                     "adam_eps 1e-8 and 1e-25 (Prieto et al. use 1e-25 to 1e-30 in some runs); its NLM alignment is "
                     "the gradient of the float32 loss",
                     "test_acc thresholds are read from history.jsonl (every 50 steps); SC and NLM from checkpoints "
                     "(every 100 steps)"]}
    res["sweep"] = sweep(args.out, GRID)
    res["float32"] = sweep(args.out / "float32", GRID_FLOAT32)
    ce = mg.Run(args.out / res["sweep"]["variants"]["cross-entropy"]["run"])
    res["costs"] = costs(ce)
    res["total_seconds"] = time.perf_counter() - t0
    out = HERE / "results" / "repro_numerical_stability.json"
    out.write_text(json.dumps(to_jsonable(res), indent=1, allow_nan=False) + "\n")  # NaN -> null
    _figure(res, HERE.parent / "docs" / "img" / "numerical_stability.png")
    for name, v in {**res["sweep"]["variants"], **res["float32"]["variants"]}.items():
        f = v["final"]
        print(f"{name:48s} train {f['train_acc']:.3f} test {f['test_acc']:.3f} (0.95 at {v['step_test_acc_0.95']}) "
              f"SC32 {f['softmax_collapse']:.3f} SC64 {f['softmax_collapse_float64']:.3f} NLM {f['nlm_alignment']:.3f}")
    print("costs (x one forward over the training split):",
          {k: round(v, 2) for k, v in res["costs"]["ratio_to_forward_train"].items()})
    c = res["costs"]
    print(f"progress: the stability columns add {c['progress_added_seconds'] * 1e3:.1f} ms per checkpoint "
          f"({100 * c['progress_added_share']:.0f}% of {c['seconds']['progress_per_checkpoint'] * 1e3:.0f} ms)")
    print(f"total {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
