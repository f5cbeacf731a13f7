"""Circuits on transformer-lens models mechgrok did not build: GPT-2-, Pythia- and Llama-style
configs (LayerNorm / RMSNorm, GELU / gated SiLU, biases, learned / rotary positions, parallel
attention, grouped-query attention) and an attention-only model.

Ground truths: the full circuit is the clean model and the empty one the corrupted model at every
level; and a planted circuit (a random model whose other heads and MLPs write nothing) is what
every method finds.
"""

import hf_models
import pytest
import torch

import mechgrok as mg
from mechgrok.circuits import Patcher, Prompts, attribute, graph, metrics
from mechgrok.circuits.attribution import acdc_default_tau, acdc_kept
from mechgrok.models import HookedTransformer, HookedTransformerConfig

V, T = 20, 6
STYLES = {
    "gpt2": dict(normalization_type="LN", act_fn="gelu_new"),
    "pythia": dict(normalization_type="LN", act_fn="gelu", positional_embedding_type="rotary", rotary_dim=2,
                   parallel_attn_mlp=True),
    "llama": dict(normalization_type="RMS", act_fn="silu", positional_embedding_type="rotary", rotary_dim=4,
                  gated_mlp=True, n_key_value_heads=2, final_rms=True),
    "attn-only": dict(normalization_type="LN", attn_only=True),
}
MORE_STYLES = {  # for the gradient identities: no norm at all, and shortformer positions
    "no-norm": dict(normalization_type=None, act_fn="gelu"),
    "shortformer": dict(normalization_type="LNPre", positional_embedding_type="shortformer"),
}
LIVE_HEADS = {"a0.h1", "a1.h2"}  # the planted circuit: these heads and m1 write, nothing else does


def tl_model(style: str, seed: int = 0, planted: bool = False) -> HookedTransformer:
    """A random 2-layer model of ``style`` with random (non-zero) biases; ``planted``: every head
    but ``LIVE_HEADS`` and the MLP of layer 0 write nothing (their output weights are zero)."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=16, d_vocab=V, n_ctx=T,
                                  device="cpu", **{"act_fn": "relu", **{**STYLES, **MORE_STYLES}[style]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedTransformer(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.split(".")[-1].startswith("b_"):
                    p.normal_(0, 0.1)
                elif p.ndim >= 2:
                    p.normal_(0, 0.4)
            if planted:
                for layer in range(2):
                    for h in range(4):
                        if f"a{layer}.h{h}" not in LIVE_HEADS:
                            model.blocks[layer].attn.W_O[h] = 0
                if not cfg.attn_only:
                    model.blocks[0].mlp.W_out.zero_()
    return model.eval()


def hf_converted(style: str, planted: bool = False) -> HookedTransformer:
    """A tiny random Hugging Face model (tests/hf_models.py) converted by ``from_pretrained``;
    ``planted``: its weights redrawn at ``tl_model``'s larger scale (at HF's initial scale, 0.02,
    attention is nearly uniform and the query/key edges move the metric by less than 1e-4 of the
    largest effect) and the output weights zeroed as ``tl_model`` does."""
    model = mg.models.from_pretrained(hf_models.BUILDERS[style]())
    if planted:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            for name, p in model.named_parameters():
                if name.split(".")[-1].startswith("b_"):
                    p.normal_(0, 0.1)
                elif p.ndim >= 2:
                    p.normal_(0, 0.4)
            for layer in range(2):
                for h in range(model.cfg.n_heads):
                    if f"a{layer}.h{h}" not in LIVE_HEADS:
                        model.blocks[layer].attn.W_O[h] = 0
            model.blocks[0].mlp.W_out.zero_()
    return model


def prompts_for(model: HookedTransformer, n: int = 12, seed: int = 0, n_pos: int = T) -> Prompts:
    """Random clean/corrupted prompts, answers read at random positions >= 2 (not only the last)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = torch.randint(0, vocab, (n, n_pos), generator=g)
    pos = torch.randint(2, n_pos, (n,), generator=g)
    with torch.no_grad():
        rows = torch.arange(n)
        correct = model(clean)[rows, pos].argmax(-1)
        incorrect = model(corrupted)[rows, pos].argmax(-1)
    incorrect = torch.where(incorrect == correct, (correct + 1) % vocab, incorrect)
    return Prompts(clean, corrupted, pos, correct, incorrect)


@pytest.mark.parametrize("style", list(STYLES))
def test_patching_reproduces_clean_and_corrupted_runs(style):
    model = tl_model(style)
    p = prompts_for(model)
    patcher = Patcher(model, graph(model), p.clean, p.corrupted)
    with torch.no_grad():
        clean, corrupted = model(p.clean), model(p.corrupted)
        assert torch.allclose(patcher.run()[0], clean, atol=1e-5)
        assert torch.allclose(patcher.run(masks=patcher.all_masks(0.0))[0], corrupted, atol=1e-5)  # every edge
        nodes = [n for n in patcher.sources if n != "input"]
        # every node but the input ablated: only the input's own edges stay clean, so this is not the
        # corrupted run; with the input ablated too it is
        assert torch.allclose(patcher.run(ablate_nodes=nodes + ["input"])[0], corrupted, atol=1e-5)
        assert not torch.allclose(clean, corrupted, atol=1e-3)


@pytest.mark.parametrize("style", [*STYLES, *MORE_STYLES])
@pytest.mark.parametrize("alpha", [None, 0.4])
def test_receiver_gradients_equal_those_of_the_split_forward(style, alpha):
    """EAP's receiver gradients come from the shared-input forward (the norm's vector-Jacobian
    product applied per head); the split-input forward, where every head has its own input tensor,
    is the definition. Same numbers on every receiver hook, in float64 (so to 1e-10: the two forwards
    add in different orders, which in float32 moves gradients by ~1e-5 of their size)."""
    model = tl_model(style).to(torch.float64)
    p = prompts_for(model)
    patcher = Patcher(model, graph(model), p.clean, p.corrupted)
    metric = metrics.bind(metrics.logit_diff(), p, lambda: patcher.run()[0])
    fast = patcher.receiver_grads(metric, alpha)
    with torch.enable_grad():
        logits, kept = patcher.run(interpolate=alpha, retain=list(patcher.receivers))
        metric(logits).backward()
    slow = {mg.circuits.patching.receiver_hook(model, r)[0]: t.grad for r, t in kept.items()}
    for q in model.parameters():
        q.grad = None
    assert set(fast) == set(slow)
    for hook, g in slow.items():
        scale = g.abs().max().item()
        assert scale > 0, hook
        assert fast[hook].shape == g.shape, hook
        assert (fast[hook] - g).abs().max().item() <= 1e-10 * scale, hook


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("level", ["edge", "node", "neuron"])
def test_full_circuit_is_faithful_and_empty_is_not(style, level):
    model = tl_model(style)
    p = prompts_for(model)
    metric = metrics.logit_diff()
    g = graph(model, level)
    full = mg.circuits.Circuit.from_graph(g, g.components, {c: 1.0 for c in g.components}, {})
    empty = mg.circuits.Circuit.from_graph(g, [], {c: 0.0 for c in g.components}, {})
    assert mg.circuits.faithfulness(model, full, p, metric) == pytest.approx(1.0, abs=1e-5)
    assert mg.circuits.faithfulness(model, empty, p, metric) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "pythia", "llama"])
def test_graph_follows_the_architecture(style):
    model = tl_model(style)
    names = {e.name for e in graph(model).edges}
    parallel = style == "pythia"
    assert ("a0.h0->m0" in names) != parallel  # a parallel block's MLP reads the layer's input, not its heads
    assert "a0.h0->m1" in names and "m0->a1.h3.k" in names and "input->logits" in names
    neurons = graph(model, "neuron").components
    assert "m1.n15" in neurons and "a1.h3" in neurons


def test_tl_style_metric_on_full_logits():
    """A metric written the transformer-lens way, on [batch, pos, vocab], works unchanged."""
    model = tl_model("gpt2")
    p = prompts_for(model)
    a, b = int(p.correct[0]), int(p.incorrect[0])
    tl_metric = lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()  # noqa: E731 (float32, the rest float64)
    same = metrics.logit_diff(torch.full((len(p),), a), torch.full((len(p),), b))  # reads the last position
    s1 = attribute(model, p, tl_metric, method="exact", level="node", progress=False)
    s2 = attribute(model, p, same, method="exact", level="node", progress=False)
    assert s1 == pytest.approx(s2, rel=1e-4, abs=1e-6) and max(abs(v) for v in s1.values()) > 1e-3


def test_answer_positions_are_where_the_metric_reads():
    """Scores at per-prompt answer positions equal those of the prompts cut to end there."""
    model = tl_model("llama")
    p = prompts_for(model, n=6)
    at = attribute(model, p, metrics.logit_diff(), method="exact", level="node", progress=False)
    for pos in sorted(set(p.answer_pos.tolist())):
        rows = p.answer_pos == pos
        cut = Prompts(p.clean[rows, :pos + 1], p.corrupted[rows, :pos + 1], None, p.correct[rows], p.incorrect[rows])
        part = attribute(model, cut, metrics.logit_diff(), method="exact", level="node", progress=False)
        w = float(rows.float().mean())
        for k in at:  # the full-batch mean is the row-weighted mean of the parts
            at[k] -= w * part[k]
    assert max(abs(v) for v in at.values()) < 1e-5


@pytest.mark.parametrize("style", list(STYLES))
def test_planted_circuit_is_found_by_every_method(style):
    model = tl_model(style, planted=True)
    p = prompts_for(model, n=16)
    metric = metrics.logit_diff()
    g = graph(model)
    live_nodes = LIVE_HEADS | {"input", "logits"} | (set() if model.cfg.attn_only else {"m1"})
    live = {e.name for e in g.edges if e.src in live_nodes and e.dst in live_nodes}
    planted = mg.circuits.Circuit.from_graph(g, live, {c: 1.0 for c in g.components}, {})
    assert mg.circuits.faithfulness(model, planted, p, metric) == pytest.approx(1.0, abs=1e-5)
    scores = {m: attribute(model, p, metric, method=m, progress=False) for m in ("exact", "eap", "eap-ig", "acdc")}
    top = max(abs(v) for v in scores["exact"].values())
    for m in ("exact", "eap", "eap-ig"):
        dead = max(abs(v) for k, v in scores[m].items() if k not in live)
        assert dead < 1e-7 * top, (m, dead)  # nothing outside the planted circuit gets any score
        found = {k for k, v in scores[m].items() if abs(v) > 1e-4 * top}
        assert found == live, (m, sorted(found ^ live))  # and every planted edge does (measured: all 12-16)
    with torch.no_grad():
        pt = Patcher(model, g, p.clean, p.corrupted)
        bound = metric.bind(p)
        full = float(bound(pt.run()[0]))
        empty = float(bound(pt.run(masks=pt.all_masks(0.0))[0]))
    kept = set(acdc_kept(scores["acdc"], acdc_default_tau(full, empty)))
    assert kept and kept <= live
    acdc = mg.circuits.Circuit.from_graph(g, kept, scores["acdc"], {})
    assert mg.circuits.faithfulness(model, acdc, p, metric) > 0.9


def test_circuits_refuse_what_they_cannot_split():
    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    with pytest.raises(TypeError, match="from_pretrained"):
        graph(model)
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=V, n_ctx=T,
                                  act_fn="gelu", normalization_type="RMS", use_normalization_before_and_after=True,
                                  device="cpu")
    with pytest.raises(ValueError, match="cannot split this model's residual stream"):
        graph(HookedTransformer(cfg))


def test_prompts_are_checked():
    clean = torch.randint(0, V, (4, T))
    with pytest.raises(ValueError, match="corrupted must have the clean prompts' shape"):
        Prompts(clean, clean[:3])
    with pytest.raises(ValueError, match=r"answer_pos must lie in \[-6, 6\)"):
        Prompts(clean, clean, answer_pos=torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match=r"answer_pos must have shape \[4\]"):
        Prompts(clean, clean, answer_pos=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer token ids"):
        Prompts(clean, clean, correct=torch.zeros(4))
    p = Prompts(clean, clean, answer_pos=-1, correct=clean[:, -1])
    assert p.answer_pos.tolist() == [T - 1] * 4
    with pytest.raises(ValueError, match="reads the prompts' incorrect"):
        metrics.logit_diff().bind(p)
    with pytest.raises(ValueError, match="not bound to any prompts"):
        metrics.logit_diff()(torch.zeros(4, T, V))
    model = tl_model("gpt2")
    with pytest.raises(ValueError, match="returned a tensor of shape"):
        attribute(model, Prompts(clean, clean, correct=clean[:, 0]), lambda lg: lg[:, -1, 0], method="exact",
                  level="node", progress=False)


@pytest.mark.slow(seconds=10)
@pytest.mark.parametrize("style", hf_models.ARCHITECTURES)
def test_converted_hugging_face_models(style):
    """GPT-2, GPT-NeoX (parallel, rotary) and Llama (RMSNorm, gated SiLU, GQA) converted from
    Hugging Face: patching reproduces both runs, faithfulness is 1 and 0 at every level, and a
    planted circuit is all exact patching, EAP and EAP-IG find and all ACDC keeps comes from."""
    model = hf_converted(style)
    p = prompts_for(model, n=8, n_pos=8)
    patcher = Patcher(model, graph(model), p.clean, p.corrupted)
    with torch.no_grad():
        assert torch.allclose(patcher.run()[0], model(p.clean), atol=1e-5)
        assert torch.allclose(patcher.run(masks=patcher.all_masks(0.0))[0], model(p.corrupted), atol=1e-5)
    metric = metrics.logit_diff()
    for level in ("edge", "node", "neuron"):
        g = graph(model, level)
        full = mg.circuits.Circuit.from_graph(g, g.components, {c: 1.0 for c in g.components}, {})
        empty = mg.circuits.Circuit.from_graph(g, [], {c: 0.0 for c in g.components}, {})
        assert mg.circuits.faithfulness(model, full, p, metric) == pytest.approx(1.0, abs=1e-5), level
        assert mg.circuits.faithfulness(model, empty, p, metric) == pytest.approx(0.0, abs=1e-5), level
    planted = hf_converted(style, planted=True)
    p = prompts_for(planted, n=8, n_pos=8)
    live_nodes = LIVE_HEADS | {"input", "logits", "m1"}
    live = {e.name for e in graph(planted).edges if e.src in live_nodes and e.dst in live_nodes}
    for method in ("exact", "eap", "eap-ig"):
        s = attribute(planted, p, metric, method=method, progress=False)
        top = max(abs(v) for v in s.values())
        assert {k for k, v in s.items() if abs(v) > 1e-4 * top} == live, method
    acdc = mg.circuits.discover(planted, p, metric, method="acdc", progress=False)  # ACDC's own selection
    assert set(acdc.components) <= live and acdc.provenance["faithfulness"] > 0.9


def test_prompts_on_another_device_than_the_model_are_refused():
    model = tl_model("gpt2")
    p = prompts_for(model)
    model.to("meta")  # parameters on another device; nothing runs before the check
    with pytest.raises(ValueError, match=r"prompts are on cpu but the model is on meta; move them with prompts.to"):
        attribute(model, p, metrics.logit_diff(), method="exact", level="node", progress=False)
