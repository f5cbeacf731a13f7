"""Time ``mechgrok.capture`` against its anchors, in one run on the same models and inputs.

Anchors:
- in memory: a plain ``model(x)`` forward under ``torch.no_grad()`` over the same batches;
- on disk: that forward with raw ``register_forward_hook`` s writing each activation into a
  ``numpy.lib.format.open_memmap`` (what one would write by hand), flushed.

Models: the demo transformer (p=59, 1 layer, d_model 64, 4 heads, d_mlp 256; all 3481 inputs) and
the Doshi et al. MLP (p=97, width 500; all 9409 inputs). One torch thread; each time is the median
of several trials after warm-up, with the methods interleaved so that drift in the machine's load
hits them alike (random order per round).

    python benchmarks/bench_capture.py [--quick]

Writes ``benchmarks/results/bench_capture.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from numpy.lib.format import open_memmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import mechgrok as mg  # noqa: E402
from mechgrok.capture import BACKENDS, capture  # noqa: E402

log = logging.getLogger("bench_capture")
RESULTS = Path(__file__).resolve().parent / "results"
NOTES = """Why the ratios are what they are:

- One batch holding all N examples: the in-memory cache keeps the hooks' own output tensors (no
  copy; a version-counter check falls back to copies if the model edits one in place), so capture
  costs about one forward.
- Batches of 1024: each activation is copied into a fresh [N, ...] tensor. Filling fresh memory is
  bound by page faults (about 2-3 GB/s here), so the extra time grows with the captured megabytes,
  while the plain batched forward reuses the same small, warm buffers. Zero-copy is impossible here:
  the batches must end up in one contiguous tensor.
- nnsight adds a trace per batch (its worker thread and a handoff at every module) plus a
  one-example dry run to find the execution order and the wrapping of every module.
- Disk: capture appends each batch to its .npy file with write() and fsyncs it; the anchor writes
  through a memory map (a page fault per new page) and msyncs. Both pay for the page cache and the
  flush, so disk costs well above a forward on either path.
- This is a shared machine: medians move by about 10% between runs.
"""


def setups() -> list[tuple[str, torch.nn.Module, torch.Tensor, list[str]]]:
    """(name, model, inputs [N, n_ctx], hooks) for the two reference models."""
    t59 = mg.tasks.modular_arithmetic(p=59, op="add", train_frac=0.3, seed=0)
    t97 = mg.tasks.modular_arithmetic(p=97, op="add", train_frac=0.3, seed=0)
    tf = mg.models.transformer(t59, n_layers=1, d_model=64, n_heads=4, d_mlp=256).eval()
    mlp = mg.models.mlp(t97, width=500).eval()
    return [
        ("transformer p=59 (N=3481)", tf, t59.inputs,
         ["blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"]),
        ("MLP width 500 p=97 (N=9409)", mlp, t97.inputs, ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]),
    ]


def forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])


def raw_memmap(model: torch.nn.Module, x: torch.Tensor, hooks: list[str], shapes: dict, folder: Path,
               batch_size: int) -> None:
    """The hand-written disk anchor: forward hooks copying into pre-created .npy memory maps."""
    folder.mkdir()
    maps = {h: open_memmap(folder / f"{h}.npy", mode="w+", dtype="float32", shape=shapes[h]) for h in hooks}
    views = {h: torch.from_numpy(m) for h, m in maps.items()}
    start = [0]

    def hook(name: str) -> Callable:
        def fn(_module, _args, out):
            views[name][start[0]:start[0] + len(out)].copy_(out)
        return fn

    handles = [model.get_submodule(h).register_forward_hook(hook(h)) for h in hooks]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                start[0] = i
                model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    for m in maps.values():
        m.flush()


def time_interleaved(methods: dict[str, Callable[[], object]], trials: int, warmup: int,
                     cleanup: Callable[[], None]) -> dict[str, float]:
    """Median seconds per method. Every round runs each method once, in a seeded random order;
    a method's result is released (and its files deleted) outside the timed region."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    rng = random.Random(0)
    for r in range(warmup + trials):
        for name in rng.sample(list(methods), len(methods)):
            t0 = time.perf_counter()
            result = methods[name]()
            dt = time.perf_counter() - t0
            del result
            cleanup()
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(trials: int, warmup: int) -> list[dict]:
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench_capture."))
    counter = [0]

    def fresh() -> Path:
        counter[0] += 1
        return scratch / f"run{counter[0]}"

    def cleanup() -> None:
        for p in scratch.iterdir():
            shutil.rmtree(p)

    try:
        for name, model, x, hooks in setups():
            ref = capture(model, x, hooks, progress=False)
            shapes = {h: tuple(ref[h].shape) for h in hooks}
            del ref
            for bs in (len(x), 1024):
                methods: dict[str, Callable[[], object]] = {"forward": lambda: forward(model, x, bs)}
                for backend in BACKENDS:
                    methods[backend] = lambda b=backend: capture(model, x, hooks, backend=b, batch_size=bs,
                                                                 progress=False)
                methods["disk: raw memmap"] = lambda: raw_memmap(model, x, hooks, shapes, fresh(), bs)
                methods["disk: capture(out=)"] = lambda: capture(model, x, hooks, batch_size=bs, out=fresh(),
                                                                 progress=False)
                med = time_interleaved(methods, trials, warmup, cleanup)
                rows.append({"setup": name, "batch_size": bs, "hooks": hooks,
                             "mb": round(sum(4 * torch.Size(s).numel() for s in shapes.values()) / 2**20, 1),
                             "median_s": med})
                log.info("%s bs=%d: %s", name, bs, {k: f"{v * 1e3:.1f} ms" for k, v in med.items()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| setup | batch | method | median ms | × forward | × raw memmap |\n"
            "|---|---:|---|---:|---:|---:|")
    lines = [head]
    for r in rows:
        med, f, raw = r["median_s"], r["median_s"]["forward"], r["median_s"]["disk: raw memmap"]
        for method, t in med.items():
            vs_raw = f"{t / raw:.2f}" if method.startswith("disk") else ""
            lines.append(f"| {r['setup']} | {r['batch_size']} | {method} | {t * 1e3:.1f} | {t / f:.2f} | {vs_raw} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 trials instead of 15 (a smoke run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    trials, warmup = (3, 1) if args.quick else (15, 3)
    rows = bench(trials, warmup)
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, "
               f"torch {torch.__version__} with 1 thread, Python {platform.python_version()}")
    md = (f"# capture benchmark\n\nMachine: {machine}. Median of {trials} interleaved trials after {warmup} "
          f"warm-up round(s){' (--quick)' if args.quick else ''}. Captured activations per setup: "
          + ", ".join(f"{r['setup']}: {r['mb']} MB" for r in rows[::2]) + ".\n\n" + table(rows) + "\n\n"
          + NOTES)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_capture.md").write_text(md)
    (RESULTS / "bench_capture.json").write_text(json.dumps(
        {"machine": machine, "trials": trials, "warmup": warmup, "rows": rows}, indent=2))
    log.info("\n%s", md)


if __name__ == "__main__":
    main()
