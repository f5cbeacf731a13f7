"""Time mechgrok's circuit discovery (EAP, EAP-IG, ACDC) against auto-circuit, on the same models.

Anchor: auto-circuit (github.com/UFO-101/auto-circuit, PyPI ``auto-circuit``), installed in its own
venv (it needs transformer-lens 2.x; mechgrok targets 3.x): see ``benchmarks/README_autocircuit.md``.
It runs in a long-lived subprocess (``benchmarks/_autocircuit_side.py``) with that venv's python,
on the SAME weights (safetensors + config JSON, rebuilt as a HookedTransformer there; the clean
logits of both rebuilds are compared) and the SAME inputs (safetensors).

Models (p=59 modular addition, d_model 64, 4 heads, d_mlp 256, no LayerNorm):
- 1 layer: the trained demo checkpoint ``/tmp/mgtest/demo2`` if present (``--checkpoint``), else
  random init;
- 2 layers: random init (seed 0).
Inputs: 256 test examples and resampled counterfactuals (``mechgrok.circuits.contrast``); metric:
logit difference of the correct answer vs the counterfactual's answer (label + 1 when they agree).

Methods, each side's closest equivalent:
- EAP: ``attribute(method="eap")`` vs ``mask_gradient_prune_scores(mask_val=0)`` (one forward and
  one backward; auto-circuit documents it as equal to Syed et al.'s EAP).
- EAP-IG: ``attribute(method="eap-ig", steps=5)`` (input embedding interpolated, Hanna et al.) vs
  ``mask_gradient_prune_scores(integrated_grad_samples=4)`` (all edge masks interpolated at
  0, .25, ..., 1): five forward+backward passes each, but not the same interpolation path.
- ACDC: ``attribute(method="acdc", metric=kl_to(clean), tau=tau)`` vs ``acdc_prune_scores`` with one
  threshold (``tao_bases=[tau], tao_exps=[0]``): auto-circuit's ACDC only optimises KL (or MSE) to the
  clean output, so both sides use KL here; tau = mechgrok's default (1% of the KL with every edge
  ablated).

Timing: one torch thread on both sides; each trial times one call (mechgrok: ``attribute``, which
builds the graph and records the clean/corrupted activations; auto-circuit: the prune-score
function, which records its source activations too; its one-off ``patchable_model`` wrapping is
reported separately). All (model, method, library) jobs run in a random order per round; medians
over rounds after warm-up rounds.

    python benchmarks/bench_circuits.py [--quick] [--autocircuit-python PATH] [--profile]

Writes ``benchmarks/results/bench_circuits.md`` and ``.json`` (and ``bench_circuits.profile.txt``
with ``--profile``: cProfile of mechgrok's side).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import mechgrok as mg  # noqa: E402
from mechgrok.circuits.attribution import acdc_default_tau, acdc_kept  # noqa: E402
from mechgrok.circuits.graph import graph as build_graph  # noqa: E402
from mechgrok.circuits.patching import Patcher  # noqa: E402

log = logging.getLogger("bench_circuits")
RESULTS = Path(__file__).resolve().parent / "results"
SIDE = Path(__file__).resolve().parent / "_autocircuit_side.py"
METHODS = ("eap", "eap-ig", "acdc")
IG_STEPS = 5
INSTALL = """auto-circuit's python not found at {path}. To install it (separate venv; the project's
venv is untouched; torch stays the local CPU wheel):

    python3 -m venv .venv-autocircuit
    .venv-autocircuit/bin/pip install "torch==2.13.0" "auto-circuit==1.0.1" \\
        "transformer-lens==2.18.0" "datasets==3.6.0" "pyarrow<21"

(see benchmarks/README_autocircuit.md), then rerun, or pass --autocircuit-python PATH.
Running the mechgrok side alone."""


# ------------------------------------------------------------------------------ setups
def setups(checkpoint: Path, n: int) -> list[dict]:
    task = mg.tasks.modular_arithmetic(p=59)
    x, xc, y, _ = mg.circuits.contrast(task, "test", n=n, seed=0)
    y_c = task.labels[_row_index(task, xc)]
    wrong = torch.where(y_c == y, (y + 1) % task.d_vocab_out, y_c)  # the counterfactual's answer
    out = []
    if (checkpoint / "config.json").exists():
        m1, src1 = mg.Run(checkpoint).load_model(), f"trained ({checkpoint}, last checkpoint)"
    else:
        m1, src1 = mg.models.transformer(task, n_layers=1, d_model=64, n_heads=4, d_mlp=256), "random init"
    m2 = mg.models.transformer(task, n_layers=2, d_model=64, n_heads=4, d_mlp=256, seed=0)
    for name, model, src in (("1-layer", m1, src1), ("2-layer", m2, "random init (seed 0)")):
        model.eval()
        with torch.no_grad():
            clean_logits = mg.models.final_logits(model, x)
        out.append({"name": name, "model": model, "source": src, "x": x, "xc": xc, "y": y, "wrong": wrong,
                    "metric": mg.circuits.metrics.logit_diff(y, wrong),
                    "kl": mg.circuits.metrics.kl_to(clean_logits), "clean_logits": clean_logits,
                    "n_edges": len(build_graph(model, "edge").edges)})
    return out


def _row_index(task, inputs: torch.Tensor) -> torch.Tensor:
    """Rows of ``task.inputs`` equal to each row of ``inputs``."""
    key = {tuple(r): i for i, r in enumerate(task.inputs.tolist())}
    return torch.tensor([key[tuple(r)] for r in inputs.tolist()])


def acdc_tau(s: dict) -> float:
    """mechgrok's default threshold for the KL metric: 1% of the KL with every edge ablated."""
    p = Patcher(s["model"], build_graph(s["model"], "edge"), s["x"], s["xc"])
    with torch.no_grad():
        full = float(s["kl"](p.run()[0]))
        empty = float(s["kl"](p.run(masks=p.all_masks(0.0))[0]))
    return acdc_default_tau(full, empty)


def export(s: dict, folder: Path) -> None:
    """Weights, transformer-lens config and inputs for the auto-circuit side."""
    c = s["model"].cfg
    cfg = {k: getattr(c, k) for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out",
                                      "n_ctx", "act_fn", "normalization_type", "positional_embedding_type")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(mg.models.state_tensors(s["model"]), str(folder / "model.safetensors"))
    save_file({"clean": s["x"].contiguous(), "corrupted": s["xc"].contiguous(), "answers": s["y"].contiguous(),
               "wrong": s["wrong"].contiguous()}, str(folder / "inputs.safetensors"))


# ------------------------------------------------------------------------------ the two sides
def mechgrok_call(s: dict, method: str) -> dict[str, float]:
    if method == "acdc":
        return mg.circuits.attribute(s["model"], s["x"], s["xc"], s["kl"], method="acdc", tau=s["tau"],
                                     progress=False)
    return mg.circuits.attribute(s["model"], s["x"], s["xc"], s["metric"], method=method, steps=IG_STEPS,
                                 progress=False)


class AutoCircuit:
    """The auto-circuit worker subprocess (JSON lines on stdin / stdout)."""

    def __init__(self, python: str, stderr):
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
        # PYTHONHASHSEED: auto-circuit's ACDC walks a set of edges; fix its order between runs
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
            self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------ agreement
def agreement(method: str, mine: dict[str, float], theirs: dict[str, float], tau: float | None) -> dict:
    if set(mine) != set(theirs):
        return {"error": f"edge names differ: only mechgrok {sorted(set(mine) - set(theirs))[:5]}, "
                         f"only auto-circuit {sorted(set(theirs) - set(mine))[:5]}"}
    names = list(mine)
    a = torch.tensor([mine[k] for k in names], dtype=torch.float64)
    b = torch.tensor([theirs[k] for k in names], dtype=torch.float64)
    if method == "acdc":  # auto-circuit: inf for kept edges, tau for removed ones
        kept_a = set(acdc_kept(mine, tau))
        kept_b = {k for k, v in theirs.items() if v == float("inf")}
        union = kept_a | kept_b
        return {"kept_mechgrok": len(kept_a), "kept_autocircuit": len(kept_b),
                "jaccard": len(kept_a & kept_b) / len(union) if union else 1.0}
    # auto-circuit's scores are gradients of -logit_diff w.r.t. masks (1 = corrupted): the opposite sign
    b_aligned = -b
    out = {"spearman_signed": float(spearmanr(a, b_aligned).statistic),
           "spearman_abs": float(spearmanr(a.abs(), b.abs()).statistic),
           "spearman_raw": float(spearmanr(a, b).statistic)}
    if method == "eap":
        out["max_abs_diff"] = float((a - b_aligned).abs().max())
        out["max_abs_score"] = float(a.abs().max())
    else:  # different interpolation paths and scale (auto-circuit sums its samples, mechgrok averages)
        k = max(1, len(names) // 10)
        top_a = set(a.abs().topk(k).indices.tolist())
        top_b = set(b.abs().topk(k).indices.tolist())
        out[f"top{k}_overlap"] = len(top_a & top_b) / k
    return out


# ------------------------------------------------------------------------------ main loop
def bench(sets: list[dict], ac: AutoCircuit | None, trials: int, warmup: int, workdir: Path) -> list[dict]:
    jobs = [(i, m, side) for i in range(len(sets)) for m in METHODS for side in (("mg", "ac") if ac else ("mg",))]
    times: dict[tuple, list[float]] = {j: [] for j in jobs}
    scores: dict[tuple, dict] = {}
    rng = random.Random(0)
    for rnd in range(warmup + trials):
        rng.shuffle(jobs)
        for i, method, side in jobs:
            s = sets[i]
            if side == "mg":
                t0 = time.perf_counter()
                res = mechgrok_call(s, method)
                dt = time.perf_counter() - t0
                if rnd == 0:
                    scores[(i, method, side)] = res
            else:
                path = workdir / f"ac_{s['name']}_{method}.json" if rnd == 0 else None
                dt = ac.call(cmd="run", name=s["name"], method=method, tau=s["tau"], ig_samples=IG_STEPS - 1,
                             scores=str(path) if path else None)["time_s"]
                if path:
                    scores[(i, method, side)] = json.loads(path.read_text())
            if rnd >= warmup:
                times[(i, method, side)].append(dt)
        log.info("round %d/%d done", rnd + 1, warmup + trials)
    rows = []
    for i, s in enumerate(sets):
        for method in METHODS:
            mg_t = times[(i, method, "mg")]
            row = {"model": s["name"], "method": method, "n_edges": s["n_edges"],
                   "mechgrok_ms": statistics.median(mg_t) * 1e3, "mechgrok_trials_ms": [t * 1e3 for t in mg_t]}
            if ac:
                ac_t = times[(i, method, "ac")]
                row.update({"autocircuit_ms": statistics.median(ac_t) * 1e3,
                            "autocircuit_trials_ms": [t * 1e3 for t in ac_t]})
                row["ratio_mg_over_ac"] = row["mechgrok_ms"] / row["autocircuit_ms"]
                row["agreement"] = agreement(method, scores[(i, method, "mg")], scores[(i, method, "ac")],
                                             s["tau"])
            rows.append(row)
    return rows


def _median_ms(fn, reps: int = 15, grad: bool | None = None) -> float:
    with torch.set_grad_enabled(grad) if grad is not None else contextlib.nullcontext():
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def components(s: dict) -> dict[str, float]:
    """Where mechgrok's time goes, measured piece by piece with its public ``Patcher`` (ms)."""
    model, g = s["model"], build_graph(s["model"], "edge")
    p = Patcher(model, g, s["x"], s["xc"])
    out = {"Patcher() (graph + clean and corrupted run_with_cache)": _median_ms(lambda: Patcher(model, g, s["x"], s["xc"]))}
    with torch.no_grad():
        out["patched forward, no masks"] = _median_ms(lambda: p.run())
        one_off = p.all_masks(1.0)
        for m in one_off.values():
            m[0] = 0.0
        out["patched forward, one edge ablated into every receiver"] = _median_ms(lambda: p.run(masks=one_off))

    def grad_pass(weights: bool) -> None:
        params = list(model.parameters())
        req = [q.requires_grad for q in params]
        retain = list(p.receivers) + ([] if weights else ["src:blocks.0.hook_resid_pre"])
        try:
            for q in params:
                q.requires_grad_(weights)
            with torch.enable_grad():
                logits, _ = p.run(retain=retain)
                s["metric"](logits).backward()
        finally:
            for q, r in zip(params, req):
                q.requires_grad_(r)
                q.grad = None

    out["EAP forward+backward, weights requires_grad"] = _median_ms(lambda: grad_pass(True))
    out["EAP forward+backward, weights frozen, embedding output the grad leaf"] = _median_ms(lambda: grad_pass(False))
    return out


def profile(sets: list[dict], reps: int = 5) -> str:
    """cProfile of mechgrok's ``attribute`` per (model, method): top functions by time."""
    buf = io.StringIO()
    for s in sets:
        for method in METHODS:
            mechgrok_call(s, method)  # warm
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(reps):
                mechgrok_call(s, method)
            pr.disable()
            buf.write(f"\n==== {s['name']} {method} ({reps} calls) ====\n")
            st = pstats.Stats(pr, stream=buf)
            st.sort_stats("tottime").print_stats(18)
            st.sort_stats("cumulative").print_stats(25)
    return buf.getvalue()


def _fmt_agree(r: dict) -> str:
    a = r.get("agreement")
    if not a:
        return ""
    if "error" in a:
        return a["error"]
    if r["method"] == "acdc":
        return f"kept {a['kept_mechgrok']} vs {a['kept_autocircuit']}, Jaccard {a['jaccard']:.2f}"
    extra = (f"max abs diff {a['max_abs_diff']:.1e} (scores up to {a['max_abs_score']:.3g})" if r["method"] == "eap"
             else ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in a.items() if k.startswith("top")))
    return f"{a['spearman_signed']:.3f} / {a['spearman_abs']:.3f}; {extra}"


def table(rows: list[dict]) -> str:
    lines = ["| model | edges | method | mechgrok ms | auto-circuit ms | mechgrok / auto-circuit | "
             "Spearman signed / abs; agreement |", "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        ac = f"{r['autocircuit_ms']:.1f}" if "autocircuit_ms" in r else "n/a"
        ratio = f"{r['ratio_mg_over_ac']:.2f}" if "ratio_mg_over_ac" in r else "n/a"
        lines.append(f"| {r['model']} | {r['n_edges']} | {r['method']} | {r['mechgrok_ms']:.1f} | {ac} | {ratio} | "
                     f"{_fmt_agree(r)} |")
    return "\n".join(lines)


def mechgrok_source() -> dict:
    """Which mechgrok circuit code was timed: git commit, uncommitted changes, a hash of the files."""
    files = sorted((ROOT / "mechgrok" / "circuits").glob("*.py")) + sorted((ROOT / "mechgrok" / "models").glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    out = {"circuits_sha256": digest}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mechgrok/circuits", "mechgrok/models"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
        out["uncommitted"] = sorted(ln[3:] for ln in dirty if ln.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def machine(ac_versions: dict | None) -> dict:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    virt = "VM" if "hypervisor" in open("/proc/cpuinfo").read() else "host" if os.path.exists("/proc/cpuinfo") else ""
    d = {"arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(), "kind": virt,
         "loadavg_1min_start": LOAD_AT_START, "loadavg_1min_end": os.getloadavg()[0],
         "python": platform.python_version(), "torch": torch.__version__, "threads": 1,
         "mechgrok_transformer_lens": importlib.metadata.version("transformer-lens")}
    if ac_versions:
        d.update({"autocircuit": ac_versions["auto-circuit"],
                  "autocircuit_transformer_lens": ac_versions["transformer-lens"],
                  "autocircuit_torch": ac_versions["torch"], "autocircuit_numpy": ac_versions["numpy"]})
    return d


NOTES = """Notes:

- Same weights and inputs on both sides; "clean logits max |Δ|" above compares the final-position
  logits of the two rebuilt HookedTransformers (transformer-lens {tl_mg} vs {tl_ac}).
- EAP scores are the same quantity on both sides up to sign: auto-circuit differentiates
  -logit_diff with respect to edge masks (mask 1 = corrupted), mechgrok reports
  (corrupted − clean) · ∂logit_diff/∂receiver. "Spearman signed" negates auto-circuit's scores first;
  "abs" compares magnitudes. Some edges score exactly 0 on both sides (e.g. the input read at the
  last position only, where clean and corrupted tokens agree), which ties the ranks.
- EAP-IG is not the same estimator on the two sides: mechgrok interpolates the input embedding
  (Hanna et al. 2024, steps=5, right Riemann sum), auto-circuit interpolates every edge mask at once
  (integrated_grad_samples=4: 5 points 0..1) and sums rather than averages. Same number of
  forward+backward passes; scores are compared by rank only.
- ACDC: one threshold, KL to the clean output on both sides (auto-circuit's ACDC cannot optimise a
  logit difference). The edge order differs (mechgrok: receivers from the logits back, sources latest
  first; auto-circuit: by destination layer, set order within a layer, fixed by PYTHONHASHSEED=0),
  so the kept sets can differ legitimately. Both restart each trial's forward at the layer being
  decided (auto-circuit: start_at_layer from cached clean residuals; mechgrok since 5f5eb25).

Where mechgrok's time goes (cProfile: `--profile` writes bench_circuits.profile.txt; the component
table above). The first run of this benchmark (commit 5790e41) had mechgrok 1.3-2.3x slower than
auto-circuit on every row; the profile traced it to:

- EAP / EAP-IG set `requires_grad` on every weight, so each backward also computed weight
  gradients nobody read (compare the two "forward+backward" rows). Fixed in 5f5eb25: weights
  frozen, the embedding output is the grad leaf.
- ACDC's receiver hooks re-derived every source delta per receiver, for every receiver on every
  trial (all-ones masks included), and every trial reran the whole model. Fixed in 5f5eb25:
  all-ones receivers skipped, deltas once per source per forward, runs start at the layer being
  decided (as auto-circuit's start_at_layer). 2e99c8f records clean and corrupted outputs in one
  forward over both batches.

What is left (profiled at 704ae20), and the fixes (package code, not changed by this benchmark):

- `Patcher()` (`run_with_cache` over clean + corrupted) is ~45% of an EAP call, and EAP /
  EAP-IG compute the clean activations again in their own gradient pass; auto-circuit records
  only the corrupted sources. Fix: for gradient methods record the corrupted batch only and take
  the clean source outputs from the gradient pass (`current`).
- `_gradient` scores edges one at a time (`(delta[src] * grad[..., idx, :]).sum()` per edge):
  ~13% of a 2-layer EAP call. Fix: one einsum per receiver hook,
  `[n_src, b, pos, d] x [b, pos, heads, d] -> [n_src, heads]`.
- Receiver hooks take ~28% of 2-layer ACDC: per masked receiver a `torch.stack` of its sources'
  deltas and an einsum, then the head axis is unbound and re-stacked. Fix: per hook, stack the
  deltas `[n_src, b, pos, d]` once per forward and apply all heads' masks with one einsum
  `[heads, n_src] x [n_src, b, pos, d]` written into the `[b, pos, heads, d]` activation (what
  auto-circuit's PatchWrapper does with its `[dest, src]` mask).
- Each ACDC trial clones every receiver's mask (`{{r: m.clone() ...}}`; ~3%): clone only the
  receiver being changed.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 trials after 1 warm-up round (a smoke run)")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--n", type=int, default=256, help="clean/corrupted examples (default 256)")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/mgtest/demo2"),
                        help="trained 1-layer run directory (random init when absent)")
    parser.add_argument("--autocircuit-python", default=str(ROOT / ".venv-autocircuit" / "bin" / "python"))
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile mechgrok's side; writes results/bench_circuits.profile.txt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    trials, warmup = (3, 1) if args.quick else (15, 3)
    trials, warmup = args.trials or trials, args.warmup if args.warmup is not None else warmup
    warmup = max(warmup, 1)  # round 0 also collects the scores

    source_before = SOURCE_AT_IMPORT
    sets = setups(args.checkpoint, args.n)
    for s in sets:
        s["tau"] = acdc_tau(s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    have_ac = Path(args.autocircuit_python).exists()
    if not have_ac:
        print(INSTALL.format(path=args.autocircuit_python), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_circuits_") as tmp:
        tmp = Path(tmp)
        ac = ac_versions = None
        checks = {}
        if have_ac:
            ac_log = open(tmp / "autocircuit.log", "w")
            ac = AutoCircuit(args.autocircuit_python, ac_log)
        try:
            if ac:
                ac_versions = ac.call(cmd="versions")
                for s in sets:
                    folder = tmp / s["name"]
                    export(s, folder)
                    info = ac.call(cmd="load", name=s["name"], dir=str(folder))
                    if info["n_edges"] != s["n_edges"]:
                        raise RuntimeError(f"{s['name']}: auto-circuit has {info['n_edges']} edges, mechgrok "
                                           f"{s['n_edges']}")
                    theirs = load_file(str(folder / info["clean_logits"]))["logits"]
                    with mg.models.patchable(s["model"]):
                        mine_fwd = _median_ms(lambda: s["model"](s["x"]), reps=31, grad=False)
                    checks[s["name"]] = {"clean_logits_max_abs_diff": float((theirs - s["clean_logits"]).abs().max()),
                                         "patchable_model_setup_ms": info["setup_s"] * 1e3,
                                         "forward_ms_mechgrok_tl": mine_fwd, "forward_ms_autocircuit_tl": info["forward_ms"]}
                    log.info("%s: %s", s["name"], checks[s["name"]])
            rows = bench(sets, ac, trials, warmup, tmp)
        finally:
            if ac:
                ac.close()
                ac_log.close()
                tail = (tmp / "autocircuit.log").read_text()[-2000:]
                if tail.strip():
                    log.info("auto-circuit worker stderr (tail):\n%s", tail)

    comps = {s["name"]: components(s) for s in sets}
    comp_md = ["| mechgrok component (median ms) | " + " | ".join(comps) + " |", "|---|" + "---:|" * len(comps)]
    for k in next(iter(comps.values())):
        comp_md.append(f"| {k} | " + " | ".join(f"{c[k]:.1f}" for c in comps.values()) + " |")
    source = dict(source_before)  # the code imported (and so timed) is the code at import time
    now = mechgrok_source()
    if now != source_before:
        log.warning("mechgrok's circuit files changed after this run imported them (%s -> %s); the numbers are "
                    "for the imported version", source_before, now)
        source["files_changed_after_import"] = now
    mach = machine(ac_versions)
    desc = (f"{mach['arch']} {mach['kind']}, {mach['cpus']} CPUs ({mach['cpu']}), torch {mach['torch']} with 1 thread "
            f"on both sides, Python {mach['python']}; mechgrok on transformer-lens {mach['mechgrok_transformer_lens']}; "
            f"1-minute load average {mach['loadavg_1min_start']:.1f} at the start, {mach['loadavg_1min_end']:.1f} at "
            "the end (the machine is shared; the interleaving spreads other load over both libraries)")
    if ac_versions:
        desc += (f"; auto-circuit {mach['autocircuit']} on transformer-lens {mach['autocircuit_transformer_lens']} "
                 f"(torch {mach['autocircuit_torch']}, numpy {mach['autocircuit_numpy']}), separate venv "
                 "(install: benchmarks/README_autocircuit.md)")
    models_desc = "; ".join(f"{s['name']}: {s['source']}, {s['n_edges']} edges, ACDC tau {s['tau']:.4g}" for s in sets)
    check_desc = "; ".join(f"{k}: clean logits max |Δ| {v['clean_logits_max_abs_diff']:.1e}; plain no-grad forward "
                           f"with the patching hooks enabled {v['forward_ms_mechgrok_tl']:.2f} ms (mechgrok's "
                           f"transformer-lens) vs {v['forward_ms_autocircuit_tl']:.2f} ms (auto-circuit's); auto-circuit "
                           f"patchable_model() one-off {v['patchable_model_setup_ms']:.1f} ms (not in the times)"
                           for k, v in checks.items())
    src_desc = (f"mechgrok commit {source.get('commit', '?')}"
                + (f" + uncommitted changes to {', '.join(source['uncommitted'])}" if source.get("uncommitted") else "")
                + f" (circuits code sha256 {source['circuits_sha256']})"
                + ("; the files changed after import (numbers are for the imported version)"
                   if source.get("files_changed_after_import") else ""))
    md = (f"# circuit discovery benchmark: mechgrok vs auto-circuit\n\nMachine: {desc}.\n\nCode: {src_desc}.\n\n"
          f"Models (p=59 modular addition, d_model 64, 4 heads, d_mlp 256): {models_desc}. {args.n} clean test "
          f"examples with resampled counterfactuals; metric: logit difference (correct answer vs the "
          f"counterfactual's answer); ACDC: KL to the clean output. Median of {trials} trials after {warmup} "
          f"warm-up round(s), all jobs in a random order per round{' (--quick)' if args.quick else ''}.\n\n"
          + (f"Checks: {check_desc}.\n\n" if check_desc else "auto-circuit not installed: mechgrok side only.\n\n")
          + table(rows) + "\n\n" + "\n".join(comp_md) + "\n\n"
          + NOTES.format(tl_mg=mach["mechgrok_transformer_lens"],
                         tl_ac=mach.get("autocircuit_transformer_lens", "n/a")))
    (RESULTS / "bench_circuits.md").write_text(md)
    (RESULTS / "bench_circuits.json").write_text(json.dumps(
        {"machine": mach, "mechgrok_source": source, "trials": trials, "warmup": warmup, "n": args.n, "ig_steps": IG_STEPS,
         "models": [{k: s[k] for k in ("name", "source", "n_edges", "tau")} for s in sets],
         "checks": checks, "rows": rows, "mechgrok_components_ms": comps}, indent=2))
    log.info("\n%s", md)
    if args.profile:
        text = profile(sets)
        (RESULTS / "bench_circuits.profile.txt").write_text(text)
        log.info("profile written to %s", RESULTS / "bench_circuits.profile.txt")


SOURCE_AT_IMPORT = mechgrok_source()
LOAD_AT_START = os.getloadavg()[0]

if __name__ == "__main__":
    main()
