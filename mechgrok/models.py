"""Build, save and load the models mechgrok studies.

Two kinds, both transformer-lens ``HookedRootModule`` s, so every analysis speaks hook names:

- ``transformer(task, ...)``: a ``HookedTransformer`` with no LayerNorm and ReLU by default, as in
  the grokking papers (Nanda et al. 2023).
- ``mlp(task, width, act, ...)``: ``HookedMLP``, one-hot(a) ‖ one-hot(b) -> ``W_in`` -> act ->
  ``W_out`` -> logits, no biases by default (Doshi et al. 2023). Its weights live at
  ``blocks.0.mlp.W_in`` / ``W_out`` and its hooks at ``blocks.0.mlp.hook_pre`` / ``hook_post``,
  the same paths as a 1-layer transformer's MLP, so neuron analyses serve both.

This module is the only place that knows which transformer-lens version is installed: other
modules import ``HookedRootModule``, ``HookPoint`` and ``HookedTransformer`` from here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor, nn

from mechgrok._io import atomic_dir, atomic_write_text, read_safetensors
from mechgrok.tasks import Task

with warnings.catch_warnings():
    # transformer-lens 3.x warns that HookedTransformer is deprecated in favour of 4.x's
    # TransformerBridge; sae-lens 6 needs < 4, so 3.x is the version mechgrok targets.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    try:  # transformer-lens >= 3 exports it at the top level
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - transformer-lens 2.x
        from transformer_lens.hook_points import HookedRootModule
    from transformer_lens.hook_points import HookPoint

TL_VERSION = importlib.metadata.version("transformer-lens")

__all__ = ["HookedMLP", "HookedRootModule", "HookPoint", "HookedTransformer", "transformer", "mlp",
           "save", "load", "spec", "build", "final_logits", "training_logits", "patchable", "check_compatible", "mlp_hook", "n_layers", "TL_VERSION"]

_ACTS = {
    "square": lambda x: x * x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "linear": lambda x: x,
}


def _quiet_build(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return fn(*args, **kwargs)


def transformer(task: Task | None = None, *, n_layers: int = 1, d_model: int = 128, n_heads: int = 4,
                d_head: int | None = None, d_mlp: int = 512, act_fn: str = "relu",
                normalization: str | None = None, seed: int = 0, d_vocab: int | None = None,
                d_vocab_out: int | None = None, n_ctx: int | None = None) -> HookedTransformer:
    """A ``HookedTransformer`` sized for ``task`` (vocabulary and context read from it).

    Args:
        task: gives ``d_vocab``, ``d_vocab_out`` and ``n_ctx`` (or pass them explicitly).
        n_layers, d_model, n_heads, d_mlp: sizes; ``d_head`` defaults to ``d_model // n_heads``.
        act_fn: MLP nonlinearity (transformer-lens name: relu, gelu, ...).
        normalization: ``None`` (default, as in the grokking papers), ``"LN"`` or ``"RMS"``.
        seed: seeds the initialisation without touching the global RNG.

    Returns:
        The model; ``model(tokens)`` maps ``[batch, n_ctx]`` ids to logits ``[batch, n_ctx, d_vocab_out]``.
    """
    d_vocab = d_vocab if d_vocab is not None else _need(task, "d_vocab")
    d_vocab_out = d_vocab_out if d_vocab_out is not None else _need(task, "d_vocab_out")
    n_ctx = n_ctx if n_ctx is not None else _need(task, "n_ctx")
    if d_head is None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass d_head")
        d_head = d_model // n_heads
    if normalization not in (None, "LN", "RMS"):
        raise ValueError(f"normalization must be None, 'LN' or 'RMS', got {normalization!r}")
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                                  d_mlp=d_mlp, d_vocab=d_vocab, d_vocab_out=d_vocab_out, n_ctx=n_ctx,
                                  act_fn=act_fn, normalization_type=normalization, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _quiet_build(HookedTransformer, cfg)
    model.mechgrok_spec = {"kind": "transformer", "kwargs": dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, act_fn=act_fn,
        normalization=normalization, seed=seed, d_vocab=d_vocab, d_vocab_out=d_vocab_out, n_ctx=n_ctx)}
    return model


def _need(task: Task | None, attr: str) -> int:
    if task is None:
        raise ValueError(f"pass a task or {attr}=...")
    return int(getattr(task, attr))


class _MLPLayer(nn.Module):
    """``W_in [d_in, width] -> act -> W_out [width, d_out]`` with hooks before and after ``act``."""

    def __init__(self, d_in: int, width: int, d_out: int, act: str, bias: bool, g: torch.Generator):
        super().__init__()
        # PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.W_in = nn.Parameter((torch.rand(d_in, width, generator=g) * 2 - 1) / d_in**0.5)
        self.W_out = nn.Parameter((torch.rand(width, d_out, generator=g) * 2 - 1) / width**0.5)
        self.b_in = nn.Parameter(torch.zeros(width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.act = _ACTS[act]
        self.hook_pre = HookPoint()  # [batch, width]
        self.hook_post = HookPoint()  # [batch, width]

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_out"]:
        pre = x @ self.W_in
        if self.b_in is not None:
            pre = pre + self.b_in
        post = self.hook_post(self.act(self.hook_pre(pre)))
        out = post @ self.W_out
        return out + self.b_out if self.b_out is not None else out


class _Block(nn.Module):
    def __init__(self, mlp: _MLPLayer):
        super().__init__()
        self.mlp = mlp


class HookedMLP(HookedRootModule):
    """Two-layer MLP on one-hot operands (Doshi et al. 2023, "To grok or not to grok").

    ``forward`` takes token ids ``[batch, n_ctx]`` (operands read at ``operand_positions`` and
    one-hot encoded) or the one-hot view ``[batch, 2p]`` (``Task.onehot()``) and returns logits
    ``[batch, d_out]``. Hooks: ``hook_in`` (one-hot input), ``blocks.0.mlp.hook_pre``,
    ``blocks.0.mlp.hook_post``, ``hook_out`` (logits).
    """

    def __init__(self, p: int, width: int, d_out: int, act: str = "square", bias: bool = False,
                 operand_positions: tuple[int, int] = (0, 1), seed: int = 0):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unknown act {act!r}; choose one of {sorted(_ACTS)}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.p, self.d_out, self.operand_positions = p, d_out, tuple(operand_positions)
        g = torch.Generator().manual_seed(seed)
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList([_Block(_MLPLayer(2 * p, width, d_out, act, bias, g))])
        self.hook_out = HookPoint()
        self.setup()

    def forward(self, x: Int[Tensor, "batch n_ctx"] | Float[Tensor, "batch two_p"]) -> Float[Tensor, "batch d_out"]:
        if not x.is_floating_point():
            i, j = self.operand_positions
            x = torch.cat([nn.functional.one_hot(x[:, i], self.p), nn.functional.one_hot(x[:, j], self.p)],
                          dim=-1).to(self.blocks[0].mlp.W_in.dtype)  # [batch, 2p]
        return self.hook_out(self.blocks[0].mlp(self.hook_in(x)))


def mlp(task: Task | None = None, *, width: int = 500, act: str = "square", bias: bool = False, seed: int = 0,
        p: int | None = None, d_out: int | None = None) -> HookedMLP:
    """The Doshi et al. MLP for a single-operation ``task``: ``2p -> width -> act -> d_out``, no biases."""
    if task is not None and len(task.task_names) != 1:
        raise ValueError(f"the MLP sees only the two operands; task {task.name!r} mixes several ops "
                         "(use a transformer for multi-task data)")
    p = p if p is not None else _need(task, "p")
    d_out = d_out if d_out is not None else _need(task, "d_vocab_out")
    positions = tuple(task.operand_positions) if task is not None else (0, 1)
    model = HookedMLP(p, width, d_out, act=act, bias=bias, operand_positions=positions, seed=seed)
    model.mechgrok_spec = {"kind": "mlp", "kwargs": dict(width=width, act=act, bias=bias, seed=seed, p=p,
                                                         d_out=d_out)}
    return model


# ---------------------------------------------------------------------------- helpers


def spec(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model`` (``{"kind": ..., "kwargs": ...}``); set by the builders above."""
    s = getattr(model, "mechgrok_spec", None)
    if s is None:
        raise ValueError("this model was not built by mechgrok.models.transformer/mlp, so it cannot "
                         "be saved as a mechgrok model; save its state_dict with safetensors instead")
    return s


def n_layers(model: nn.Module) -> int:
    """Number of blocks of a HookedTransformer or HookedMLP."""
    return int(model.cfg.n_layers) if isinstance(model, HookedTransformer) else len(model.blocks)


def mlp_hook(layer: int = 0, where: str = "post") -> str:
    """The hook name of an MLP's neurons (same for transformers and HookedMLP)."""
    if where not in ("pre", "post"):
        raise ValueError(f"where must be 'pre' or 'post', got {where!r}")
    return f"blocks.{layer}.mlp.hook_{where}"


def final_logits(model: nn.Module, inputs: Tensor) -> Float[Tensor, "batch d_out"]:
    """Logits at the answer (last) position, ``[batch, d_vocab_out]``, for either kind of model."""
    out = model(inputs)
    return out[:, -1] if out.ndim == 3 else out


def training_logits(model: nn.Module, inputs: Tensor) -> Float[Tensor, "batch d_out"]:
    """``final_logits`` computed faster for training: the last block's MLP and the unembedding run
    at the answer position only (earlier positions cannot affect it: attention is causal and the
    logits are read at the last position). Same values as ``final_logits`` up to float rounding
    (tested); ~1.6x faster for a 1-layer model (DESIGN.md §5).

    Hooks on the last block's ``hook_resid_mid`` and later see only that position, so use this
    only where no analysis hook is attached (the training loop).
    """
    if not isinstance(model, HookedTransformer) or not _plain_blocks(model.cfg):
        return final_logits(model, inputs)
    resid = model.hook_embed(model.embed(inputs)) + model.hook_pos_embed(model.pos_embed(inputs))  # [b, pos, d]
    for block in model.blocks[:-1]:
        resid = block(resid)
    blk = model.blocks[-1]
    resid = blk.hook_resid_pre(resid)
    x = blk.ln1(resid)
    attn_out = blk.hook_attn_out(blk.attn(query_input=x, key_input=x, value_input=x))  # [b, pos, d]
    mid = blk.hook_resid_mid(resid[:, -1:] + attn_out[:, -1:])  # [b, 1, d]
    out = blk.hook_resid_post(mid + blk.hook_mlp_out(blk.mlp(blk.ln2(mid))))  # [b, 1, d]
    if hasattr(model, "ln_final"):  # absent when normalization is None
        out = model.ln_final(out)
    return model.unembed(out)[:, -1]  # [b, d_out]


def _plain_blocks(cfg) -> bool:
    """A config whose blocks are the standard pre-norm attention-then-MLP layout."""
    return (cfg.positional_embedding_type == "standard" and not cfg.attn_only and not cfg.parallel_attn_mlp
            and not cfg.use_split_qkv_input and not cfg.use_attn_in and not cfg.use_hook_mlp_in
            and not cfg.use_normalization_before_and_after and cfg.original_architecture is None)


@contextlib.contextmanager
def patchable(model: nn.Module):
    """Expose per-head outputs (``attn.hook_result``), per-head q/k/v inputs (``hook_q_input``, ...)
    and the MLP input (``hook_mlp_in``) of a HookedTransformer for the duration of the block, then
    restore its settings. The forward computes the same values (float rounding aside)."""
    if not isinstance(model, HookedTransformer):
        yield model
        return
    cfg = model.cfg
    old = (cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    if not cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    try:
        yield model
    finally:
        model.set_use_attn_result(old[0])
        model.set_use_split_qkv_input(old[1])
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(old[2])


def check_compatible(model: nn.Module, task: Task) -> None:
    """Raise a clear error when ``model`` cannot read ``task``'s tokens or predict its classes."""
    if isinstance(model, HookedTransformer):
        cfg = model.cfg
        have = {"d_vocab": cfg.d_vocab, "d_vocab_out": cfg.d_vocab_out}
        if task.n_ctx > cfg.n_ctx:
            raise ValueError(f"task {task.name!r} has sequences of length {task.n_ctx} but the model's "
                             f"n_ctx is {cfg.n_ctx}; build the model with mg.models.transformer(task, ...)")
    elif isinstance(model, HookedMLP):
        have = {"p": model.p, "d_vocab_out": model.d_out}
        if len(task.task_names) != 1:
            raise ValueError(f"the MLP cannot read multi-task data ({task.name!r})")
    else:
        raise TypeError(f"expected a HookedTransformer or HookedMLP, got {type(model).__name__}")
    want = {k: int(getattr(task, k)) for k in have}
    bad = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k}: model {m} vs task {t}" for k, (m, t) in bad.items())
        raise ValueError(f"model and task {task.name!r} do not match ({detail}); build the model from "
                         "this task, e.g. mg.models.transformer(task, ...)")


# ---------------------------------------------------------------------------- save / load

_BUILDERS = {"transformer": transformer, "mlp": mlp}


def build(model_spec: dict[str, Any]) -> nn.Module:
    """Build a fresh model from a ``spec`` dict."""
    kind = model_spec.get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[kind](None, **model_spec["kwargs"])


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.json`` (spec, versions) and ``path/model.safetensors`` atomically."""
    path = Path(path)
    meta = {"format": "mechgrok.model/1", "spec": spec(model), "transformer_lens": TL_VERSION,
            "torch": torch.__version__}
    with atomic_dir(path) as tmp:
        save_file(state_tensors(model), str(tmp / "model.safetensors"))
        atomic_write_text(tmp / "model.json", json.dumps(meta, indent=2))
    return path


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters as a flat dict of contiguous CPU tensors (for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}


def load_state(model: nn.Module, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy parameters from ``tensors`` into ``model`` in place, checking names and shapes."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tensors[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, model wants {tuple(p.shape)}")
            p.copy_(tensors[k])


def load(path: str | Path) -> nn.Module:
    """Load a model written by ``save`` (safetensors + JSON; nothing is unpickled)."""
    path = Path(path)
    meta_file, weights = path / "model.json", path / "model.safetensors"
    if not meta_file.exists() or not weights.exists():
        raise FileNotFoundError(f"{path} is not a saved model: expected model.json and model.safetensors")
    meta = json.loads(meta_file.read_text())
    model = build(meta["spec"])
    load_state(model, read_safetensors(weights), source=str(weights))
    return model

