"""Memorization scoring throughput (sequences/s) against plain PyTorch loops, and localization
time per method.

Setup: the ``lm`` preset's model (2 layers, d_model 64, 4 heads, d_mlp 256, LayerNorm, n_ctx 32,
d_vocab 64) with its initial weights (timing does not depend on training), and 512 sequences of
the preset's corpus (the planted and held-out ones first). Anchors, each written here in plain
PyTorch and run side by side in one process:

- extraction (k = 8): a batched greedy-decoding loop, ``x = cat(x, model(x)[:, -1].argmax(-1))``
  for the 24 continuation tokens, against ``mg.memorization.extract``;
- sequence loss: one batched forward and a masked cross-entropy, against
  ``mg.memorization.sequence_loss``;
- ``mg.memorization.scores`` with each of its methods, in sequences/s (no anchor: the EK-FAC
  self-influence includes its fit on the corpus' training rows, its real cost).

Localization (``mg.memorization.localize``): seconds per method for the 32 ``planted_r100``
sequences against the other training rows, on the same model.

One torch thread; medians of several trials after warm-up, interleaved in a seeded random order.

    python benchmarks/bench_memorization.py [--quick]

Writes ``benchmarks/results/bench_memorization.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import mechgrok as mg  # noqa: E402
from mechgrok.tasks import IGNORE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_measures import time_interleaved  # noqa: E402  (one timing loop for every benchmark)

RESULTS = Path(__file__).resolve().parent / "results"
K = 8


def subset(task, n: int):
    """The first ``n`` rows of ``task``'s scoring order: held-out and planted first, then structured."""
    order = torch.cat([(task.metadata["kind"] > 0).nonzero().flatten(), (task.metadata["kind"] == 0).nonzero().flatten()])
    keep = torch.zeros(task.n, dtype=torch.bool)
    keep[order[:n]] = True
    return task.with_groups(bench=keep)


@torch.no_grad()
def plain_greedy(model, x: torch.Tensor, k: int, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        y = x[i:i + batch_size, :k]
        for _ in range(x.shape[1] - k):
            y = torch.cat([y, model(y)[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(y[:, k:])
    return torch.cat(out)


@torch.no_grad()
def plain_loss(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size]).double()
        t = y[i:i + batch_size]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t, ignore_index=IGNORE, reduction="none")
        out.append(nll.sum(-1) / (t != IGNORE).sum(-1))
    return torch.cat(out)


def bench(n: int, trials: int, warmup: int, localize: bool) -> dict:
    torch.set_num_threads(1)
    task, model, _ = mg.presets.build("lm")
    model.eval()
    t = subset(task, n)
    rows = t.mask("bench")
    x, y = t.inputs[rows], t.targets[rows]
    # the same answers first: the comparison is between two ways of computing one thing
    assert torch.equal(plain_greedy(model, x, K), mg.memorization.extract(model, t, K, split="bench").generated)
    assert torch.allclose(plain_loss(model, x, y), mg.memorization.sequence_loss(model, t, split="bench"), rtol=1e-5)
    sec = time_interleaved({
        "plain greedy loop": lambda: plain_greedy(model, x, K),
        "mg.memorization.extract": lambda: mg.memorization.extract(model, t, K, split="bench"),
        "plain masked loss": lambda: plain_loss(model, x, y),
        "mg.memorization.sequence_loss": lambda: mg.memorization.sequence_loss(model, t, split="bench"),
    }, trials, warmup)
    result = {"n_sequences": n, "k": K, "seconds": sec,
              "sequences_per_s": {k: n / v for k, v in sec.items()},
              "ratio_extract": sec["mg.memorization.extract"] / sec["plain greedy loop"],
              "ratio_loss": sec["mg.memorization.sequence_loss"] / sec["plain masked loss"]}
    scores = {}
    for method in mg.memorization.SCORE_METHODS:
        t0 = time.perf_counter()
        mg.memorization.scores(model, t, methods=[method], split="bench", k=K)
        scores[method] = time.perf_counter() - t0
    result["scores_seconds"] = scores
    result["scores_sequences_per_s"] = {m: n / s for m, s in scores.items()}
    if localize:
        times = {}
        for method in mg.memorization.LOCALIZATION_METHODS:
            t0 = time.perf_counter()
            mg.memorization.localize(model, task, "planted_r100", method)
            times[method] = time.perf_counter() - t0
        result["localize_seconds"] = times
    return result


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_memorization.json").write_text(json.dumps(result, indent=1))
    s = result["seconds"]
    lines = [f"# Memorization scoring ({result['n_sequences']} sequences of 32 tokens, k = {result['k']}; "
             f"{result['machine']})", "",
             "| computation | seconds | sequences/s | ratio to the plain loop |", "|---|---|---|---|"]
    for name, anchor in (("mg.memorization.extract", "plain greedy loop"),
                         ("mg.memorization.sequence_loss", "plain masked loss")):
        lines.append(f"| {anchor} | {s[anchor]:.3f} | {result['sequences_per_s'][anchor]:.0f} | 1 |")
        lines.append(f"| {name} | {s[name]:.3f} | {result['sequences_per_s'][name]:.0f} | {s[name] / s[anchor]:.2f} |")
    lines += ["", "| mg.memorization.scores method | seconds | sequences/s |", "|---|---|---|"]
    lines += [f"| {m} | {v:.2f} | {result['scores_sequences_per_s'][m]:.0f} |" for m, v in result["scores_seconds"].items()]
    if "localize_seconds" in result:
        lines += ["", "| localization method (32 planted_r100 sequences) | seconds |", "|---|---|"]
        lines += [f"| {m} | {v:.2f} |" for m, v in result["localize_seconds"].items()]
    (RESULTS / "bench_memorization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sequences and trials (a smoke run)")
    ap.add_argument("--no-localize", action="store_true")
    args = ap.parse_args()
    n, trials, warmup = (64, 2, 1) if args.quick else (512, 5, 1)
    result = bench(n, trials, warmup, localize=not args.no_localize)
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 1 thread".strip()
    write(result)


if __name__ == "__main__":
    main()
