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

from mechgrok._config import check_int
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
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

TL_VERSION = importlib.metadata.version("transformer-lens")

__all__ = ["HookedMLP", "HookedRootModule", "HookPoint", "HookedTransformer", "transformer", "mlp",
           "save", "load", "spec", "build", "final_logits", "training_logits", "patchable", "check_compatible",
           "check_inputs", "mlp_hook", "n_layers", "TL_VERSION", "TRANSFORMER_ACTS", "MLP_ACTS"]

_ACTS = {
    "square": lambda x: x * x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "linear": lambda x: x,
}
#: ``act_fn`` names ``transformer`` accepts (transformer-lens's) and ``act`` names ``mlp`` accepts.
TRANSFORMER_ACTS = tuple(sorted(SUPPORTED_ACTIVATIONS))
MLP_ACTS = tuple(sorted(_ACTS))


def _check_choice(value: Any, name: str, choices: tuple[str, ...], owner: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them (with close matches)."""
    import difflib

    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {list(choices)}{hint}")
    return value


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
    owner = "models.transformer"
    _check_task(task, owner)
    n_layers, d_model, n_heads, d_mlp = (check_int(v, k, low=1, owner=owner) for k, v in (
        ("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads), ("d_mlp", d_mlp)))
    seed = check_int(seed, "seed", low=0, owner=owner)
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


def _check_task(task: Any, owner: str) -> None:
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"{owner}: task must be a mechgrok Task (e.g. mg.tasks.modular_arithmetic(p=113)) or None, "
                        f"got {type(task).__name__}")


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
    ``blocks.0.mlp.hook_post``, ``hook_out`` (logits).
    """

    def __init__(self, p: int, width: int, d_out: int, act: str = "square", bias: bool = False,
                 operand_positions: tuple[int, int] = (0, 1), seed: int = 0):
        super().__init__()
        owner = "HookedMLP"
        act = _check_choice(act, "act", MLP_ACTS, owner)
        p, width, d_out = (check_int(v, k, low=1, owner=owner) for k, v in (("p", p), ("width", width), ("d_out", d_out)))
        seed = check_int(seed, "seed", low=0, owner=owner)
        if not isinstance(bias, bool):
            raise TypeError(f"{owner}: bias must be True or False, got {bias!r}")
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

    def forward(self, x: Int[Tensor, "batch n_ctx"] | Float[Tensor, "batch two_p"]) -> Float[Tensor, "batch d_out"]:
        if not x.is_floating_point():
            i, j = self.operand_positions
            if not (self.hook_in._forward_hooks or self.hook_in._forward_pre_hooks):
                # nothing reads or edits the one-hot input: add the operands' rows of W_in (training's
                # path; a third faster than the matmul at p = 97, width 500, and bitwise the same values)
                rows = torch.stack([x[:, i], x[:, j] + self.p], dim=1)  # [batch, 2]
                return self.hook_out(self.blocks[0].mlp(rows=rows))
            x = torch.cat([nn.functional.one_hot(x[:, i], self.p), nn.functional.one_hot(x[:, j], self.p)],
                          dim=-1).to(self.blocks[0].mlp.W_in.dtype)  # [batch, 2p]
        return self.hook_out(self.blocks[0].mlp(self.hook_in(x)))


def mlp(task: Task | None = None, *, width: int = 500, act: str = "square", bias: bool = False, seed: int = 0,
        p: int | None = None, d_out: int | None = None) -> HookedMLP:
    """The Doshi et al. MLP for a single-operation ``task``: ``2p -> width -> act -> d_out``, no biases."""
    _check_task(task, "models.mlp")
    if task is not None and len(task.task_names) != 1:
        raise ValueError(f"the MLP sees only the two operands; task {task.name!r} mixes several ops "
                         "(use a transformer for multi-task data)")
    owner = "models.mlp"
    width = check_int(width, "width", low=1, owner=owner)
    p = check_int(p if p is not None else _need(task, "p"), "p", low=1, owner=owner)
    d_out = check_int(d_out if d_out is not None else _need(task, "d_vocab_out"), "d_out", low=1, owner=owner)
    act = _check_choice(act, "act", MLP_ACTS, owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    if not isinstance(bias, bool):
        raise TypeError(f"{owner}: bias must be True or False, got {bias!r}")
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
        raise TypeError(f"expected a HookedTransformer or HookedMLP, got {type(model).__name__}")
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


def build(model_spec: dict[str, Any]) -> nn.Module:
    """Build a fresh model from a ``spec`` dict (``{"kind": "transformer" | "mlp", "kwargs": {...}}``)."""
    import inspect

    if not isinstance(model_spec, dict) or not isinstance(model_spec.get("kwargs", {}), dict):
        raise ValueError(f"a model spec is a dict {{'kind': ..., 'kwargs': {{...}}}}, got {model_spec!r:.200}")
    kind = model_spec.get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_BUILDERS)}")
    kwargs = model_spec.get("kwargs", {})
    known = [k for k in inspect.signature(_BUILDERS[kind]).parameters if k != "task"]
    if unknown := sorted(set(kwargs) - set(known)):
        raise ValueError(f"model spec of kind {kind!r} has unknown arguments {unknown}; known: {known}")
    return _BUILDERS[kind](None, **kwargs)


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.json`` (spec, versions) and ``path/model.safetensors`` atomically."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # atomic_dir would replace the file by a folder
        raise FileExistsError(f"{path} is a file; a model is saved as a folder (model.json + model.safetensors): "
                              "choose another path")
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
    try:
        meta = json.loads(meta_file.read_text())
        spec_ = meta["spec"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is damaged ({type(e).__name__}: {e}); save the model again") from None
    try:
        model = build(spec_)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_file}: {e}") from None
    load_state(model, read_safetensors(weights), source=str(weights))
    return model

