"""Models rewritten with ``nn.Linear`` layers, so that kronfluence can see them.

:func:`conv1d_as_linear` copies any model with ``transformers``' ``Conv1D`` layers (Hugging Face
GPT-2: ``y = x W + b`` with ``W`` ``[in, out]``) into one with ``nn.Linear`` layers (``W`` transposed,
same outputs, tied weights kept tied).

kronfluence tracks only ``nn.Linear`` / ``nn.Conv2d`` modules, and a HookedTransformer computes with
einsums over raw parameters. :func:`as_linear` copies a plain 1+-layer HookedTransformer (no
LayerNorm, standard positional embedding, ReLU/GELU MLP) into :class:`LinearTransformer`, whose
every weight lives in an ``nn.Linear`` (the embeddings act on one-hot vectors) and whose logits equal
the original's (tested to float rounding). Used by the kronfluence comparison tests and by
``benchmarks/bench_influence.py``; it is a reference copy, not a training model.
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechgrok.models import HookedTransformer

__all__ = ["LinearTransformer", "as_linear", "conv1d_as_linear"]


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int, act):
        super().__init__()
        self.n_heads, self.d_head, self.act = n_heads, d_head, act
        self.W_Q = nn.Linear(d_model, n_heads * d_head)
        self.W_K = nn.Linear(d_model, n_heads * d_head)
        self.W_V = nn.Linear(d_model, n_heads * d_head)
        self.W_O = nn.Linear(n_heads * d_head, d_model)
        self.W_in = nn.Linear(d_model, d_mlp)
        self.W_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: Float[Tensor, "b pos d"]) -> Float[Tensor, "b pos d"]:
        b, n, _ = x.shape
        q = self.W_Q(x).view(b, n, self.n_heads, self.d_head)  # [b, pos, H, dh]
        k = self.W_K(x).view(b, n, self.n_heads, self.d_head)
        v = self.W_V(x).view(b, n, self.n_heads, self.d_head)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.d_head**0.5  # [b, H, q, k]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(b, n, -1)  # [b, pos, H*dh]
        x = x + self.W_O(z)
        return x + self.W_out(self.act(self.W_in(x)))


class LinearTransformer(nn.Module):
    """Token ids ``[b, n_ctx]`` -> logits ``[b, n_ctx, d_vocab_out]``, every weight in an ``nn.Linear``."""

    def __init__(self, d_vocab: int, d_vocab_out: int, n_ctx: int, d_model: int, n_heads: int, d_head: int,
                 d_mlp: int, n_layers: int = 1, act_fn: str = "relu"):
        super().__init__()
        acts = {"relu": torch.relu, "gelu": nn.functional.gelu}
        if act_fn not in acts:
            raise ValueError(f"act_fn must be one of {sorted(acts)}, got {act_fn!r}")
        self.d_vocab, self.n_ctx = d_vocab, n_ctx
        self.W_E = nn.Linear(d_vocab, d_model, bias=False)  # on one-hot tokens
        self.W_pos = nn.Linear(n_ctx, d_model, bias=False)  # on one-hot positions
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_head, d_mlp, acts[act_fn]) for _ in range(n_layers))
        self.W_U = nn.Linear(d_model, d_vocab_out)

    def forward(self, tokens: Int[Tensor, "b pos"]) -> Float[Tensor, "b pos d_out"]:
        dtype = self.W_E.weight.dtype
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        pos = nn.functional.one_hot(pos, self.n_ctx).to(dtype).expand(tokens.shape[0], -1, -1)  # [b, pos, n_ctx]
        x = self.W_E(nn.functional.one_hot(tokens, self.d_vocab).to(dtype)) + self.W_pos(pos)  # [b, pos, d]
        for blk in self.blocks:
            x = blk(x)
        return self.W_U(x)


@torch.no_grad()
def as_linear(model: HookedTransformer) -> LinearTransformer:
    """Copy ``model``'s weights into a :class:`LinearTransformer` (same dtype, same logits)."""
    cfg = model.cfg
    if cfg.normalization_type is not None or cfg.positional_embedding_type != "standard" or cfg.attn_only \
            or cfg.gated_mlp or cfg.act_fn not in ("relu", "gelu"):
        raise NotImplementedError("as_linear handles HookedTransformers without LayerNorm, with standard "
                                  "positional embeddings and a ReLU/GELU MLP")
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    out = LinearTransformer(cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx, d, H, dh, cfg.d_mlp, cfg.n_layers, cfg.act_fn)
    out = out.to(dtype=model.W_E.dtype, device=model.W_E.device)
    out.W_E.weight.copy_(model.W_E.T)
    out.W_pos.weight.copy_(model.W_pos.T)
    for blk, src in zip(out.blocks, model.blocks):
        a = src.attn
        for lin, W, b in ((blk.W_Q, a.W_Q, a.b_Q), (blk.W_K, a.W_K, a.b_K), (blk.W_V, a.W_V, a.b_V)):
            lin.weight.copy_(W.permute(0, 2, 1).reshape(H * dh, d))  # [H, d, dh] -> [H*dh, d]
            lin.bias.copy_(b.reshape(-1))
        blk.W_O.weight.copy_(a.W_O.reshape(H * dh, d).T)  # [H, dh, d] -> [d, H*dh]
        blk.W_O.bias.copy_(a.b_O)
        blk.W_in.weight.copy_(src.mlp.W_in.T)
        blk.W_in.bias.copy_(src.mlp.b_in)
        blk.W_out.weight.copy_(src.mlp.W_out.T)
        blk.W_out.bias.copy_(src.mlp.b_out)
    out.W_U.weight.copy_(model.W_U.T)
    out.W_U.bias.copy_(model.b_U)
    return out


@torch.no_grad()
def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ``transformers`` ``Conv1D`` layers are ``nn.Linear`` layers with the
    same weights (transposed: ``Conv1D.weight`` is ``[in, out]``, ``nn.Linear.weight`` ``[out, in]``) and
    biases, so the copy computes the same outputs; the caller's model is not modified."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError("conv1d_as_linear needs the transformers package (pip install transformers)") from e
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Conv1D:
                d_in, d_out = child.weight.shape
                lin = nn.Linear(d_in, d_out, device=child.weight.device, dtype=child.weight.dtype)
                lin.weight.copy_(child.weight.T)  # [in, out] -> [out, in]
                lin.bias.copy_(child.bias)
                lin.weight.requires_grad_(child.weight.requires_grad)
                lin.bias.requires_grad_(child.bias.requires_grad)
                setattr(parent, name, lin)
    return out
