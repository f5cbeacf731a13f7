"""Memorization in a small language model, end to end (docs/reproductions.md, "Memorized sequences").

1. Train the ``lm`` preset (or read ``--run`` if it is trained) and measure: k-extractability by
   repetition count against held-out planted sequences, generalization of the structured part,
   the memorization scores' AUROC per repetition count and their agreement.
2. The repeated-data sweep (Hernandez et al. 2022): the ``lm`` preset with planted sequences
   repeated 100 times, their number varied, so the repeated share of the training sequences goes
   from 0 to more than half; induction scores of each run; the figure
   ``docs/img/lm_repeated_data.png``.
3. Chang et al. 2024's INJ and DEL benchmarks of every localization method on the trained model.
4. The generalizing and the memorizing circuit of the trained model and their overlap.
5. SAE features of the trained model that fire on planted sequences.
6. Counterfactual memorization over 8 runs on seeded halves of the corpus (``subset_seed``).

Writes ``benchmarks/results/repro_lm_memorization.json``. About 35 minutes on a 2-core CPU (part 6 alone ~10)::

    .venv/bin/python benchmarks/repro_lm_memorization.py --out /tmp/repro_lm [--parts 1,2,3,4,5,6]
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
SEGMENTS = (8, 11, 15)  # segment lengths of the induction probes (the corpus' periods: 7 to 15)
N_INJ_ROWS, N_INJ_NEURONS = 4, 16  # INJ: sequences injected, into this many random neurons


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
    out["induction"] = {str(seg): mg.measures.induction_scores(model, bos=task.d_vocab - 1, segment=seg).to_dict()
                        for seg in SEGMENTS}
    return out


def part2(out_dir: Path) -> dict:
    grid = {"n_planted": list(N_PLANTED), "repeats": [[100]]}  # the lm preset otherwise (induction_varied)
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
        probes = {seg: mg.measures.induction_scores(model, bos=task.d_vocab - 1, segment=seg) for seg in SEGMENTS}
        last = run.history()[-1]
        rows.append({"n_planted": int(r["n_planted"]), "repeated_fraction": n_rep / per_epoch,
                     **{f"in_context_gain_{seg}": p.in_context_gain for seg, p in probes.items()},
                     **{f"loss_second_{seg}": p.loss_second for seg, p in probes.items()},
                     **{f"acc_second_{seg}": p.acc_second for seg, p in probes.items()},
                     **{f"prefix_matching_{seg}": p.strength for seg, p in probes.items()},
                     "test_loss": last["test_loss"], "test_exact": last["test_exact"],
                     "planted_r100_loss": last.get("planted_r100_loss")})
    _figure(rows, HERE.parent / "docs" / "img" / "lm_repeated_data.png")
    return {"sweep_seconds": seconds, "rows": rows}


def part3(run_dir: Path, seeds: tuple[int, ...] = (0, 1, 2), methods: tuple[str, ...] | None = None) -> dict:
    """Chang et al. 2024's benchmarks on the trained ``lm`` model (512 MLP neurons), for ``methods``
    (default: every localization method).

    INJ: 4 never-seen planted sequences are injected into 16 random neurons (3.1%) by fine-tuning those
    neurons only (500 Adam steps at lr 1e-2, a batch of 64 structured training sequences kept; all 4
    become k=8 extractable), then each method localizes them; recall@16 against random (16 / 512). DEL: each method localizes the 32
    ``planted_r100`` sequences (k=8 extractable) and its top 0.1 / 0.5 / 1 / 5% neurons are dropped."""
    mem = mg.memorization
    methods = tuple(mem.LOCALIZATION_METHODS) if methods is None else methods
    run = mg.Run(run_dir)
    model, task = run.load_model(), run.task()
    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    held = task.groups["held_out_planted"].nonzero().flatten()
    inj = {m: [] for m in methods}
    inj_meta, seconds = [], {m: 0.0 for m in methods}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        rows = held[torch.randperm(len(held), generator=g)[:N_INJ_ROWS]]
        flat = torch.randperm(n_neurons, generator=g)[:N_INJ_NEURONS]
        neurons = [(int(i) // model.cfg.d_mlp, int(i) % model.cfg.d_mlp) for i in flat]
        injected = mem.inject(model, task, rows, neurons, keep="structured_train", batch_size=64, steps=500, seed=seed)
        t = task.with_groups(_inj=torch.zeros(task.n, dtype=torch.bool).index_fill_(0, rows, True))
        rate = mem.extract(injected, t, 8, split="_inj").rate
        inj_meta.append({"seed": seed, "neurons": neurons, "extractable_after_injection": rate,
                         "structured_loss_change": float(mem.sequence_loss(injected, task, "test").mean()
                                                         - mem.sequence_loss(model, task, "test").mean())})
        for m in methods:
            t0 = time.perf_counter()
            loc = mem.localize(injected, task, rows, m)
            seconds[m] += time.perf_counter() - t0
            inj[m].append(mem.inj_recall(loc, neurons))
    out = {"inj": {"random_recall": mem.random_recall(N_INJ_NEURONS, n_neurons), "recall": inj, "injections": inj_meta,
                   "localize_seconds_mean": {m: v / len(seeds) for m, v in seconds.items()}}}
    fractions = (0.001, 0.005, 0.01, 0.05)
    dele = {}
    g = torch.Generator().manual_seed(0)
    rand = mem.Localization("random", torch.rand(model.cfg.n_layers, model.cfg.d_mlp, generator=g,
                                                  dtype=torch.float64), task.groups["planted_r100"].nonzero().flatten())
    for m in (*methods, "random"):
        loc = rand if m == "random" else mem.localize(model, task, "planted_r100", m)
        dele[m] = [p.to_dict() for p in mem.deletion_curve(model, task, loc, fractions, k=8)]
    out["del"] = {"fractions": list(fractions), "curves": dele,
                  "before_extractable": mem.extract(model, task, 8, split="planted_r100").rate}
    return out


def part4(run_dir: Path) -> dict:
    """The generalizing (held-out structured) and memorizing (planted_r100) circuits at neuron level
    (EAP-IG, smallest top-k with faithfulness >= 0.8) and their overlap beside 1,000 random circuits."""
    from mechgrok.memorization.circuits import lm_circuits

    run = mg.Run(run_dir)
    model, task = run.load_model(), run.task()
    t0 = time.perf_counter()
    r = lm_circuits(model, task, level="neuron")
    d = r.to_dict()
    for role in ("generalizing", "memorizing"):
        comps = d[role]["components"]
        d[role]["by_kind"] = {k: sum(c.startswith(k) for c in comps) for k in ("a0.", "a1.", "m0.", "m1.")}
        del d[role]["components"]
    d["seconds"] = time.perf_counter() - t0
    return d


def part5(run_dir: Path) -> dict:
    """An SAE (TopK, 512 features, k 16, 1,000 steps) on every position of blocks.1.mlp.hook_post, and
    how selectively its features fire on planted_r100 against structured and unseen sequences."""
    run = mg.Run(run_dir)
    model, task = run.load_model(), run.task()
    t0 = time.perf_counter()
    sae = mg.sae.train(model, task.inputs, "blocks.1.mlp.hook_post", position="all", architecture="topk", d_sae=512,
                       k=16, steps=1000, progress=False)
    train_s = time.perf_counter() - t0
    out = {"sae_seconds": train_s}
    for group in ("planted_r100", "planted_r10"):
        fs = mg.memorization.planted_features(model, sae, task, group)
        out[group] = {**fs.to_dict(8), "n_selective_0.1": len(fs.selective(0.1)),
                      "n_selective_0.05": len(fs.selective(0.05))}
    return out


def part6(out_dir: Path) -> dict:
    """Counterfactual memorization (Zhang et al. 2023) of the lm preset: 8 runs on seeded halves."""
    t0 = time.perf_counter()
    mg.sweep("lm", {"subset_seed": list(range(8))}, out=out_dir, workers=2, progress=False)
    seconds = time.perf_counter() - t0
    cf = mg.memorization.counterfactual(out_dir)
    return {"sweep_seconds": seconds, "by_group": cf.by_group(),
            "auroc_vs_structured": {g: cf.auroc(g) for _, g in mg.tasks.lm.planted_groups(
                {k: cf.group(k) for k in set(cf.kind) - {""}})}}


def _figure(rows: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["repeated_fraction"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for seg in SEGMENTS:
        axes[0].plot(x, [r[f"loss_second_{seg}"] for r in rows], "o-", label=f"random segment of {seg} tokens")
    axes[0].set_ylabel("loss on the repeated copy (nats)")
    axes[0].set_yscale("log")
    axes[0].set_title("in-context copying", fontsize=10)
    axes[1].set_title("held-out corpus sequences", fontsize=10)
    axes[1].plot(x, [r["test_loss"] for r in rows], "o-", color="C3", label="held-out structured loss")
    axes[1].set_ylabel("nats per target token")
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
    ap.add_argument("--parts", default="1,2,3,4,5,6", help="which parts to run, e.g. 1,3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    parts = set(args.parts.split(","))
    f = HERE / "results" / "repro_lm_memorization.json"
    result = json.loads(f.read_text()) if f.exists() else {}
    result["machine"] = "2-core x86 VM, CPU, torch threads 1"
    runs = {"1": (part1, "lm"), "2": (part2, "repeated"), "3": (part3, "lm"), "4": (part4, "lm"), "5": (part5, "lm"),
            "6": (part6, "cf")}  # part -> (function, its folder inside --out)
    for part in sorted(parts):
        fn, folder = runs[part]
        result[f"part{part}"] = fn(out / folder)
    f.write_text(json.dumps(result, indent=1, allow_nan=True))
    print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
