"""EK-FAC on models and data mechgrok did not build: Hugging Face GPT-2 (Conv1D) against its nn.Linear
rewrite and kronfluence, per-token losses on token sequences against autograd, output objects,
coverage and its warning, a gated-MLP / GQA HookedTransformer, and clear errors on bad data."""

import copy
import gc
import json
import logging
import tempfile
import warnings

import pytest
import torch
from hf_models import gpt2, tokens
from torch import nn

import mechgrok as mg
from mechgrok.influence import (EKFAC, CoverageWarning, Sequences, conv1d_as_linear, exact_curvature, linear_maps,
                                per_example_gradients, ranking_agreement, tfidf_candidates, top_influences)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _flat(G, maps):
    return torch.cat([G[m.name].flatten(1) for m in maps], 1)


@pytest.fixture(scope="module")
def hf():
    """The tiny random HF GPT-2 (2 layers, d_model 32, vocab 50; Conv1D layers, lm_head tied to wte)."""
    return gpt2().double()


@pytest.fixture(scope="module")
def seqs():
    """12 sequences of 16 tokens, about 70% of the next-token predictions in the loss."""
    mask = torch.rand(12, 15, generator=torch.Generator().manual_seed(0)) > 0.3
    return Sequences(tokens(12, 16, seed=1), loss_mask=mask, name="lm")


def _perturbed(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---------------------------------------------------------------------------- Hugging Face GPT-2


def test_gpt2_conv1d_layers_are_covered_and_ekfac_says_so(hf, seqs, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)  # every weight matrix is fitted: no warning
        with caplog.at_level(logging.INFO, logger="mechgrok.influence.ekfac"):
            ek = EKFAC(hf, seqs, progress=False)
    per_layer = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [m.name for m in ek.maps] == [f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer] + ["lm_head"]
    cov = ek.coverage
    linear = {f"transformer.h.{i}.{n}.{w}" for i in range(2) for n in per_layer for w in ("weight", "bias")}
    assert linear <= set(cov.covered) and "transformer.wte.weight" in cov.covered
    assert cov.tied == {"lm_head.weight": "transformer.wte.weight"}  # the unembedding is a map; the lookup is not
    params = dict(hf.named_parameters())
    assert set(cov.not_covered) == {n for n in params if "ln_" in n} | {"transformer.wpe.weight"}
    assert cov.n_total == sum(p.numel() for p in params.values())
    assert cov.n_covered == cov.n_total - sum(params[n].numel() for n in cov.not_covered)
    assert not cov.partial and not cov.unsupported and cov.fraction > 0.95
    assert "covering" in caplog.text and "transformer.wpe.weight" in caplog.text
    assert f"{cov.n_covered:,} of {cov.n_total:,}" in repr(ek)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_gpt2_conv1d_factors_and_scores_equal_its_nn_linear_rewrite(hf, seqs, fisher):
    lin = conv1d_as_linear(hf)
    assert not any(type(m).__name__ == "Conv1D" for m in lin.modules())
    assert lin.lm_head.weight is lin.transformer.wte.weight  # still tied
    with torch.no_grad():
        assert rel(lin(seqs.tokens).logits, hf(seqs.tokens).logits) < 1e-12
    kw = dict(fisher=fisher, n_samples=2, batch_size=5, progress=False)
    a, b = EKFAC(hf, seqs, **kw).fit(range(4, 12)), EKFAC(lin, seqs, **kw).fit(range(4, 12))
    worst = {k: max(rel(getattr(a, k)[m], getattr(b, k)[m]) for m in a.A_)
             for k in ("A_", "S_", "eigA_", "eigS_", "lambda_")}
    worst["scores"] = rel(a.scores(range(4), range(4, 12)), b.scores(range(4), range(4, 12)))
    worst["self"] = rel(a.self_influence(), b.self_influence())
    logging.getLogger(__name__).info("Conv1D vs nn.Linear, fisher=%s: %s", fisher, worst)
    assert max(worst.values()) <= 1e-6, worst


@pytest.mark.filterwarnings("ignore:.*GradScaler.*:FutureWarning")  # inside kronfluence
def test_gpt2_rewrite_agrees_with_kronfluence_on_the_summed_per_token_loss(hf, seqs, monkeypatch):
    """Empirical Fisher, damping 0.1 × mean Λ per module, float64, the masked next-token loss summed
    over positions: factors and scores agree with kronfluence's EK-FAC to ≤ 1e-5 relative."""
    from torch.utils.data import TensorDataset

    from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model
    from kronfluence import Task as KTask

    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # kronfluence's ~15 gc.collect() calls change no number

    class LM(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, mask = batch
            z = model(x).logits[:, :-1]  # [b, T-1, V] predicts x[:, 1:]
            ce = nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            return (ce * mask.reshape(-1).to(ce)).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    model = conv1d_as_linear(hf)
    f64 = torch.float64
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                         gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64,
                         eigendecomposition_dtype=f64)
    sa = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                        score_dtype=f64, query_gradient_svd_dtype=f64)
    tr, te = torch.arange(4, 12), torch.arange(4)
    ek = EKFAC(model, seqs, fisher="empirical", damping=0.1, damping_mode="relative", batch_size=4,
               progress=False).fit(tr)
    S, self_s = ek.scores(te, tr), ek.self_influence(tr)
    with tempfile.TemporaryDirectory() as d:
        an = Analyzer("lm", prepare_model(copy.deepcopy(model), LM()), LM(), cpu=True, disable_tqdm=True,
                      output_dir=d, log_level=logging.WARNING)
        trd = TensorDataset(seqs.tokens[tr], seqs.loss_mask[tr])
        ted = TensorDataset(seqs.tokens[te], seqs.loss_mask[te])
        an.fit_all_factors("f", trd, per_device_batch_size=4, factor_args=fa)
        an.compute_pairwise_scores("s", "f", ted, trd, per_device_query_batch_size=4,
                                   per_device_train_batch_size=4, score_args=sa)
        an.compute_self_scores("ss", "f", trd, per_device_train_batch_size=4, score_args=sa)
        K, K_self = an.load_pairwise_scores("s")["all_modules"], an.load_self_scores("ss")["all_modules"]
        kf = {**an.load_covariance_matrices("f"), **an.load_lambda_matrices("f")}
    assert sorted(kf["lambda_matrix"]) == sorted(m.name for m in ek.maps)
    worst = {"A": 0.0, "S": 0.0, "lambda": 0.0}
    for name in kf["lambda_matrix"]:
        A = kf["activation_covariance"][name] / kf["num_activation_covariance_processed"][name]
        G = kf["gradient_covariance"][name] / kf["num_gradient_covariance_processed"][name]
        L = kf["lambda_matrix"][name] / kf["num_lambda_processed"][name]
        for key, ours, theirs in (("A", ek.A_[name], A), ("S", ek.S_[name], G), ("lambda", ek.lambda_[name], L)):
            worst[key] = max(worst[key], rel(ours, theirs))
    worst.update(scores=rel(S, K), self=rel(self_s, K_self))
    agree = ranking_agreement(K, S)
    logging.getLogger(__name__).info("GPT-2 vs kronfluence: %s, %s", worst, agree)
    assert max(worst.values()) <= 1e-5, worst
    assert agree["spearman"] >= 0.999, agree


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_every_tiny_hf_architecture_fits_every_weight_matrix_but_the_embeddings(arch):
    from hf_models import BUILDERS

    model = BUILDERS[arch]().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        ek = EKFAC(model, tokens(4, 16), batch_size=2, progress=False).fit("all")
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2}
    assert matrices - set(ek.coverage.covered) == {n for n in matrices if "embed" in n or "wpe" in n}
    assert bool(ek.scores([0], [1, 2, 3]).isfinite().all())


# ---------------------------------------------------------------------------- the per-token loss


def test_per_token_loss_is_what_ekfac_differentiates(hf, seqs):
    """Hook gradients = autograd on Σ_t m_t CE(z_t, x_{t+1}) (exact.per_example_gradients differentiates
    the loss itself); the last-position loss and the unmasked loss give other gradients."""
    mods = [m.name for m in linear_maps(hf) if m.name != "lm_head"]
    ek = EKFAC(hf, seqs, fisher="empirical", modules=mods, batch_size=3, progress=False)
    idx = [0, 5, 7, 11]
    ours = _flat(ek.gradients(idx), ek.maps)
    ref = per_example_gradients(hf, seqs, idx, maps=ek.maps)[:, 0]
    assert rel(ours, ref) < 1e-10
    # the same masks, token-aligned [N, T] (column 0 dropped): the same gradients
    aligned = torch.cat([torch.ones(12, 1, dtype=torch.bool), seqs.loss_mask], 1)
    same = EKFAC(hf, Sequences(seqs.tokens, loss_mask=aligned), fisher="empirical", modules=mods, progress=False)
    assert torch.equal(same.data.loss_mask, seqs.loss_mask) and rel(_flat(same.gradients(idx), ek.maps), ours) < 1e-14
    # a plain tensor is Sequences with every prediction in the loss, which differs from the masked one
    full = _flat(EKFAC(hf, seqs.tokens, fisher="empirical", modules=mods, progress=False).gradients(idx), ek.maps)
    assert rel(full, ours) > 0.1
    # the loss of the last prediction only (what a Task reads) is another gradient again
    x = seqs.tokens[idx[:1]]
    last = nn.functional.cross_entropy(hf(x).logits[:, -2].double(), x[:, -1], reduction="sum")
    g = torch.autograd.grad(last, dict(hf.named_parameters())["transformer.h.0.mlp.c_fc.weight"])[0]  # [in, out]
    assert rel(g.T, ek.gradients(idx[:1])["transformer.h.0.mlp.c_fc"][0, :, :-1]) > 0.1  # G = [out, in (+1)]
    # the tied lm_head: exact autograd would add the embedding's gradient, so it refuses
    with pytest.raises(ValueError, match="lm_head.weight is shared with"):
        per_example_gradients(hf, seqs, [0], maps=EKFAC(hf, seqs, modules=["lm_head"], progress=False).maps)


def test_true_fisher_on_sequences_satisfies_the_eigenvalue_correction_identity(hf, seqs):
    """Labels sampled per target token (same seed as the exact reference): Λ = diag(Qᵀ F Q)."""
    name = "transformer.h.1.attn.c_proj"
    ek = EKFAC(hf, seqs, fisher="true", n_samples=2, modules=[name], batch_size=5, progress=False).fit("all")
    F, _ = exact_curvature(hf, seqs, "all", modules=[name], fisher="true", n_samples=2)
    Q = torch.kron(ek.QS_[name], ek.QA_[name])
    assert rel(ek.lambda_[name], torch.diagonal(Q.T @ F @ Q).reshape(ek.maps[0].shape)) < 1e-10


def test_sequences_save_load_and_tfidf(hf, seqs, tmp_path):
    ek = EKFAC(hf, seqs, fisher="empirical", modules=["lm_head", "transformer.h.1.mlp.c_fc"], progress=False).fit("all")
    ek.save(tmp_path / "ek")
    back = EKFAC.load(tmp_path / "ek", hf, seqs, progress=False)
    assert torch.equal(back.scores([0, 1], [2, 3]), ek.scores([0, 1], [2, 3]))
    meta = json.loads((tmp_path / "ek" / "ekfac.json").read_text())
    assert meta["data"] == {"kind": "sequences", "name": "lm"} and meta["coverage"]["tied"] == ek.coverage.tied
    with pytest.raises(ValueError, match="fitted on Sequences"):
        EKFAC.load(tmp_path / "ek", hf, _task_on(seqs.tokens))
    cand = tfidf_candidates(seqs, [0, 1], "all", k=3)
    assert cand.shape == (2, 3) and cand[:, 0].tolist() == [0, 1]  # each sequence is most similar to itself


# ---------------------------------------------------------------------------- any nn.Module


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear, returning logits in the form ``kind`` says."""

    def __init__(self, kind="tensor", vocab=11, d=6, vocab_out=None):
        super().__init__()
        self.kind = kind
        self.emb, self.fc = nn.Embedding(vocab, d), nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, vocab_out or vocab)

    def forward(self, x):
        z = self.out(torch.relu(self.fc(self.emb(x))))  # [b, T, vocab]
        if self.kind == "tuple":
            return (z, None)
        if self.kind == "dict":
            return {"logits": z}
        if self.kind == "object":
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=z)
        return z if self.kind == "tensor" else "no logits"


def test_output_objects_tuples_and_dicts_are_unwrapped():
    x = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(0))
    base = TinyLM().double()
    ref = _flat(EKFAC(base, x, fisher="empirical", progress=False).gradients("all"), linear_maps(base))
    for kind in ("tuple", "dict", "object"):
        m = TinyLM(kind).double()
        m.load_state_dict(base.state_dict())
        assert torch.equal(_flat(EKFAC(m, x, fisher="empirical", progress=False).gradients("all"), linear_maps(m)), ref)
    bad = TinyLM("str").double()
    with pytest.raises(TypeError, match="needs logits"):
        EKFAC(bad, x, progress=False).fit("all")


class WithCustomLayer(nn.Module):
    """An nn.Linear, an embedding (a lookup: not covered, no warning) and a custom matrix layer."""

    class Mix(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.W = nn.Parameter(torch.randn(d, d) / d**0.5)

        def forward(self, h):
            return h @ self.W

    def __init__(self, vocab=9, d=4):
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, d), self.Mix(d), nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))))


def test_a_layer_it_cannot_fit_warns_by_name_and_is_listed():
    model = WithCustomLayer()
    with pytest.warns(CoverageWarning, match=r"mix \(Mix: W \[4, 4\]\)") as rec:
        ek = EKFAC(model, torch.randint(0, 9, (3, 5)), progress=False)
    assert len(rec) == 1 and "emb" not in str(rec[0].message)
    assert ek.coverage.unsupported == ("mix (Mix: W [4, 4])",)
    assert set(ek.coverage.not_covered) == {"emb.weight", "mix.W"}
    assert ek.coverage.covered == ("head.weight", "head.bias")
    # leaving a fittable map out on purpose lists it, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        ek = EKFAC(TinyLM(), torch.randint(0, 11, (3, 5)), modules=["out"], progress=False)
    assert "fc.weight" in ek.coverage.not_covered


# ---------------------------------------------------------------------------- HookedTransformer configs


def _tl(**kw):
    from mechgrok.models import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=50, n_ctx=16,
                                  dtype=torch.float64, seed=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _perturbed(HookedTransformer(cfg))


def _task_on(x):
    n = x.shape[0]
    y = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(3))
    return mg.tasks.Task(name="t", inputs=x, labels=y, true_labels=y, train=torch.ones(n, dtype=torch.bool),
                         train_corrupted=torch.zeros(n, dtype=torch.bool), task_ids=torch.zeros(n, dtype=torch.long),
                         task_names=("t",), d_vocab=50, d_vocab_out=50, p=50)


GATED_GQA = dict(n_key_value_heads=2, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                 gated_mlp=True)
PARALLEL = dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                parallel_attn_mlp=True)


@pytest.mark.parametrize("arch", ["gated_gqa", "parallel"])
@pytest.mark.parametrize("per_head", [False, True])
def test_hooked_transformer_gated_mlp_gqa_and_parallel_attention(arch, per_head):
    model = _tl(**(GATED_GQA if arch == "gated_gqa" else PARALLEL))
    x = tokens(6, 16, seed=2)
    for data in (Sequences(x), _task_on(x)):
        ek = EKFAC(model, data, fisher="empirical", per_head=per_head, batch_size=4, progress=False)
        ref = per_example_gradients(model, data, [0, 3, 5], maps=ek.maps)[:, 0]
        assert rel(_flat(ek.gradients([0, 3, 5]), ek.maps), ref) < 1e-10
        last = {m.name: m.positions for m in ek.maps}["blocks.1.mlp.W_in"]
        assert last == ("all" if isinstance(data, Sequences) else "last")
    cov = ek.coverage
    if arch == "gated_gqa":
        for layer in range(2):
            blk = f"blocks.{layer}"
            assert {f"{blk}.mlp.W_gate", f"{blk}.mlp.W_in", f"{blk}.attn._W_K", f"{blk}.attn._W_V",
                    f"{blk}.attn._b_K", f"{blk}.attn._b_V"} <= set(cov.covered)
            assert f"{blk}.mlp.b_in" in cov.not_covered  # added after the gate product: no map's bias
        kv = [m for m in ek.maps if m.name.startswith("blocks.0.attn.W_K")]  # 2 key/value heads of 8
        whole = [("blocks.0.attn.W_K", (16, 33))]
        want = [(f"blocks.0.attn.W_K.h{h}", (8, 33)) for h in range(2)] if per_head else whole
        assert [(m.name, m.shape) for m in kv] == want
    assert ("blocks.0.attn.b_O" in cov.not_covered) == per_head and not cov.unsupported


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_hf_checkpoints_converted_to_hooked_transformers_fit_every_map(arch):
    """GPT-2 (LayerNorm, learned positions), NeoX (parallel attention, partial rotary), Llama (RMSNorm,
    gated MLP, GQA) converted by mg.models.from_pretrained: hook gradients = autograd, no warning."""
    from hf_models import BUILDERS

    if not hasattr(mg.models, "from_pretrained"):
        pytest.skip("mg.models.from_pretrained is not there")
    model = mg.models.from_pretrained(BUILDERS[arch](), dtype=torch.float64)
    x = tokens(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        ek = EKFAC(model, x, fisher="empirical", progress=False)
    ref = per_example_gradients(model, x, [0, 2], maps=ek.maps)[:, 0]
    assert rel(_flat(ek.gradients([0, 2]), ek.maps), ref) < 1e-10
    left = ek.coverage.not_covered  # norm scales and biases, a gated MLP's b_in
    assert all(n.startswith(("blocks.", "ln_final")) and n.endswith((".w", ".b", ".b_in")) for n in left)


# ---------------------------------------------------------------------------- errors and devices


def test_bad_data_gets_a_clear_error(hf, seqs):
    x = seqs.tokens
    with pytest.raises(TypeError, match="integer token ids"):
        EKFAC(hf, x.double())
    with pytest.raises(ValueError, match=r"\[N, T-1\] = \[12, 15\].*got \(12, 14\)"):
        Sequences(x, loss_mask=torch.ones(12, 14, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        Sequences(x, loss_mask=torch.ones(12, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 2"):
        Sequences(x[:, :1])
    with pytest.raises(TypeError, match="data must be a mechgrok Task"):
        EKFAC(hf, x.tolist())
    with pytest.raises(ValueError, match="cross_entropy"):
        EKFAC(hf, seqs, loss="mse")
    ek = EKFAC(hf, seqs, modules=["lm_head"], progress=False)
    with pytest.raises(ValueError, match="belong to a Task"):
        ek.fit("train")
    with pytest.raises(ValueError, match="no true_labels"):
        ek.gradients([0], labels="true_labels")
    with pytest.raises(ValueError, match="ids up to 60, but the model's input embedding has 50 entries"):
        EKFAC(hf, torch.full((2, 4), 60), modules=["lm_head"], progress=False)
    with pytest.raises(ValueError, match="outside the model's 8 output classes"):  # more tokens than classes
        EKFAC(TinyLM(vocab=11, vocab_out=8), torch.full((2, 4), 8).tril(), progress=False).fit("all")
    with pytest.raises(ValueError, match="logits at every position"):  # one output per example: use a Task
        EKFAC(mg.models.mlp(mg.tasks.modular_arithmetic(p=5, op="add", seed=0), width=4), torch.zeros(2, 2).long(),
              progress=False).fit("all")
    with pytest.raises(TypeError, match="top_influences reads a Task"):
        top_influences(torch.zeros(1, 2), seqs, [0, 1])


def test_dropout_in_training_mode_warns(hf, seqs):
    m = copy.deepcopy(hf).train()
    with pytest.warns(UserWarning, match="model.eval"):
        EKFAC(m, seqs, modules=["lm_head"], progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_follows_the_model_device(hf, seqs):
    cpu = EKFAC(hf, seqs, fisher="true", progress=False).fit("all")
    gpu = EKFAC(copy.deepcopy(hf).cuda(), seqs, fisher="true", progress=False).fit("all")
    assert gpu.lambda_["lm_head"].is_cuda
    assert rel(gpu.scores([0, 1], [2, 3]).cpu(), cpu.scores([0, 1], [2, 3])) < 1e-6
