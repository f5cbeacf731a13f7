"""Tiny random Hugging Face causal LMs for the bring-your-own-model tests (no downloads).

Each builder returns a seeded ``transformers`` model in eval mode, small enough for CPU tests:
2 layers, d_model 32, 4 heads, vocabulary 50, context 16. ``save(model, folder)`` writes it as a
checkpoint folder (``config.json`` + safetensors), the form researchers bring.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, N_CTX, D_MODEL, N_HEADS, N_LAYERS = 50, 16, 32, 4, 2
ARCHITECTURES = ("gpt2", "neox", "llama")


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def gpt2(seed: int = 0):
    """GPT-2: LayerNorm, GELU, biases, learned positions, ``Conv1D`` layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_positions=N_CTX, vocab_size=VOCAB,
                     bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def neox(seed: int = 0):
    """GPT-NeoX / Pythia: rotary on half the head dimensions, parallel attention + MLP."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                        intermediate_size=4 * D_MODEL, max_position_embeddings=N_CTX, vocab_size=VOCAB,
                        rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
                        architectures=["GPTNeoXForCausalLM"])
    return _seeded(lambda: GPTNeoXForCausalLM(cfg), seed)


def llama(seed: int = 0):
    """Llama: RMSNorm, rotary, gated SiLU MLP, grouped-query attention (2 key/value heads for 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=N_CTX, vocab_size=VOCAB,
                      bos_token_id=0, eos_token_id=0, architectures=["LlamaForCausalLM"])
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


BUILDERS = {"gpt2": gpt2, "neox": neox, "llama": llama}


def save(model, folder: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder and return the folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def tokens(n: int = 4, pos: int = N_CTX, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[n, pos]`` in the tiny models' vocabulary."""
    return torch.randint(0, VOCAB, (n, pos), generator=torch.Generator().manual_seed(seed))
