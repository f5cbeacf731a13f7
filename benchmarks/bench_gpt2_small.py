"""mechgrok on a GPT-2-small-shaped random model: capture, EAP / EAP-IG and EK-FAC against their anchors.

The model: a seeded random Hugging Face ``GPT2LMHeadModel`` with GPT-2 small's blocks (12 layers,
d_model 768, 12 heads, d_mlp 3072, LayerNorm, GELU, biases, learned positions, context 16) and a
**vocabulary of 4,096** instead of 50,257 (``--vocab``): the unembedding then costs 3.1M instead of
38.6M parameters, so each forward over the 32 prompts costs ~1.1x the blocks' own work rather than
~1.5x, which keeps the whole run (about 25 forward-equivalents per EAP-IG call on each side, two EK-FAC
fits per library) feasible with one CPU thread. It is converted to a HookedTransformer by
``mg.models.from_pretrained`` (offline); the HF model itself is used where a user would use it
(capture by module path, EK-FAC on its ``Conv1D`` layers).

Data: 32 prompts of 16 tokens: 8 random tokens repeated twice (an induction-style prompt); the
corrupted prompt is another 8 random tokens repeated; answers at the last position (correct: the
clean prompt's first token, incorrect: the corrupted prompt's).

Parts, each measured side by side in one process (the anchors in the same run):

a. capture of 3 hooks (``blocks.0.hook_resid_post``, ``blocks.5.mlp.hook_post``,
   ``blocks.11.hook_resid_post``) with each backend, vs a plain ``model(x)`` under ``no_grad`` and
   vs ``model.run_with_cache(x, names_filter=hooks)`` under ``no_grad``; and on the HF model, the
   same three places by module path (``transformer.h.0``, ``transformer.h.5.mlp.act``,
   ``transformer.h.11``) vs its plain forward.
b. ``mg.circuits.attribute(method="eap" | "eap-ig", level="edge")`` (logit difference, EAP-IG with
   5 steps) vs auto-circuit's ``mask_gradient_prune_scores`` (``mask_val=0`` / 4 integrated-gradient
   samples = 5 points) on the same weights and prompts; auto-circuit runs in its own venv
   (``benchmarks/README_autocircuit.md``) via ``benchmarks/_autocircuit_side.py``. Edge scores are
   compared per edge name (Spearman, max relative difference, top-10% overlap). The model is cut to
   ``--circuit-layers`` (default 4; 3,135 edges) because at 12 layers (32,491 edges) mechgrok's
   EAP-IG needs about 24 GB; the peak memory of each (library, method) is measured in a fresh
   process at ``--memory-layers`` (default 2 and 4 layers) to show how it grows.
c. EK-FAC fit + pairwise scores (empirical Fisher, damping 0.1 x mean eigenvalue per map, float64
   factors, the next-token loss summed over the 16 positions: ``mechgrok.influence.Sequences``) vs
   kronfluence on the model rewritten with ``nn.Linear`` layers (``conv1d_as_linear``, same
   weights); mechgrok also on the HF model's own ``Conv1D`` layers. Maps: see ``--ekfac-maps``.

Timing: one torch thread everywhere (auto-circuit's process too); the compared methods of a part run
once per round in a seeded random order, so drift in the machine's load hits them alike; medians
over the rounds after warm-up rounds (EK-FAC: no warm-up, each round fits from scratch).

    python benchmarks/bench_gpt2_small.py [--quick] [--layers 12] [--vocab 4096] [--parts capture circuits influence]

Writes ``benchmarks/results/bench_gpt2_small.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import mechgrok as mg  # noqa: E402
from mechgrok.capture import BACKENDS  # noqa: E402
from mechgrok.circuits.graph import graph as build_graph  # noqa: E402
from mechgrok.influence import EKFAC, Sequences, conv1d_as_linear, ranking_agreement  # noqa: E402

log = logging.getLogger("bench_gpt2_small")
RESULTS = Path(__file__).resolve().parent / "results"
SIDE = Path(__file__).resolve().parent / "_autocircuit_side.py"
N_PROMPTS, N_CTX, IG_STEPS = 32, 16, 5
KRON, MG_LIN, MG_HF = "kronfluence (nn.Linear rewrite)", "mechgrok (nn.Linear rewrite)", "mechgrok (HF Conv1D)"
LOAD_AT_START = os.getloadavg()[0]
LOAD: list[float] = []  # 1-minute load average after every timed job
# the TL config fields auto-circuit's side rebuilds the model from (transformer-lens 2.x accepts them all)
TL_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn",
             "normalization_type", "positional_embedding_type", "eps", "attn_only", "parallel_attn_mlp",
             "use_attn_scale", "scale_attn_by_inverse_layer_idx")


# ------------------------------------------------------------------------------ model and data
def build(n_layers: int, vocab: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(HF GPT2LMHeadModel, its HookedTransformer conversion), both in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layers, n_embd=768, n_head=12, n_inner=3072, n_positions=N_CTX, vocab_size=vocab,
                     bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(cfg).eval()
    return hf, mg.models.from_pretrained(hf)


def prompts(vocab: int, seed: int = 0) -> mg.circuits.Prompts:
    g = torch.Generator().manual_seed(seed)
    half = N_CTX // 2
    r = torch.randint(vocab, (N_PROMPTS, half), generator=g)
    rc = torch.randint(vocab, (N_PROMPTS, half), generator=g)
    rc[:, 0] = torch.where(rc[:, 0] == r[:, 0], (r[:, 0] + 1) % vocab, rc[:, 0])  # incorrect != correct
    return mg.circuits.Prompts(r.repeat(1, 2), rc.repeat(1, 2), correct=r[:, 0], incorrect=rc[:, 0])


# ------------------------------------------------------------------------------ timing
def interleaved(jobs: dict[str, Callable[[], object]], trials: int, warmup: int, seed: int = 0,
                label: str = "") -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds per trial of every job and each job's result of round 0. Every round runs each job
    once in a seeded random order. A job returning ``("time", seconds, result)`` reports its own time
    (the auto-circuit worker's in-process time); otherwise the wall clock around the call counts."""
    times: dict[str, list[float]] = {k: [] for k in jobs}
    first: dict[str, object] = {}
    rng = random.Random(seed)
    for rnd in range(warmup + trials):
        for name in rng.sample(list(jobs), len(jobs)):
            gc.collect()
            t0 = time.perf_counter()
            out = jobs[name]()
            dt = time.perf_counter() - t0
            if isinstance(out, tuple) and len(out) == 3 and out[0] == "time":
                dt, out = out[1], out[2]
            if rnd == 0:
                first[name] = out
            if rnd >= warmup:
                times[name].append(dt)
            del out
            LOAD.append(os.getloadavg()[0])
        log.info("%s round %d/%d: %s", label, rnd + 1, warmup + trials,
                 ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v and rnd >= warmup))
    return times, first


def med(ts: list[float]) -> float:
    return statistics.median(ts)


# ------------------------------------------------------------------------------ a. capture
def bench_capture(hf: nn.Module, model: nn.Module, x: torch.Tensor, trials: int, warmup: int) -> list[dict]:
    n = model.cfg.n_layers
    hooks = ["blocks.0.hook_resid_post", f"blocks.{n // 2 - 1 if n > 2 else 0}.mlp.hook_post",
             f"blocks.{n - 1}.hook_resid_post"]
    hf_hooks = ["transformer.h.0", f"transformer.h.{n // 2 - 1 if n > 2 else 0}.mlp.act", f"transformer.h.{n - 1}"]

    def forward(m):
        with torch.no_grad():
            return m(x)

    def rwc():
        with torch.no_grad():
            return model.run_with_cache(x, names_filter=hooks)

    tl_jobs = {"forward": lambda: forward(model), "run_with_cache(names_filter)": rwc,
               **{f"capture {b}": (lambda b=b: mg.capture(model, x, hooks, backend=b, progress=False))
                  for b in BACKENDS}}
    hf_jobs = {"forward": lambda: forward(hf),
               **{f"capture {b}": (lambda b=b: mg.capture(hf, x, hf_hooks, backend=b, progress=False))
                  for b in ("torch", "nnsight")}}
    # the caches agree with run_with_cache (TL) and between the HF and TL models
    cache = mg.capture(model, x, hooks, progress=False)
    hf_cache = mg.capture(hf, x, hf_hooks, backend="torch", progress=False)
    with torch.no_grad():
        _, ref = model.run_with_cache(x, names_filter=hooks)
    check = {"capture vs run_with_cache max |diff|": max(float((cache[h] - ref[h]).abs().max()) for h in hooks),
             "HF module paths vs TL hooks max |diff|": max(float((hf_cache[a] - cache[b]).abs().max())
                                                          for a, b in zip(hf_hooks, hooks))}
    del cache, hf_cache, ref
    rows = []
    for setup, jobs, hk in (("HookedTransformer", tl_jobs, hooks), ("HF GPT2LMHeadModel", hf_jobs, hf_hooks)):
        times, _ = interleaved(jobs, trials, warmup, label=f"capture {setup}")
        f = med(times["forward"])
        rwc_t = med(times["run_with_cache(names_filter)"]) if "run_with_cache(names_filter)" in times else None
        for k, ts in times.items():
            rows.append({"setup": setup, "method": k, "hooks": hk, "median_s": med(ts), "trials_s": ts,
                         "x_forward": med(ts) / f, "x_run_with_cache": med(ts) / rwc_t if rwc_t else None})
    return rows, check


# ------------------------------------------------------------------------------ b. circuits
class AutoCircuit:
    """The auto-circuit worker (``_autocircuit_side.py`` in its own venv; JSON lines on stdin / stdout,
    replies prefixed ``@@``), as ``bench_circuits.py`` runs it."""

    def __init__(self, python: str, stderr):
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([python, str(SIDE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr, text=True, env=env, cwd=str(ROOT))

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"auto-circuit worker exited (rc={self.proc.poll()}); see its log")
            if line.startswith("@@"):
                reply = json.loads(line[2:])
                if not reply.pop("ok"):
                    raise RuntimeError(f"auto-circuit worker: {reply.get('traceback') or reply.get('error')}")
                return reply

    def close(self) -> None:
        try:
            self.call(cmd="quit")
        finally:
            self.proc.wait(timeout=60)


def export(model: nn.Module, p: mg.circuits.Prompts, folder: Path) -> None:
    """Weights, transformer-lens config and prompts for the auto-circuit side."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({k: getattr(model.cfg, k) for k in TL_FIELDS}))
    save_file(mg.models.state_tensors(model), str(folder / "model.safetensors"))
    save_file({"clean": p.clean.contiguous(), "corrupted": p.corrupted.contiguous(), "answers": p.correct.contiguous(),
               "wrong": p.incorrect.contiguous()}, str(folder / "inputs.safetensors"))


def edge_agreement(mine: dict[str, float], theirs: dict[str, float]) -> dict:
    """Spearman, max relative difference and top-10% overlap of two edge-score tables; auto-circuit's
    scores are gradients of -logit_diff w.r.t. masks (1 = corrupted), so they are negated first."""
    if set(mine) != set(theirs):
        return {"error": f"edge names differ: only mechgrok {sorted(set(mine) - set(theirs))[:5]}, "
                         f"only auto-circuit {sorted(set(theirs) - set(mine))[:5]}"}
    names = list(mine)
    a = torch.tensor([mine[k] for k in names], dtype=torch.float64)
    b = -torch.tensor([theirs[k] for k in names], dtype=torch.float64)
    k = max(1, len(names) // 10)
    top_a, top_b = set(a.abs().topk(k).indices.tolist()), set(b.abs().topk(k).indices.tolist())
    return {"n_edges": len(names), "spearman": float(spearmanr(a, b).statistic),
            "spearman_abs": float(spearmanr(a.abs(), b.abs()).statistic),
            "max_rel_diff": float((a - b).abs().max() / b.abs().max()),
            "max_abs_score": float(a.abs().max()), f"top{k}_overlap": len(top_a & top_b) / k}


def bench_circuits(model: nn.Module, p: mg.circuits.Prompts, ac_python: str, trials: int, warmup: int,
                   workdir: Path) -> tuple[list[dict], dict]:
    metric = mg.circuits.metrics.logit_diff()
    n_edges = len(build_graph(model, "edge").edges)
    jobs: dict[str, Callable] = {
        "mechgrok eap": lambda: mg.circuits.attribute(model, p, metric, method="eap", level="edge", progress=False),
        "mechgrok eap-ig": lambda: mg.circuits.attribute(model, p, metric, method="eap-ig", level="edge",
                                                         steps=IG_STEPS, progress=False)}
    info: dict = {"n_edges": n_edges}
    ac = None
    if Path(ac_python).exists():
        ac_log = open(workdir / "autocircuit.log", "w")
        ac = AutoCircuit(ac_python, ac_log)
        info["autocircuit_versions"] = ac.call(cmd="versions")
        export(model, p, workdir / "gpt2")
        t0 = time.perf_counter()
        loaded = ac.call(cmd="load", name="gpt2", dir=str(workdir / "gpt2"), forward_reps=3)
        info["autocircuit_load_s"] = time.perf_counter() - t0
        if loaded["n_edges"] != n_edges:
            raise RuntimeError(f"auto-circuit has {loaded['n_edges']} edges, mechgrok {n_edges}")
        theirs = load_file(str(workdir / "gpt2" / loaded["clean_logits"]))["logits"]
        with torch.no_grad():
            mine = model(p.clean)[:, -1]
            with mg.models.patchable(model):  # what mechgrok's patching forward costs, for comparison
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    model(p.clean)
                    ts.append(time.perf_counter() - t0)
        info["mechgrok_patchable_forward_ms"] = med(ts[1:]) * 1e3
        info.update({"clean_logits_max_abs_diff": float((theirs - mine).abs().max()),
                     "patchable_model_setup_s": loaded["setup_s"], "autocircuit_forward_ms": loaded["forward_ms"]})
        log.info("auto-circuit side: %s", info)
        counter = [0]

        def ac_job(method: str):
            counter[0] += 1
            path = workdir / f"ac_{method}_{counter[0]}.json"
            r = ac.call(cmd="run", name="gpt2", method=method, ig_samples=IG_STEPS - 1, scores=str(path))
            scores = json.loads(path.read_text())
            path.unlink()
            return ("time", r["time_s"], scores)

        jobs["auto-circuit eap"] = lambda: ac_job("eap")
        jobs["auto-circuit eap-ig"] = lambda: ac_job("eap-ig")
    else:
        info["autocircuit"] = f"not installed at {ac_python} (benchmarks/README_autocircuit.md): mechgrok side only"
        log.warning("%s", info["autocircuit"])
    try:
        times, first = interleaved(jobs, trials, warmup, label="circuits")
    finally:
        if ac:
            ac.close()
            ac_log.close()
    rows = []
    for method in ("eap", "eap-ig"):
        row = {"method": method, "n_edges": n_edges, "mechgrok_s": med(times[f"mechgrok {method}"]),
               "mechgrok_trials_s": times[f"mechgrok {method}"]}
        if ac:
            row.update({"autocircuit_s": med(times[f"auto-circuit {method}"]),
                        "autocircuit_trials_s": times[f"auto-circuit {method}"]})
            row["ratio_mg_over_ac"] = row["mechgrok_s"] / row["autocircuit_s"]
            row["agreement"] = edge_agreement(first[f"mechgrok {method}"], first[f"auto-circuit {method}"])
        rows.append(row)
    if "mechgrok eap" in first and "mechgrok eap-ig" in first:  # EAP vs EAP-IG within mechgrok
        a, b = first["mechgrok eap"], first["mechgrok eap-ig"]
        info["mechgrok_eap_vs_eapig_spearman"] = float(spearmanr([a[k] for k in a], [b[k] for k in a]).statistic)
    return rows, info


# ------------------------------------------------------------------------------ c. influence
def ekfac_modules(hf: nn.Module, which: str) -> list[str]:
    """Map names (the HF module paths) of ``--ekfac-maps``."""
    n = hf.config.n_layer
    if which == "attn-out":
        return [f"transformer.h.{i}.attn.c_proj" for i in range(n)]
    if which == "mlp-all":
        return [f"transformer.h.{i}.mlp.{k}" for i in range(n) for k in ("c_fc", "c_proj")]
    if which.startswith("mlp:"):
        layers = sorted({int(v) % n for v in which[4:].split(",")})
        return [f"transformer.h.{i}.mlp.{k}" for i in layers for k in ("c_fc", "c_proj")]
    raise ValueError(f"--ekfac-maps: 'attn-out', 'mlp-all' or 'mlp:0,5,11', got {which!r}")


def _kron_args():
    from kronfluence import FactorArguments, ScoreArguments

    f64 = torch.float64
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                         gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64,
                         eigendecomposition_dtype=f64)
    sa = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                        score_dtype=f64, query_gradient_svd_dtype=f64)
    return fa, sa


def bench_influence(hf: nn.Module, tokens: torch.Tensor, n_query: int, which: str, batch_size: int,
                    trials: int, workdir: Path) -> dict:
    from kronfluence import Analyzer, prepare_model
    from kronfluence import Task as KTask

    modules = ekfac_modules(hf, which)

    class LM(KTask):  # the next-token loss summed over positions, as mechgrok's Sequences
        def compute_train_loss(self, batch, model, sample=False):
            (x,) = batch
            z = model(x).logits[:, :-1]  # [b, T-1, V] predicts x[:, 1:]
            return nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]).double(), x[:, 1:].reshape(-1),
                                               reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

    from torch.utils.data import TensorDataset

    n_train = len(tokens) - n_query
    train, query = torch.arange(n_train), torch.arange(n_train, len(tokens))
    seqs = Sequences(tokens, name="gpt2-prompts")
    lin = conv1d_as_linear(hf).eval()
    fa, sa = _kron_args()
    an = Analyzer("gpt2", prepare_model(copy.deepcopy(lin), LM()), LM(), cpu=True, disable_tqdm=True,
                  output_dir=str(workdir / "kronfluence"), log_level=logging.WARNING)
    trd, qd = TensorDataset(tokens[train]), TensorDataset(tokens[query])
    kw = dict(fisher="empirical", damping=0.1, damping_mode="relative", modules=modules, batch_size=batch_size,
              progress=False)

    def kron_fit():
        an.fit_all_factors("f", trd, per_device_batch_size=batch_size, factor_args=fa, overwrite_output_dir=True)

    def kron_scores():
        an.compute_pairwise_scores("s", "f", qd, trd, per_device_query_batch_size=n_query,
                                   per_device_train_batch_size=batch_size, score_args=sa, overwrite_output_dir=True)
        return an.load_pairwise_scores("s")["all_modules"]

    libs: dict[str, tuple[Callable, Callable]] = {KRON: (kron_fit, kron_scores)}
    fitted: dict[str, EKFAC] = {}
    for name, model in ((MG_LIN, lin), (MG_HF, hf)):
        def fit(name=name, model=model):
            fitted[name] = EKFAC(model, seqs, **kw).fit(train)

        def scores(name=name):
            return fitted[name].scores(query, train)

        libs[name] = (fit, scores)
    fit_t: dict[str, list[float]] = {k: [] for k in libs}
    worst: dict[str, float] = {}
    coverage = ""
    score_t: dict[str, list[float]] = {k: [] for k in libs}
    S: dict[str, torch.Tensor] = {}
    factors: dict[str, dict] = {}
    rng = random.Random(0)
    for rnd in range(trials):
        for name in rng.sample(list(libs), len(libs)):
            fit, scores = libs[name]
            gc.collect()
            t0 = time.perf_counter()
            fit()
            fit_t[name].append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            out = scores()
            score_t[name].append(time.perf_counter() - t0)
            if rnd == 0:
                S[name] = out
                if name == MG_LIN:  # keep only what the comparison reads (wide maps: GBs of factors)
                    ek = fitted[name]
                    factors["mechgrok"] = {"A": ek.A_, "S": ek.S_, "lambda": ek.lambda_}
                    coverage = ek.coverage.short()
                if name == KRON:
                    kf = {**an.load_covariance_matrices("f"), **an.load_lambda_matrices("f")}
                    factors["kronfluence"] = {
                        "A": {m: kf["activation_covariance"][m] / kf["num_activation_covariance_processed"][m]
                              for m in modules},
                        "S": {m: kf["gradient_covariance"][m] / kf["num_gradient_covariance_processed"][m]
                              for m in modules},
                        "lambda": {m: kf["lambda_matrix"][m] / kf["num_lambda_processed"][m] for m in modules}}
                    del kf
                if len(factors) == 2 and not worst:
                    mf, kf = factors.pop("mechgrok"), factors.pop("kronfluence")
                    worst.update({k: max(float((mf[k][m] - kf[k][m]).abs().max() / kf[k][m].abs().max())
                                         for m in modules) for k in ("A", "S", "lambda")})
                    del mf, kf
            fitted.pop(name, None)  # one library's factors in memory at a time
            del out
            LOAD.append(os.getloadavg()[0])
        log.info("influence round %d/%d: %s", rnd + 1, trials,
                 ", ".join(f"{k} fit {fit_t[k][-1]:.1f}s scores {score_t[k][-1]:.1f}s" for k in libs))
    K, M, H = S[KRON], S[MG_LIN], S[MG_HF]
    n_params = sum(p.numel() for n, p in lin.named_parameters() if n.rsplit(".", 1)[0] in modules)
    return {"maps": which, "modules": modules, "n_params_in_maps": n_params, "n_train": n_train, "n_query": n_query,
            "batch_size": batch_size, "mechgrok_coverage": coverage,
            "fit_s": {k: med(v) for k, v in fit_t.items()}, "score_s": {k: med(v) for k, v in score_t.items()},
            "fit_trials_s": fit_t, "score_trials_s": score_t,
            "fit_ratio_kron_over_mg": med(fit_t[KRON]) / med(fit_t[MG_LIN]),
            "score_ratio_kron_over_mg": med(score_t[KRON]) / med(score_t[MG_LIN]),
            "factor_max_rel_diff_vs_kronfluence": worst,
            "score_max_rel_diff_vs_kronfluence": float((M - K).abs().max() / K.abs().max()),
            "ranking_vs_kronfluence": ranking_agreement(K, M),
            "conv1d_vs_rewrite_score_max_rel_diff": float((H - M).abs().max() / M.abs().max())}


# ------------------------------------------------------------------------------ memory probes
def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(library: str, method: str, n_layers: int, vocab: int, ac_python: str) -> None:
    """One circuit call in this fresh process; prints ``@@{json}`` with the peak resident memory
    before (model built and loaded) and after it."""
    _, model = build(n_layers, vocab)
    p = prompts(vocab)
    gc.collect()
    out = {"library": library, "method": method, "layers": n_layers, "n_edges": len(build_graph(model, "edge").edges)}
    if library == "mechgrok":
        out["base_mb"] = _maxrss_mb()
        t0 = time.perf_counter()
        mg.circuits.attribute(model, p, mg.circuits.metrics.logit_diff(), method=method, level="edge",
                              steps=IG_STEPS, progress=False)
        out.update(s=time.perf_counter() - t0, peak_mb=_maxrss_mb())
    else:
        with tempfile.TemporaryDirectory(prefix="bench_gpt2_probe_") as d:
            ac = AutoCircuit(ac_python, subprocess.DEVNULL)
            try:
                export(model, p, Path(d))
                ac.call(cmd="load", name="m", dir=d, forward_reps=1)
                out["base_mb"] = ac.call(cmd="maxrss")["maxrss_mb"]
                out["s"] = ac.call(cmd="run", name="m", method=method, ig_samples=IG_STEPS - 1)["time_s"]
                out["peak_mb"] = ac.call(cmd="maxrss")["maxrss_mb"]
            finally:
                ac.close()
    print("@@" + json.dumps(out), flush=True)


def probe_in_subprocess(library: str, method: str, n_layers: int, vocab: int, ac_python: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", library, method, "--layers", str(n_layers),
           "--vocab", str(vocab), "--autocircuit-python", ac_python]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("@@")), None)
    if line is None:
        out = {"library": library, "method": method, "layers": n_layers,
               "error": f"rc={r.returncode} (-9: killed, likely out of memory): {r.stderr[-300:]}"}
    else:
        out = json.loads(line[2:])
    log.info("memory probe: %s", out)
    return out


# ------------------------------------------------------------------------------ provenance
def machine() -> dict:
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    d = {"arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
         "kind": "VM" if "hypervisor" in info else "host",
         "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
         "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "loadavg_1min_start": LOAD_AT_START, "loadavg_1min_end": os.getloadavg()[0],
         "loadavg_1min_during": ({"min": min(LOAD), "median": med(LOAD), "max": max(LOAD), "samples": len(LOAD)}
                                 if LOAD else None)}
    for pkg in ("transformer-lens", "transformers", "kronfluence", "nnsight"):
        try:
            d[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            d[pkg] = None
    return d


def source_hash() -> str:
    """sha256 (12 hex digits) of mechgrok's Python files: which code a run imported."""
    import hashlib

    files = sorted((ROOT / "mechgrok").rglob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


SOURCE_HASH = source_hash()


def merge(old: dict, new: dict) -> dict:
    """``new`` with the parts of ``old`` it did not measure: capture / influence as a whole, circuit
    runs by model size, memory probes by (layers, library, method)."""
    out = dict(new, merged=True)
    if "influence" in new and "influence" in old:  # rows by their maps
        maps = {r["maps"] for r in new["influence"]["rows"]}
        kept = [r for r in old["influence"]["rows"] if r["maps"] not in maps]
        out["influence"] = dict(new["influence"], rows=kept + new["influence"]["rows"])
    for part in ("capture", "influence"):
        if part not in new and part in old:
            out[part] = old[part]
    if "circuits" in old:
        oc = old["circuits"]
        if "runs" not in oc:  # the first format: one run
            oc = {"runs": [oc], "memory": oc.get("memory", [])}
        nc = new.get("circuits", {"runs": [], "memory": []})
        have = {r["layers"] for r in nc["runs"]}
        probes = {(r["layers"], r["library"], r["method"]) for r in nc["memory"]}
        out["circuits"] = {
            "runs": sorted(nc["runs"] + [r for r in oc["runs"] if r["layers"] not in have], key=lambda r: r["layers"]),
            "memory": nc["memory"] + [r for r in oc["memory"]
                                      if (r["layers"], r["library"], r["method"]) not in probes]}
    return out


def source() -> dict:
    out: dict = {"mechgrok_sha256": SOURCE_HASH}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mechgrok"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        out["uncommitted"] = sorted(ln[3:] for ln in dirty if ln.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# ------------------------------------------------------------------------------ report
def circuit_markdown(c: dict, res: dict) -> list[str]:
    """The section of one circuits run (one model size)."""
    info = c["info"]
    lines = [f"## b. EAP and EAP-IG at edge level vs auto-circuit: {c['layers']} layers ({c['trials']} interleaved "
             f"rounds after {c['warmup']} warm-up)\n", *_provenance(c, res),
             f"The GPT-2-shaped model with **{c['layers']} layers** (d_model 768, 12 heads, d_mlp 3072), "
             f"{info['n_edges']:,} edges.\n"]
    if "autocircuit_versions" in info:
        v = info["autocircuit_versions"]
        lines.append(f"auto-circuit {v['auto-circuit']} on transformer-lens {v['transformer-lens']} (torch "
                     f"{v['torch']}, {v['threads']} thread), separate venv and process; same weights (clean "
                     f"logits max |diff| {info['clean_logits_max_abs_diff']:.1e}); its one-off `patchable_model` "
                     f"took {info['patchable_model_setup_s']:.1f} s (not in the times). A no-grad forward with the "
                     "hooks patching needs (per-head q/k/v inputs and outputs): "
                     f"{info['autocircuit_forward_ms'] / 1e3:.2f} s in auto-circuit's process, "
                     f"{info['mechgrok_patchable_forward_ms'] / 1e3:.2f} s in mechgrok's "
                     "(`mg.models.patchable`). "
                     f"EAP-IG: mechgrok {IG_STEPS} steps on the input embedding, auto-circuit "
                     f"{IG_STEPS - 1} integrated-gradient samples (5 points) on all edge masks: not the same "
                     "estimator, compared by rank.\n")
    else:
        lines.append(info.get("autocircuit", "") + "\n")
    lines += ["| method | mechgrok s | auto-circuit s | mechgrok / auto-circuit | Spearman (abs) | max rel. diff | "
              "top-10% overlap |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in c["rows"]:
        ag = r.get("agreement", {})
        top = next((v for k, v in ag.items() if k.startswith("top")), None)
        if "error" in ag:
            agree = f"{ag['error']} | | "
        elif ag:
            agree = f"{ag['spearman']:.4f} ({ag['spearman_abs']:.4f}) | {ag['max_rel_diff']:.1e} | {top:.3f}"
        else:
            agree = " | | "
        ac = f"{r['autocircuit_s']:.2f}" if "autocircuit_s" in r else "n/a"
        ratio = f"**{r['ratio_mg_over_ac']:.2f}x**" if "ratio_mg_over_ac" in r else "n/a"
        lines.append(f"| {r['method']} | {r['mechgrok_s']:.2f} | {ac} | {ratio} | {agree} |")
    return lines + [""]


def measured(src: dict, since: int) -> dict:
    """When, on which code and under which load (the samples since ``LOAD[since]``) a part was timed."""
    xs = LOAD[since:]
    return {"at": time.strftime("%Y-%m-%d %H:%M"), "source": src,
            "load": {"min": min(xs), "median": med(xs), "max": max(xs)} if xs else None}


def _provenance(part: dict, res: dict) -> list[str]:
    """Where a part was measured, when the results merge several runs (``--merge``)."""
    m = part.get("measured")
    if not res.get("merged") or not m:
        return []
    load = m.get("load")
    return [f"Measured {m['at']} UTC, code {_code(m['source'])}"
            + (f", 1-minute load average {load['min']:.1f} to {load['max']:.1f} (median {load['median']:.1f})"
               if load else "") + ".\n"]


def _code(src: dict) -> str:
    text = f"commit {src.get('commit', '?')}"
    if src.get("uncommitted"):
        text += f" + uncommitted changes to {', '.join(src['uncommitted'])}"
    if src.get("changed_during_run"):
        text += " (mechgrok's files changed during the run: the numbers are for the code imported at its start)"
    return text


def markdown(res: dict) -> str:
    m, a = res["machine"], res["args"]
    src = res["source"]
    lines = ["# mechgrok on a GPT-2-small-shaped random model\n",
             f"Machine: {m['arch']} {m['kind']}, {m['cpus']} CPUs ({m['cpu']}), {m['mem_gb']} GB, **shared with other "
             "jobs** (" + ("the 1-minute load average of each part is given with it" if res.get("merged") else
                          f"1-minute load average {m['loadavg_1min_start']:.1f} at the start, "
                          f"{m['loadavg_1min_end']:.1f} at the end" + (
                              f", {m['loadavg_1min_during']['min']:.1f} to {m['loadavg_1min_during']['max']:.1f} "
                              f"(median {m['loadavg_1min_during']['median']:.1f}) after the timed jobs"
                              if m["loadavg_1min_during"] else ""))
             + f"; 2 cores: a load above 1 means another job competed for them). torch {m['torch']} with "
             f"{m['threads']} thread, Python {m['python']}, transformer-lens {m['transformer-lens']}, transformers "
             f"{m['transformers']}, kronfluence {m['kronfluence']}, nnsight {m['nnsight']}. Code: {_code(src)}. "
             f"Date {res['date']}" + (" (parts merged from several runs: see each part)" if res.get("merged") else "")
             + ".\n",
             f"Model: random GPT-2 (HF `GPT2LMHeadModel`, seed 0) with {a['layers']} layers, d_model 768, 12 heads, "
             f"d_mlp 3072, context {N_CTX}, **vocabulary {a['vocab']}** (GPT-2's 50,257 would make the unembedding "
             "38.6M parameters and every forward ~1.5x the blocks' cost; with 4,096 it is ~1.1x), converted by "
             f"`mg.models.from_pretrained`; {res['n_params']:,} parameters. {N_PROMPTS} prompts of {N_CTX} tokens "
             "(8 random tokens repeated; corrupted: another 8 repeated; logit difference at the last position)."
             + (" (--quick)" if a["quick"] else "") + "\n"]
    if "capture" in res:
        c = res["capture"]
        lines += [f"## a. capture of 3 hooks ({c['trials']} interleaved rounds after {c['warmup']} warm-up)\n",
                  *_provenance(c, res),
                  "Hooks: " + ", ".join(f"`{h}`" for h in c["rows"][0]["hooks"]) + " (HF model: "
                  + ", ".join(f"`{h}`" for h in c["rows"][-1]["hooks"]) + "). Checks: "
                  + "; ".join(f"{k} {v:.1e}" for k, v in c["checks"].items()) + ".\n",
                  "| model | method | median s | x forward | x run_with_cache |", "|---|---|---:|---:|---:|"]
        for r in c["rows"]:
            rw = f"{r['x_run_with_cache']:.2f}" if r["x_run_with_cache"] else ""
            lines.append(f"| {r['setup']} | {r['method']} | {r['median_s']:.3f} | {r['x_forward']:.2f} | {rw} |")
        lines.append("")
    if "circuits" in res:
        for c in res["circuits"]["runs"]:
            lines += circuit_markdown(c, res)
        if res["circuits"].get("memory"):
            lines += ["Peak resident memory of one edge-level call, each in a fresh process (MB; 'before': the "
                      "process with the model and inputs loaded):\n",
                      "| layers | edges | library | method | before MB | peak MB | call s |",
                      "|---:|---:|---|---|---:|---:|---:|"]
            for r in sorted(res["circuits"]["memory"], key=lambda r: (r["layers"], r["library"], r["method"])):
                if "error" in r:
                    lines.append(f"| {r['layers']} | | {r['library']} | {r['method']} | {r['error'][:80]} | | |")
                else:
                    lines.append(f"| {r['layers']} | {r['n_edges']:,} | {r['library']} | {r['method']} | "
                                 f"{r['base_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['s']:.1f} |")
            lines.append("")
    if "influence" in res:
        lines += ["## c. EK-FAC fit + pairwise scores vs kronfluence\n", *_provenance(res["influence"], res)]
        for r in res["influence"]["rows"]:
            lines += [*_provenance(r, res), f"Maps `{r['maps']}`: {len(r['modules'])} maps ({r['modules'][0]}, ...), "
                      f"{r['n_params_in_maps']:,} parameters; fit on {r['n_train']} sequences, {r['n_query']} query "
                      f"sequences, batch {r['batch_size']}, median of {r['trials']} round(s). "
                      f"Factors vs kronfluence, max rel. diff: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in r["factor_max_rel_diff_vs_kronfluence"].items())
                      + f"; scores {r['score_max_rel_diff_vs_kronfluence']:.1e} (Spearman "
                      f"{r['ranking_vs_kronfluence']['spearman']:.6f}); mechgrok on HF Conv1D vs on the rewrite: "
                      f"{r['conv1d_vs_rewrite_score_max_rel_diff']:.1e}.\n",
                      "| library (model) | fit s | scores s |", "|---|---:|---:|"]
            for k in r["fit_s"]:
                lines.append(f"| {k} | {r['fit_s'][k]:.1f} | {r['score_s'][k]:.1f} |")
            lines += ["", f"kronfluence / mechgrok (same nn.Linear model): fit **{r['fit_ratio_kron_over_mg']:.2f}x**, "
                      f"scores **{r['score_ratio_kron_over_mg']:.2f}x** (> 1: mechgrok faster).\n"]
    gc_s = (f"{res['influence']['gc_collect_s']:.2f} s each in this process" if "influence" in res
            else "not measured")
    eigh_s = (f"{res['influence']['eigh_3072_s']:.1f} s on one thread in this run" if "influence" in res
              else "not measured")
    lines.append(NOTES.replace("{gc_s}", gc_s).replace("{eigh_s}", eigh_s))
    return "\n".join(lines)


NOTES = """Notes:

- Ratios are within one run; the methods of a part alternate in a random order each round, so load
  from other jobs on this shared machine spreads over all of them. Medians still move between runs.
- kronfluence's times include writing its factors and scores to disk (safetensors) and its own
  `gc.collect()` calls ({gc_s}); mechgrok keeps them in memory.
- Both eigendecompose every factor in float64 (`torch.linalg.eigh`), a cost that is the same on
  both sides and grows as d³ (a 3,072-wide MLP factor: {eigh_s}).
- The eigenvalue correction: kronfluence forms each example's gradient `G = Σ_t g_t a_tᵀ` and
  rotates it, `Q_Sᵀ G Q_A` (o·i·(o + i) flops per example); mechgrok rotates the per-token vectors first,
  `Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ` (T·(o² + i² + o·i)), which is cheaper for 16 tokens and wide maps.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round after 1 warm-up (a smoke run)")
    ap.add_argument("--layers", type=int, default=12, help="layers (12: GPT-2 small; fewer for a smoke run)")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size (GPT-2: 50257)")
    ap.add_argument("--circuit-layers", type=int, nargs="+", default=[4, 12],
                    help="model sizes (layers) for EAP / EAP-IG vs auto-circuit, one timed run each")
    ap.add_argument("--merge", action="store_true",
                    help="keep the parts (and circuit model sizes / memory probes) of the existing results that "
                         "this run does not measure")
    ap.add_argument("--memory-layers", type=int, nargs="*", default=None,
                    help="model sizes (layers) at which to measure each circuit method's peak memory, one fresh "
                         "process per (library, method) (default 2 4; none with --quick)")
    ap.add_argument("--probe", nargs=2, metavar=("LIBRARY", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--parts", nargs="+", default=["capture", "circuits", "influence"],
                    choices=["capture", "circuits", "influence"])
    ap.add_argument("--trials", type=int, default=None, help="rounds of capture and circuits (default 5 and 3)")
    ap.add_argument("--ekfac-maps", nargs="+", default=["attn-out", "mlp-all"],
                    help="which maps EK-FAC fits, one row each: 'attn-out' (every layer's attention output "
                         "projection), 'mlp-all' (c_fc + c_proj of every layer), 'mlp:0,5,11' (of those layers)")
    ap.add_argument("--ekfac-trials", type=int, nargs="+", default=None,
                    help="rounds per --ekfac-maps row (default 3 for attn-out, 2 for MLP maps)")
    ap.add_argument("--queries", type=int, default=4,
                    help="query sequences for EK-FAC (the first corrupted prompts; default 4: with every MLP map "
                         "a query's float64 gradient takes 0.45 GB, twice while it is preconditioned)")
    ap.add_argument("--ekfac-batch", type=int, default=8)
    ap.add_argument("--autocircuit-python", default=str(ROOT / ".venv-autocircuit" / "bin" / "python"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mechgrok").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)  # kronfluence's Analyzer lowers the root logger to its log_level
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp.GradScaler
    torch.set_num_threads(1)
    if args.probe:
        return probe(*args.probe, args.layers, args.vocab, args.autocircuit_python)
    quick = args.quick
    memory_layers = ([] if quick else [2, 4]) if args.memory_layers is None else args.memory_layers
    src = source()
    hf, model = build(args.layers, args.vocab)
    p = prompts(args.vocab)
    res: dict = {"machine": None, "source": src, "date": time.strftime("%Y-%m-%d"),
                 "args": {**vars(args), "layers": args.layers, "vocab": args.vocab},
                 "n_params": sum(q.numel() for q in hf.parameters())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpt2_") as tmp:
        tmp = Path(tmp)
        if "capture" in args.parts:
            trials, warmup = (1, 1) if quick else (args.trials or 5, 1)
            since = len(LOAD)
            rows, checks = bench_capture(hf, model, p.clean, trials, warmup)
            res["capture"] = {"trials": trials, "warmup": warmup, "rows": rows, "checks": checks,
                              "measured": measured(src, since)}
        if "circuits" in args.parts:
            mem = [probe_in_subprocess(lib, method, n, args.vocab, args.autocircuit_python)
                   for n in memory_layers for lib in ("mechgrok", "auto-circuit") for method in ("eap", "eap-ig")
                   if lib == "mechgrok" or Path(args.autocircuit_python).exists()]
            runs = []
            for n_layers in args.circuit_layers:
                # no warm-up round at full size: each call takes a minute or more, first-call costs are
                # negligible, and round 0 also collects the scores
                trials, warmup = (1, 1) if quick else (args.trials or 3, 0 if n_layers >= 6 else 1)
                c_model = model if n_layers == args.layers else build(n_layers, args.vocab)[1]
                since = len(LOAD)
                rows, info = bench_circuits(c_model, p, args.autocircuit_python, trials, warmup, tmp)
                runs.append({"layers": n_layers, "trials": trials, "warmup": warmup, "rows": rows, "info": info,
                             "measured": measured(src, since)})
                del c_model
            res["circuits"] = {"runs": runs, "memory": mem}
        if "influence" in args.parts:
            tokens = torch.cat([p.clean, p.corrupted[:args.queries]])  # fit on the 32 prompts; query other ones
            rows = []
            for i, which in enumerate(args.ekfac_maps):
                default = 3 if which == "attn-out" else 2
                trials = 1 if quick else (args.ekfac_trials[i] if args.ekfac_trials else default)
                since = len(LOAD)
                rows.append(bench_influence(hf, tokens, args.queries, which, args.ekfac_batch, trials, tmp))
                rows[-1].update(trials=trials, measured=measured(src, since))
                log.info("influence %s: %s", which, {k: v for k, v in rows[-1].items() if "trials" not in k})
            t0 = time.perf_counter()
            gc.collect()  # what each of kronfluence's own gc.collect() calls costs in this process
            gc_s = time.perf_counter() - t0
            spd = torch.randn(3072, 3072, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            spd = spd @ spd.T
            t0 = time.perf_counter()
            torch.linalg.eigh(spd)  # one MLP-wide factor's eigendecomposition, as both libraries do it
            res["influence"] = {"rows": rows, "gc_collect_s": gc_s, "eigh_3072_s": time.perf_counter() - t0}
            del spd
    del res["args"]["out"]
    res["machine"] = machine()
    if source_hash() != SOURCE_HASH:
        src["changed_during_run"] = True
        log.warning("mechgrok's files changed during this run; the numbers are for the code imported at its start")
    if args.merge and (out / "bench_gpt2_small.json").exists():
        res = merge(json.loads((out / "bench_gpt2_small.json").read_text()), res)
    md = markdown(res)
    (out / "bench_gpt2_small.md").write_text(md)
    (out / "bench_gpt2_small.json").write_text(json.dumps(res, indent=2, default=str))
    log.info("\n%s", md)


if __name__ == "__main__":
    main()
