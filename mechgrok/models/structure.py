"""What a model is made of: its number of blocks, whether they have MLP neurons, the hook names of
those neurons, and the per-head hooks that patching needs (``patchable``).

>>> from mechgrok import models
>>> mlp_hook(1, "pre")
'blocks.1.mlp.hook_pre'
>>> model = models.transformer(d_vocab=7, d_vocab_out=5, n_ctx=3, d_model=16, n_heads=2, n_layers=2, attn_only=True)
>>> n_layers(model), has_mlp(model)
(2, False)
"""

from __future__ import annotations

import contextlib

from torch import nn

from mechgrok._config import check_int
from mechgrok.models._tl import HookedTransformer

__all__ = ["n_layers", "has_mlp", "mlp_kind", "mlp_hook", "patchable"]


def n_layers(model: nn.Module) -> int:
    """Number of blocks of a HookedTransformer or HookedMLP."""
    return int(model.cfg.n_layers) if isinstance(model, HookedTransformer) else len(model.blocks)


def has_mlp(model: nn.Module) -> bool:
    """Whether ``model``'s blocks have one layer of MLP neurons (``mlp_hook``): not an attention-only
    transformer, nor a mixture-of-experts one (whose neurons are each expert's, ``blocks.L.mlp.experts.E``)."""
    return not (isinstance(model, HookedTransformer) and (model.cfg.attn_only or model.cfg.num_experts))


def mlp_kind(model: nn.Module) -> str:
    """What a model's blocks have instead of MLP neurons, for messages: ``"attention-only"``,
    ``"mixture-of-experts"``, or ``"dense"`` (it has them)."""
    if isinstance(model, HookedTransformer) and model.cfg.attn_only:
        return "attention-only"
    if isinstance(model, HookedTransformer) and model.cfg.num_experts:
        return "mixture-of-experts"
    return "dense"


def mlp_hook(layer: int = 0, where: str = "post") -> str:
    """The hook name of an MLP's neurons (same for transformers and HookedMLP)."""
    if where not in ("pre", "post"):
        raise ValueError(f"where must be 'pre' or 'post', got {where!r}")
    layer = check_int(layer, "layer", low=0)
    return f"blocks.{layer}.mlp.hook_{where}"


_PATCH_FLAGS = ("use_split_qkv_input", "use_hook_mlp_in", "ungroup_grouped_query_attention")


@contextlib.contextmanager
def patchable(model: nn.Module, split_heads: bool = True):
    """Expose per-head q/k/v inputs (``hook_q_input``, ..., with ``split_heads``), one set of keys
    and values per query head under grouped-query attention (``ungroup_grouped_query_attention``),
    and the MLP input (``hook_mlp_in``) of a HookedTransformer while in the block, then restore its
    settings. The forward computes the same values (float rounding aside); other models pass
    through unchanged. ``split_heads=False`` keeps the one shared attention input (TL's
    ``use_split_qkv_input`` makes every layer normalise and project ``[batch, pos, heads, d_model]``
    copies of the stream): enough when no head's input is patched."""
    if not isinstance(model, HookedTransformer):
        yield model
        return
    cfg = model.cfg
    old = {f: getattr(cfg, f) for f in _PATCH_FLAGS}
    cfg.use_split_qkv_input = bool(split_heads)  # heads' outputs are read at attn.hook_z (not hook_result: see circuits.patching)
    cfg.use_hook_mlp_in = not cfg.attn_only
    cfg.ungroup_grouped_query_attention = cfg.n_key_value_heads is not None
    try:
        yield model
    finally:
        for f, v in old.items():
            setattr(cfg, f, v)
