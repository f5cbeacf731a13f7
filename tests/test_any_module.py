"""Bring your own model (issue 14): capture, SAEs of every position and neuron ablation on any
``nn.Module`` (a raw Hugging Face GPT-2, transformer-lens models of other configs), each checked
against hand-written forward hooks on the same model."""

import math

import hf_models
import pytest
import torch

import mechgrok as mg
from mechgrok import neurons

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

HF_HOOK = "transformer.h.0"  # a GPT-2 block: returns a tuple (hidden states first) or a tensor


@pytest.fixture(scope="module")
def gpt2():
    return hf_models.gpt2()


@pytest.fixture(scope="module")
def tokens():
    return hf_models.tokens(6, hf_models.N_CTX, seed=1)  # [6, 16]


@pytest.fixture(scope="module")
def modular():
    task = mg.tasks.modular_arithmetic(p=11, train_frac=0.6, corrupt_frac=0.3, seed=0)
    return task, mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)


def hand_sae(d: int, hook: str, position="all", *, lossless: bool = False, d_sae: int = 24, seed: int = 0):
    """A StandardSAE built by hand: random (lossy) weights, or W_enc = [I, −I], W_dec = [I; −I],
    which reconstructs exactly (relu(x) − relu(−x) = x)."""
    d_sae = 2 * d if lossless else d_sae
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=hook, mechgrok_position=position)))
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1) if lossless else torch.randn(d, d_sae, generator=g) / math.sqrt(d))
        W_dec = torch.cat([eye, -eye], 0) if lossless else torch.randn(d_sae, d, generator=g) / math.sqrt(d_sae)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def first(output):
    return output[0] if isinstance(output, tuple) else output


def manual_forward(model, x, hook, fn=None):
    """``model(x)`` with a raw forward hook at ``hook`` that records (and, with ``fn``, replaces)
    its output; returns (logits, the recorded output)."""
    seen = {}

    def record(_m, _a, out):
        seen["out"] = first(out).detach().clone()
        if fn is not None:
            new = fn(first(out))
            return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = model.get_submodule(hook).register_forward_hook(record)
    try:
        with torch.no_grad():
            logits = model(x).logits
    finally:
        handle.remove()
    return logits, seen["out"]


# --- capture ------------------------------------------------------------------------------------

def test_capture_any_module_by_path_matches_manual_hooks(gpt2, tokens):
    hooks = ["transformer.h.0.mlp", "transformer.h.1"]
    manual = {h: manual_forward(gpt2, tokens, h)[1] for h in hooks}
    before = [(sorted(m._forward_hooks), sorted(m.__dict__)) for m in gpt2.modules()]
    default = mg.capture(gpt2, tokens, hooks, progress=False)  # no backend named: torch hooks
    traced = mg.capture(gpt2, tokens, hooks, backend="nnsight", progress=False)
    assert default.meta["backend"] == "torch"
    for h in hooks:  # the same forward on the same batch, read three ways: equal to the bit
        assert default[h].shape == (6, 16, 32) and default[h].device.type == "cpu"
        assert torch.equal(default[h], manual[h]) and torch.equal(traced[h], manual[h]), h
    assert [(sorted(m._forward_hooks), sorted(m.__dict__)) for m in gpt2.modules()] == before  # nothing left on it
    task = mg.tasks.modular_arithmetic(p=5, train_frac=0.5)
    tl = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16)
    assert mg.capture(tl, task.inputs, ["hook_embed"], progress=False).meta["backend"] == "transformer_lens"


def test_capture_names_the_module_it_cannot_find(gpt2, tokens):
    with pytest.raises(ValueError, match=r"unknown hook 'transformer.h.0.mpl'; did you mean 'transformer.h.0.mlp'"):
        mg.capture(gpt2, tokens, ["transformer.h.0.mpl"], progress=False)
    with pytest.raises(ValueError, match=r"token ids in \[0, 50\] but the model's vocabulary is \[0, 50\)"):
        mg.capture(gpt2, torch.tensor([[0, 50]]), [HF_HOOK], progress=False)  # was an IndexError inside


# --- SAEs on every position ---------------------------------------------------------------------

def test_sae_trains_on_every_position_of_any_module(gpt2, tokens, tmp_path):
    kw = dict(hook=HF_HOOK, d_sae=32, k=4, steps=30, batch_size=32, seed=0, progress=False)
    sae = mg.sae.train(gpt2, tokens, position="all", out=tmp_path / "a", **kw)
    assert mg.sae.site(sae) == (HF_HOOK, "all") and sae.cfg.d_in == 32
    assert sae.cfg.metadata.mechgrok_n_activations == 6 * 16  # one training vector per token
    x = mg.sae.activations(gpt2, tokens, HF_HOOK, "all")  # [N * pos, d], row n * pos + t
    assert torch.equal(x, mg.capture(gpt2, tokens, [HF_HOOK], progress=False)[HF_HOOK].reshape(96, 32))
    plain = sae_lens.SAE.load_from_disk(str(tmp_path / "a"))  # plain sae-lens reads it
    with torch.no_grad():
        assert torch.equal(plain.encode(x), sae.encode(x))
    with pytest.raises(TypeError, match="use position='all'"):  # one spelling: position=
        mg.sae.train(gpt2, tokens, positions="all", **kw)
    with pytest.raises(ValueError, match="needs the Task"):
        mg.sae.train(gpt2, tokens, position="all", split="train", **kw)
    with pytest.raises(ValueError, match="position must be an integer, None or 'all'"):
        mg.sae.activations(gpt2, tokens, HF_HOOK, "every")


def test_sae_on_a_transformer_lens_residual_stream(tmp_path):
    cfg = mg.models.HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=20,
                                            act_fn="gelu", normalization_type="LN", seed=0)
    model = mg.models.HookedTransformer(cfg)
    x = torch.randint(0, 20, (8, 8), generator=torch.Generator().manual_seed(0))
    sae = mg.sae.train(model, x, hook="blocks.1.hook_resid_post", position="all", d_sae=32, k=4, steps=20,
                       batch_size=32, progress=False, out=tmp_path / "s")
    ev = mg.sae.evaluate(model, sae, x)
    assert ev["position"] == "all" and set(ev["by_split"]) == {"all"} and 0 <= ev["by_split"]["all"]["l0"] <= 4
    assert ev["original"] == mg.sae.next_token_metrics(model, x)


def test_evaluate_every_position(gpt2, tokens):
    sae = hand_sae(32, HF_HOOK)
    ev = mg.sae.evaluate(gpt2, sae, tokens)
    x = mg.sae.activations(gpt2, tokens, HF_HOOK, "all")  # [96, 32]
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    want = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert math.isclose(ev["by_split"]["all"]["explained_variance"], float(want), rel_tol=1e-5)
    assert ev["spliced"] == mg.sae.next_token_metrics(mg.sae.splice(gpt2, sae), tokens)
    assert ev["spliced"]["all"]["loss"] != ev["original"]["all"]["loss"]  # a random SAE loses information
    exact = mg.sae.evaluate(gpt2, hand_sae(32, HF_HOOK, lossless=True), tokens)
    assert exact["by_split"]["all"]["explained_variance"] > 1 - 1e-6
    assert abs(exact["spliced"]["all"]["loss"] - exact["original"]["all"]["loss"]) < 1e-5
    assert abs(exact["loss_recovered"]["all"] - 1) < 1e-4


@pytest.mark.parametrize("kind", ["hf", "tl"])
def test_splice_every_position_equals_a_manual_hook(gpt2, tokens, kind):
    if kind == "hf":
        model, x, hook = gpt2, tokens, HF_HOOK
    else:
        cfg = mg.models.HookedTransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=32, n_ctx=16,
                                                d_vocab=50, act_fn="gelu", normalization_type="LN", seed=0)
        model, x, hook = mg.models.HookedTransformer(cfg), tokens, "blocks.0.hook_resid_mid"
    sae = hand_sae(32, hook)

    def recon(a):  # [batch, pos, d] -> sae(x) at every position
        with torch.no_grad():
            return sae.decode(sae.encode(a.reshape(-1, 32))).reshape(a.shape)

    if kind == "hf":
        want = manual_forward(model, x, hook, recon)[0]
        got = mg.sae.splice(model, sae)(x).logits
        base = model(x).logits
    else:
        with torch.no_grad():
            want = model.run_with_hooks(x, fwd_hooks=[(hook, lambda a, hook: recon(a))])
            got, base = mg.sae.splice(model, sae)(x), model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, base, atol=1e-3)  # it did edit every position
    assert not torch.allclose(got[:, :-1], base[:, :-1], atol=1e-3)  # including the earlier ones
    assert torch.equal(mg.sae.ablate(model, sae, [])(x).logits if kind == "hf" else mg.sae.ablate(model, sae, [])(x),
                       base)  # no feature ablated: the model itself


def test_features_on_every_position(gpt2, tokens, modular):
    stats = mg.sae.features(gpt2, hand_sae(32, HF_HOOK), tokens)  # tokens, no Task: statistics only
    acts = stats.acts
    assert acts.shape == (96, 24) and stats.positions == 16 and set(stats.labels) == {"other"}
    assert torch.equal(stats.fire_rate["all"], (acts > 0).float().mean(0))
    row = int(stats.top_examples(0, 1)[0])
    assert stats.locate(torch.tensor([row])).tolist() == [[row // 16, row % 16]]
    assert "top_tokens" in stats.table(k=1)[0]
    # On a Task: a 1-layer model's MLP reaches the answer logits only at the answer position, so the
    # corrupted push summed over all positions equals the push of the same SAE at position -1.
    task, model = modular
    hook = "blocks.0.mlp.hook_post"
    every = mg.sae.features(model, hand_sae(32, hook, "all", lossless=True), task)
    last = mg.sae.features(model, hand_sae(32, hook, -1, lossless=True), task)
    assert every.acts.shape == (len(task.inputs) * task.n_ctx, 64)
    torch.testing.assert_close(every.corrupted_push, last.corrupted_push, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(every.answer_share, last.answer_share)  # η² reads the answer position
    train_rows = task.train.repeat_interleave(task.n_ctx)
    assert torch.equal(every.fire_rate["train"], (every.acts[train_rows] > 0).float().mean(0))
    ev = mg.sae.evaluate(model, hand_sae(32, hook, "all", lossless=True), task)
    assert ev["by_split"]["test"]["explained_variance"] > 1 - 1e-6
    assert all(abs(ev["spliced"][s]["loss"] - ev["original"][s]["loss"]) < 1e-5 for s in ("train", "test"))


# --- neurons ------------------------------------------------------------------------------------

def test_ipr_refuses_a_task_that_is_not_modular_arithmetic():
    task = mg.tasks.knowledge(n_entities=10, n_relations=2, inferred_ratio=1.0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=16)
    with pytest.raises(ValueError, match=r"only means something on modular arithmetic.*'knowledge'.*memorization"):
        neurons.classify(model, task, score="ipr")


@pytest.mark.parametrize("mlp", ["gated", "solu_ln", "gelu_ln"])
def test_neurons_on_other_transformer_lens_mlps(modular, mlp):
    task, _ = modular
    act = {"gated": "silu", "solu_ln": "solu_ln", "gelu_ln": "gelu"}[mlp]
    cfg = mg.models.HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=24, n_ctx=task.n_ctx,
                                            d_vocab=task.d_vocab, d_vocab_out=task.d_vocab_out, act_fn=act,
                                            gated_mlp=mlp == "gated", seed=0,
                                            normalization_type="RMS" if mlp == "gated" else "LN")
    model = mg.models.HookedTransformer(cfg)
    drop = [2, 7, 11]
    pruned, ablated = neurons.prune(model, drop, layer=1), neurons.ablate(model, drop, layer=1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(task.inputs), ablated(task.inputs), rtol=1e-5, atol=1e-5)
        _, cache = model.run_with_cache(task.inputs, names_filter="blocks.1.mlp.hook_post")
    # the memorization score by hand: activation at the answer × direct effect on logit(ỹ) − logit(y)
    c = task.train_corrupted
    a = cache["blocks.1.mlp.hook_post"][c, -1].double()  # [n_corr, d_mlp]
    D = (model.blocks[1].mlp.W_out @ model.W_U).detach().double()  # [d_mlp, d_vocab_out]
    want = (a * (D[:, task.labels[c]] - D[:, task.true_labels[c]]).T).mean(0)
    torch.testing.assert_close(neurons.memorization_score(model, task, layer=1).double(), want, rtol=1e-4, atol=1e-6)
    groups = neurons.classify(model, task, score="memorization", layer=1)
    assert len(groups.memorizing) + len(groups.generalizing) == 24
    rows = neurons.prune_sweep(model, task, groups.scores, counts=[0, 3], orders=["low-first"], layer=1, progress=False)
    assert rows[0]["test_acc"] == mg.evaluate(model, task)["test"]["acc"]


def test_neurons_refuse_what_has_no_neurons(modular, gpt2):
    task, _ = modular
    cfg = mg.models.HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=task.n_ctx,
                                            d_vocab=task.d_vocab, d_vocab_out=task.d_vocab_out, attn_only=True)
    with pytest.raises(ValueError, match="blocks.0 has no MLP"):
        neurons.memorization_score(mg.models.HookedTransformer(cfg), task)  # was a KeyError
    with pytest.raises(TypeError, match=r"neurons.ablate\(model, neurons, hook="):
        neurons.prune(gpt2, [1])
    with pytest.raises(ValueError, match="name the module whose output holds the neurons"):
        neurons.ablate(gpt2, [1])


def test_ablate_neurons_of_any_module(gpt2, tokens):
    hook, drop = "transformer.h.0.mlp.act", [1, 5, 100]

    def zero(a):  # [batch, pos, 4 * d_model]
        a = a.clone()
        a[..., drop] = 0
        return a

    want = manual_forward(gpt2, tokens, hook, zero)[0]
    edited = neurons.ablate(gpt2, drop, hook=hook)
    assert edited is not gpt2 and not gpt2.transformer.h[0].mlp.act._forward_hooks  # a copy; the original is untouched
    with torch.no_grad():
        assert torch.equal(edited(tokens).logits, want)
        assert not torch.equal(gpt2(tokens).logits, want)
        half = neurons.ablate(gpt2, drop, hook=hook, scale=0.5)(tokens).logits
    assert not torch.equal(half, want)
    with pytest.raises(ValueError, match=r"neuron 128 does not exist: the output of 'transformer.h.0.mlp.act' has 128"):
        neurons.ablate(gpt2, [128], hook=hook)(tokens)
    with pytest.raises(ValueError, match="did you mean 'transformer.h.0.mlp.act'"):
        neurons.ablate(gpt2, [1], hook="transformer.h.0.mlp.actt")
    with pytest.raises(ValueError, match="listed more than once"):
        neurons.ablate(gpt2, [1, 1], hook=hook)


class _TupleOut(torch.nn.Module):
    """Returns ``(hidden, extra)``, as many Hugging Face blocks do."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 6)

    def forward(self, x):
        return self.inner(x), x.sum()


def test_edits_replace_element_0_of_a_tuple_output():
    model = torch.nn.Sequential(_TupleOut())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, extra = neurons.ablate(model, [0, 2], hook="0")(x)
        ref = model[0].inner(x)
    assert (hidden[:, [0, 2]] == 0).all() and torch.equal(hidden[:, [1, 3, 4, 5]], ref[:, [1, 3, 4, 5]])
    assert torch.equal(extra, x.sum())  # the rest of the tuple passes through
