"""How well EAP and EAP-IG agree with exact patching on a trained 2-layer LayerNorm model.

The model: GPT-2-style (LayerNorm, GELU, biases, learned positions; d_model 32, 2 heads, d_mlp 64)
trained with ``mg.train`` on in-context copying (``mg.tasks.induction``, 24 tokens, 10 positions),
as in ``tests/test_induction.py``, once per seed. Prompts: 64 held-out sequences, each corrupted
by an unrelated held-out sequence; metric: logit difference between the clean and the corrupted
answer. For the node (6 components) and edge (46) levels: Spearman rank correlation of the scores
with exact patching's, and the overlap of the top-k sets by |score|.

    python benchmarks/bench_eap_agreement.py [--seeds 0 1 2]

Writes ``benchmarks/results/bench_eap_agreement.{json,md}``.
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
from mechgrok.circuits import Prompts, attribute, metrics

V, T = 24, 10
RESULTS = Path(__file__).resolve().parent / "results"


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def top_overlap(a: dict[str, float], b: dict[str, float], k: int) -> float:
    top = [set(sorted(s, key=lambda c: -abs(s[c]))[:k]) for s in (a, b)]
    return len(top[0] & top[1]) / k


def one_seed(seed: int, folder: Path) -> dict:
    task = mg.tasks.induction(d_vocab=V, n_ctx=T, n=12000, seed=seed)
    model = mg.models.transformer(task, n_layers=2, d_model=32, n_heads=2, d_mlp=64, act_fn="gelu",
                                  normalization="LN", seed=seed)
    cfg = mg.TrainConfig(steps=800, lr=3e-3, weight_decay=0.1, batch_size=256, warmup=50, eval_every=400,
                         checkpoint_every=800, seed=seed)
    mg.train(model, task, cfg, folder / f"seed{seed}", progress=False)
    test = torch.nonzero(task.test).flatten()
    y, yc = task.labels[test[:64]], task.labels[test[64:128]]
    p = Prompts(task.inputs[test[:64]], task.inputs[test[64:128]], correct=y,
                incorrect=torch.where(yc == y, (y + 1) % (V - 1), yc))
    out = {"test_acc": mg.evaluate(model, task)["test"]["acc"]}
    for level, ks in (("node", (2, 3)), ("edge", (5, 10, 20))):
        s = {m: attribute(model, p, metrics.logit_diff(), method=m, level=level, progress=False)
             for m in ("exact", "eap", "eap-ig")}
        names = list(s["exact"])
        for m in ("eap", "eap-ig"):
            row = {"spearman": spearman([s[m][c] for c in names], [s["exact"][c] for c in names])}
            row.update({f"top{k}": top_overlap(s[m], s["exact"], k) for k in ks})
            out[f"{level}/{m}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = {s: one_seed(s, Path(tmp)) for s in args.seeds}
    rows = sorted({k for r in per_seed.values() for k in r if "/" in k})
    summary = {k: {stat: [per_seed[s][k][stat] for s in args.seeds] for stat in per_seed[args.seeds[0]][k]}
               for k in rows}
    result = {"seeds": args.seeds, "per_seed": per_seed, "summary": summary, "seconds": time.perf_counter() - t0,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread",
              "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_eap_agreement.json").write_text(json.dumps(result, indent=2))
    lines = ["| level / method | " + " | ".join(next(iter(summary.values())).keys()) + " |", "|---|" + "---|" * 4]
    lines = []
    for k, stats in summary.items():
        cells = [f"{stat} {statistics.fmean(v):.2f} (min {min(v):.2f})" for stat, v in stats.items()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    accs = ", ".join(f"{per_seed[s]['test_acc']:.3f}" for s in args.seeds)
    md = (f"EAP / EAP-IG vs exact patching, induction GPT-2-style model, seeds {args.seeds} (test acc {accs}); "
          f"mean over seeds (min)\n\n" + "\n".join(lines) + "\n")
    (RESULTS / "bench_eap_agreement.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
