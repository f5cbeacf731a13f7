"""Build, convert, save and load the models mechgrok studies.

Every model is a transformer-lens ``HookedRootModule``, so every analysis speaks hook names:

- ``transformer(task, ...)``: a ``HookedTransformer`` with no LayerNorm and ReLU by default, as in
  the grokking papers (Nanda et al. 2023); options for rotary or shortformer positions, parallel
  attention + MLP, grouped-query attention, gated MLPs, attention-only models, or any
  ``HookedTransformerConfig`` (``config=``).
- ``mlp(task, width, act, ...)``: ``HookedMLP``, one-hot(a) ‖ one-hot(b) -> ``W_in`` -> act ->
  ``W_out`` -> logits, no biases by default (Doshi et al. 2023). Its weights live at
  ``blocks.0.mlp.W_in`` / ``W_out`` and its hooks at ``blocks.0.mlp.hook_pre`` / ``hook_post``,
  the same paths as a 1-layer transformer's MLP, so neuron analyses serve both.
- ``from_pretrained(folder_or_hf_model)``: a Hugging Face causal LM converted, offline, by
  transformer-lens's own conversion code (``PRETRAINED_ARCHITECTURES``).

``save`` / ``load`` handle all of them, and any other ``HookedTransformer``: safetensors for the
weights, JSON for how to rebuild the model (a builder's arguments, or the transformer-lens config).

This module is the only place that knows which transformer-lens version is installed: other
modules import ``HookedRootModule``, ``HookPoint`` and ``HookedTransformer`` from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor, nn

from mechgrok._config import check_int
from mechgrok._io import atomic_dir, atomic_write_text, read_safetensors
from mechgrok.tasks import Task

with warnings.catch_warnings():
    # transformer-lens 3.x warns that HookedTransformer is deprecated in favour of 4.x's
    # TransformerBridge; sae-lens 6 needs < 4, so 3.x is the version mechgrok targets.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as _tl_loading

    try:  # transformer-lens >= 3 exports it at the top level
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - transformer-lens 2.x
        from transformer_lens.hook_points import HookedRootModule
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS, softcap_enabled

TL_VERSION = importlib.metadata.version("transformer-lens")

__all__ = ["HookedMLP", "HookedRootModule", "HookPoint", "HookedTransformer", "HookedTransformerConfig",
           "transformer", "mlp", "from_pretrained", "save", "load", "spec", "build", "final_logits",
           "training_logits", "patchable", "check_compatible", "check_inputs", "mlp_hook", "n_layers", "has_mlp",
           "device_of", "TL_VERSION", "TRANSFORMER_ACTS", "MLP_ACTS", "POSITIONAL",
           "PRETRAINED_ARCHITECTURES"]

_ACTS = {
    "square": lambda x: x * x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "linear": lambda x: x,
}
#: ``act_fn`` names ``transformer`` accepts (transformer-lens's) and ``act`` names ``mlp`` accepts.
TRANSFORMER_ACTS = tuple(sorted(SUPPORTED_ACTIVATIONS))
MLP_ACTS = tuple(sorted(_ACTS))
#: ``positional`` values ``transformer`` accepts: learned absolute positions added to the residual
#: stream, rotary (Su et al. 2021) on ``rotary_dim`` of each head's dimensions, or shortformer
#: (Press et al. 2021: learned positions added to the queries' and keys' inputs only).
POSITIONAL = ("standard", "rotary", "shortformer")


def _check_choice(value: Any, name: str, choices: tuple[str, ...], owner: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them (with close matches)."""
    import difflib

    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {list(choices)}{hint}")
    return value


def _check_bool(value: Any, name: str, owner: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


def _quiet_build(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return fn(*args, **kwargs)


def _device(device: str | torch.device | None, owner: str) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` is torch's default device (``torch.get_default_device()``)."""
    if device is None:
        return torch.get_default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{owner}: device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (torch's default device for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.get_default_device()


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (a HookedTransformer's ``cfg.device`` follows)."""
    if device_of(model) == device:
        if isinstance(model, HookedTransformer):
            model.cfg.device = str(device)
        return model
    if isinstance(model, HookedTransformer):
        model.to(device, print_details=False)
        model.cfg.device = str(device)
        return model
    return model.to(device)


# ---------------------------------------------------------------------------- transformer

# The options added after v0.1 and their defaults: a model built with the defaults keeps the spec it
# had then (these keys are left out), so older run folders still match and load.
_NEW_OPTIONS = {"positional": "standard", "rotary_dim": None, "parallel_attn_mlp": False, "n_key_value_heads": None,
                "gated_mlp": False, "attn_only": False}
_SIZE_OPTIONS = {"n_layers": 1, "d_model": 128, "n_heads": 4, "d_head": None, "d_mlp": 512, "act_fn": "relu",
                 "normalization": None, "d_vocab": None, "d_vocab_out": None, "n_ctx": None}


def transformer(task: Task | None = None, *, n_layers: int = 1, d_model: int = 128, n_heads: int = 4,
                d_head: int | None = None, d_mlp: int = 512, act_fn: str = "relu",
                normalization: str | None = None, seed: int | None = None, d_vocab: int | None = None,
                d_vocab_out: int | None = None, n_ctx: int | None = None, positional: str = "standard",
                rotary_dim: int | None = None, parallel_attn_mlp: bool = False, n_key_value_heads: int | None = None,
                gated_mlp: bool = False, attn_only: bool = False, config: HookedTransformerConfig | None = None,
                device: str | torch.device | None = None) -> HookedTransformer:
    """A ``HookedTransformer`` sized for ``task`` (vocabulary and context read from it).

    Args:
        task: gives ``d_vocab``, ``d_vocab_out`` and ``n_ctx`` (or pass them explicitly).
        n_layers, d_model, n_heads, d_mlp: sizes; ``d_head`` defaults to ``d_model // n_heads``.
        act_fn: MLP nonlinearity (transformer-lens name: relu, gelu, silu, ...).
        normalization: ``None`` (default, as in the grokking papers), ``"LN"`` (LayerNorm) or
            ``"RMS"`` (RMSNorm), before attention, MLP and unembedding.
        seed: seeds the initialisation without touching the global RNG (default 0).
        positional: one of ``POSITIONAL``: ``"standard"`` (learned, added to the residual stream),
            ``"rotary"`` or ``"shortformer"``.
        rotary_dim: how many of each head's dimensions rotary rotates (even; default all of
            ``d_head``); only with ``positional="rotary"``.
        parallel_attn_mlp: attention and MLP both read the block's input and add to it (GPT-J,
            GPT-NeoX) instead of the MLP reading the attention's output.
        n_key_value_heads: grouped-query attention (Ainslie et al. 2023): this many key/value heads,
            each shared by ``n_heads // n_key_value_heads`` query heads; ``None`` = one per head.
        gated_mlp: ``W_out(act(x W_gate) * (x W_in))`` (SwiGLU-style, as Llama) instead of
            ``W_out(act(x W_in))``.
        attn_only: no MLPs (``d_mlp``, ``act_fn`` and ``gated_mlp`` then do not apply).
        config: any ``HookedTransformerConfig`` instead of the options above (which must then be
            left at their defaults); it is copied, never modified. ``seed`` (or ``config.seed``)
            seeds the initialisation, ``device`` overrides ``config.device``, and ``task``, when
            given, is checked against it.
        device: where the model lives (default: torch's default device; ``config.device`` with a
            config). Weights are initialised on the CPU and then moved, so a seed gives the same
            weights on every device.

    Biases: transformer-lens gives every attention and MLP layer biases (zero at initialisation)
    and has no switch to leave them out, so neither has this builder.

    Returns:
        The model; ``model(tokens)`` maps ``[batch, n_ctx]`` ids to logits ``[batch, n_ctx, d_vocab_out]``.
    """
    owner = "models.transformer"
    _check_task(task, owner)
    if config is not None:
        options = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
                       act_fn=act_fn, normalization=normalization, d_vocab=d_vocab, d_vocab_out=d_vocab_out,
                       n_ctx=n_ctx, positional=positional, rotary_dim=rotary_dim,
                       parallel_attn_mlp=parallel_attn_mlp, n_key_value_heads=n_key_value_heads,
                       gated_mlp=gated_mlp, attn_only=attn_only)
        given = {k for k, v in options.items() if v != {**_SIZE_OPTIONS, **_NEW_OPTIONS}[k]}
        if given:
            raise TypeError(f"{owner}: pass either config= or the options {sorted(given)}, not both (set them on "
                            "the HookedTransformerConfig instead)")
        return _from_config(task, config, seed, device, owner)
    seed = check_int(0 if seed is None else seed, "seed", low=0, owner=owner)
    n_layers, d_model, n_heads, d_mlp = (check_int(v, k, low=1, owner=owner) for k, v in (
        ("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads), ("d_mlp", d_mlp)))
    d_vocab, d_vocab_out, n_ctx = (check_int(v if v is not None else _need(task, k), k, low=1, owner=owner)
                                   for k, v in (("d_vocab", d_vocab), ("d_vocab_out", d_vocab_out), ("n_ctx", n_ctx)))
    act_fn = _check_choice(act_fn, "act_fn", TRANSFORMER_ACTS, owner)
    if d_head is None:
        if d_model % n_heads:
            raise ValueError(f"{owner}: d_model={d_model} is not divisible by n_heads={n_heads}; choose n_heads "
                             f"among {[h for h in range(1, d_model + 1) if d_model % h == 0]} or pass d_head")
        d_head = d_model // n_heads
    d_head = check_int(d_head, "d_head", low=1, owner=owner)
    if normalization not in (None, "LN", "RMS"):
        raise ValueError(f"{owner}: normalization must be None, 'LN' or 'RMS', got {normalization!r}")
    options = _check_options(owner, n_heads=n_heads, d_head=d_head, positional=positional, rotary_dim=rotary_dim,
                             parallel_attn_mlp=parallel_attn_mlp, n_key_value_heads=n_key_value_heads,
                             gated_mlp=gated_mlp, attn_only=attn_only)
    target = _device(device, owner)
    tl_options = dict(positional_embedding_type=positional, parallel_attn_mlp=parallel_attn_mlp,
                      n_key_value_heads=n_key_value_heads, gated_mlp=gated_mlp, attn_only=attn_only)
    if rotary_dim is not None:
        tl_options["rotary_dim"] = rotary_dim
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                                  d_mlp=d_mlp, d_vocab=d_vocab, d_vocab_out=d_vocab_out, n_ctx=n_ctx,
                                  act_fn=act_fn, normalization_type=normalization, device="cpu", **tl_options)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # even under torch.set_default_device
        torch.manual_seed(seed)
        model = _quiet_build(HookedTransformer, cfg)  # initialised on the CPU: the same weights on every device
    model.mechgrok_spec = {"kind": "transformer", "kwargs": dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, act_fn=act_fn,
        normalization=normalization, seed=seed, d_vocab=d_vocab, d_vocab_out=d_vocab_out, n_ctx=n_ctx,
        **{k: v for k, v in options.items() if v != _NEW_OPTIONS[k]})}
    return _to_device(model, target)


def _check_options(owner: str, *, n_heads: int, d_head: int, positional: str, rotary_dim: int | None,
                   parallel_attn_mlp: bool, n_key_value_heads: int | None, gated_mlp: bool,
                   attn_only: bool) -> dict[str, Any]:
    """The architecture options of ``transformer``, checked; each error says how to fix it."""
    positional = _check_choice(positional, "positional", POSITIONAL, owner)
    parallel_attn_mlp, gated_mlp, attn_only = (_check_bool(v, k, owner) for k, v in (
        ("parallel_attn_mlp", parallel_attn_mlp), ("gated_mlp", gated_mlp), ("attn_only", attn_only)))
    if rotary_dim is not None:
        if positional != "rotary":
            raise ValueError(f"{owner}: rotary_dim applies only with positional='rotary' (got positional="
                             f"{positional!r}); leave it out or pass positional='rotary'")
        rotary_dim = check_int(rotary_dim, "rotary_dim", low=2, owner=owner)
        if rotary_dim % 2 or rotary_dim > d_head:
            raise ValueError(f"{owner}: rotary_dim must be even and at most d_head={d_head} (rotary turns pairs of "
                             f"dimensions), got {rotary_dim}")
    if n_key_value_heads is not None:
        n_key_value_heads = check_int(n_key_value_heads, "n_key_value_heads", low=1, owner=owner)
        if n_heads % n_key_value_heads:
            raise ValueError(f"{owner}: n_key_value_heads={n_key_value_heads} must divide n_heads={n_heads} (each "
                             f"key/value head serves n_heads // n_key_value_heads query heads); choose among "
                             f"{[k for k in range(1, n_heads + 1) if n_heads % k == 0]}, or None for one per head")
    if attn_only and (gated_mlp or parallel_attn_mlp):
        which = " and ".join(k for k, v in (("gated_mlp", gated_mlp), ("parallel_attn_mlp", parallel_attn_mlp)) if v)
        raise ValueError(f"{owner}: an attention-only model has no MLP, so {which} cannot apply; drop "
                         f"{'them' if ' and ' in which else 'it'} or attn_only")
    return dict(positional=positional, rotary_dim=rotary_dim, parallel_attn_mlp=parallel_attn_mlp,
                n_key_value_heads=n_key_value_heads, gated_mlp=gated_mlp, attn_only=attn_only)


def _from_config(task: Task | None, config: Any, seed: int | None, device: Any, owner: str) -> HookedTransformer:
    """``transformer(task, config=...)``: a freshly initialised model of a copy of ``config``."""
    if not isinstance(config, HookedTransformerConfig):
        raise TypeError(f"{owner}: config must be a transformer_lens HookedTransformerConfig, got "
                        f"{type(config).__name__}")
    if seed is not None and config.seed is not None and seed != config.seed:
        raise ValueError(f"{owner}: seed={seed} but config.seed={config.seed}; pass one of them")
    seed = check_int(seed if seed is not None else config.seed if config.seed is not None else 0, "seed", low=0,
                     owner=owner)
    target = _device(device if device is not None else config.device, owner)
    cfg = _config_from_json(_config_to_json(config), device="cpu")
    cfg.init_weights = config.init_weights
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = _quiet_build(HookedTransformer, cfg)  # TL's init reseeds with cfg.seed (None here): ours governs
    cfg.seed = seed  # the seed used, as provenance (set after: a config given one seeds torch, random, numpy)
    if task is not None:
        check_compatible(model, task)
    return _to_device(model, target)


def _need(task: Task | None, attr: str) -> int:
    if task is None:
        raise ValueError(f"pass a task or {attr}=...")
    return int(getattr(task, attr))


def _check_task(task: Any, owner: str) -> None:
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"{owner}: task must be a mechgrok Task (e.g. mg.tasks.modular_arithmetic(p=113)) or None, "
                        f"got {type(task).__name__}")


# ---------------------------------------------------------------------------- mlp


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

    def forward(self, x: Float[Tensor, "batch d_in"] | None = None, *, rows: Int[Tensor, "batch k"] | None = None
                ) -> Float[Tensor, "batch d_out"]:
        """``x``: the input; or ``rows``: the indices of the input's ones when it is one-hot (then
        ``x @ W_in`` is the sum of those rows of ``W_in``, the same numbers without the zeros)."""
        pre = x @ self.W_in if rows is None else self.W_in[rows].sum(1)
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
    ``blocks.0.mlp.hook_post``, ``hook_out`` (logits). Inputs are moved to the weights' device.
    """

    def __init__(self, p: int, width: int, d_out: int, act: str = "square", bias: bool = False,
                 operand_positions: tuple[int, int] = (0, 1), seed: int = 0):
        super().__init__()
        owner = "HookedMLP"
        act = _check_choice(act, "act", MLP_ACTS, owner)
        p, width, d_out = (check_int(v, k, low=1, owner=owner) for k, v in (("p", p), ("width", width), ("d_out", d_out)))
        seed = check_int(seed, "seed", low=0, owner=owner)
        bias = _check_bool(bias, "bias", owner)
        if (isinstance(operand_positions, (str, bytes)) or not hasattr(operand_positions, "__len__")
                or len(operand_positions) != 2):
            raise ValueError(f"{owner}: operand_positions must be two token positions (a, b), got {operand_positions!r}")
        operand_positions = tuple(check_int(i, "operand_positions", low=0, owner=owner) for i in operand_positions)
        self.p, self.d_out, self.operand_positions = p, d_out, operand_positions
        g = torch.Generator().manual_seed(seed)
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList([_Block(_MLPLayer(2 * p, width, d_out, act, bias, g))])
        self.hook_out = HookPoint()
        self.setup()
        # how to rebuild it (see spec); operand_positions only when they are not the default (0, 1)
        self.mechgrok_spec = {"kind": "mlp", "kwargs": dict(
            width=width, act=act, bias=bias, seed=seed, p=p, d_out=d_out,
            **({"operand_positions": list(operand_positions)} if operand_positions != (0, 1) else {}))}

    def forward(self, x: Int[Tensor, "batch n_ctx"] | Float[Tensor, "batch two_p"]) -> Float[Tensor, "batch d_out"]:
        W_in = self.blocks[0].mlp.W_in
        x = x.to(W_in.device)
        if not x.is_floating_point():
            i, j = self.operand_positions
            if not (self.hook_in._forward_hooks or self.hook_in._forward_pre_hooks):
                # nothing reads or edits the one-hot input: add the operands' rows of W_in (training's
                # path; a third faster than the matmul at p = 97, width 500, and bitwise the same values)
                rows = torch.stack([x[:, i], x[:, j] + self.p], dim=1)  # [batch, 2]
                return self.hook_out(self.blocks[0].mlp(rows=rows))
            x = torch.cat([nn.functional.one_hot(x[:, i], self.p), nn.functional.one_hot(x[:, j], self.p)],
                          dim=-1).to(W_in.dtype)  # [batch, 2p]
        return self.hook_out(self.blocks[0].mlp(self.hook_in(x)))


def mlp(task: Task | None = None, *, width: int = 500, act: str = "square", bias: bool = False, seed: int = 0,
        p: int | None = None, d_out: int | None = None, operand_positions: tuple[int, int] | None = None,
        device: str | torch.device | None = None) -> HookedMLP:
    """The Doshi et al. MLP for a single-operation ``task``: ``2p -> width -> act -> d_out``, no biases.

    ``operand_positions`` default to the task's (``(0, 1)`` without a task); ``device`` to torch's
    default device (weights are initialised on the CPU, then moved).
    """
    owner = "models.mlp"
    _check_task(task, owner)
    if task is not None and len(task.task_names) != 1:
        raise ValueError(f"the MLP sees only the two operands; task {task.name!r} mixes several ops "
                         "(use a transformer for multi-task data)")
    width = check_int(width, "width", low=1, owner=owner)
    p = check_int(p if p is not None else _need(task, "p"), "p", low=1, owner=owner)
    d_out = check_int(d_out if d_out is not None else _need(task, "d_vocab_out"), "d_out", low=1, owner=owner)
    act = _check_choice(act, "act", MLP_ACTS, owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    _check_bool(bias, "bias", owner)
    if operand_positions is None:
        operand_positions = tuple(task.operand_positions) if task is not None else (0, 1)
    target = _device(device, owner)
    with torch.device("cpu"):  # its generator is a CPU one, whatever torch's default device
        model = HookedMLP(p, width, d_out, act=act, bias=bias, operand_positions=operand_positions, seed=seed)
    return _to_device(model, target)


# ---------------------------------------------------------------------------- Hugging Face checkpoints

#: Hugging Face causal-LM classes ``from_pretrained`` converts, each with transformer-lens's own
#: converter and each checked against the Hugging Face logits in tests/test_pretrained.py.
PRETRAINED_ARCHITECTURES = ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                            "Qwen2ForCausalLM", "GPTJForCausalLM", "GPTNeoForCausalLM")
# Substrings that make transformer-lens 3.9's convert_hf_model_config take a hard-coded config
# chosen by the *path* instead of reading config.json; the neutral folder's path avoids them.
_TL_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2", "tinystories", "santacoder")


def from_pretrained(source: str | os.PathLike | Any, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str = torch.float32, fold_ln: bool = False,
                    center_writing_weights: bool = False, center_unembed: bool = False,
                    fold_value_biases: bool = False, check: bool = True) -> HookedTransformer:
    """A Hugging Face causal LM as a ``HookedTransformer``, converted offline by transformer-lens.

    Args:
        source: a local checkpoint folder (``config.json`` and the weights, as
            ``model.save_pretrained(folder)`` writes them; read with ``local_files_only=True``, never
            downloaded) or an in-memory ``transformers`` ``PreTrainedModel`` (read, not modified).
            Its architecture must be one of ``PRETRAINED_ARCHITECTURES``.
        device: where the model goes (default: the in-memory model's device; for a folder, torch's
            default device). ``model.cfg.device`` says where it is.
        dtype: the parameters' dtype (a folder is also read in it).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: transformer-lens's
            weight processing, all off by default so the weights are the checkpoint's and the
            logits equal Hugging Face's (within float rounding; tested to 1e-4). ``fold_ln`` folds
            each norm's scale (and bias) into the next layer's weights, leaving parameter-free
            norms (``LNPre`` / ``RMSPre``); ``center_writing_weights`` makes every weight writing to
            the residual stream mean-zero (LayerNorm models only; it changes nothing the next
            LayerNorm sees); ``center_unembed`` makes ``W_U`` mean-zero over the vocabulary (logits
            shift by a per-position constant, probabilities do not change); ``fold_value_biases``
            moves the value biases into the attention output bias. transformer-lens's own
            ``HookedTransformer.from_pretrained`` turns the first four on, so its logits and
            weights differ from these.
        check: run both models on one short random sequence and raise if the log-probabilities
            differ by more than float rounding (a checkpoint feature the converter ignores).

    Returns:
        The model in eval mode, with ``model.mechgrok_source`` (architecture, source name, the
        processing applied), which ``save`` records.

    Raises:
        FileNotFoundError: the folder does not exist or has no ``config.json``.
        ValueError: the architecture is not one of ``PRETRAINED_ARCHITECTURES``, or the checkpoint
            uses a feature transformer-lens does not convert (rope scaling, Llama biases, ...).

    Limits: the tokenizer is not loaded (mechgrok works on token ids; attach one with
    ``model.set_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))``). A folder
    is read whole into memory next to the converted copy.
    """
    owner = "models.from_pretrained"
    dtype = _check_dtype(dtype, owner)
    flags = {k: _check_bool(v, k, owner) for k, v in dict(
        fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases).items()}
    _check_bool(check, "check", owner)
    import transformers  # slow to import: only here

    if isinstance(source, HookedTransformer):
        raise TypeError(f"{owner}: this is already a HookedTransformer; use it as it is")
    if isinstance(source, (str, os.PathLike)):
        hf, name = _read_folder(Path(source), dtype, owner), Path(source).resolve().name
    elif isinstance(source, transformers.PreTrainedModel):
        hf, name = source, Path(str(getattr(source.config, "name_or_path", "") or "")).name or "in-memory model"
    else:
        raise TypeError(f"{owner}: source must be a checkpoint folder or a transformers PreTrainedModel, got "
                        f"{type(source).__name__}")
    arch = type(hf).__name__
    _check_architecture(arch, owner)
    _refuse_unconverted(hf.config, arch, owner)
    hf_device = device_of(hf)
    if hf_device.type == "meta":
        raise ValueError(f"{owner}: the model's weights are on the meta device (not loaded); load them first")
    target = hf_device if device is None and not isinstance(source, (str, os.PathLike)) else _device(device, owner)

    with _neutral_folder(owner) as folder:
        cfg_dict = _tl_config_dict(hf.config, arch, folder, owner)
        # Converted where the weights are (the converters add zero biases on cfg.device), moved after.
        cfg_dict.update(model_name=name, init_weights=False, tokenizer_name=None, device=str(hf_device),
                        dtype=dtype, n_devices=1, from_checkpoint=False,
                        default_prepend_bos=cfg_dict.get("default_prepend_bos", True))
        if flags["fold_ln"] and cfg_dict.get("normalization_type") in ("LN", "RMS"):
            cfg_dict["normalization_type"] += "Pre"  # as transformer-lens's get_pretrained_model_config does
        cfg = HookedTransformerConfig(**cfg_dict)
        with torch.no_grad():
            state = _quiet_build(_tl_loading.get_pretrained_state_dict, str(folder), cfg, hf_model=hf, dtype=dtype)
            model = _quiet_build(HookedTransformer, cfg)  # on cfg.device: where the weights are
            model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False, **flags)
    model.eval()
    model.mechgrok_source = {"architecture": arch, "name": name, "transformers": transformers.__version__,
                             "transformer_lens": TL_VERSION, **flags}
    if check:
        _check_logits(hf, model, owner)
    return _to_device(model, target)


def _check_dtype(dtype: Any, owner: str) -> torch.dtype:
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{owner}: dtype must be a floating torch dtype such as torch.float32 or 'bfloat16', "
                        f"got {dtype!r}")
    return dtype


def _check_architecture(arch: str, owner: str) -> None:
    if arch not in PRETRAINED_ARCHITECTURES:
        raise ValueError(f"{owner}: cannot convert a {arch}; supported architectures: "
                         f"{', '.join(PRETRAINED_ARCHITECTURES)} (transformer-lens {TL_VERSION}'s converters, each "
                         "checked against the Hugging Face logits). Capture, SAEs and EK-FAC also take the "
                         "Hugging Face model itself by module path")


def _read_folder(folder: Path, dtype: torch.dtype, owner: str):
    """The Hugging Face model saved in ``folder``, read offline; its architecture checked first."""
    import transformers

    if not folder.is_dir():
        raise FileNotFoundError(f"{owner}: {folder} is not a folder; from_pretrained reads a local Hugging Face "
                                "checkpoint folder (config.json + weights) and downloads nothing")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{owner}: {folder} has no config.json, so it is not a Hugging Face checkpoint "
                                "folder; write one with hf_model.save_pretrained(folder)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"{owner}: {folder}/config.json names no architecture ('architectures' is empty); "
                         f"save the model with save_pretrained, or load it yourself and pass the model")
    _check_architecture(archs[0], owner)
    _refuse_unconverted(config, archs[0], owner)
    try:
        return _quiet_build(transformers.AutoModelForCausalLM.from_pretrained, folder, config=config,
                            local_files_only=True, dtype=dtype).eval()
    except OSError as e:
        raise FileNotFoundError(f"{owner}: could not read the weights in {folder}: {e}") from None


def _rope_types(config: Any) -> set[str | None]:
    """The rope types a Hugging Face config asks for (``rope_parameters`` / ``rope_scaling``)."""
    found: set[str | None] = set()
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, attr, None)
        if not isinstance(rope, dict):
            continue
        groups = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
        found |= {g.get("rope_type") or g.get("type") for g in groups}
    return found


def _refuse_unconverted(config: Any, arch: str, owner: str) -> None:
    """Refuse checkpoint features transformer-lens 3.9's converters would drop without a word."""
    problems = []
    allowed = {None, "default"} | ({"llama3"} if arch == "LlamaForCausalLM" else set())
    if bad := sorted(str(t) for t in _rope_types(config) - allowed):
        problems.append(f"rope scaling {bad} (converted: {sorted(str(t) for t in allowed if t)})")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        problems += [f"{k}=True" for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim != config.hidden_size // config.num_attention_heads:
            problems.append(f"head_dim={head_dim} != hidden_size // num_attention_heads")
    if arch == "Qwen2ForCausalLM" and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if problems:
        raise ValueError(f"{owner}: this {arch} uses {', '.join(problems)}, which transformer-lens {TL_VERSION} "
                         "does not convert; the converted model would compute something else")


@contextlib.contextmanager
def _neutral_folder(owner: str):
    """A temporary folder whose path has none of ``_TL_NAME_TRIGGERS`` in it (removed afterwards)."""
    parents = [tempfile.gettempdir(), "/tmp", "/var/tmp", os.getcwd()]
    for parent in parents:
        if not Path(parent).is_dir() or any(t in str(Path(parent).resolve()).lower() for t in _TL_NAME_TRIGGERS):
            continue
        for _ in range(5):
            with tempfile.TemporaryDirectory(prefix="mechgrok-hf-config-", dir=parent) as tmp:
                if not any(t in str(Path(tmp).resolve()).lower() for t in _TL_NAME_TRIGGERS):
                    yield Path(tmp).resolve()
                    return
    raise RuntimeError(f"{owner}: every temporary folder ({parents}) has one of {list(_TL_NAME_TRIGGERS)} in its "
                       "path, which transformer-lens mistakes for a model name; set TMPDIR to a folder without them")


def _tl_config_dict(hf_config: Any, arch: str, folder: Path, owner: str) -> dict[str, Any]:
    """transformer-lens's config for ``hf_config``, from its own ``convert_hf_model_config``.

    That function reads ``config.json`` from a folder, but first matches model names in the folder's
    path ("llama", "gemma", ...) and then uses a hard-coded config instead; so the config is written
    to the neutral ``folder`` (whatever the checkpoint's folder is called), and the sizes of the
    result are checked against ``hf_config``.
    """
    d = json.loads(hf_config.to_json_string(use_diff=False))
    d["architectures"] = [arch]  # an in-memory model's config may name none
    if arch == "GPT2LMHeadModel" and "n_ctx" not in d:
        d["n_ctx"] = d["n_positions"]  # transformers 5 dropped GPT2Config.n_ctx, which TL 3.9's GPT-2 branch reads
    (folder / "config.json").write_text(json.dumps(d))
    cfg_dict = _quiet_build(_tl_loading.convert_hf_model_config, str(folder), local_files_only=True)
    for tl_key, hf_key in (("n_layers", "num_hidden_layers"), ("d_model", "hidden_size"), ("d_vocab", "vocab_size")):
        want = getattr(hf_config, hf_key, None)
        if want is not None and cfg_dict.get(tl_key) != want:
            raise RuntimeError(f"{owner}: transformer-lens converted the config to {tl_key}={cfg_dict.get(tl_key)}, "
                               f"but the checkpoint has {hf_key}={want}; please report this")
    return cfg_dict


def _check_logits(hf: nn.Module, model: HookedTransformer, owner: str) -> None:
    """Raise unless ``model`` and ``hf`` give the same log-probabilities on a short random sequence."""
    n = min(8, model.cfg.n_ctx)
    tokens = torch.randint(0, min(model.cfg.d_vocab, hf.config.vocab_size), (1, n),
                           generator=torch.Generator().manual_seed(0))  # [1, n]
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            ref = hf(tokens.to(device_of(hf))).logits.double().cpu()  # [1, n, vocab]
            out = model(tokens).double().cpu()
    finally:
        hf.train(was_training)
    diff = float((ref.log_softmax(-1) - out.log_softmax(-1)).abs().max())
    low = {torch.float16, torch.bfloat16}
    rtol = 3e-2 if model.cfg.dtype in low or next(hf.parameters()).dtype in low else 1e-3
    tol = rtol * (1 + float(ref.abs().max()))
    if not diff <= tol:
        raise ValueError(f"{owner}: the converted model's log-probabilities differ from the Hugging Face model's by "
                         f"{diff:.3g} (tolerance {tol:.3g}) on a random sequence: the checkpoint uses something "
                         f"transformer-lens {TL_VERSION} does not convert. Pass check=False to get the model anyway")


# ---------------------------------------------------------------------------- transformer-lens configs as JSON

# Not saved: where the model lives is chosen when it is loaded (``load(path, device=...)``).
_CONFIG_NOT_SAVED = ("device",)


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """``cfg``'s fields as JSON values (dtypes as ``{"torch.dtype": "float32"}``), without ``device``."""
    return {k: _json_value(v, k) for k, v in dict(cfg.to_dict()).items() if k not in _CONFIG_NOT_SAVED}


def _json_value(v: Any, field: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if isinstance(v, float):
        return float(v)  # numpy float64 is a float
    if isinstance(v, torch.dtype):
        return {"torch.dtype": str(v).removeprefix("torch.")}
    if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy / torch scalars
        return _json_value(v.item(), field)
    if isinstance(v, (list, tuple)):
        return [_json_value(x, field) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x, field) for k, x in v.items()}
    raise TypeError(f"cannot save the transformer-lens config field {field!r} = {v!r:.80} ({type(v).__name__}) as "
                    "JSON; set it to a plain value before saving")


def _from_json_value(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"torch.dtype"}:
            dtype = getattr(torch, str(v["torch.dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {v['torch.dtype']!r}")
            return dtype
        return {k: _from_json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json_value(x) for x in v]
    return v


def _config_from_json(d: Any, *, device: str | torch.device) -> HookedTransformerConfig:
    """The config ``_config_to_json`` wrote, on ``device``; no weight initialisation, no seeding.

    ``seed`` is set after construction: ``HookedTransformerConfig`` seeds torch, ``random`` and
    numpy globally when it is given one.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a transformer-lens config is a JSON object, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    if unknown := sorted(set(d) - fields):
        raise ValueError(f"the saved transformer-lens config has fields {unknown} that the installed transformer-lens "
                         f"{TL_VERSION} does not know; load it with the version that saved it")
    kw = {k: _from_json_value(v) for k, v in d.items()}
    seed = kw.pop("seed", None)
    cfg = HookedTransformerConfig(**{**kw, "seed": None, "init_weights": False, "device": str(device)})
    cfg.seed = seed
    return cfg


def _build_hooked_transformer(model_spec: dict[str, Any], device: torch.device) -> HookedTransformer:
    """A ``HookedTransformer`` of the saved config (weights uninitialised: ``load_state`` fills them)."""
    if unknown := sorted(set(model_spec) - {"kind", "config", "source"}):
        raise ValueError(f"a model spec of kind 'hooked_transformer' has keys kind, config, source; got also {unknown}")
    saved = model_spec.get("config")
    cfg = _config_from_json(saved, device=device)
    tokenizer_name, cfg.tokenizer_name = cfg.tokenizer_name, None  # no tokenizer is loaded (nor downloaded)
    model = _quiet_build(HookedTransformer, cfg)
    cfg.tokenizer_name, cfg.init_weights = tokenizer_name, saved.get("init_weights", True)
    if model_spec.get("source") is not None:
        model.mechgrok_source = dict(model_spec["source"])
    return model.eval()


# ---------------------------------------------------------------------------- helpers


def spec(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``, as JSON: ``{"kind": "transformer" | "mlp", "kwargs": ...}`` for the
    models built here, ``{"kind": "hooked_transformer", "config": ..., "source": ...}`` (the
    transformer-lens config, and ``mechgrok_source`` when set) for any other ``HookedTransformer``."""
    s = getattr(model, "mechgrok_spec", None)
    if s is not None:
        return s
    if type(model) is HookedTransformer:
        out: dict[str, Any] = {"kind": "hooked_transformer", "config": _config_to_json(model.cfg)}
        if getattr(model, "mechgrok_source", None) is not None:
            out["source"] = dict(model.mechgrok_source)
        return out
    if isinstance(model, HookedTransformer):
        raise ValueError(f"a {type(model).__name__} (a subclass of HookedTransformer) cannot be rebuilt from its "
                         "transformer-lens config, so mechgrok cannot save it; save its state_dict with safetensors")
    raise ValueError(f"mechgrok saves HookedTransformer and HookedMLP models, not a {type(model).__name__}; convert a "
                     "Hugging Face model with mg.models.from_pretrained, or save its state_dict with safetensors")


def n_layers(model: nn.Module) -> int:
    """Number of blocks of a HookedTransformer or HookedMLP."""
    return int(model.cfg.n_layers) if isinstance(model, HookedTransformer) else len(model.blocks)


def has_mlp(model: nn.Module) -> bool:
    """Whether ``model``'s blocks have MLP neurons (``mlp_hook``): not an attention-only transformer."""
    return not (isinstance(model, HookedTransformer) and model.cfg.attn_only)


def mlp_hook(layer: int = 0, where: str = "post") -> str:
    """The hook name of an MLP's neurons (same for transformers and HookedMLP)."""
    if where not in ("pre", "post"):
        raise ValueError(f"where must be 'pre' or 'post', got {where!r}")
    layer = check_int(layer, "layer", low=0)
    return f"blocks.{layer}.mlp.hook_{where}"


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
    if not isinstance(task, Task):
        raise TypeError(f"task must be a mechgrok Task, got {type(task).__name__}")
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
        raise TypeError(f"expected a HookedTransformer or HookedMLP, got {type(model).__name__} (a Hugging Face "
                        "model converts with mg.models.from_pretrained)")
    want = {k: int(getattr(task, k)) for k in have}
    bad = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k}: model {m} vs task {t}" for k, (m, t) in bad.items())
        raise ValueError(f"model and task {task.name!r} do not match ({detail}); build the model from "
                         "this task, e.g. mg.models.transformer(task, ...)")


def check_inputs(model: nn.Module, inputs: Any, what: str = "inputs") -> None:
    """Raise a clear error unless ``inputs`` ``[N, ...]`` (N >= 1) can be fed to ``model``: before
    it runs, instead of an ``IndexError`` from inside an embedding or a one-hot encoding.

    - ``HookedTransformer``: integer token ids ``[N, pos]`` with ``1 <= pos <= n_ctx`` and every id in
      ``[0, d_vocab)``.
    - ``HookedMLP``: integer token ids ``[N, n_ctx]`` whose operands (at ``operand_positions``) lie
      in ``[0, p)``, or the float one-hot view ``[N, 2p]``.
    - any other module: a tensor with at least one example (nothing else is known about it).
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{what} must be a torch tensor [N, ...], got {type(inputs).__name__} "
                        "(torch.as_tensor(...) turns a nested list into one)")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{what} must be a tensor [N, ...] with N >= 1 examples, got shape {tuple(inputs.shape)}")
    integer = not (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool)
    if isinstance(model, HookedTransformer):
        cfg = model.cfg
        if not integer:
            raise TypeError(f"{what} must be integer token ids [N, pos] for a HookedTransformer, got dtype "
                            f"{inputs.dtype} (tokens are indices into the vocabulary: use .long())")
        if inputs.ndim != 2 or not 1 <= inputs.shape[1] <= cfg.n_ctx:
            raise ValueError(f"{what} must be token ids [N, pos] with 1 <= pos <= the model's n_ctx={cfg.n_ctx}, "
                             f"got shape {tuple(inputs.shape)}")
        _check_ids(inputs, cfg.d_vocab, what, "token ids", "d_vocab")
    elif isinstance(model, HookedMLP):
        if not integer:
            if inputs.ndim != 2 or inputs.shape[1] != 2 * model.p or not inputs.is_floating_point():
                raise ValueError(f"{what}: a HookedMLP reads integer token ids [N, n_ctx] or the float one-hot view "
                                 f"[N, 2p={2 * model.p}] (Task.onehot()), got {inputs.dtype} {tuple(inputs.shape)}")
            return
        need = max(model.operand_positions) + 1
        if inputs.ndim != 2 or inputs.shape[1] < need:
            raise ValueError(f"{what} must be token ids [N, n_ctx] with the operands at positions "
                             f"{model.operand_positions} (n_ctx >= {need}), got shape {tuple(inputs.shape)}")
        _check_ids(inputs[:, list(model.operand_positions)], model.p, what, "operands", "p")


def _check_ids(ids: Tensor, size: int, what: str, kind: str, name: str) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{what} holds {kind} in [{lo}, {hi}] but the model's {name} is {size} (valid: 0 to "
                         f"{size - 1}); build the model from the task the inputs come from")


# ---------------------------------------------------------------------------- save / load

_BUILDERS = {"transformer": transformer, "mlp": mlp}
_NOT_IN_SPECS = ("task", "config", "device")  # builder arguments a spec never holds


def build(model_spec: dict[str, Any], *, device: str | torch.device | None = None) -> nn.Module:
    """Build a model from a ``spec`` dict (``{"kind": "transformer" | "mlp", "kwargs": {...}}`` or
    ``{"kind": "hooked_transformer", "config": {...}}``) on ``device`` (default: torch's default
    device). Builders' models are freshly initialised; a ``hooked_transformer``'s weights are left
    uninitialised for ``load_state`` to fill."""
    import inspect

    if not isinstance(model_spec, dict) or not isinstance(model_spec.get("kwargs", {}), dict):
        raise ValueError(f"a model spec is a dict {{'kind': ..., 'kwargs': {{...}}}}, got {model_spec!r:.200}")
    kind = model_spec.get("kind")
    target = _device(device, "models.build")
    if kind == "hooked_transformer":
        return _build_hooked_transformer(model_spec, target)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted([*_BUILDERS, 'hooked_transformer'])}")
    kwargs = model_spec.get("kwargs", {})
    known = [k for k in inspect.signature(_BUILDERS[kind]).parameters if k not in _NOT_IN_SPECS]
    if unknown := sorted(set(kwargs) - set(known)):
        raise ValueError(f"model spec of kind {kind!r} has unknown arguments {unknown}; known: {known}")
    return _BUILDERS[kind](None, **kwargs, device=target)


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.json`` (spec, versions) and ``path/model.safetensors`` atomically.

    Any ``HookedTransformer`` (its transformer-lens config goes into the spec) or ``HookedMLP``; the
    weights are saved from whatever device they are on. Nothing is pickled.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():  # atomic_dir would replace the file by a folder
        raise FileExistsError(f"{path} is a file; a model is saved as a folder (model.json + model.safetensors): "
                              "choose another path")
    meta = {"format": "mechgrok.model/1", "spec": spec(model), "transformer_lens": TL_VERSION,
            "torch": torch.__version__}
    text = json.dumps(meta, indent=2)  # before anything is written: a config that is not JSON fails here
    with atomic_dir(path) as tmp:
        save_file(state_tensors(model), str(tmp / "model.safetensors"))
        atomic_write_text(tmp / "model.json", text)
    return path


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters as a flat dict of contiguous CPU tensors (for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}


def load_state(model: nn.Module, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy parameters from ``tensors`` into ``model`` in place (onto its device), checking names and shapes."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tensors[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, model wants {tuple(p.shape)}")
            p.copy_(tensors[k])


def load(path: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by ``save`` (safetensors + JSON; nothing is unpickled) onto ``device``
    (default: torch's default device). Its logits equal the saved model's."""
    path = Path(path)
    meta_file, weights = path / "model.json", path / "model.safetensors"
    if not meta_file.exists() or not weights.exists():
        raise FileNotFoundError(f"{path} is not a saved model: expected model.json and model.safetensors")
    try:
        meta = json.loads(meta_file.read_text())
        spec_ = meta["spec"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is damaged ({type(e).__name__}: {e}); save the model again") from None
    try:
        model = build(spec_, device=device)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_file}: {e}") from None
    load_state(model, read_safetensors(weights), source=str(weights))
    return model
