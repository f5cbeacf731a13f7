"""The linear maps EK-FAC sees, and how to read their inputs and output gradients from a model.

A *linear map* is ``y = W a (+ b)`` applied at every token position. EK-FAC approximates the Fisher
block of ``W`` (and ``b``) from ``a`` (the map's input) and ``g = dℓ/dy`` (the gradient of the
per-example loss at the map's output). mechgrok uses one convention everywhere:

    G = Σ_t g_t a_tᵀ   of shape ``[d_out, d_in (+1)]``  (the per-example gradient, a bias column last)

whatever the parameter's own layout (transformer-lens stores ``W_in`` as ``[d_in, d_out]``,
``nn.Linear`` as ``[d_out, d_in]``); :meth:`LinearMap.to_G` converts parameter gradients into it.

Maps found by :func:`linear_maps`:

- ``HookedTransformer`` (read through its hook points): ``embed.W_E`` and ``pos_embed.W_pos``
  (one-hot inputs, so their ``A`` is diagonal), per block ``attn.W_Q/W_K/W_V`` (input: the attention
  input, output ``hook_q/k/v``; with grouped-query attention ``W_K``/``W_V`` are the stored
  ``_W_K``/``_W_V`` of ``n_key_value_heads`` heads), ``attn.W_O`` (input ``hook_z``, output
  ``hook_attn_out``), ``mlp.W_in`` (output ``mlp.hook_pre``; ``mlp.hook_pre_linear`` in a gated MLP,
  whose ``mlp.W_gate`` writes ``mlp.hook_pre``), ``mlp.W_out`` (input ``mlp.hook_post``, output
  ``hook_mlp_out``), and ``unembed.W_U`` (input ``unembed.hook_in``, output ``unembed.hook_out``).
  Biases (``b_Q``, ``b_in``, ...) ride along as the bias column; a gated MLP's ``b_in`` is added
  after the gate product, belongs to no map and is not covered. With ``per_head=True`` each attention
  map is split into one map per head (``blocks.0.attn.W_Q.h1``; key/value heads for ``W_K``/``W_V``
  under GQA); ``b_O`` belongs to no head and is then left out. Parallel attention + MLP (GPT-J /
  NeoX) is supported; split q/k/v inputs, mixture-of-experts MLPs, post-norm and shortformer
  layouts are refused with a message.
- ``HookedMLP``: ``blocks.0.mlp.W_in`` (input ``hook_in``) and ``blocks.0.mlp.W_out`` (output
  ``hook_out``).
- Any other ``nn.Module``: every submodule whose type is exactly ``nn.Linear`` (``y = x Wᵀ + b``) or
  ``transformers``' ``Conv1D`` (Hugging Face GPT-2; ``y = x W + b`` with ``W`` ``[in, out]``), read
  through its own forward hook, with a trainable weight. Other layers are not covered; a layer that
  holds a weight matrix (a trainable parameter of 2+ dims) but is not one of these nor an
  ``nn.Embedding`` (a subclass of ``nn.Linear``, ``nn.MultiheadAttention``, a convolution, a custom
  module) is *unsupported*: :class:`~mechgrok.influence.EKFAC` warns about it by name
  (:mod:`mechgrok.influence.coverage`). A weight shared by two modules (GPT-2's ``lm_head`` tied to
  ``wte``) is fitted as the linear map that uses it: its ``G`` is that map's share of the
  gradient (as in kronfluence); the embedding lookup's share is not covered.

Positions that carry no loss are masked out of ``A`` and ``S``. For a Task the loss is read at the
last position only, so in a HookedTransformer's last block the query, output, MLP and unembedding
maps have a non-zero gradient at the last position alone (``positions="last"``); keys, values,
earlier blocks and the embeddings act at every position. With a per-token loss (Sequences,
``per_token=True``) every map uses every position. Plain ``nn.Module`` models use every position
(as kronfluence does). LayerNorm scales and the like are not linear maps and are not covered.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechgrok.models import HookedMLP, HookedTransformer

__all__ = ["LinearMap", "linear_maps", "select_maps", "is_fitted_layer"]


@dataclass(frozen=True)
class LinearMap:
    """One linear map ``y = W a (+ b)`` and where its ``a`` and ``y`` live in the model.

    Attributes:
        name: e.g. ``"blocks.0.attn.W_Q"``, ``"blocks.0.attn.W_Q.h1"`` (one head) or ``"fc1"``.
        d_in: input features, without the bias column.
        d_out: output features.
        bias: a bias column of ones is appended to ``a``.
        onehot: the input is a one-hot index (``"tokens"`` or ``"positions"``), so ``A`` is diagonal.
        in_ref: where ``a`` is read: ``("output", module)`` (a hook point or module's output),
            ``("input", module)`` (an ``nn.Linear``'s input), ``("tokens",)`` or ``("positions",)``.
        out_ref: the module whose output is ``y``.
        in_head / out_head: the head to slice from a ``[batch, pos, head, d_head]`` input/output.
        positions: ``"all"`` or ``"last"`` (the only position with a non-zero output gradient).
        weight / bias_param: parameter names.
        layout: how ``weight`` relates to ``G``: ``"out_in"`` (nn.Linear), ``"in_out"``
            (transformer-lens ``W_in``, ``W_E``, ...), ``"qkv"`` (``[head, d_model, d_head]``),
            ``"o"`` (``[head, d_head, d_model]``).
    """

    name: str
    d_in: int
    d_out: int
    bias: bool
    onehot: bool
    in_ref: tuple[str, ...]
    out_ref: str
    weight: str
    layout: str
    bias_param: str | None = None
    in_head: int | None = None
    out_head: int | None = None
    positions: str = "all"

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ``G``: ``(d_out, d_in + bias)``."""
        return (self.d_out, self.d_in + int(self.bias))

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_G(self, grads: dict[str, Tensor]) -> Tensor:
        """Parameter gradients (name -> tensor, optionally with a leading batch dim) -> ``G``
        ``[..., d_out, d_in (+1)]`` in float64."""
        w = grads[self.weight].double()
        h = self.in_head if self.in_head is not None else self.out_head
        if self.layout == "out_in":  # [.., out, in]
            G = w
        elif self.layout == "in_out":  # [.., in, out]
            G = w.transpose(-1, -2)
        elif self.layout == "qkv":  # [.., H, d_model, d_head]
            G = w[..., h, :, :].transpose(-1, -2) if h is not None else \
                w.transpose(-1, -2).flatten(-3, -2)  # [.., H*d_head, d_model]
        elif self.layout == "o":  # [.., H, d_head, d_model]
            G = w[..., h, :, :].transpose(-1, -2) if h is not None else \
                w.flatten(-3, -2).transpose(-1, -2)  # [.., d_model, H*d_head]
        else:  # pragma: no cover - set by linear_maps only
            raise AssertionError(self.layout)
        if not self.bias:
            return G
        b = grads[self.bias_param].double()
        if self.layout == "qkv":
            b = b[..., h, :] if h is not None else b.flatten(-2)  # [.., d_head] / [.., H*d_head]
        return torch.cat([G, b.unsqueeze(-1)], dim=-1)

    def param_names(self) -> list[str]:
        return [self.weight] + ([self.bias_param] if self.bias else [])


def linear_maps(model: nn.Module, per_head: bool = False, per_token: bool = False) -> list[LinearMap]:
    """Every linear map of ``model`` that EK-FAC can fit (see the module docstring); ``per_token``: the
    loss is read at every position (Sequences), not at the last one. HookedTransformer maps come in
    forward order, other models' in the order of ``named_modules``."""
    if isinstance(model, HookedTransformer):
        return _transformer_maps(model, per_head, per_token)
    if isinstance(model, HookedMLP):
        return _mlp_maps(model)
    maps = []
    for name, mod in model.named_modules():
        kind = is_fitted_layer(mod)
        if kind is None or not mod.weight.requires_grad:
            continue
        pre = f"{name}." if name else ""
        has_bias = mod.bias is not None and mod.bias.requires_grad
        if kind == "linear":
            d_in, d_out, layout = mod.in_features, mod.out_features, "out_in"  # weight [out, in]
        else:  # Conv1D: weight [in, out]
            (d_in, d_out), layout = mod.weight.shape, "in_out"
        maps.append(LinearMap(name=name, d_in=int(d_in), d_out=int(d_out), bias=has_bias, onehot=False,
                              in_ref=("input", name), out_ref=name, weight=f"{pre}weight", layout=layout,
                              bias_param=f"{pre}bias" if has_bias else None))
    if not maps:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or transformers Conv1D layers with a trainable "
                         "weight and is not a HookedTransformer or HookedMLP, so EK-FAC finds no linear map to fit")
    return maps


def is_fitted_layer(mod: nn.Module) -> str | None:
    """``"linear"`` for an exact ``nn.Linear``, ``"conv1d"`` for ``transformers``' ``Conv1D`` (its
    exact type), else ``None``. Subclasses are not fitted: their forward may compute something else
    (``nn.MultiheadAttention.out_proj`` is never even called)."""
    if type(mod) is nn.Linear:
        return "linear"
    utils = sys.modules.get("transformers.pytorch_utils")  # a Conv1D exists only once this is imported
    if utils is not None and type(mod) is getattr(utils, "Conv1D", None):
        return "conv1d"
    return None


def select_maps(maps: list[LinearMap], modules: str | list[str]) -> list[LinearMap]:
    """``modules="all"`` or a list of map names; a whole-map name selects all its heads."""
    if isinstance(modules, str):
        if modules == "all":
            return list(maps)
        modules = [modules]
    if not modules:
        raise ValueError("modules is empty; pass 'all' or a list of map names")
    names = [m.name for m in maps]
    bases = {m.name.rsplit(".h", 1)[0] if m.out_head is not None or m.in_head is not None else m.name
             for m in maps}
    chosen = []
    for want in modules:
        hits = [m for m in maps if m.name == want or (m.name.rsplit(".h", 1)[0] == want
                                                      and (m.in_head is not None or m.out_head is not None))]
        if not hits:
            close = difflib.get_close_matches(want, sorted(set(names) | bases), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown module {want!r}{hint} (the model's linear maps are: {', '.join(names)})")
        chosen += [m for m in hits if m not in chosen]
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=lambda m: order[m.name])


# ---------------------------------------------------------------------------- transformer-lens


def _transformer_maps(model: HookedTransformer, per_head: bool, per_token: bool) -> list[LinearMap]:
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None)
    unsupported = {
        "use_split_qkv_input": cfg.use_split_qkv_input, "use_attn_in": cfg.use_attn_in,
        "ungroup_grouped_query_attention": n_kv is not None and getattr(cfg, "ungroup_grouped_query_attention", False),
        "a mixture-of-experts MLP (num_experts)": getattr(cfg, "num_experts", None) is not None,
        "a gated MLP with a LayerNorm activation": cfg.gated_mlp and cfg.is_layer_norm_activation(),
        "use_normalization_before_and_after": cfg.use_normalization_before_and_after,
        f"positional_embedding_type={cfg.positional_embedding_type!r}":
            cfg.positional_embedding_type not in ("standard", "rotary"),
        "a post-norm architecture": cfg.original_architecture is not None
            and "olmo" in str(cfg.original_architecture).lower(),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NotImplementedError(f"EK-FAC on a HookedTransformer supports pre-norm layouts (LayerNorm / RMSNorm / "
                                  f"none, gated or plain MLPs, GQA, parallel attention); this model uses "
                                  f"{', '.join(bad)} (switch it off, e.g. set_use_split_qkv_input(False), or "
                                  "rewrite the model with nn.Linear layers)")
    H, dh, d, L = cfg.n_heads, cfg.d_head, cfg.d_model, cfg.n_layers
    norm = cfg.normalization_type is not None
    maps = [LinearMap(name="embed.W_E", d_in=cfg.d_vocab, d_out=d, bias=False, onehot=True, in_ref=("tokens",),
                      out_ref="hook_embed", weight="embed.W_E", layout="in_out")]
    if cfg.positional_embedding_type == "standard":
        maps.append(LinearMap(name="pos_embed.W_pos", d_in=cfg.n_ctx, d_out=d, bias=False, onehot=True,
                              in_ref=("positions",), out_ref="hook_pos_embed", weight="pos_embed.W_pos",
                              layout="in_out"))
    for layer in range(L):
        blk = f"blocks.{layer}"
        last = "last" if layer == L - 1 and not per_token else "all"
        attn_in = ("output", f"{blk}.ln1") if norm else ("output", f"{blk}.hook_resid_pre")
        for W, hook, pos in (("Q", "hook_q", last), ("K", "hook_k", "all"), ("V", "hook_v", "all")):
            grouped = n_kv is not None and W != "Q"  # GQA stores n_kv heads of keys / values in _W_K, _W_V
            heads, prefix = (n_kv, "_") if grouped else (H, "")
            common = dict(d_in=d, bias=True, onehot=False, in_ref=attn_in, out_ref=f"{blk}.attn.{hook}",
                          weight=f"{blk}.attn.{prefix}W_{W}", layout="qkv", bias_param=f"{blk}.attn.{prefix}b_{W}",
                          positions=pos)
            if per_head:
                maps += [LinearMap(name=f"{blk}.attn.W_{W}.h{h}", d_out=dh, out_head=h, **common)
                         for h in range(heads)]
            else:
                maps.append(LinearMap(name=f"{blk}.attn.W_{W}", d_out=heads * dh, **common))
        common = dict(d_out=d, onehot=False, in_ref=("output", f"{blk}.attn.hook_z"), out_ref=f"{blk}.hook_attn_out",
                      weight=f"{blk}.attn.W_O", layout="o", positions=last)
        if per_head:
            maps += [LinearMap(name=f"{blk}.attn.W_O.h{h}", d_in=dh, bias=False, in_head=h, **common) for h in range(H)]
        else:
            maps.append(LinearMap(name=f"{blk}.attn.W_O", d_in=H * dh, bias=True, bias_param=f"{blk}.attn.b_O",
                                  **common))
        if cfg.attn_only:
            continue
        if norm or cfg.parallel_attn_mlp:  # ln2 (an nn.Identity without normalisation) reads the MLP input
            mlp_in = ("output", f"{blk}.ln2")
        else:
            mlp_in = ("output", f"{blk}.hook_mlp_in" if cfg.use_hook_mlp_in else f"{blk}.hook_resid_mid")
        mlp = dict(d_in=d, d_out=cfg.d_mlp, onehot=False, in_ref=mlp_in, layout="in_out", positions=last)
        if cfg.gated_mlp:  # hook_post = act(x W_gate) * (x W_in) + b_in: neither product has a bias
            maps.append(LinearMap(name=f"{blk}.mlp.W_gate", bias=False, out_ref=f"{blk}.mlp.hook_pre",
                                  weight=f"{blk}.mlp.W_gate", **mlp))
            maps.append(LinearMap(name=f"{blk}.mlp.W_in", bias=False, out_ref=f"{blk}.mlp.hook_pre_linear",
                                  weight=f"{blk}.mlp.W_in", **mlp))
        else:
            maps.append(LinearMap(name=f"{blk}.mlp.W_in", bias=True, out_ref=f"{blk}.mlp.hook_pre",
                                  weight=f"{blk}.mlp.W_in", bias_param=f"{blk}.mlp.b_in", **mlp))
        maps.append(LinearMap(name=f"{blk}.mlp.W_out", d_in=cfg.d_mlp, d_out=d, bias=True, onehot=False,
                              in_ref=("output", f"{blk}.mlp.hook_post"), out_ref=f"{blk}.hook_mlp_out",
                              weight=f"{blk}.mlp.W_out", layout="in_out", bias_param=f"{blk}.mlp.b_out",
                              positions=last))
    maps.append(LinearMap(name="unembed.W_U", d_in=d, d_out=cfg.d_vocab_out, bias=True, onehot=False,
                          in_ref=("output", "unembed.hook_in"), out_ref="unembed.hook_out", weight="unembed.W_U",
                          layout="in_out", bias_param="unembed.b_U", positions="all" if per_token else "last"))
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    for m in maps:
        for ref in (m.in_ref[1:] + (m.out_ref,)):
            if ref not in modules:
                raise NotImplementedError(f"EK-FAC expected the module {ref!r} in this HookedTransformer (for "
                                          f"{m.name}); this transformer-lens version lays it out differently")
        for name in m.param_names():
            if name not in params:
                raise NotImplementedError(f"EK-FAC expected the parameter {name!r} in this HookedTransformer (for "
                                          f"{m.name}); this transformer-lens version lays it out differently")
    return maps


def _mlp_maps(model: HookedMLP) -> list[LinearMap]:
    mlp = model.blocks[0].mlp
    d_in, width = mlp.W_in.shape
    d_out = mlp.W_out.shape[1]
    return [
        LinearMap(name="blocks.0.mlp.W_in", d_in=d_in, d_out=width, bias=mlp.b_in is not None, onehot=False,
                  in_ref=("output", "hook_in"), out_ref="blocks.0.mlp.hook_pre", weight="blocks.0.mlp.W_in",
                  layout="in_out", bias_param="blocks.0.mlp.b_in" if mlp.b_in is not None else None),
        LinearMap(name="blocks.0.mlp.W_out", d_in=width, d_out=d_out, bias=mlp.b_out is not None, onehot=False,
                  in_ref=("output", "blocks.0.mlp.hook_post"), out_ref="hook_out", weight="blocks.0.mlp.W_out",
                  layout="in_out", bias_param="blocks.0.mlp.b_out" if mlp.b_out is not None else None),
    ]
