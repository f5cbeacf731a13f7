"""EK-FAC factor fitting and pairwise scoring: mechgrok against kronfluence, same model and data.

The model is the demo-size 1-layer transformer (p=59, d_model 64, 4 heads, d_mlp 256, seeded random
weights: the cost does not depend on training), rewritten with ``nn.Linear`` layers
(``mechgrok.influence.rewrite.as_linear``, same logits) so that kronfluence sees all 9 linear maps.
Both fit EK-FAC on the empirical Fisher with factors in float64 (model in float32) and score 100
test queries against ``n`` training examples, batch size 256, 1 torch thread. The ratio is
kronfluence's time over mechgrok's (> 1: mechgrok is faster), measured in the same run. Extra rows:
mechgrok on the HookedTransformer itself (hook points, positions without loss masked out), and how
well low-rank query batching keeps the rankings.

    python benchmarks/bench_influence.py [--sizes 500 1000 2000] [--trials 3]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import mechgrok as mg
from mechgrok.influence import EKFAC, ranking_agreement
from mechgrok.influence.rewrite import as_linear


def _median_time(fn, trials: int):
    times, out = [], None
    for _ in range(trials):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _kronfluence(model, task, train, query, batch_size, trials):
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model
    from kronfluence import Task as KTask

    class LastTokenCE(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return nn.functional.cross_entropy(model(x)[:, -1].double(), y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    f64 = torch.float64
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                         gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64,
                         eigendecomposition_dtype=f64)
    sa = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                        score_dtype=f64, query_gradient_svd_dtype=f64)
    trd = TensorDataset(task.inputs[train], task.labels[train])
    qd = TensorDataset(task.inputs[query], task.labels[query])
    with tempfile.TemporaryDirectory() as d:
        an = Analyzer("bench", prepare_model(copy.deepcopy(model), LastTokenCE()), LastTokenCE(), cpu=True,
                      disable_tqdm=True, output_dir=d, log_level=logging.WARNING)
        fit, _ = _median_time(lambda: an.fit_all_factors("f", trd, per_device_batch_size=batch_size, factor_args=fa,
                                                         overwrite_output_dir=True), trials)
        score, _ = _median_time(lambda: an.compute_pairwise_scores(
            "s", "f", qd, trd, per_device_query_batch_size=len(query), per_device_train_batch_size=batch_size,
            score_args=sa, overwrite_output_dir=True), trials)
        S = an.load_pairwise_scores("s")["all_modules"]
    return fit, score, S


def _mechgrok(model, task, train, query, batch_size, trials, **kw):
    def fit():
        ek = EKFAC(model, task, fisher="empirical", damping=0.1, batch_size=batch_size, progress=False, **kw)
        return ek.fit(train)

    t_fit, ek = _median_time(fit, trials)
    t_score, S = _median_time(lambda: ek.scores(query, train), trials)
    return t_fit, t_score, S, ek


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp.GradScaler
    task = mg.tasks.modular_arithmetic(p=59, op="add", train_frac=0.7, seed=0)
    hooked = mg.models.transformer(task, n_layers=1, d_model=64, n_heads=4, d_mlp=256, seed=0)
    linear = as_linear(hooked)
    train_all, test_all = task.train.nonzero().flatten(), task.test.nonzero().flatten()
    query = test_all[: args.queries]
    rows = []
    for n in args.sizes:
        train = train_all[:n]
        k_fit, k_score, K = _kronfluence(linear, task, train, query, args.batch_size, args.trials)
        collect, gc.collect = gc.collect, lambda *a: 0  # kronfluence's compute alone, without its gc.collect()s
        try:
            kn_fit, kn_score, _ = _kronfluence(linear, task, train, query, args.batch_size, args.trials)
        finally:
            gc.collect = collect
        m_fit, m_score, S, _ = _mechgrok(linear, task, train, query, args.batch_size, args.trials)
        h_fit, h_score, _, ek = _mechgrok(hooked, task, train, query, args.batch_size, args.trials)
        low = {f"rank{r}": ranking_agreement(S_full := ek.scores(query, train), ek.scores(query, train, low_rank=r))
               ["spearman"] for r in (1, 4, 16)}
        rows.append({"n_train": n, "kronfluence_fit_s": k_fit, "kronfluence_score_s": k_score,
                     "mechgrok_fit_s": m_fit, "mechgrok_score_s": m_score,
                     "fit_ratio": k_fit / m_fit, "score_ratio": k_score / m_score,
                     "kronfluence_no_gc_fit_s": kn_fit, "kronfluence_no_gc_score_s": kn_score,
                     "fit_ratio_no_gc": kn_fit / m_fit, "score_ratio_no_gc": kn_score / m_score,
                     "max_rel_score_diff": float((S - K).abs().max() / K.abs().max()),
                     "hooked_fit_s": h_fit, "hooked_score_s": h_score,
                     "low_rank_spearman": low, "n_query": len(query), "n_params": sum(m.n_params for m in ek.maps)})
        del S_full
        print(rows[-1], flush=True)
    t = time.perf_counter()
    gc.collect()
    gc_s = time.perf_counter() - t
    load = os.getloadavg()[0]
    machine = (f"{platform.machine()} ({platform.processor() or 'cpu'}, {os.cpu_count()} cores), "
               f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, "
               f"python {platform.python_version()}; "
               f"shared VM, load average {load_start:.1f} at start and {load:.1f} at end "
               "(other jobs compete for the cores when it exceeds 1)")
    lines = [f"EK-FAC on the demo-size 1-layer transformer (p=59, d_model 64, 4 heads, d_mlp 256) rewritten with "
             f"nn.Linear layers; {args.queries} queries; empirical Fisher, float64 factors, batch {args.batch_size}; "
             f"median of {args.trials}; {machine}", "",
             "| n train | kronfluence fit s (no gc) | mechgrok fit s | fit ratio (no gc) | kronfluence score s (no gc) "
             "| mechgrok score s | score ratio (no gc) | max rel. score diff | mechgrok on HookedTransformer fit / "
             "score s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n_train']} | {r['kronfluence_fit_s']:.2f} ({r['kronfluence_no_gc_fit_s']:.2f}) | "
                     f"{r['mechgrok_fit_s']:.2f} | {r['fit_ratio']:.1f}x ({r['fit_ratio_no_gc']:.1f}x) | "
                     f"{r['kronfluence_score_s']:.2f} ({r['kronfluence_no_gc_score_s']:.2f}) | "
                     f"{r['mechgrok_score_s']:.2f} | {r['score_ratio']:.1f}x ({r['score_ratio_no_gc']:.1f}x) | "
                     f"{r['max_rel_score_diff']:.1e} | {r['hooked_fit_s']:.2f} / {r['hooked_score_s']:.2f} |")
    lines += ["", f"Ratio = kronfluence time / mechgrok time (> 1: mechgrok faster). kronfluence's own times include "
              f"a fixed overhead, mostly the `gc.collect()` calls it makes after every stage ({gc_s:.2f} s each in "
              "this process, which holds transformer-lens); the numbers in parentheses are kronfluence with "
              "`gc.collect` made a no-op, i.e. its computation alone. Low-rank query batching on the "
              "HookedTransformer, Spearman with the full scores over all pairs:", "",
              "| n train | rank 1 | rank 4 | rank 16 |", "|---:|---:|---:|---:|",
              *[f"| {r['n_train']} | {r['low_rank_spearman']['rank1']:.3f} | {r['low_rank_spearman']['rank4']:.3f} | "
                f"{r['low_rank_spearman']['rank16']:.3f} |" for r in rows]]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_influence.md").write_text(text + "\n")
    (out / "bench_influence.json").write_text(json.dumps({"machine": machine, "gc_collect_s": gc_s, "rows": rows},
                                                             indent=2))


if __name__ == "__main__":
    main()
