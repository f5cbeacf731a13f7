"""The builders of the models mechgrok trains: ``transformer`` and ``mlp``.

- ``transformer(task, ...)``: a ``HookedTransformer`` with no LayerNorm and ReLU by default, as in
  the grokking papers (Nanda et al. 2023); options for rotary or shortformer positions, parallel
  attention + MLP, grouped-query attention, gated MLPs, attention-only models, mixture-of-experts
  MLPs, or any ``HookedTransformerConfig`` (``config=``).
- ``mlp(task, width, act, ...)``: a ``HookedMLP`` (Doshi et al. 2023).

Both are sized from the task, seeded without touching the global RNG, initialised on the CPU (the
same weights on every device) and record how to rebuild them in ``model.mechgrok_spec``.

>>> from mechgrok import tasks
>>> task = tasks.modular_arithmetic(p=7, train_frac=0.5, seed=0)
>>> model = transformer(task, d_model=16, n_heads=2, d_mlp=32)
>>> model.cfg.d_vocab, model.cfg.n_ctx, model.cfg.d_head
(8, 3, 8)
>>> model.mechgrok_spec["kind"], mlp(task, width=8).mechgrok_spec["kwargs"]["width"]
('transformer', 8)
"""

from __future__ import annotations

from typing import Any

import torch

from mechgrok._config import check_int
from mechgrok.models._args import _check_bool, _check_choice, _check_task, _need
from mechgrok.models._tl import SUPPORTED_ACTIVATIONS, HookedTransformer, HookedTransformerConfig, _quiet_build
from mechgrok.models.checks import check_compatible
from mechgrok.models.config_json import _config_from_json, _config_to_json
from mechgrok.models.devices import _device, _to_device
from mechgrok.models.hooked_mlp import MLP_ACTS, HookedMLP
from mechgrok.tasks import Task

__all__ = ["transformer", "mlp", "TRANSFORMER_ACTS", "POSITIONAL"]

#: ``act_fn`` names ``transformer`` accepts (transformer-lens's).
TRANSFORMER_ACTS = tuple(sorted(SUPPORTED_ACTIVATIONS))
#: ``positional`` values ``transformer`` accepts: learned absolute positions added to the residual
#: stream, rotary (Su et al. 2021) on ``rotary_dim`` of each head's dimensions, or shortformer
#: (Press et al. 2021: learned positions added to the queries' and keys' inputs only).
POSITIONAL = ("standard", "rotary", "shortformer")


# ---------------------------------------------------------------------------- transformer

# The options added after v0.1 and their defaults: a model built with the defaults keeps the spec it
# had then (these keys are left out), so older run folders still match and load.
_NEW_OPTIONS = {"positional": "standard", "rotary_dim": None, "parallel_attn_mlp": False, "n_key_value_heads": None,
                "gated_mlp": False, "attn_only": False, "num_experts": None, "experts_per_token": None}
_SIZE_OPTIONS = {"n_layers": 1, "d_model": 128, "n_heads": 4, "d_head": None, "d_mlp": 512, "act_fn": "relu",
                 "normalization": None, "d_vocab": None, "d_vocab_out": None, "n_ctx": None}


def transformer(task: Task | None = None, *, n_layers: int = 1, d_model: int = 128, n_heads: int = 4,
                d_head: int | None = None, d_mlp: int = 512, act_fn: str = "relu",
                normalization: str | None = None, seed: int | None = None, d_vocab: int | None = None,
                d_vocab_out: int | None = None, n_ctx: int | None = None, positional: str = "standard",
                rotary_dim: int | None = None, parallel_attn_mlp: bool = False, n_key_value_heads: int | None = None,
                gated_mlp: bool = False, attn_only: bool = False, num_experts: int | None = None,
                experts_per_token: int | None = None, config: HookedTransformerConfig | None = None,
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
        num_experts: a mixture-of-experts MLP in every block (transformer-lens's ``MoE``, as
            Mixtral): ``num_experts`` gated experts of width ``d_mlp`` each and a linear router
            ``W_gate``; each token goes to its ``experts_per_token`` highest-softmax experts, whose
            outputs are summed weighted by their (unrenormalised) softmax weights. Hooks
            ``blocks.L.mlp.hook_expert_indices`` / ``hook_expert_weights``. ``None``: a dense MLP.
        experts_per_token: ``k`` of the top-k routing (required with ``num_experts``; 1 or 2 are usual).
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
                       gated_mlp=gated_mlp, attn_only=attn_only, num_experts=num_experts,
                       experts_per_token=experts_per_token)
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
                             gated_mlp=gated_mlp, attn_only=attn_only, num_experts=num_experts,
                             experts_per_token=experts_per_token)
    target = _device(device, owner)
    tl_options = dict(positional_embedding_type=positional, parallel_attn_mlp=parallel_attn_mlp,
                      n_key_value_heads=n_key_value_heads, gated_mlp=gated_mlp, attn_only=attn_only,
                      num_experts=options["num_experts"], experts_per_token=options["experts_per_token"])
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
                   attn_only: bool, num_experts: int | None = None,
                   experts_per_token: int | None = None) -> dict[str, Any]:
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
    if num_experts is None and experts_per_token is not None:
        raise ValueError(f"{owner}: experts_per_token={experts_per_token} applies only to a mixture-of-experts MLP; "
                         "pass num_experts too, or leave experts_per_token out")
    if num_experts is not None:
        num_experts = check_int(num_experts, "num_experts", low=1, owner=owner)
        if experts_per_token is None:
            raise ValueError(f"{owner}: num_experts={num_experts} needs experts_per_token, the k of top-k routing "
                             "(1 or 2 are usual); pass it")
        experts_per_token = check_int(experts_per_token, "experts_per_token", low=1, high=num_experts, owner=owner)
        if attn_only or gated_mlp:
            raise ValueError(f"{owner}: num_experts makes every MLP a mixture of gated experts, so "
                             f"{'attn_only (no MLP)' if attn_only else 'gated_mlp (the experts are already gated)'} "
                             "cannot apply; drop it or num_experts")
    return dict(positional=positional, rotary_dim=rotary_dim, parallel_attn_mlp=parallel_attn_mlp,
                n_key_value_heads=n_key_value_heads, gated_mlp=gated_mlp, attn_only=attn_only,
                num_experts=num_experts, experts_per_token=experts_per_token)


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


# ---------------------------------------------------------------------------- mlp


def mlp(task: Task | None = None, *, width: int = 500, act: str = "square", bias: bool = False, seed: int = 0,
        p: int | None = None, d_out: int | None = None, operand_positions: tuple[int, int] | None = None,
        device: str | torch.device | None = None) -> HookedMLP:
    """The Doshi et al. MLP for a single-operation ``task``: ``2p -> width -> act -> d_out``, no biases.

    ``operand_positions`` default to the task's (``(0, 1)`` without a task); ``device`` to torch's
    default device (weights are initialised on the CPU, then moved).
    """
    owner = "models.mlp"
    _check_task(task, owner, sequences=False)
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
