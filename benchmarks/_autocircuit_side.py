"""auto-circuit side of ``bench_circuits.py``; runs in the separate auto-circuit venv.

Started by ``bench_circuits.py`` as a long-lived subprocess with the auto-circuit venv's python
(see ``benchmarks/README_autocircuit.md``). It never imports mechgrok: it rebuilds each model as a
transformer-lens ``HookedTransformer`` from ``config.json`` + ``model.safetensors`` written by the
driver, and reads the clean / corrupted batches and answers from ``inputs.safetensors``.

Protocol: one JSON command per line on stdin, one reply per line on stdout prefixed with ``@@``
(anything else printed on stdout is ignored by the driver). Commands:

- ``{"cmd": "load", "name": N, "dir": D, "forward_reps": R}``: build the model, wrap it with
  ``auto_circuit.utils.graph_utils.patchable_model`` (timed separately: one-off setup), time a
  plain forward of the unwrapped model (the transformer-lens version's own cost; median of ``R``
  runs after ``min(5, R)`` warm-up runs, default 31: fewer for a large model), write its clean
  final-position logits to ``D/ac_clean_logits.safetensors`` for the driver's check. Used by
  ``bench_circuits.py`` and ``bench_gpt2_small.py`` (whose ``config.json`` also carries ``eps``
  and the other transformer-lens fields a GPT-2 needs; any ``HookedTransformerConfig`` field works).
- ``{"cmd": "run", "name": N, "method": "eap"|"eap-ig"|"acdc", "tau": float, "ig_samples": int,
  "scores": PATH|null}``: time one call of auto-circuit's prune-score function; with ``scores``,
  write ``{mechgrok edge name: score}`` as JSON there.
- ``{"cmd": "maxrss"}``: this process's peak resident memory so far (MB; ``bench_gpt2_small.py``'s
  memory probe).
- ``{"cmd": "versions"}``, ``{"cmd": "quit"}``.

Timed region (what a user calls): ``mask_gradient_prune_scores`` (EAP: ``mask_val=0``; EAP-IG:
``integrated_grad_samples``) or ``acdc_prune_scores`` with a single threshold. Both compute their
own clean / corrupted source activations inside the call, as mechgrok's ``attribute`` does.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off, as mechgrok's progress=False
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

from safetensors.torch import load_file, save_file  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from auto_circuit.data import PromptDataLoader, PromptDataset  # noqa: E402
from auto_circuit.prune_algos.ACDC import acdc_prune_scores  # noqa: E402
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.types import AblationType  # noqa: E402
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402

MODELS: dict[str, dict] = {}


def _src_name(name: str) -> str:
    """auto-circuit source node name -> mechgrok node name."""
    if name == "Resid Start":
        return "input"
    if name.startswith("MLP "):
        return f"m{int(name[4:])}"
    layer, head = name[1:].split(".")  # "A1.2"
    return f"a{int(layer)}.h{int(head)}"


def _dest_name(name: str) -> str:
    """auto-circuit destination node name -> mechgrok receiver name."""
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return f"m{int(name[4:])}"
    layer, head, qkv = name[1:].split(".")  # "A1.2.Q"
    return f"a{int(layer)}.h{int(head)}.{qkv.lower()}"


def edge_name(edge) -> str:
    return f"{_src_name(edge.src.name)}->{_dest_name(edge.dest.name)}"


def load(name: str, path: str, forward_reps: int = 31) -> dict:
    cfg = json.load(open(os.path.join(path, "config.json")))
    model = HookedTransformer(HookedTransformerConfig(**cfg, device="cpu"))
    state = load_file(os.path.join(path, "model.safetensors"))
    missing = set(dict(model.named_parameters())) ^ set(state)
    if missing:
        raise ValueError(f"parameter names differ between the two transformer-lens versions: {sorted(missing)}")
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(state[k])
    model.eval()
    for p in model.parameters():  # as auto_circuit.experiment_utils.load_tl_model
        p.requires_grad_(False)
    data = load_file(os.path.join(path, "inputs.safetensors"))
    with torch.no_grad():
        clean_logits = model(data["clean"])[:, -1].contiguous()
    save_file({"logits": clean_logits}, os.path.join(path, "ac_clean_logits.safetensors"))

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    forward_ms = _forward_ms(model, data["clean"], forward_reps)  # this transformer-lens version's own forward cost
    t0 = time.perf_counter()
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True,
                         device=torch.device("cpu"))
    setup_s = time.perf_counter() - t0
    n = len(data["clean"])
    ds = PromptDataset(data["clean"], data["corrupted"], data["answers"][:, None], data["wrong"][:, None])
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=n, shuffle=False)
    MODELS[name] = {"model": pm, "loader": loader}
    return {"setup_s": setup_s, "n_edges": len(pm.edges), "clean_logits": "ac_clean_logits.safetensors",
            "forward_ms": forward_ms}


def _forward_ms(model, x, reps: int = 31) -> float:
    """Median ms of a plain no-grad forward (per-head outputs and q/k/v/MLP inputs hooked)."""
    ts, warm = [], min(5, reps)
    with torch.no_grad():
        for i in range(reps + warm):
            t0 = time.perf_counter()
            model(x)
            if i >= warm:
                ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def run(name: str, method: str, tau: float | None = None, ig_samples: int = 4, scores: str | None = None) -> dict:
    m = MODELS[name]
    pm, loader = m["model"], m["loader"]
    t0 = time.perf_counter()
    if method == "eap":
        ps = mask_gradient_prune_scores(pm, loader, None, grad_function="logit", answer_function="avg_diff",
                                        mask_val=0.0, ablation_type=AblationType.RESAMPLE, clean_corrupt="corrupt")
    elif method == "eap-ig":
        ps = mask_gradient_prune_scores(pm, loader, None, grad_function="logit", answer_function="avg_diff",
                                        integrated_grad_samples=ig_samples, ablation_type=AblationType.RESAMPLE,
                                        clean_corrupt="corrupt")
    elif method == "acdc":
        # one threshold (tao = base * 10**exp): the same single sweep over the edges as mechgrok's ACDC
        ps = acdc_prune_scores(pm, loader, None, tao_exps=[0], tao_bases=[float(tau)], faithfulness_target="kl_div")
    else:
        raise ValueError(method)
    elapsed = time.perf_counter() - t0
    out = {"time_s": elapsed}
    if scores:
        table = {edge_name(e): float(ps[e.dest.module_name][e.patch_idx]) for e in pm.edges}
        with open(scores, "w") as f:
            json.dump(table, f)
    return out


def versions() -> dict:
    v = {k: importlib.metadata.version(k) for k in ("auto-circuit", "transformer-lens", "torch", "numpy")}
    v["python"] = sys.version.split()[0]
    v["threads"] = torch.get_num_threads()
    return v


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            if cmd == "quit":
                reply = {"ok": True}
            elif cmd == "load":
                reply = {"ok": True, **load(req["name"], req["dir"], int(req.get("forward_reps", 31)))}
            elif cmd == "run":
                reply = {"ok": True, **run(**req)}
            elif cmd == "maxrss":
                import resource

                reply = {"ok": True, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            elif cmd == "versions":
                reply = {"ok": True, **versions()}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as e:  # report, keep serving
            import traceback
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        sys.stdout.write("@@" + json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd == "quit":
            break


if __name__ == "__main__":
    main()
