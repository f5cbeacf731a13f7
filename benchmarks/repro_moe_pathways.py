"""MoE routing pathways track grokking without test data? (Li, Fan and Zhou 2025, arXiv 2506.21551;
docs/reproductions.md).

1. Train a small mixture-of-experts transformer (``mg.models.transformer(task, num_experts=4,
   experts_per_token=1, normalization="LN")``, 2 layers, d_model 32, experts of width 64) on a + b
   mod 47 with half the pairs for training, full-batch AdamW lr 3e-3, weight decay 1.0, 2,200 steps,
   a checkpoint every 100 steps. It memorizes by step 200 and groks around step 1,300. (Settings
   tried first, without LayerNorm, with top-2 routing, other learning rates or Adam's beta2 = 0.999,
   either did not grok within 4,000 steps or were less stable; every MoE run tried had loss spikes,
   this one too, at step ~1,800: docs/reproductions.md.)
2. On every checkpoint, ``mg.measures.pathways_over_training`` on 512 *training* examples: the mean
   pathway edit distance over 2,000 random pairs, over 2,000 same-answer pairs and over the random
   pairs with each (layer, position) slot shuffled across examples (a usage-only control), the mean pathway
   consistency (MoE-output and router embeddings), and the expert-usage entropy; the same at the
   answer position alone, and on 512 *test* examples as a reference.
3. Pearson and Spearman correlation of each metric with test accuracy (from ``history.jsonl``) over
   all checkpoints and over the checkpoints whose training set is fitted (train accuracy >= 0.999:
   the paper's regime, loss converged while test accuracy still moves); as controls, with train
   accuracy and with the step itself (a monotone drift correlates with any monotone accuracy curve).
4. The cost of the metrics on one checkpoint against one forward pass over the same examples.

Writes ``benchmarks/results/repro_moe_pathways.json`` and ``docs/img/moe_pathways.png``.
About 5 minutes on a 2-core CPU (the run is reused from ``--out`` when it is complete)::

    .venv/bin/python benchmarks/repro_moe_pathways.py --out /tmp/repro_moe_pathways
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import mechgrok as mg
from mechgrok._io import to_jsonable
from mechgrok.measures.pathways import (PATHWAY_METRICS, _correlations, expert_pathways, pathway_consistency,
                                        pathway_distance, pathways_over_training, usage_entropy)
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, first_step
from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
TASK = dict(p=47, op="add", train_frac=0.5, seed=0)
MODEL = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, normalization="LN", num_experts=4, experts_per_token=1,
             seed=0)
TRAIN = dict(steps=2200, lr=3e-3, weight_decay=1.0, eval_every=100, checkpoint_every=100)
N_EXAMPLES, N_PAIRS = 512, 2000
FITTED_ACC = 0.999  # train accuracy of a checkpoint whose training set counts as fitted


def train(out: Path) -> mg.Run:
    """The MoE run (trained again unless ``out`` holds a complete one with these settings)."""
    cfg = mg.TrainConfig(**TRAIN)
    if (out / "config.json").exists():
        run = mg.Run(out)
        saved = run.config
        if (run.steps() and run.steps()[-1] == cfg.steps and all(saved["task"].get(k) == v for k, v in TASK.items())
                and all(saved["model"]["kwargs"].get(k) == v for k, v in MODEL.items())
                and all(saved["train"].get(k) == v for k, v in TRAIN.items())):
            return run
    task = mg.tasks.modular_arithmetic(**TASK)
    model = mg.models.transformer(task, **MODEL)
    return mg.train(model, task, cfg, out=out, progress=False, overwrite=True)


def _fitted(res: dict) -> dict:
    """Correlations with test accuracy over the checkpoints whose training set is fitted (train accuracy
    >= FITTED_ACC): the paper's regime, training loss converged while test accuracy still moves."""
    keep = [i for i, a in enumerate(res["train_acc"]) if a is not None and a >= FITTED_ACC]
    return {m: _correlations([res[m][i] for i in keep], [res["test_acc"][i] for i in keep]) for m in PATHWAY_METRICS}


def measure(run: mg.Run) -> dict:
    hist = run.history()
    memorized, generalized = first_step(hist, "train_acc", MEMORIZED_ACC), first_step(hist, "test_acc", GENERALIZED_ACC)
    variants = {"train": dict(split="train"), "train, answer position": dict(split="train", position="last"),
                "test (reference)": dict(split="test")}
    out = {"memorized_step": memorized, "generalized_step": generalized, "variants": {}}
    for name, kw in variants.items():
        t = time.perf_counter()
        res = pathways_over_training(run, n_examples=N_EXAMPLES, n_pairs=N_PAIRS, progress=False, **kw).to_dict()
        res["seconds"] = time.perf_counter() - t
        res["correlations_when_fitted"] = _fitted(res)
        res["correlations_with_train_acc"] = {m: _correlations(res[m], res["train_acc"]) for m in PATHWAY_METRICS}
        res["correlations_with_step"] = {m: _correlations(res[m], res["steps"]) for m in PATHWAY_METRICS}
        out["variants"][name] = res
    tr = out["variants"]["train"]
    out["test_acc_vs_step"] = _correlations(tr["test_acc"], tr["steps"])
    out["n_checkpoints"], out["n_fitted_checkpoints"] = len(tr["steps"]), sum(
        a is not None and a >= FITTED_ACC for a in tr["train_acc"])
    return out



def costs(run: mg.Run) -> dict:
    """Seconds per checkpoint of the pathway metrics against one forward pass over the same examples."""
    task, step = run.task(), run.steps()[-1]
    model = run.load_model(step)
    model.eval()
    g = torch.Generator().manual_seed(0)
    idx = task.train.nonzero().squeeze(1)
    x = task.inputs[idx[torch.randperm(len(idx), generator=g)[:N_EXAMPLES]]]  # [512, 3]
    pairs = torch.randint(len(x), (N_PAIRS, 2), generator=g)

    def forward():
        with torch.no_grad():
            mg.models.final_logits(model, x)

    def metrics():
        pw = expert_pathways(model, x)
        seqs = pw.sequences()
        for _ in range(3):  # random, same-answer and shuffled-slot pairs cost the same
            pathway_distance(seqs, pairs)
        pathway_consistency(pw).nanmean()
        pathway_consistency(pw, embedding="router").nanmean()
        usage_entropy(pw)

    pw = expert_pathways(model, x)
    t = {"forward": median_seconds(forward), "expert_pathways": median_seconds(lambda: expert_pathways(model, x)),
         "edit_distance_2000_pairs": median_seconds(lambda: pathway_distance(pw.sequences(), pairs)),
         "all_metrics": median_seconds(metrics), "load_model": median_seconds(lambda: run.load_model(step)),
         "pathways_over_training_per_checkpoint": median_seconds(lambda: pathways_over_training(
             run, steps=[step], n_examples=N_EXAMPLES, n_pairs=N_PAIRS, progress=False), reps=3)}
    return {"seconds": t, "n_examples": len(x), "n_pairs": N_PAIRS, "pathway_length": int(pw.sequences().shape[1]),
            "ratio_to_forward": {k: v / t["forward"] for k, v in t.items()},
            "note": "forward = one no-grad forward over the 512 examples (final logits); all_metrics = expert_pathways "
                    "(one hooked forward) + three mean edit distances over 2,000 pairs + two consistencies + usage "
                    "entropy; "
                    "pathways_over_training per checkpoint adds loading the checkpoint and drawing the sample"}


def _figure(res: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, te = res["measures"]["variants"]["train"], res["measures"]["variants"]["test (reference)"]
    last = res["measures"]["variants"]["train, answer position"]
    hist = res["history"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    s = tr["steps"]
    panels = [
        ("pathway edit distance (of %d)" % tr["pathway_length"],
         {"train, random pairs": tr["edit_distance"], "train, same answer": tr["edit_distance_same_answer"],
          "train, shuffled slots (control)": tr["edit_distance_shuffled"], "test, random pairs": te["edit_distance"]}),
        ("pathway consistency", {"train, MoE output": tr["consistency"], "train, router": tr["consistency_router"],
                                 "train, MoE output, answer position": last["consistency"],
                                 "train, router, answer position": last["consistency_router"]}),
        ("expert-usage entropy (normalised)", {"train, all positions": tr["usage_entropy"],
                                               "train, answer position": last["usage_entropy"]}),
        ("accuracy (history)", None)]
    for ax, (title, series) in zip(axes, panels):
        if series is None:
            ax.plot(hist["step"], hist["train_acc"], label="train")
            ax.plot(hist["step"], hist["test_acc"], label="test")
        else:
            for label, y in series.items():
                ax.plot(s, [np.nan if v is None else v for v in y], label=label)
        for label, x, c in (("memorized", res["measures"]["memorized_step"], "0.35"),
                            ("generalized", res["measures"]["generalized_step"], "tab:purple")):
            if x is not None:
                ax.axvline(x, color=c, ls="--", lw=1, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"a + b mod {TASK['p']}, 2-layer MoE transformer with LayerNorm ({MODEL['num_experts']} experts, "
                 f"top-{MODEL['experts_per_token']}), {int(TASK['train_frac'] * 100)}% training data", fontsize=11)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def _c(c) -> str:
    if not c:
        return "—"
    f = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
    return f"Pearson {f(c['pearson'])}, Spearman {f(c['spearman'])} (n={c['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/repro_moe_pathways"), help="run folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run = train(args.out)
    train_s = time.perf_counter() - t0
    hist = run.history()
    res = {"paper": "Li, Fan and Zhou 2025, arXiv 2506.21551",
           "settings": {"task": TASK, "model": MODEL, "train": TRAIN, "n_examples": N_EXAMPLES, "n_pairs": N_PAIRS},
           "train_seconds": train_s,
           "history": {k: [r.get(k) for r in hist] for k in ("step", "train_acc", "test_acc", "train_loss")}}
    res["measures"] = measure(run)
    res["costs"] = costs(run)
    res["total_seconds"] = time.perf_counter() - t0
    file = HERE / "results" / "repro_moe_pathways.json"
    file.write_text(json.dumps(to_jsonable(res), indent=1, allow_nan=False) + "\n")
    _figure(res, HERE.parent / "docs" / "img" / "moe_pathways.png")
    m = res["measures"]
    print(f"train {train_s:.0f} s; memorized (train acc 1) at step {m['memorized_step']}, generalized (test acc "
          f">= 0.95) at {m['generalized_step']}; final train {hist[-1]['train_acc']:.3f} test {hist[-1]['test_acc']:.3f}")
    print(f"test acc vs step: {_c(m['test_acc_vs_step'])}")
    for name, v in m["variants"].items():
        print(f"[{name}]")
        for metric in PATHWAY_METRICS:
            print(f"  {metric:26s} {v[metric][0]:.3f} -> {v[metric][-1]:.3f}"
                  f" | vs test acc: {_c(v['correlations'][metric])}"
                  f" | fitted checkpoints: {_c(v['correlations_when_fitted'][metric])}"
                  f" | vs train acc: {_c(v['correlations_with_train_acc'][metric])}"
                  f" | vs step: {_c(v['correlations_with_step'][metric])}")
    c = res["costs"]
    print("costs (x one forward over the same examples):", {k: round(v, 2) for k, v in c["ratio_to_forward"].items()},
          f"(forward {c['seconds']['forward'] * 1e3:.1f} ms)")
    print(f"total {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
