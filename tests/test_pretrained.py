"""Bring your own model: Hugging Face checkpoints converted offline, any HookedTransformer saved,
loaded and trained, and the transformer builder's architecture options.

Every model is tiny and random (tests/hf_models.py); nothing is downloaded (HF_HUB_OFFLINE=1).
"""

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hf_models
import mechgrok as mg
from mechgrok import models
from mechgrok.models import HookedTransformer, HookedTransformerConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.5, seed=0)


@pytest.fixture(scope="module")
def hf():
    """One tiny random model per architecture, built once."""
    return {name: build() for name, build in hf_models.BUILDERS.items()}


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _tl_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


# ------------------------------------------------------------------------------------ from_pretrained


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_converted_logits_equal_hugging_face(tmp_path, hf, arch):
    ref_model = hf[arch]
    tokens = hf_models.tokens()
    ref = _hf_logits(ref_model, tokens)
    folder = hf_models.save(ref_model, tmp_path / "checkpoint")
    for source in (folder, str(folder), ref_model):
        m = models.from_pretrained(source)
        assert type(m) is HookedTransformer and m.cfg.device == "cpu" and not m.training
        assert (_tl_logits(m, tokens) - ref).abs().max() < 1e-4
    cfg = m.cfg
    assert m.mechgrok_source["architecture"] == type(ref_model).__name__
    if arch == "gpt2":
        assert cfg.normalization_type == "LN" and cfg.positional_embedding_type == "standard"
        assert torch.equal(m.W_E, ref_model.transformer.wte.weight)  # not folded: the checkpoint's weights
        assert torch.equal(m.blocks[0].ln1.w, ref_model.transformer.h[0].ln_1.weight)
    if arch == "neox":
        assert cfg.parallel_attn_mlp and cfg.positional_embedding_type == "rotary" and cfg.rotary_dim == 4
    if arch == "llama":
        assert cfg.normalization_type == "RMS" and cfg.gated_mlp and cfg.n_key_value_heads == 2
        assert cfg.act_fn == "silu"
    assert all(p.requires_grad for p in ref_model.parameters())  # the caller's model is left as it was


def test_converted_model_is_independent_of_the_hf_model(hf):
    ref_model = hf_models.gpt2(seed=1)
    m = models.from_pretrained(ref_model)
    with torch.no_grad():
        m.W_E.zero_()
    assert ref_model.transformer.wte.weight.abs().sum() > 0


def test_a_folder_name_cannot_choose_the_config(tmp_path, hf):
    """transformer-lens matches names like "llama" in a path before it reads config.json."""
    tokens = hf_models.tokens()
    folder = hf_models.save(hf["gpt2"], tmp_path / "my_llama_run")
    m = models.from_pretrained(folder)
    assert m.cfg.original_architecture == "GPT2LMHeadModel" and m.cfg.normalization_type == "LN"
    assert m.mechgrok_source["name"] == "my_llama_run"
    assert (_tl_logits(m, tokens) - _hf_logits(hf["gpt2"], tokens)).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_processing_flags_keep_the_probabilities(hf, arch):
    tokens = hf_models.tokens()
    ref = _hf_logits(hf[arch], tokens).log_softmax(-1)
    m = models.from_pretrained(hf[arch], fold_ln=True, center_writing_weights=True, center_unembed=True,
                               fold_value_biases=True)
    assert m.cfg.normalization_type == {"gpt2": "LNPre", "llama": "RMSPre"}[arch]
    assert (_tl_logits(m, tokens).log_softmax(-1) - ref).abs().max() < 1e-4
    assert torch.allclose(m.W_U.mean(-1), torch.zeros(()), atol=1e-6)  # centred unembedding
    assert m.mechgrok_source["fold_ln"] and m.mechgrok_source["center_unembed"]


def _extra(name):
    import transformers as T

    common = dict(vocab_size=hf_models.VOCAB, bos_token_id=0, eos_token_id=0)
    size = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=hf_models.N_CTX)
    build = {
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**size, **common, num_key_value_heads=2,
                                                                intermediate_size=48, sliding_window=None)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**size, **common, num_key_value_heads=2,
                                                          intermediate_size=48)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_layer=2, n_embd=32, n_head=4, n_positions=hf_models.N_CTX,
                                                       rotary_dim=4, **common)),
        "gptneo": lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4,
                                                             max_position_embeddings=hf_models.N_CTX, window_size=4,
                                                             attention_types=[[["global", "local"], 1]], **common)),
    }[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gptj", "gptneo"])
def test_other_supported_architectures(name):
    ref_model = _extra(name)
    assert type(ref_model).__name__ in models.PRETRAINED_ARCHITECTURES
    tokens = hf_models.tokens()
    m = models.from_pretrained(ref_model)
    assert (_tl_logits(m, tokens) - _hf_logits(ref_model, tokens)).abs().max() < 1e-4


def test_unsupported_architectures_are_refused_naming_the_supported_ones(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM

    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=20, max_position_embeddings=8))
    with pytest.raises(ValueError, match=r"cannot convert a BertForMaskedLM; supported architectures: "
                                         r"GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM"):
        models.from_pretrained(bert)
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=32,
                                   vocab_size=20, max_position_embeddings=8, word_embed_proj_dim=16))
    opt.save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="cannot convert a OPTForCausalLM"):  # refused before the weights are read
        models.from_pretrained(tmp_path / "opt")


def test_folders_that_are_not_checkpoints(tmp_path, hf):
    with pytest.raises(FileNotFoundError, match="is not a folder; .* downloads nothing"):
        models.from_pretrained(tmp_path / "gpt2")  # a hub name is not fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="already a HookedTransformer"):
        models.from_pretrained(models.from_pretrained(hf["gpt2"]))
    with pytest.raises(TypeError, match="checkpoint folder or a transformers PreTrainedModel"):
        models.from_pretrained(nn.Linear(2, 2))


def test_features_the_converter_would_drop_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(**kw):
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                            intermediate_size=24, vocab_size=20, max_position_embeddings=8, **kw))

    with pytest.raises(ValueError, match=r"rope scaling \['linear'\]"):
        models.from_pretrained(llama(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="attention_bias=True"):
        models.from_pretrained(llama(attention_bias=True))


def test_check_catches_a_model_that_computes_something_else(hf, monkeypatch):
    """A converter that drops a weight is caught by the logits check (simulated: corrupt the copy)."""
    real = models._tl_loading.get_pretrained_state_dict

    def corrupt(*args, **kwargs):
        state = real(*args, **kwargs)
        state["blocks.0.mlp.W_in"] = torch.zeros_like(state["blocks.0.mlp.W_in"])
        return state

    monkeypatch.setattr(models._tl_loading, "get_pretrained_state_dict", corrupt)
    with pytest.raises(ValueError, match="log-probabilities differ"):
        models.from_pretrained(hf["gpt2"])
    assert models.from_pretrained(hf["gpt2"], check=False) is not None


# ------------------------------------------------------------------------------------ save / load any model


@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_converted_model_saves_and_loads_identically(tmp_path, hf, arch):
    m = models.from_pretrained(hf[arch])
    models.save(m, tmp_path / "m")
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.bin"))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["spec"]["kind"] == "hooked_transformer" and "device" not in meta["spec"]["config"]
    assert meta["spec"]["source"]["architecture"] == type(hf[arch]).__name__
    n = models.load(tmp_path / "m")
    tokens = hf_models.tokens()
    assert torch.equal(_tl_logits(m, tokens), _tl_logits(n, tokens))
    assert models.spec(n) == models.spec(m) and n.mechgrok_source == m.mechgrok_source
    assert n.cfg.device == "cpu" and models.load(tmp_path / "m", device="cpu").cfg.device == "cpu"


def test_raw_hooked_transformer_saves_loads_and_leaves_the_global_rngs_alone(tmp_path, task):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=task.d_vocab,
                                  d_vocab_out=task.d_vocab_out, n_ctx=task.n_ctx, act_fn="gelu",
                                  normalization_type="LN", device="cpu", seed=3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = HookedTransformer(cfg)
    models.save(m, tmp_path / "m")
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    n = models.load(tmp_path / "m")
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])  # a config with a seed would reseed all three
    assert n.cfg.dtype == torch.float64 and n.cfg.seed == 3
    assert torch.equal(m(task.inputs), n(task.inputs))
    assert models.spec(n) == models.spec(m)


def test_only_transformer_lens_and_mechgrok_models_save(tmp_path, task):
    with pytest.raises(ValueError, match="mechgrok saves HookedTransformer and HookedMLP models, not a Linear"):
        models.save(nn.Linear(2, 2), tmp_path / "m")

    class Custom(HookedTransformer):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = Custom(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=8, n_ctx=3,
                                             act_fn="relu", device="cpu"))
    with pytest.raises(ValueError, match="subclass of HookedTransformer"):
        models.spec(sub)
    assert not (tmp_path / "m").exists()


def test_v01_specs_and_saved_models_are_unchanged(task):
    """Old run folders compare their config.json with the spec: the default spec must not change."""
    assert models.spec(models.transformer(task, d_model=16, n_heads=2, d_mlp=32)) == {"kind": "transformer", "kwargs": {
        "n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32, "act_fn": "relu", "normalization": None,
        "seed": 0, "d_vocab": 8, "d_vocab_out": 7, "n_ctx": 3}}
    assert models.spec(models.mlp(task, width=8)) == {"kind": "mlp", "kwargs": {
        "width": 8, "act": "square", "bias": False, "seed": 0, "p": 7, "d_out": 7}}
    old = models.load(ROOT / "circuits" / "test" / "model")  # written by mechgrok v0.1
    assert models.spec(old)["kind"] == "transformer"


def test_a_directly_built_mlp_saves(tmp_path, task):
    m = models.HookedMLP(7, 8, 7, act="relu", operand_positions=(1, 0), seed=2)
    models.save(m, tmp_path / "m")
    n = models.load(tmp_path / "m")
    assert n.operand_positions == (1, 0) and torch.equal(m(task.inputs), n(task.inputs))


# ------------------------------------------------------------------------------------ training any model


def test_train_a_raw_hooked_transformer_and_reload_the_run(tmp_path, task):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=task.d_vocab,
                                  d_vocab_out=task.d_vocab_out, n_ctx=task.n_ctx, act_fn="gelu",
                                  normalization_type="LN", device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = HookedTransformer(cfg)
    before = m.W_E.detach().clone()
    train_cfg = mg.TrainConfig(steps=4, eval_every=2, checkpoint_every=2, lr=1e-2)
    run = mg.train(m, task, train_cfg, out=tmp_path / "run", progress=False)
    assert not torch.equal(m.W_E, before) and run.steps() == [0, 2, 4]
    loaded = run.load_model()
    assert type(loaded) is HookedTransformer and torch.equal(loaded(task.inputs), m(task.inputs))
    assert json.dumps(mg.evaluate(loaded, task)) == json.dumps(mg.evaluate(m, task))  # NaN for the empty splits
    assert [r["step"] for r in run.history()] == [0, 2, 4]
    again = mg.train(loaded, task, train_cfg, out=tmp_path / "run", progress=False)  # same spec: already trained
    assert again.path == run.path


def test_train_refuses_what_it_cannot_use_with_the_real_reason(tmp_path, task):
    with pytest.raises(TypeError, match="expected a HookedTransformer or HookedMLP, got Sequential"):
        mg.train(nn.Sequential(nn.Linear(3, 7)), task, mg.TrainConfig(steps=1), out=tmp_path / "a", progress=False)
    gpt2 = models.from_pretrained(hf_models.gpt2())  # vocabulary 50, the task's 8
    with pytest.raises(ValueError, match="do not match.*d_vocab: model 50 vs task 8"):
        mg.train(gpt2, task, mg.TrainConfig(steps=1), out=tmp_path / "b", progress=False)
    attn = models.transformer(task, d_model=16, n_heads=2, attn_only=True)
    with pytest.raises(ValueError, match="dropout=0.1 acts on MLP neurons.*attention-only"):
        mg.train(attn, task, mg.TrainConfig(steps=1, dropout=0.1), out=tmp_path / "c", progress=False)
    class Custom(HookedTransformer):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = Custom(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=task.d_vocab,
                                             d_vocab_out=task.d_vocab_out, n_ctx=task.n_ctx, act_fn="relu",
                                             device="cpu"))
    with pytest.raises(ValueError, match=r"cannot record how to rebuild this model: a Custom \(a subclass"):
        mg.train(sub, task, mg.TrainConfig(steps=1), out=tmp_path / "d", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")


# ------------------------------------------------------------------------------------ transformer options

OPTIONS = {
    "rotary": dict(positional="rotary"),
    "rotary-half": dict(positional="rotary", rotary_dim=4, normalization="LN"),
    "shortformer": dict(positional="shortformer", normalization="LN"),
    "parallel": dict(parallel_attn_mlp=True, normalization="LN", act_fn="gelu"),
    "gqa": dict(n_heads=4, n_key_value_heads=2, normalization="RMS"),
    "gated": dict(gated_mlp=True, act_fn="silu", normalization="RMS"),
    "attn-only": dict(attn_only=True, normalization="LN"),
    "llama-like": dict(positional="rotary", n_heads=4, n_key_value_heads=1, gated_mlp=True, act_fn="silu",
                       normalization="RMS"),
    "neox-like": dict(positional="rotary", rotary_dim=2, parallel_attn_mlp=True, normalization="LN"),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_transformer_options(tmp_path, task, name):
    kw = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_mlp": 32, **OPTIONS[name]}
    m = models.transformer(task, seed=1, **kw)
    cfg = m.cfg
    assert cfg.positional_embedding_type == kw.get("positional", "standard")
    assert cfg.parallel_attn_mlp == kw.get("parallel_attn_mlp", False) and cfg.attn_only == kw.get("attn_only", False)
    assert cfg.n_key_value_heads == kw.get("n_key_value_heads") and cfg.gated_mlp == kw.get("gated_mlp", False)
    models.check_compatible(m, task)
    models.check_inputs(m, task.inputs)
    full = m(task.inputs)[:, -1]
    assert torch.allclose(models.training_logits(m, task.inputs), full, atol=1e-5)
    assert models._fast_last_block(cfg)  # the fast path, not the fallback, was compared
    s = models.spec(m)
    assert json.loads(json.dumps(s)) == s and s["kwargs"]["seed"] == 1
    rebuilt = models.build(s)  # the same architecture and, seeded, the same weights
    assert torch.equal(rebuilt(task.inputs), m(task.inputs))
    models.save(m, tmp_path / "m")
    assert torch.equal(models.load(tmp_path / "m")(task.inputs), m(task.inputs))


def test_training_logits_of_converted_models(hf):
    tokens = hf_models.tokens()
    for arch in hf_models.ARCHITECTURES:
        m = models.from_pretrained(hf[arch])
        assert models._fast_last_block(m.cfg)
        with torch.no_grad():
            assert torch.allclose(models.training_logits(m, tokens), m(tokens)[:, -1], atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"positional": "rotari"}, ValueError, "unknown positional 'rotari'.*did you mean 'rotary'"),
    ({"rotary_dim": 4}, ValueError, "rotary_dim applies only with positional='rotary'"),
    ({"positional": "rotary", "rotary_dim": 3}, ValueError, "rotary_dim must be even and at most d_head=8"),
    ({"positional": "rotary", "rotary_dim": 16}, ValueError, "rotary_dim must be even and at most d_head=8"),
    ({"n_key_value_heads": 3}, ValueError, r"must divide n_heads=2.*choose among \[1, 2\]"),
    ({"n_key_value_heads": 0}, ValueError, "n_key_value_heads must be >= 1"),
    ({"gated_mlp": 1}, TypeError, "gated_mlp must be True or False"),
    ({"attn_only": True, "gated_mlp": True}, ValueError, "attention-only model has no MLP, so gated_mlp"),
    ({"normalization": "layernorm"}, ValueError, "normalization must be None, 'LN' or 'RMS'"),
    ({"device": "gpu0"}, ValueError, "device must be a torch device"),
])
def test_bad_transformer_options(task, kwargs, error, match):
    with pytest.raises(error, match=f"models.transformer: .*{match}"):
        models.transformer(task, d_model=16, n_heads=2, d_mlp=32, **kwargs)


def test_transformer_from_a_config(task):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=task.d_vocab,
                                  d_vocab_out=task.d_vocab_out, n_ctx=task.n_ctx, act_fn="gelu",
                                  normalization_type="LN", positional_embedding_type="rotary", device="cpu")
    before = dict(cfg.to_dict())
    states = torch.get_rng_state(), random.getstate()
    a, b = models.transformer(task, config=cfg, seed=5), models.transformer(task, config=cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert torch.equal(a.W_E, b.W_E) and not torch.equal(a.W_E, models.transformer(task, config=cfg).W_E)
    assert a.cfg is not cfg and dict(cfg.to_dict()) == before  # the caller's config is copied, not changed
    assert a.cfg.positional_embedding_type == "rotary" and a.cfg.seed == 5
    assert models.spec(a)["kind"] == "hooked_transformer"
    assert torch.allclose(models.training_logits(a, task.inputs), models.final_logits(a, task.inputs), atol=1e-5)
    with pytest.raises(TypeError, match=r"pass either config= or the options \['n_layers'\]"):
        models.transformer(task, config=cfg, n_layers=2)
    with pytest.raises(ValueError, match="do not match.*d_vocab: model 8 vs task 14"):
        models.transformer(mg.tasks.modular_arithmetic(p=13, train_frac=0.5), config=cfg)
    with pytest.raises(TypeError, match="config must be a transformer_lens HookedTransformerConfig"):
        models.transformer(task, config={"n_layers": 1})


def test_devices_are_chosen_not_hard_coded(tmp_path, task):
    """The suite runs on the CPU; the same calls take device='cuda' where there is one."""
    m = models.transformer(task, d_model=16, n_heads=2, d_mlp=32, device="cpu")
    assert m.cfg.device == "cpu" and models.device_of(m).type == "cpu"
    mlp = models.mlp(task, width=8, device=torch.device("cpu"))
    models.save(mlp, tmp_path / "mlp")
    assert models.device_of(models.load(tmp_path / "mlp", device="cpu")).type == "cpu"
    run = mg.train(m, task, mg.TrainConfig(steps=1, eval_every=1), out=tmp_path / "run", progress=False)
    assert models.device_of(run.load_model(device="cpu")).type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_everything_on_cuda(tmp_path, task, hf):  # pragma: no cover - run where a GPU is
    m = models.from_pretrained(hf["llama"], device="cuda")
    assert m.cfg.device.startswith("cuda") and models.device_of(m).type == "cuda"
    tokens = hf_models.tokens()
    assert (_tl_logits(m, tokens).cpu() - _hf_logits(hf["llama"], tokens)).abs().max() < 1e-4
    models.save(m, tmp_path / "m")
    assert models.device_of(models.load(tmp_path / "m", device="cuda")).type == "cuda"
    t = models.transformer(task, d_model=16, n_heads=2, d_mlp=32, device="cuda")
    assert torch.equal(t.W_E.cpu(), models.transformer(task, d_model=16, n_heads=2, d_mlp=32).W_E)  # same weights
    cfg = mg.TrainConfig(steps=3, eval_every=1, checkpoint_every=1, batch_size=8, dropout=0.1)
    run = mg.train(t, task, cfg, out=tmp_path / "run", stop_at=2, progress=False)
    run = mg.train(t, task, cfg, out=tmp_path / "run", progress=False)  # resumes on the GPU
    assert models.device_of(run.load_model(device="cuda")).type == "cuda"
    mg.evaluate(models.mlp(task, width=8, device="cuda"), task)


def test_gpt2_with_its_own_mlp_width_converts():
    """GPT-2's ``n_inner`` (an MLP width other than 4 d_model) is kept, not replaced by 4 d_model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, n_inner=48, n_positions=8, vocab_size=20,
                                    bos_token_id=0, eos_token_id=0)).eval()
    model = mg.models.from_pretrained(hf)
    assert model.cfg.d_mlp == 48
    x = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-4)
