"""The logits mechgrok reads: at the answer (last) position, for either kind of model.

>>> import torch
>>> from mechgrok import models
>>> model = models.transformer(d_vocab=7, d_vocab_out=5, n_ctx=3, d_model=16, n_heads=2, d_mlp=32)
>>> x = torch.tensor([[1, 2, 6], [3, 4, 6]])
>>> final_logits(model, x).shape
torch.Size([2, 5])
>>> torch.allclose(training_logits(model, x), final_logits(model, x), atol=1e-6)
True
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from mechgrok.models._tl import HookedTransformer, softcap_enabled
from mechgrok.models.builders import POSITIONAL
from mechgrok.models.pretrained import PRETRAINED_ARCHITECTURES

__all__ = ["final_logits", "training_logits"]


def final_logits(model: nn.Module, inputs: Tensor) -> Float[Tensor, "batch d_out"]:
    """Logits at the answer (last) position, ``[batch, d_vocab_out]``, for either kind of model."""
    out = model(inputs)
    return out[:, -1] if out.ndim == 3 else out


def training_logits(model: nn.Module, inputs: Tensor) -> Float[Tensor, "batch d_out"]:
    """``final_logits`` computed faster for training: the last block's MLP and the unembedding run
    at the answer position only (earlier positions cannot affect it: attention is causal and the
    logits are read at the last position). Same values as ``final_logits`` up to float rounding
    (tested for learned, rotary and shortformer positions, parallel attention, grouped-query
    attention, gated MLPs, attention-only models, LayerNorm and RMSNorm); ~1.6x faster for a
    1-layer model (DESIGN.md §5). Other configurations (hooks enabled in the config, post-norm or
    MoE blocks, logit soft-capping, several devices) run the full forward.

    Hooks on the last block's ``hook_resid_mid`` and later see only that position, so use this
    only where no analysis hook is attached (the training loop).
    """
    if not isinstance(model, HookedTransformer) or not _fast_last_block(model.cfg):
        return final_logits(model, inputs)
    cfg = model.cfg
    resid, _, shortformer, mask = model.input_to_embed(inputs)  # [b, pos, d], shortformer positions or None
    for block in model.blocks[:-1]:
        resid = block(resid, shortformer_pos_embed=shortformer, attention_mask=mask)
    blk = model.blocks[-1]
    resid = blk.hook_resid_pre(resid)
    x = blk.ln1(resid)
    qk = x if shortformer is None else x + shortformer
    attn_out = blk.hook_attn_out(blk.attn(query_input=qk, key_input=qk, value_input=x, attention_mask=mask))
    last = resid[:, -1:]  # [b, 1, d]
    if cfg.attn_only:
        out = last + attn_out[:, -1:]
    elif cfg.parallel_attn_mlp:
        out = last + attn_out[:, -1:] + blk.apply_mlp(blk.ln2(last))
    else:
        mid = blk.hook_resid_mid(last + attn_out[:, -1:])  # [b, 1, d]
        out = mid + blk.apply_mlp(blk.ln2(mid))
    out = blk.hook_resid_post(out)  # [b, 1, d]
    if cfg.normalization_type is not None:
        out = model.ln_final(out)
    return model.unembed(out)[:, -1]  # [b, d_out]


def _fast_last_block(cfg) -> bool:
    """A config whose blocks ``training_logits`` reproduces (pre-norm, sequential or parallel)."""
    return (cfg.positional_embedding_type in POSITIONAL and not cfg.use_split_qkv_input and not cfg.use_attn_in
            and not cfg.use_hook_mlp_in and not cfg.use_normalization_before_and_after and not cfg.num_experts
            and cfg.n_devices == 1 and not softcap_enabled(cfg.output_logits_soft_cap)
            and (cfg.original_architecture is None or cfg.original_architecture in PRETRAINED_ARCHITECTURES))
