"""Local complexity over grokking (Humayun, Balestriero and Baraniuk 2024), side by side (docs/reproductions.md).

The paper's claim: during training, linear regions first accumulate around the training points (local
complexity, LC, rises), and late in training, around grokking, they migrate away from the data (LC at
training and test points falls) and concentrate near the decision boundary.

1. ``mg.train`` a ReLU ``HookedMLP`` (one-hot(a) ‖ one-hot(b) -> 256 ReLU neurons with biases -> logits)
   on a + b mod 47, half the pairs for training, AdamW lr 3e-3, weight decay 1.0, full batch: it
   memorizes in a few hundred steps and groks about 1,500 steps later.
2. On every checkpoint (every 200 steps, to step 12,000): ``local_complexity_over_training`` at 256 training points,
   256 test points and up to 256 decision-boundary points (``boundary_points``: bisection on segments
   between examples predicted differently), for radii 0.1, 0.3 and 1.0 (one-hot examples that differ
   in one operand lie √2 apart), P = 25 random orthonormal directions per point.
3. A control for the boundary points: the same segments at shuffled positions (``segment_control``).
4. The cost of ``local_complexity`` per checkpoint against one forward pass over the same points.

5. A deeper net, as the paper's MLPs are: ``nn.Sequential`` 2p -> 128 -> 128 -> p (ReLU), trained by a
   minimal full-batch AdamW loop (lr 3e-3, weight decay 2.0, 4,000 steps), LC per layer every 100 steps.

Writes ``benchmarks/results/repro_local_complexity.json`` and ``docs/img/local_complexity.png``.
About 4 minutes on a 2-core CPU::

    .venv/bin/python benchmarks/repro_local_complexity.py --out /tmp/repro_local_complexity
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import mechgrok as mg
from mechgrok._io import to_jsonable
from mechgrok.measures.local_complexity import (
    LC_SETS,
    boundary_points,
    local_complexity,
    local_complexity_over_training,
)

HERE = Path(__file__).resolve().parent
P, WIDTH, TRAIN_FRAC = 47, 256, 0.5
CONFIG = dict(steps=10000, lr=3e-3, weight_decay=1.0, eval_every=100, checkpoint_every=250)
# the deeper MLP (part 5): a plain nn.Sequential trained by a minimal full-batch AdamW loop
DEEP = dict(widths=(128, 128), steps=4000, lr=3e-3, weight_decay=2.0, betas=(0.9, 0.98), every=100, seed=0)
RADII = (0.1, 0.3, 1.0)
N_POINTS, N_BOUNDARY, N_DIRECTIONS = 256, 256, 25


def train(out: Path) -> tuple[mg.Run, float]:
    task = mg.tasks.modular_arithmetic(p=P, op="add", train_frac=TRAIN_FRAC, seed=0)
    model = mg.models.mlp(task, width=WIDTH, act="relu", bias=True, seed=0)
    t0 = time.perf_counter()
    run = mg.train(model, task, mg.TrainConfig(**CONFIG), out=out / "run", progress=False)
    return run, time.perf_counter() - t0


def _first(steps, values, at_least):
    return next((s for s, v in zip(steps, values) if v >= at_least), None)


def summarize(res, mem_step, grok_step) -> dict:
    """LC of each set at the landmarks of the run, and where LC at training points peaks."""
    steps = list(res.steps)
    at = {"init": 0, "memorized": mem_step, "peak_train_lc": steps[max(range(len(steps)),
                                                                       key=lambda i: res.mean["train"][i])],
          "grokked": grok_step, "end": steps[-1]}
    rows = {}
    for name, step in at.items():
        if step is None:
            continue
        i = steps.index(step)
        rows[name] = {"step": step, **{f"lc_{s}": res.mean[s][i] for s in LC_SETS},
                      "boundary_over_train": res.mean["boundary"][i] / res.mean["train"][i]
                      if res.mean["train"][i] else None,
                      "n_boundary": res.n_points["boundary"][i], "test_acc": res.test_acc[i]}
    return rows


def segment_control(run: mg.Run) -> dict:
    """LC on the same segments as the boundary points but at shuffled positions ``t`` (a control).

    Boundary points lie between two one-hot examples, off the data; at initialisation they already
    have a higher LC than the examples. The control keeps the pairs (those ``local_complexity_over_training``
    uses: ``boundary_points(n=N_BOUNDARY, seed=1)``) and the distribution of ``t`` but permutes ``t`` among
    the pairs, so its points lie on the boundary only by chance.
    """
    task = run.task()
    x = task.onehot()
    g = torch.Generator().manual_seed(3)
    out = {str(r): {"steps": [], "lc_boundary": [], "lc_control": [], "mean_t": []} for r in RADII}
    for step in run.steps():
        model = run.load_model(step)
        bp = boundary_points(model, x, n=N_BOUNDARY, seed=1)
        if not len(bp.points):
            continue
        a, b = x[bp.pairs[:, 0]], x[bp.pairs[:, 1]]  # [m, 2p] each
        t = bp.t[torch.randperm(len(bp.t), generator=g)][:, None]  # [m, 1]
        control = a + t * (b - a)
        for r in RADII:
            row = out[str(r)]
            row["steps"].append(step)
            row["lc_boundary"].append(local_complexity(model, bp.points, r, n_directions=N_DIRECTIONS, seed=2).mean())
            row["lc_control"].append(local_complexity(model, control, r, n_directions=N_DIRECTIONS, seed=2).mean())
            row["mean_t"].append(float(bp.t.mean()))
    return out


def deep(task) -> dict:
    """Part 5: a 2-hidden-layer ReLU MLP (nn.Sequential), LC per layer on its checkpoints (kept in memory)."""
    from torch import nn

    x, y = task.onehot(), task.labels  # [N, 2p], [N]
    torch.manual_seed(DEEP["seed"])
    layers, d = [], x.shape[1]
    for w in DEEP["widths"]:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    net = nn.Sequential(*layers, nn.Linear(d, task.d_vocab_out))
    opt = torch.optim.AdamW(net.parameters(), lr=DEEP["lr"], weight_decay=DEEP["weight_decay"], betas=DEEP["betas"])
    g = torch.Generator().manual_seed(0)
    idx = {s: m.nonzero().squeeze(1)[torch.randperm(int(m.sum()), generator=g)[:N_POINTS]]
           for s, m in (("train", task.train), ("test", task.test))}
    rows = []
    t0 = time.perf_counter()
    lc_time = 0.0
    for step in range(DEEP["steps"] + 1):
        if step % DEEP["every"] == 0:
            t1 = time.perf_counter()
            with torch.no_grad():
                pred = net(x).argmax(-1)
            row = {"step": step, "train_acc": float((pred[task.train] == y[task.train]).double().mean()),
                   "test_acc": float((pred[task.test] == task.true_labels[task.test]).double().mean())}
            bp = boundary_points(net, x, n=N_BOUNDARY, seed=1)
            row["n_boundary"] = len(bp.points)
            for r in RADII:
                for name, pts, seed in (("train", x[idx["train"]], 0), ("test", x[idx["test"]], 1),
                                        ("boundary", bp.points, 2)):
                    lc = local_complexity(net, pts, r, n_directions=N_DIRECTIONS, seed=seed)
                    row[f"lc_{name}@{r}"] = lc.mean()
                    row[f"lc_{name}_per_layer@{r}"] = list(lc.mean_per_layer())
            rows.append(row)
            lc_time += time.perf_counter() - t1
        if step == DEEP["steps"]:
            break
        net.train()
        loss = nn.functional.cross_entropy(net(x[task.train]).double(), y[task.train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"setting": {**DEEP, "widths": list(DEEP["widths"]), "model": "nn.Sequential 2p -> 128 ReLU -> 128 ReLU "
                        "-> p, PyTorch default init, float64 cross-entropy"},
            "rows": rows, "layers": list(lc.layers), "seconds": time.perf_counter() - t0, "lc_seconds": lc_time}


def cost(run: mg.Run, radius: float, repeats: int = 5) -> dict:
    """Seconds of local_complexity and boundary_points against one forward pass over the same points."""
    task = run.task()
    x = task.onehot()[: 2 * N_POINTS]  # [512, 2p]
    model = run.load_model()
    model.eval()

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        fwd = best(lambda: model(x))
    lc = best(lambda: local_complexity(model, x, radius, n_directions=N_DIRECTIONS))
    bp = best(lambda: boundary_points(model, task.onehot(), n=N_BOUNDARY))
    return {"points": len(x), "n_directions": N_DIRECTIONS, "forward_s": fwd, "local_complexity_s": lc,
            "ratio_lc_to_forward": lc / fwd, "boundary_points_s (all p^2 examples + 256 pairs)": bp,
            "note": "best of 5; local_complexity runs 2P = 50 vertices per point plus one QR per point"}


def figure(results: dict, history: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    n = len(RADII) + 1
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.0))
    colors = {"train": "C0", "test": "C1", "boundary": "C3"}
    hs = [h["step"] for h in history]
    axes[0, 0].plot(hs, [h["train_acc"] for h in history], label="train acc")
    axes[0, 0].plot(hs, [h["test_acc"] for h in history], label="test acc")
    axes[0, 0].set_title(f"1 hidden layer (256), a + b mod {P}")
    for ax, r in zip(axes[0, 1:], RADII):
        res = results[str(r)]
        for s in LC_SETS:
            ax.plot(res["steps"], [float("nan") if v is None else v for v in res["mean"][s]], color=colors[s],
                    label=f"{s} points")
        ctrl = results["segment_control"][str(r)]
        ax.plot(ctrl["steps"], ctrl["lc_control"], color="C3", ls=":", label="segment control")
        for key, ls in (("memorized", ":"), ("grokked", "--")):
            if results["landmarks"][key] is not None:
                ax.axvline(results["landmarks"][key], color="gray", ls=ls, lw=1)
        ax.set_title(f"1 layer: radius {r}, P = {N_DIRECTIONS}")
        ax.set_ylabel("LC (neurons cut)")
    rows = results["deep"]["rows"]
    ds = [row["step"] for row in rows]
    axes[1, 0].plot(ds, [row["train_acc"] for row in rows], label="train acc")
    axes[1, 0].plot(ds, [row["test_acc"] for row in rows], label="test acc")
    axes[1, 0].set_title("2 hidden layers (128, 128)")
    for ax, r in zip(axes[1, 1:], RADII):
        for s in LC_SETS:
            ax.plot(ds, [row[f"lc_{s}@{r}"] for row in rows], color=colors[s], label=f"{s} (both layers)")
            ax.plot(ds, [row[f"lc_{s}_per_layer@{r}"][1] for row in rows], color=colors[s], ls="--", lw=0.8,
                    label=f"{s}, layer 2")
        ax.set_title(f"2 layers: radius {r}")
        ax.set_ylabel("LC (neurons cut)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle("Local complexity over training (Humayun et al. 2024); dotted: memorized, dashed: test acc >= 95%")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="working folder (the run is written here)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "repro_local_complexity.json")
    ap.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "img" / "local_complexity.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    run, train_s = train(args.out)
    history = run.history()
    mem = _first([h["step"] for h in history], [h["train_acc"] for h in history], 1.0 - 1e-9)
    grok = _first([h["step"] for h in history], [h["test_acc"] for h in history], 0.95)
    ckpts = run.steps()
    mem_ck = next((s for s in ckpts if mem is not None and s >= mem), None)
    grok_ck = next((s for s in ckpts if grok is not None and s >= grok), None)
    results: dict = {"landmarks": {"memorized": mem, "grokked": grok}}
    lc_s = {}
    for r in RADII:
        t0 = time.perf_counter()
        res = local_complexity_over_training(run, radius=r, n_directions=N_DIRECTIONS, n_points=N_POINTS,
                                             n_boundary=N_BOUNDARY, progress=False)
        lc_s[str(r)] = time.perf_counter() - t0
        results[str(r)] = {**res.to_dict(), "summary": summarize(res, mem_ck, grok_ck)}
    t0 = time.perf_counter()
    results["segment_control"] = segment_control(run)
    control_s = time.perf_counter() - t0
    results["deep"] = deep(run.task())
    out = {
        "paper": "Humayun, Balestriero and Baraniuk 2024, Deep Networks Always Grok and Here is Why (ICML)",
        "claim": "LC at training (and test) points rises, then falls late in training / around grokking, while "
                 "the regions concentrate near the decision boundary",
        "setting": {"task": f"a + b mod {P}, train_frac {TRAIN_FRAC}", "model": f"HookedMLP 2p -> {WIDTH} ReLU "
                    "(biases) -> p", "train": CONFIG, "radii": list(RADII), "n_directions": N_DIRECTIONS,
                    "n_points": N_POINTS, "n_boundary_pairs": N_BOUNDARY},
        "results": results,
        "cost": {**cost(run, RADII[1]), "train_s": train_s,
                 "over_training_s_per_radius": lc_s, "segment_control_s": control_s,
                 "per_checkpoint_s": {r: s / len(ckpts) for r, s in lc_s.items()}},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
        "total_s": time.perf_counter() - t_start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(to_jsonable(out), indent=1, allow_nan=False) + "\n")
    figure(out["results"], history, args.figure)
    for r in RADII:
        print(f"radius {r}:")
        for name, row in results[str(r)]["summary"].items():
            ctrl = results["segment_control"][str(r)]
            c = dict(zip(ctrl["steps"], ctrl["lc_control"])).get(row["step"], float("nan"))
            print(f"  {name:14s} step {row['step']:5d}  train {row['lc_train']:6.2f}  test {row['lc_test']:6.2f}  "
                  f"boundary {row['lc_boundary']:6.2f}  (n={row['n_boundary']})  control {c:6.2f}  "
                  f"test_acc {row['test_acc']:.3f}")
    print("deep:", *(f"step {row['step']} acc {row['train_acc']:.2f}/{row['test_acc']:.2f} "
                     + " ".join(f"r{r}: {row[f'lc_train@{r}']:.1f}/{row[f'lc_test@{r}']:.1f}/{row[f'lc_boundary@{r}']:.1f}"
                                for r in RADII)
                     for row in results["deep"]["rows"][::5]), sep="\n  ")
    print(json.dumps(to_jsonable(out["cost"]), indent=1))
    print(f"total {out['total_s']:.0f} s")


if __name__ == "__main__":
    main()
