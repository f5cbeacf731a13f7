"""Training-step overhead: mechgrok.train vs a bare PyTorch loop on the same model and data.

Both run full-batch AdamW on the demo preset's model (1-layer transformer, p=59) and on the
doshi-mlp preset's MLP (p=97, width 500), torch.set_num_threads(1), in one process, alternating
trials; we report the median seconds per step and the ratio mechgrok / bare.

mechgrok.train includes what a run needs: evaluation on all examples every `eval_every` steps,
checkpoints every `checkpoint_every` steps, history.jsonl, the progress bar (off here). The bare
loop computes `model(x)[:, -1]` and a float64 cross-entropy (the same loss) and nothing else.

    python benchmarks/bench_train.py [--steps 300] [--trials 3]
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
from mechgrok import losses


def bare_loop(model, task, cfg: mg.TrainConfig) -> float:
    x, y = task.inputs[task.train], task.labels[task.train]
    fn = losses.loss_fn(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    model.train()
    t = time.perf_counter()
    for _ in range(cfg.steps):
        out = model(x)
        loss = fn(out[:, -1] if out.ndim == 3 else out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / cfg.steps


def mechgrok_loop(model, task, cfg: mg.TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        mg.train(model, task, cfg, out=Path(d) / "run", progress=False)
        return (time.perf_counter() - t) / cfg.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for preset in ("demo", "doshi-mlp"):
        task, _, cfg = mg.presets.build(preset)
        cfg = cfg.replace(steps=args.steps)
        times: dict[str, list[float]] = {"bare": [], "mechgrok": []}
        for _ in range(args.trials):
            for name, fn in (("bare", bare_loop), ("mechgrok", mechgrok_loop)):
                model = mg.presets.build(preset)[1]
                times[name].append(fn(model, task, cfg))
        bare, mech = statistics.median(times["bare"]), statistics.median(times["mechgrok"])
        rows.append({"preset": preset, "model": mg.presets.get(preset).model["kind"],
                     "n_train": int(task.train.sum()), "bare_ms": 1e3 * bare, "mechgrok_ms": 1e3 * mech,
                     "ratio": mech / bare, "eval_every": cfg.eval_every, "checkpoint_every": cfg.checkpoint_every})
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}, " \
              f"{platform.processor() or platform.platform()}"
    lines = [f"Training step, median of {args.trials} trials x {args.steps} steps ({machine})", "",
             "| preset | model | n_train | bare PyTorch ms/step | mechgrok ms/step | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['model']} | {r['n_train']} | {r['bare_ms']:.2f} | {r['mechgrok_ms']:.2f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.md").write_text(text + "\n")
    (out / "bench_train.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
