"""SAE training throughput: mechgrok.sae.train vs sae-lens's trainer called directly vs a minimal
pure-torch TopK SAE loop, on the same activations.

Activations: the demo model shipped in circuits/demo (1-layer transformer, p=59), MLP neurons at
the answer position (3,481 × 256). SAE: TopK, 512 latents, k=16, batch 256, Adam lr 3e-3, the
same number of steps for all three, torch.set_num_threads(1), alternating trials in one process.

- mechgrok: ``mg.sae.train(model, task, hook, ...)`` end to end: capture, sae-lens training with
  the recording trainer, save in sae-lens's format, reload.
- sae-lens: ``SAETrainer(SAETrainerConfig(...), TopKTrainingSAE(...), batches).fit()`` on the
  activations already in memory (the same config mechgrok builds, no save).
- pure torch: encoder, top-k, decoder, MSE, Adam; no auxiliary loss, no dead-latent tracking, no
  normalisation: a lower bound on what any trainer can cost.

    python benchmarks/bench_sae.py [--steps 1000] [--trials 3]
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

HOOK = "blocks.0.mlp.hook_post"
D_SAE, K, BATCH, LR = 512, 16, 256, 3e-3


def run_mechgrok(model, task, x, steps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        mg.sae.train(model, task, HOOK, d_sae=D_SAE, k=K, steps=steps, batch_size=BATCH, lr=LR, seed=0,
                     progress=False, out=Path(d) / "sae")
        return time.perf_counter() - t


def run_sae_lens(model, task, x, steps: int) -> float:
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from mechgrok.sae.train import _batches, _quiet_progress

    t = time.perf_counter()
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=D_SAE, k=K,
                                                normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
                           lr_warm_up_steps=100, dead_feature_window=max(1, min(1000, steps // 5)),
                           feature_sampling_window=steps + 1, n_batches_for_norm_estimate=len(x) // BATCH,
                           device="cpu", logger=LoggingConfig(log_to_wandb=False))
    with _quiet_progress(False):  # no progress bar, as in the mechgrok run
        SAETrainer(cfg, sae, _batches(x, BATCH, torch.Generator().manual_seed(0))).fit()
    return time.perf_counter() - t


def run_torch(model, task, x, steps: int) -> float:
    t = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    d = x.shape[1]
    W_enc = torch.nn.Parameter(torch.randn(d, D_SAE, generator=g) / d**0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(D_SAE)), torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=LR)
    for i in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        batch = x[idx]
        pre = (batch - b_dec) @ W_enc + b_enc
        top = pre.topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        loss = ((acts @ W_dec + b_dec - batch) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent.parent / "circuits" / "demo"
    model = mg.models.load(root / "model")
    task = mg.presets.build("demo")[0]
    x = mg.sae.activations(model, task, HOOK)
    runners = {"pure torch": run_torch, "sae-lens": run_sae_lens, "mechgrok": run_mechgrok}
    run_sae_lens(model, task, x, 20)  # warm-up: imports and first-call costs
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.trials):
        for name, fn in runners.items():
            times[name].append(fn(model, task, x, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    machine = f"{platform.machine()}, 1 torch thread, torch {torch.__version__}"
    lines = [f"SAE training, TopK {D_SAE} latents k={K}, batch {BATCH}, {args.steps} steps on {x.shape[0]} × "
             f"{x.shape[1]} activations; median of {args.trials} ({machine})", "",
             "| trainer | seconds | ms/step | vs sae-lens | vs pure torch |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {1e3 * v / args.steps:.2f} | {v / med['sae-lens']:.2f}x | {v / med['pure torch']:.2f}x |"
              for k, v in med.items()]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sae.md").write_text(text + "\n")
    (out / "bench_sae.json").write_text(json.dumps({"machine": machine, "steps": args.steps, "times": times,
                                                    "median": med}, indent=2))


if __name__ == "__main__":
    main()
