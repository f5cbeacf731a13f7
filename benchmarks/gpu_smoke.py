"""Every mechgrok capability on a CUDA device, each checked against the same call on the CPU.

    python benchmarks/gpu_smoke.py                 # on cuda; "no CUDA device; nothing run" without one
    python benchmarks/gpu_smoke.py --device cpu    # the same code path on the CPU (how CI and laptops test it)

Models (tiny and seeded, so a run takes well under 3 minutes on a GPU): a 2-layer LayerNorm / GELU
HookedTransformer from ``mg.models.transformer(..., device=dev)`` on modular addition (p=11, 20% of
the training labels corrupted, so memorization scores mean something), and a random 2-layer Hugging
Face GPT-2 (d_model 32, vocabulary 50, context 16) converted by ``mg.models.from_pretrained(hf,
device=dev)`` and also used raw (module paths, ``Conv1D`` layers). Every check builds its CPU twin
with the same seed and compares (float32: relative 1e-4 on logits and activations, 1e-3 on
gradient-based scores and trained losses; float64 EK-FAC on the HF model: 1e-6). One line per
capability with its time and PASS / FAIL; exit status 1 when any check failed, 0 when all passed.

Capabilities: models (build, convert, save / load), train (a few steps; resume; ``Run.load_model``),
evaluate, capture (every backend; an HF model by module path), circuits (exact / EAP / EAP-IG /
ACDC at node, edge and neuron level with ``Prompts.to(device)``; discover + faithfulness; the
converted GPT-2), neurons (IPR, memorization score, classify, prune, ablate, prune sweep, direct
logit map; ablate on the raw HF model), SAEs (``mg.sae.train(..., position="all")`` + evaluate on a
HookedTransformer and on the raw HF model), EK-FAC (fit + scores on a Task and on Sequences; save /
load).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import mechgrok as mg  # noqa: E402
from mechgrok.capture import BACKENDS  # noqa: E402
from mechgrok.influence import EKFAC, Sequences  # noqa: E402

log = logging.getLogger("gpu_smoke")
CHECKS: list[tuple[str, Callable]] = []
VOCAB, N_CTX = 50, 16


def check(name: str):
    """Register a capability check: ``fn(ctx) -> str`` (a short detail), raising on a mismatch."""
    def wrap(fn):
        CHECKS.append((name, fn))
        return fn
    return wrap


def close(a, b, rtol: float, what: str) -> float:
    """``max|a - b| / max(max|b|, 1e-12)`` (``a`` moved to the CPU), asserted ``<= rtol``; returns it."""
    a, b = torch.as_tensor(a).detach().cpu().double(), torch.as_tensor(b).detach().cpu().double()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    rel = float((a - b).abs().max() / max(float(b.abs().max()), 1e-12)) if a.numel() else 0.0
    assert rel <= rtol, f"{what}: relative difference {rel:.2e} > {rtol:g}"
    return rel


def on(model, dev: torch.device) -> bool:
    return all(p.device.type == dev.type for p in model.parameters())


# ------------------------------------------------------------------------------ context
class Ctx:
    """What the checks share: the device, a scratch folder, the task, the models on both devices."""

    def __init__(self, dev: torch.device, tmp: Path):
        self.dev, self.tmp, self.cpu = dev, tmp, torch.device("cpu")
        self.task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.6, corrupt_frac=0.2, seed=0)
        self.tokens = torch.randint(VOCAB, (24, N_CTX), generator=torch.Generator().manual_seed(1))
        self.hf_cpu = tiny_gpt2()

    def transformer(self, device) -> torch.nn.Module:
        return mg.models.transformer(self.task, n_layers=2, d_model=32, n_heads=4, d_mlp=64, normalization="LN",
                                     act_fn="gelu", seed=0, device=device)

    def prompts(self, n: int = 32) -> mg.circuits.Prompts:
        t, g = self.task, torch.Generator().manual_seed(0)
        idx = torch.nonzero(t.test).flatten()[:n]
        other = torch.randint(len(t.inputs), (len(idx),), generator=g)
        y, yc = t.labels[idx], t.labels[other]
        return mg.circuits.Prompts(t.inputs[idx], t.inputs[other], correct=y,
                                   incorrect=torch.where(yc == y, (y + 1) % t.d_vocab_out, yc))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=N_CTX, vocab_size=VOCAB, bos_token_id=0,
                     eos_token_id=0, architectures=["GPT2LMHeadModel"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg).eval()


# ------------------------------------------------------------------------------ models
@check("models.transformer")
def _(c: Ctx) -> str:
    m, ref = c.transformer(c.dev), c.transformer(None)
    assert on(m, c.dev) and m.cfg.device.startswith(c.dev.type), f"model on {mg.models.device_of(m)}"
    with torch.no_grad():
        rel = close(m(c.task.inputs.to(c.dev)), ref(c.task.inputs), 1e-4, "logits")
    return f"logits vs CPU {rel:.1e}"


@check("models.from_pretrained")
def _(c: Ctx) -> str:
    c.hf_cpu.save_pretrained(c.tmp / "hf")
    with torch.no_grad():
        ref = c.hf_cpu(c.tokens).logits
        rels = [close(mg.models.from_pretrained(src, device=c.dev)(c.tokens.to(c.dev)), ref, 1e-4, f"logits ({kind})")
                for kind, src in (("in-memory", c.hf_cpu), ("folder", c.tmp / "hf"))]
    return f"logits vs HF on CPU {max(rels):.1e} (in memory and from a folder)"


@check("models.save/load")
def _(c: Ctx) -> str:
    out = []
    converted = mg.models.from_pretrained(c.hf_cpu, device=c.dev)
    for name, m in (("transformer", c.transformer(c.dev)), ("converted GPT-2", converted)):
        mg.models.save(m, c.tmp / f"saved-{name}")
        back = mg.models.load(c.tmp / f"saved-{name}", device=c.dev)
        assert on(back, c.dev), f"{name} loaded on {mg.models.device_of(back)}"
        x = (c.task.inputs if name == "transformer" else c.tokens).to(c.dev)
        with torch.no_grad():
            assert torch.equal(back(x), m(x)), f"{name}: reloaded logits differ"
        out.append(name)
    return "bitwise equal after reload: " + ", ".join(out)


# ------------------------------------------------------------------------------ train / evaluate
@check("train (+ resume, Run.load_model)")
def _(c: Ctx) -> str:
    cfg = mg.TrainConfig(steps=30, eval_every=10, checkpoint_every=10, lr=3e-3)
    runs = {}
    for key, dev in (("dev", c.dev), ("cpu", None)):
        m = c.transformer(dev)
        if key == "dev":  # stopped at step 10 and resumed: the same numbers as one run
            mg.train(m, c.task, cfg, out=c.tmp / "run-dev", stop_at=10, progress=False)
            m = c.transformer(dev)
        runs[key] = mg.train(m, c.task, cfg, out=c.tmp / f"run-{key}", progress=False)
    last = {k: r.history()[-1] for k, r in runs.items()}
    rel = close(last["dev"]["train_loss"], last["cpu"]["train_loss"], 1e-3, "train loss after 30 steps")
    loaded = runs["dev"].load_model(device=c.dev)
    assert on(loaded, c.dev), f"Run.load_model(device=...) gave {mg.models.device_of(loaded)}"
    c.trained = {"dev": loaded, "cpu": runs["cpu"].load_model()}
    return f"train loss {last['dev']['train_loss']:.4f} vs CPU {last['cpu']['train_loss']:.4f} (rel {rel:.1e})"


@check("evaluate")
def _(c: Ctx) -> str:
    m_dev, m_cpu = _trained(c)
    a, b = mg.evaluate(m_dev, c.task), mg.evaluate(m_cpu, c.task)
    for split in ("train", "test"):
        close(a[split]["loss"], b[split]["loss"], 1e-4, f"{split} loss")
        assert abs(a[split]["acc"] - b[split]["acc"]) <= 1.5 / len(c.task.inputs), f"{split} accuracy differs"
    a_mlp = mg.evaluate(mg.models.mlp(c.task, width=16, device=c.dev), c.task)
    b_mlp = mg.evaluate(mg.models.mlp(c.task, width=16), c.task)
    close(a_mlp["test"]["loss"], b_mlp["test"]["loss"], 1e-4, "HookedMLP test loss")
    return f"test acc {a['test']['acc']:.3f}, loss {a['test']['loss']:.4f} (and a HookedMLP)"


def _trained(c: Ctx):
    if not hasattr(c, "trained"):  # the train check failed or was skipped: untrained twins
        c.trained = {"dev": c.transformer(c.dev), "cpu": c.transformer(None)}
    return c.trained["dev"], c.trained["cpu"]


# ------------------------------------------------------------------------------ capture
@check("capture (every backend; HF by module path)")
def _(c: Ctx) -> str:
    m_dev, m_cpu = _trained(c)
    hooks = ["blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
    ref = mg.capture(m_cpu, c.task.inputs, hooks, progress=False)
    worst = 0.0
    for b in BACKENDS:
        got = mg.capture(m_dev, c.task.inputs.to(c.dev), hooks, backend=b, progress=False)
        worst = max(worst, *(close(got[h], ref[h], 1e-4, f"{b} {h}") for h in hooks))
    hf_dev = copy.deepcopy(c.hf_cpu).to(c.dev)
    paths = ["transformer.h.0", "transformer.h.1.mlp.act"]
    ref = mg.capture(c.hf_cpu, c.tokens, paths, backend="torch", progress=False)
    for b in ("torch", "nnsight"):
        got = mg.capture(hf_dev, c.tokens.to(c.dev), paths, backend=b, progress=False)
        worst = max(worst, *(close(got[p], ref[p], 1e-4, f"HF {b} {p}") for p in paths))
    return f"{len(BACKENDS)} backends + HF torch/nnsight, max rel vs CPU {worst:.1e}"


# ------------------------------------------------------------------------------ circuits
def _circuit_check(method: str, level: str):
    def fn(c: Ctx) -> str:
        m_dev, m_cpu = _trained(c)
        p = c.prompts()
        metric = mg.circuits.metrics.logit_diff()
        kw = dict(method=method, level=level, progress=False)
        if method == "acdc":  # one threshold on both devices: 1% of the clean - corrupted metric gap
            with torch.no_grad():
                gap = float(metric.bind(p)(m_cpu(p.clean)) - metric.bind(p)(m_cpu(p.corrupted)))
            kw["tau"] = 0.01 * abs(gap)
        a = mg.circuits.attribute(m_dev, p.to(c.dev), metric, **kw)
        b = mg.circuits.attribute(m_cpu, p, metric, **kw)
        assert list(a) == list(b), "component names differ"
        rel = close(torch.tensor(list(a.values())), torch.tensor(list(b.values())), 1e-3, "scores")
        extra = ""
        if method == "acdc":
            ka, kb = set(mg.circuits.acdc_kept(a, kw["tau"])), set(mg.circuits.acdc_kept(b, kw["tau"]))
            assert ka == kb, f"ACDC kept {len(ka)} components on {c.dev} but {len(kb)} on the CPU"
            extra = f", kept {len(ka)}"
        return f"{len(a)} components, max rel vs CPU {rel:.1e}{extra}"
    return fn


for _level in ("node", "edge", "neuron"):
    for _method in ("exact", "eap", "eap-ig", "acdc"):
        check(f"circuits {_method} {_level}")(_circuit_check(_method, _level))


@check("circuits discover + faithfulness")
def _(c: Ctx) -> str:
    m_dev, m_cpu = _trained(c)
    p, metric = c.prompts(), mg.circuits.metrics.logit_diff()
    circ = mg.circuits.discover(m_dev, p.to(c.dev), metric, method="eap-ig", level="edge", top_k=20, progress=False)
    ref = mg.circuits.discover(m_cpu, p, metric, method="eap-ig", level="edge", top_k=20, progress=False)
    fa, fb = (mg.circuits.faithfulness(m, x, q, metric) for m, x, q in ((m_dev, circ, p.to(c.dev)), (m_cpu, ref, p)))
    assert abs(fa - fb) <= 1e-3 * max(1.0, abs(fb)), f"faithfulness {fa:.6f} on {c.dev} vs {fb:.6f} on the CPU"
    return f"top-20 edge circuit, faithfulness {fa:.4f} (CPU {fb:.4f})"


@check("circuits on converted HF GPT-2 (eap edge)")
def _(c: Ctx) -> str:
    m_dev, m_cpu = mg.models.from_pretrained(c.hf_cpu, device=c.dev), mg.models.from_pretrained(c.hf_cpu)
    g = torch.Generator().manual_seed(2)
    half = torch.randint(VOCAB, (16, N_CTX // 2), generator=g)
    other = (half + 1 + torch.randint(VOCAB - 1, half.shape, generator=g)) % VOCAB  # every token differs
    p = mg.circuits.Prompts(half.repeat(1, 2), other.repeat(1, 2), correct=half[:, 0], incorrect=other[:, 0])
    metric = mg.circuits.metrics.logit_diff()
    a = mg.circuits.attribute(m_dev, p.to(c.dev), metric, method="eap", level="edge", progress=False)
    b = mg.circuits.attribute(m_cpu, p, metric, method="eap", level="edge", progress=False)
    rel = close(torch.tensor(list(a.values())), torch.tensor(list(b.values())), 1e-3, "edge scores")
    return f"{len(a)} edges, max rel vs CPU {rel:.1e}"


# ------------------------------------------------------------------------------ neurons
@check("neurons (ipr, memorization, classify, prune, ablate, sweep)")
def _(c: Ctx) -> str:
    m_dev, m_cpu = _trained(c)
    t = c.task
    close(mg.neurons.ipr(m_dev, t, layer=1), mg.neurons.ipr(m_cpu, t, layer=1), 1e-3, "IPR")
    mem_a, mem_b = mg.neurons.memorization_score(m_dev, t, layer=1), mg.neurons.memorization_score(m_cpu, t, layer=1)
    close(mem_a, mem_b, 1e-3, "memorization score")
    close(mg.neurons.direct_logit_map(m_dev, layer=1), mg.neurons.direct_logit_map(m_cpu, layer=1), 1e-4,
          "direct logit map")
    groups = mg.neurons.classify(m_dev, t, score="memorization", layer=1)
    ref_groups = mg.neurons.classify(m_cpu, t, score="memorization", layer=1)
    assert groups.memorizing == ref_groups.memorizing, "classify: memorizing neurons differ from the CPU's"
    some = list(range(8))
    for name, fn in (("prune", lambda m: mg.neurons.prune(m, some, layer=1)),
                     ("ablate", lambda m: mg.neurons.ablate(m, some, layer=1))):
        a, b = mg.evaluate(fn(m_dev), t), mg.evaluate(fn(m_cpu), t)
        close(a["test"]["loss"], b["test"]["loss"], 1e-4, f"{name}: test loss")
    sweep = mg.neurons.prune_sweep(m_dev, t, "memorization", counts=[0, 16, 32], orders=("low-first",), seeds=(0,),
                                   layer=1, progress=False)
    ref = mg.neurons.prune_sweep(m_cpu, t, "memorization", counts=[0, 16, 32], orders=("low-first",), seeds=(0,),
                                 layer=1, progress=False)
    assert len(sweep) == len(ref), "prune sweeps differ in length"
    hf_dev = copy.deepcopy(c.hf_cpu).to(c.dev)
    with torch.no_grad():
        a = mg.neurons.ablate(hf_dev, some, hook="transformer.h.0.mlp.act")(c.tokens.to(c.dev)).logits
        b = mg.neurons.ablate(c.hf_cpu, some, hook="transformer.h.0.mlp.act")(c.tokens).logits
    close(a, b, 1e-4, "HF ablate logits")
    return (f"{len(groups.memorizing)} memorizing / {len(groups.generalizing)} generalizing neurons (as on the CPU); "
            "prune, ablate, sweep, direct logit map and HF ablate match")


# ------------------------------------------------------------------------------ SAEs
@check("sae.train position='all' + evaluate")
def _(c: Ctx) -> str:
    m_dev, m_cpu = _trained(c)
    kw = dict(hook="blocks.0.hook_resid_post", position="all", steps=60, d_sae=64, k=4, progress=False)
    out = []
    for name, (a_model, b_model, data_a, data_b) in {
            "HookedTransformer": (m_dev, m_cpu, c.task, c.task),
            "raw HF GPT-2 (transformer.h.0)": (copy.deepcopy(c.hf_cpu).to(c.dev), c.hf_cpu, c.tokens.to(c.dev),
                                               c.tokens)}.items():
        if name.startswith("raw"):
            kw["hook"] = "transformer.h.0"
        sa = mg.sae.train(a_model, data_a, out=c.tmp / f"sae-dev-{len(out)}", **kw)
        sb = mg.sae.train(b_model, data_b, out=c.tmp / f"sae-cpu-{len(out)}", **kw)
        assert next(sa.parameters()).device.type == c.dev.type, f"SAE trained on {next(sa.parameters()).device}"
        ea, eb = mg.sae.evaluate(a_model, sa, data_a), mg.sae.evaluate(b_model, sb, data_b)
        split = "test" if "test" in ea["by_split"] else "all"
        va, vb = ea["by_split"][split]["explained_variance"], eb["by_split"][split]["explained_variance"]
        # 60 Adam steps on float32 activations: the two devices' rounding drifts a little
        assert abs(va - vb) <= 0.02, f"{name}: explained variance {va:.4f} on {c.dev} vs {vb:.4f} on the CPU"
        out.append(f"{name} EV {va:.3f} (CPU {vb:.3f})")
    return "; ".join(out)


# ------------------------------------------------------------------------------ EK-FAC
@check("influence EKFAC on a Task (+ save/load)")
def _(c: Ctx) -> str:
    m_dev, m_cpu = _trained(c)
    kw = dict(fisher="true", n_samples=2, progress=False)
    a = EKFAC(m_dev, c.task, **kw).fit("train")
    b = EKFAC(m_cpu, c.task, **kw).fit("train")
    assert next(iter(a.lambda_.values())).device.type == c.dev.type, "factors not on the model's device"
    sa, sb = a.scores("test", "train"), b.scores("test", "train")
    rel = close(sa, sb, 1e-3, "scores")
    close(a.self_influence(), b.self_influence(), 1e-3, "self-influence")
    a.save(c.tmp / "ekfac-task")
    back = EKFAC.load(c.tmp / "ekfac-task", m_dev, c.task, progress=False)
    assert torch.equal(back.scores("test", "train"), sa), "scores differ after save/load"
    return f"{len(a.maps)} maps, scores {tuple(sa.shape)} max rel vs CPU {rel:.1e}; reloaded bitwise"


@check("influence EKFAC on Sequences (HF GPT-2, Conv1D)")
def _(c: Ctx) -> str:
    hf_cpu = copy.deepcopy(c.hf_cpu).double()
    seqs = Sequences(c.tokens, name="smoke")
    kw = dict(fisher="empirical", progress=False)
    a = EKFAC(copy.deepcopy(hf_cpu).to(c.dev), seqs, **kw).fit(range(4, 24))
    b = EKFAC(hf_cpu, seqs, **kw).fit(range(4, 24))
    rel = close(a.scores(range(4)), b.scores(range(4)), 1e-6, "scores (float64 model)")
    a.save(c.tmp / "ekfac-seq")
    back = EKFAC.load(c.tmp / "ekfac-seq", a.model, seqs, progress=False)
    close(back.scores(range(4)), b.scores(range(4)), 1e-6, "scores after save/load")
    return f"{a.coverage.short()}; max rel vs CPU {rel:.1e}"


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available), cuda:1, or cpu")
    ap.add_argument("-k", default=None, help="run only the checks whose name contains this")
    args = ap.parse_args()
    if args.device is None:
        if not torch.cuda.is_available():
            print("no CUDA device; nothing run")
            return 0
        args.device = "cuda"
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here")
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its shard-writing / weight-loading bars
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"mechgrok gpu_smoke on {dev} ({name}), torch {torch.__version__}; reference: the same calls on the CPU")
    failures, t_all = 0, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mechgrok-gpu-smoke-") as tmp:
        c = Ctx(dev, Path(tmp))
        for label, fn in CHECKS:
            if args.k and args.k not in label:
                continue
            t0 = time.perf_counter()
            try:
                detail, status = fn(c), "PASS"
            except Exception as e:  # report and go on: one line per capability
                detail, status = f"{type(e).__name__}: {e}", "FAIL"
                failures += 1
                log.debug("%s", traceback.format_exc())
                tb = traceback.extract_tb(e.__traceback__)[-1]
                detail += f" ({Path(tb.filename).name}:{tb.lineno})"
            print(f"{status}  {time.perf_counter() - t0:6.2f}s  {label}: {detail}", flush=True)
    print(f"{'all passed' if not failures else f'{failures} FAILED'} in {time.perf_counter() - t_all:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
