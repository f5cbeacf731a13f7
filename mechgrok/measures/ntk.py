"""Lazy versus rich training: the empirical neural tangent kernel (NTK), its alignment with the labels,
and how far the weights and the kernel move from initialization.

Kumar, Bordelon, Gershman and Pehlevan 2024, "Grokking as the transition from lazy to rich training
dynamics" (ICLR 2024, arXiv:2310.06110), argue that a network first fits its training set like a
kernel machine with its initial NTK ("lazy": the weights barely move, ``∇_θ f`` stays fixed) and
generalizes once it learns features ("rich"). The output scale ``α`` of the centred predictor
``α·(f(x; θ) − f(x; θ₀))`` (Chizat, Oyallon and Bach 2019) sets how lazy training is; mechgrok trains
it with ``TrainConfig(output_scale=α, center_output=True)``.

- ``empirical_ntk(model, inputs)``: ``K_ij = Σ_c ∇_θ f_c(x_i) · ∇_θ f_c(x_j)`` ``[n, n]`` over every
  trainable parameter (the trace over outputs of the eNTK at the model's current weights, the "after
  kernel" once trained; Jacot, Gabriel and Hongler 2018). ``outputs=k`` estimates it from ``k`` random
  ±1/√k combinations of the outputs (unbiased; exact when off, the default).
- ``kernel_target_alignment(K, Y)``: ``⟨K_c, T_c⟩_F / (‖K_c‖_F ‖T_c‖_F)`` with ``T = Y Yᵀ`` (one-hot
  ``Y`` for class labels) and ``M_c = H M H``, ``H = I − 11ᵀ/n`` (centred alignment, Cortes, Mohri and
  Rostamizadeh 2012). ``centered=False`` gives the form Kumar et al. write, ``yᵀKy / (‖K‖_F ‖y‖²)`` (which
  is ``⟨K, yyᵀ⟩ / (‖K‖_F ‖yyᵀ‖_F)``); they call it CKA and evaluate it on the test set.
- ``kernel_distance(K, K0)``: ``1 − ⟨K, K0⟩_F / (‖K‖_F ‖K0‖_F)`` (Fort et al. 2020, "Deep learning
  versus kernel learning"): 0 while the kernel only rescales, up to 1; ``centered=True`` compares
  ``HKH`` and ``HK0H`` instead (mechgrok's addition, see the limits).
- ``feature_movement(model, init)``: ``‖θ − θ₀‖ / ‖θ₀‖`` over all trainable parameters, per parameter
  and per layer (Kumar et al. Fig. 7 d–f), and the kernel distance on given inputs.
- ``lazy_rich_over_training(run)``: all of them on the checkpoints of a run (``LazyRichOverTraining``).

Limits:

- **Cost.** One kernel on ``n`` examples takes ``n·k`` per-example backward passes (``k`` = ``d_out``,
  or the number of projections) and ``n²·k·P`` multiply-adds for the Gram matrix (``P`` trainable
  parameters), in the model's dtype (summed in float64). At most ``max_floats`` Jacobian entries are
  held at once (64 MiB in float32 by default). benchmarks/repro_lazy_rich.py times it.
- **Classification.** The kernel is the trace over outputs; it does not see which output an example's
  gradient belongs to, so its alignment with ``YYᵀ`` asks whether examples of the same class have more
  similar gradients than others. With ``n`` examples of ``C ≳ n`` classes ``YYᵀ ≈ I`` and the alignment
  measures only how uniform ``K`` is; ``lazy_rich_over_training`` therefore draws a class-balanced
  subset (``per_class`` examples of each of ``n // per_class`` classes), which is mechgrok's choice.
- **The constant mode.** A transformer's NTK on modular arithmetic is dominated by one constant
  block (every example shares the answer position's ``=`` token and position, so their gradients
  share a large common part): in the ``test`` preset it holds 99.8% of ``‖K₀‖²_F``. The uncentred
  alignment and kernel distance then mostly describe that block (with ``K ∝ 11ᵀ`` the uncentred
  alignment is ``√(Σ_c n_c²) / n`` whatever the labels); the centred ones remove it.
- **What α changes.** The kernel of the trained predictor is ``α²·K`` (centring subtracts a constant
  of θ); alignment and kernel distance do not depend on ``α``, ``kernel_norm`` does.
- **Adaptive optimizers.** The lazy limit ``α → ∞`` is exact for gradient descent with a learning rate
  ``η₀/α²`` (Kumar et al. App. 8.1; mechgrok divides the loss by ``α²`` instead, the same for GD). AdamW
  normalizes the gradient's scale, so for it that division does (almost) nothing and the learning rate
  sets how fast the weights move whatever ``α`` is; see docs/reproductions.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._config import check_float, check_int
from mechgrok._threads import torch_threads
from mechgrok.run import Run
from mechgrok.tasks import SequenceTask
from mechgrok.train import TrainConfig

__all__ = ["empirical_ntk", "kernel_target_alignment", "kernel_distance", "feature_movement", "FeatureMovement",
           "layer_of", "balanced_rows", "lazy_rich_over_training", "LazyRichOverTraining", "LAZY_RICH_FORMAT",
           "LAZY_RICH_SERIES"]

LAZY_RICH_FORMAT = "mechgrok.lazy_rich/1"
#: Default bound on the Jacobian entries ``empirical_ntk`` holds at once (2**24: 64 MiB in float32).
MAX_FLOATS = 2**24


# ---------------------------------------------------------------------------- the kernel


def _trainable(model: nn.Module, owner: str) -> dict[str, Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{owner}: the model has no trainable parameters (requires_grad=False everywhere), so its "
                         "tangent kernel is 0")
    return params


def _projection(outputs: int | None, d_out: int, seed: int) -> Tensor | None:
    """``None`` (every output) or ``[k, d_out]`` entries ±1/√k (float64, CPU), so ``E[VᵀV] = I`` exactly
    on the diagonal."""
    if outputs is None:
        return None
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (outputs, d_out), generator=g, dtype=torch.float64) * 2 - 1
    return signs / math.sqrt(outputs)


def empirical_ntk(model: nn.Module, inputs: Tensor, *, outputs: int | None = None, output_scale: float = 1.0,
                  seed: int = 0, masks: Mapping[str, Tensor] | None = None, max_floats: int = MAX_FLOATS
                  ) -> Float[Tensor, "n n"]:
    """The empirical NTK summed over outputs, ``K_ij = α² Σ_c ∇_θ f_c(x_i) · ∇_θ f_c(x_j)``.

    ``f_c`` is the answer-position logit ``c`` (``mg.models.final_logits``) in eval mode, ``θ`` every
    parameter with ``requires_grad`` (frozen ones are constants); per-example Jacobians come from
    ``torch.func`` (``vmap`` of ``jacrev`` over ``functional_call``), a chunk of outputs at a time.

    Args:
        model: a ``HookedTransformer``, ``HookedMLP`` or any module mapping ``inputs`` to ``[n, d_out]``
            or ``[n, pos, d_out]`` logits, without batch-coupled layers (BatchNorm). Left unchanged.
        inputs: ``[n, ...]`` examples (token ids ``[n, n_ctx]``, or a HookedMLP's one-hot ``[n, 2p]``).
        outputs: ``None`` (default): every output, exact. ``k``: project the ``d_out`` outputs on ``k``
            random directions with entries ±1/√k (seeded by ``seed``) and sum over those: an unbiased
            estimate, ``k/d_out`` of the cost, for models with many classes.
        output_scale: ``α``: the kernel of the predictor ``α·f`` (or ``α·(f − f₀)``) is ``α²`` times f's.
        seed: seeds the projection (unused when ``outputs`` is None).
        masks: ``{parameter name: 0/1 tensor}`` of a run trained with fixed weight masks
            (``Run.masks()``): masked-out weights never move, so their gradients are left out.
        max_floats: about this many Jacobian entries per Jacobian (examples are processed in blocks when
            one output for all of them would not fit; then two blocks are held at once and each block
            is recomputed once per later block).

    Returns:
        ``K`` ``[n, n]``, float64 on the CPU, symmetric positive semi-definite.

    >>> from mechgrok import tasks, models
    >>> task = tasks.modular_arithmetic(p=5, op="add", train_frac=0.5, seed=0)
    >>> empirical_ntk(models.mlp(task, width=8), task.inputs[:6]).shape
    torch.Size([6, 6])
    """
    owner = "empirical_ntk"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch nn.Module, got {type(model).__name__}")
    models.check_inputs(model, inputs, f"{owner}: inputs")
    if outputs is not None:
        outputs = check_int(outputs, "outputs", low=1, owner=owner)
    output_scale = check_float(output_scale, "output_scale", low=0, low_open=True, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    max_floats = check_int(max_floats, "max_floats", low=1, owner=owner)
    params = _trainable(model, owner)
    masks = _check_masks(masks, params, owner)
    device = next(iter(params.values())).device
    x = inputs.to(device)
    n = x.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            d_out = _logits(model, params, x[:1]).shape[-1]
        proj = _projection(outputs, d_out, seed)
        k = d_out if proj is None else proj.shape[0]
        if proj is not None:
            proj = proj.to(device=device, dtype=next(iter(params.values())).dtype)
        n_params = sum(p.numel() for p in params.values())
        block = max(1, min(n, max_floats // n_params))  # examples per block at one output
        chunk = max(1, min(k, max_floats // (block * n_params)))  # outputs per Jacobian
        K = torch.zeros(n, n, dtype=torch.float64)
        blocks = [(i, min(n, i + block)) for i in range(0, n, block)]
        for c0 in range(0, k, chunk):
            rows = slice(c0, min(k, c0 + chunk))
            for a, (a0, a1) in enumerate(blocks):
                ja = _jacobian(model, params, x[a0:a1], proj, rows, masks)
                for b0, b1 in blocks[a:]:
                    jb = ja if b0 == a0 else _jacobian(model, params, x[b0:b1], proj, rows, masks)
                    gram = sum((ja[name] @ jb[name].T).double() for name in params).cpu()  # [a1 - a0, b1 - b0]
                    K[a0:a1, b0:b1] += gram
                    if b0 != a0:
                        K[b0:b1, a0:a1] += gram.T
    finally:
        model.train(was_training)
    return K * output_scale**2


def _logits(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    out = functional_call(model, params, (x,))
    return out[:, -1] if out.ndim == 3 else out  # [b, d_out]: the answer position (models.final_logits)


def _jacobian(model: nn.Module, params: dict[str, Tensor], x: Tensor, proj: Tensor | None, rows: slice,
              masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: [b, k_chunk · numel]}``: per-example gradients of the chunk ``rows`` of the outputs (or
    of their projections ``proj[rows] @ f``) with respect to each parameter."""
    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        f = _logits(model, p, xi.unsqueeze(0))[0]  # [d_out]
        return f[rows] if proj is None else proj[rows] @ f  # [k_chunk]

    try:
        jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)  # {name: [b, k_chunk, *shape]}
    except RuntimeError as e:
        raise RuntimeError(f"empirical_ntk: torch.func could not differentiate this model per example ({e}); it "
                           "needs a model whose forward works under vmap (no in-place data-dependent ops, no "
                           "BatchNorm in training mode)") from e
    out = {}
    for name, j in jac.items():
        if name in masks:
            j = j * masks[name].to(device=j.device, dtype=j.dtype)  # broadcasts over [b, k_chunk]
        out[name] = j.reshape(j.shape[0], -1)  # [b, k_chunk · numel]
    return out


def _check_masks(masks: Mapping[str, Tensor] | None, params: dict[str, Tensor], owner: str) -> dict[str, Tensor]:
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"{owner}: masks must be a dict {{parameter name: 0/1 tensor}} (Run.masks()), got "
                        f"{type(masks).__name__}")
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"{owner}: masks name {name!r}, which is not a trainable parameter of this model "
                             f"(it has {list(params)[:6]}...)")
        if not isinstance(m, Tensor) or tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"{owner}: masks[{name!r}] must be a tensor of the parameter's shape "
                             f"{tuple(params[name].shape)}")
    return dict(masks)


# ---------------------------------------------------------------------------- alignment, distance


def _square(K: Any, what: str, owner: str) -> Tensor:
    if not isinstance(K, Tensor):
        raise TypeError(f"{owner}: {what} must be a torch tensor [n, n], got {type(K).__name__}")
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 2:
        raise ValueError(f"{owner}: {what} must be a square matrix [n, n] with n >= 2, got shape {tuple(K.shape)}")
    K = K.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(K).all()):
        raise ValueError(f"{owner}: {what} holds NaN or infinite entries")
    return K


def _center(M: Tensor) -> Tensor:
    """``H M H`` with ``H = I − 11ᵀ/n``: subtract row and column means, add back the grand mean."""
    return M - M.mean(0, keepdim=True) - M.mean(1, keepdim=True) + M.mean()


def _targets(Y: Any, n: int, owner: str) -> Tensor:
    """``Y`` as float64 ``[n, c]``: integer labels ``[n]`` one-hot encoded, float targets ``[n]`` or ``[n, c]``."""
    if not isinstance(Y, Tensor):
        raise TypeError(f"{owner}: Y must be a torch tensor (integer labels [n] or float targets [n] / [n, c]), "
                        f"got {type(Y).__name__}")
    if Y.shape[0] != n or Y.ndim not in (1, 2):
        raise ValueError(f"{owner}: Y must have the kernel's {n} rows ([n] or [n, c]), got shape {tuple(Y.shape)}")
    if Y.dtype == torch.bool or not (Y.is_floating_point() or Y.is_complex()):
        if Y.ndim != 1:
            raise ValueError(f"{owner}: integer Y are class labels [n]; got shape {tuple(Y.shape)} (pass one-hot "
                             "targets as a float tensor)")
        if bool((Y < 0).any()):
            raise ValueError(f"{owner}: class labels must be >= 0, got {int(Y.min())}")
        return nn.functional.one_hot(Y.long().cpu()).double()  # [n, C]
    Y = Y.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(Y).all()):
        raise ValueError(f"{owner}: Y holds NaN or infinite values")
    return Y[:, None] if Y.ndim == 1 else Y


def kernel_target_alignment(K: Float[Tensor, "n n"], Y: Tensor, *, centered: bool = True) -> float:
    """Alignment of a kernel matrix with the target kernel ``T = Y Yᵀ``: ``⟨K', T'⟩_F / (‖K'‖_F ‖T'‖_F)``.

    Args:
        K: ``[n, n]`` kernel matrix (e.g. ``empirical_ntk``).
        Y: integer class labels ``[n]`` (one-hot encoded: ``T_ij = 1`` when ``y_i = y_j``) or float
            targets ``[n]`` / ``[n, c]``.
        centered: ``True``: ``K' = HKH``, ``T' = HTH``, ``H = I − 11ᵀ/n`` (Cortes et al. 2012): a constant
            added to every entry of ``K`` does not change it. ``False``: ``K' = K``, ``T' = T``, the
            formula of Kumar et al. 2024, ``yᵀKy / (‖K‖_F ‖y‖²)`` for one target.

    Returns:
        A number in ``[−1, 1]`` (in ``[0, 1]`` for positive semi-definite ``K``), 1 when ``K ∝ T``,
        invariant to ``K → cK`` (``c > 0``); NaN when ``K'`` or ``T'`` is 0 (e.g. every label equal).

    >>> import torch
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> round(kernel_target_alignment(torch.eye(4), y), 6)  # 1/√3
    0.57735
    """
    owner = "kernel_target_alignment"
    if not isinstance(centered, bool):
        raise TypeError(f"{owner}: centered must be True or False, got {centered!r}")
    K = _square(K, "K", owner)
    Y = _targets(Y, K.shape[0], owner)
    T = Y @ Y.T  # [n, n]
    if centered:
        K, T = _center(K), _center(T)
    den = float(K.norm()) * float(T.norm())
    return float((K * T).sum()) / den if den > 0 else float("nan")


def kernel_distance(K: Float[Tensor, "n n"], K0: Float[Tensor, "n n"], *, centered: bool = False) -> float:
    """``1 − ⟨K, K0⟩_F / (‖K‖_F ‖K0‖_F)`` (Fort et al. 2020): 0 when ``K ∝ K0``; NaN when either is 0.

    ``centered=True`` applies ``H · H`` (``H = I − 11ᵀ/n``) to both first, so that a constant added to
    either kernel does not count (the module docstring's "constant mode").

    >>> import torch
    >>> kernel_distance(3 * torch.eye(2), torch.eye(2))
    0.0
    """
    if not isinstance(centered, bool):
        raise TypeError(f"kernel_distance: centered must be True or False, got {centered!r}")
    K, K0 = _square(K, "K", "kernel_distance"), _square(K0, "K0", "kernel_distance")
    if K.shape != K0.shape:
        raise ValueError(f"kernel_distance: K {tuple(K.shape)} and K0 {tuple(K0.shape)} must be on the same examples")
    if centered:
        K, K0 = _center(K), _center(K0)
    den = float(K.norm()) * float(K0.norm())
    return 1.0 - float((K * K0).sum()) / den if den > 0 else float("nan")


# ---------------------------------------------------------------------------- movement


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its module path, with a TransformerLens bias ``b_X`` joined to
    its weight ``W_X`` (``blocks.0.attn.b_Q`` -> ``blocks.0.attn.W_Q``) and ``weight`` / ``bias`` of a
    torch module to the module (``0.bias`` -> ``0``), so that every layer has a nonzero initial norm."""
    head, _, last = name.rpartition(".")
    if last in ("weight", "bias"):
        return head or last
    if last.startswith("b_"):
        last = "W_" + last[2:]
    return f"{head}.{last}" if head else last


@dataclass(frozen=True)
class FeatureMovement:
    """How far a model moved from its initialization (``feature_movement``).

    Attributes:
        relative: ``‖θ − θ₀‖ / ‖θ₀‖`` over every trainable parameter.
        per_parameter: the same per parameter tensor (NaN where ``θ₀`` is 0, e.g. a zero-initialized bias).
        per_layer: the same per ``layer_of`` group.
        kernel_distance: ``1 − ⟨K, K₀⟩ / (‖K‖ ‖K₀‖)`` of the empirical NTKs on the given inputs, or None.
    """

    relative: float
    per_parameter: dict[str, float]
    per_layer: dict[str, float]
    kernel_distance: float | None


def _movement(params: Mapping[str, Tensor], init: Mapping[str, Tensor]) -> tuple[float, dict, dict]:
    if set(params) != set(init):
        raise ValueError(f"feature_movement: the model and its initialization have different trainable parameters "
                         f"({sorted(set(params) ^ set(init))[:4]} in one only); compare checkpoints of one run")
    d2, n2 = {}, {}
    for name in params:
        if params[name].shape != init[name].shape:
            raise ValueError(f"feature_movement: {name!r} has shape {tuple(params[name].shape)} but "
                             f"{tuple(init[name].shape)} at initialization")
        w0 = init[name].detach().double().cpu()
        d2[name] = float(((params[name].detach().double().cpu() - w0) ** 2).sum())
        n2[name] = float((w0**2).sum())

    def ratio(d: float, n: float) -> float:
        return math.sqrt(d / n) if n > 0 else float("nan")

    layers: dict[str, list[float]] = {}
    for name in params:
        acc = layers.setdefault(layer_of(name), [0.0, 0.0])
        acc[0] += d2[name]
        acc[1] += n2[name]
    return (ratio(sum(d2.values()), sum(n2.values())), {k: ratio(d2[k], n2[k]) for k in params},
            {k: ratio(*v) for k, v in layers.items()})


def feature_movement(model: nn.Module, init: nn.Module, inputs: Tensor | None = None, *,
                     outputs: int | None = None, seed: int = 0) -> FeatureMovement:
    """Relative weight change ``‖θ − θ₀‖ / ‖θ₀‖`` (total, per parameter, per layer) of ``model`` from
    ``init`` (the same architecture, e.g. ``run.load_model(0)``), and, when ``inputs`` are given, the
    kernel distance of their empirical NTKs (``empirical_ntk(..., outputs=outputs, seed=seed)`` each).

    In lazy training both stay near 0 while the training loss falls (Chizat et al. 2019); Kumar et al.
    plot the relative change against α (their Fig. 7). Parameters compared are the trainable ones."""
    for m, what in ((model, "model"), (init, "init")):
        if not isinstance(m, nn.Module):
            raise TypeError(f"feature_movement: {what} must be a torch nn.Module, got {type(m).__name__}")
    total, per_param, per_layer = _movement(_trainable(model, "feature_movement"), _trainable(init, "feature_movement"))
    dist = None
    if inputs is not None:
        dist = kernel_distance(empirical_ntk(model, inputs, outputs=outputs, seed=seed),
                               empirical_ntk(init, inputs, outputs=outputs, seed=seed))
    return FeatureMovement(total, per_param, per_layer, dist)


# ---------------------------------------------------------------------------- over training


def balanced_rows(labels: Tensor, mask: Tensor, n: int, per_class: int, seed: int) -> Tensor:
    """Up to ``n`` task rows from ``mask``: ``per_class`` random examples (all, when a class has fewer)
    of classes taken in a random order until ``n`` are drawn; sorted ``[m]``, ``m ≤ n``. Seeded."""
    g = torch.Generator().manual_seed(seed)
    rows = mask.nonzero().squeeze(1)
    y = labels[rows]
    classes = torch.unique(y)
    chosen: list[Tensor] = []
    count = 0
    for c in classes[torch.randperm(len(classes), generator=g)]:
        idx = rows[y == c]
        take = idx[torch.randperm(len(idx), generator=g)[: min(per_class, n - count)]]
        chosen.append(take)
        count += len(take)
        if count >= n:
            break
    return torch.sort(torch.cat(chosen)).values if chosen else rows[:0]


#: The per-step series of ``LazyRichOverTraining`` (each a tuple over ``steps``).
LAZY_RICH_SERIES = ("alignment_train", "alignment_test", "alignment_train_uncentered", "alignment_test_uncentered",
                    "kernel_distance", "kernel_distance_centered", "kernel_norm", "weight_movement", "train_acc",
                    "test_acc", "train_loss", "test_loss")


@dataclass(frozen=True)
class LazyRichOverTraining:
    """Kernel alignment, kernel and weight movement on the checkpoints of a run (``lazy_rich_over_training``).

    Attributes:
        run: the run folder.
        steps: checkpoint steps, ascending (step 0, the initialization, is the reference).
        output_scale, center_output: the run's ``α`` and centring; the kernels are the trained
            predictor's, ``α²·K_f``.
        outputs: None (every output, exact) or the number of random output projections.
        seed: seeds the example subsets and the projection.
        train_rows, test_rows: task rows of the examples the kernels are computed on (class-balanced).
        alignment_train: centred alignment of the NTK on ``train_rows`` with their training labels (as
            trained: corrupted ones included).
        alignment_test: the same on ``test_rows`` with their true labels (NaN without test examples).
        alignment_train_uncentered, alignment_test_uncentered: Kumar et al.'s uncentred form.
        kernel_distance: ``1 − ⟨K_t, K_0⟩ / (‖K_t‖ ‖K_0‖)`` on ``train_rows`` (Fort et al.).
        kernel_distance_centered: the same between ``HK_tH`` and ``HK_0H`` (without the constant mode).
        kernel_norm: ``‖K_t‖_F / n`` on ``train_rows`` (the predictor's kernel, so it scales with α²).
        weight_movement: ``‖θ_t − θ₀‖ / ‖θ₀‖`` over every trainable parameter.
        movement_per_layer: the same per ``layer_of`` group.
        train_acc, test_acc, train_loss, test_loss: from ``history.jsonl`` at each step (the trained
            predictor's; NaN where the history has no row at that step).
    """

    run: str
    steps: tuple[int, ...]
    output_scale: float
    center_output: bool
    outputs: int | None
    seed: int
    train_rows: tuple[int, ...]
    test_rows: tuple[int, ...]
    alignment_train: tuple[float, ...]
    alignment_test: tuple[float, ...]
    alignment_train_uncentered: tuple[float, ...]
    alignment_test_uncentered: tuple[float, ...]
    kernel_distance: tuple[float, ...]
    kernel_distance_centered: tuple[float, ...]
    kernel_norm: tuple[float, ...]
    weight_movement: tuple[float, ...]
    movement_per_layer: dict[str, tuple[float, ...]]
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    train_loss: tuple[float, ...]
    test_loss: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``None``), with ``"format"``."""
        def col(values: Iterable[float]) -> list:
            return [None if not math.isfinite(v) else v for v in values]
        return {"format": LAZY_RICH_FORMAT, "run": self.run, "steps": list(self.steps),
                "output_scale": self.output_scale, "center_output": self.center_output, "outputs": self.outputs,
                "seed": self.seed, "train_rows": list(self.train_rows), "test_rows": list(self.test_rows),
                **{k: col(getattr(self, k)) for k in LAZY_RICH_SERIES},
                "movement_per_layer": {k: col(v) for k, v in self.movement_per_layer.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LazyRichOverTraining:
        if not isinstance(d, Mapping) or d.get("format") != LAZY_RICH_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a lazy/rich result: format {got!r}, expected {LAZY_RICH_FORMAT!r}")

        def col(values: Iterable[Any]) -> tuple[float, ...]:
            return tuple(float("nan") if v is None else float(v) for v in values)
        return cls(run=d["run"], steps=tuple(int(s) for s in d["steps"]), output_scale=float(d["output_scale"]),
                   center_output=bool(d["center_output"]), outputs=d["outputs"], seed=int(d["seed"]),
                   train_rows=tuple(d["train_rows"]), test_rows=tuple(d["test_rows"]),
                   **{k: col(d[k]) for k in LAZY_RICH_SERIES},
                   movement_per_layer={k: col(v) for k, v in d["movement_per_layer"].items()})

    def at(self, step: int) -> dict[str, float]:
        """Every series at ``step`` (one of ``steps``)."""
        if step not in self.steps:
            raise ValueError(f"no measurement at step {step}; measured steps: {list(self.steps)}")
        i = self.steps.index(step)
        return {k: getattr(self, k)[i] for k in LAZY_RICH_SERIES}


def lazy_rich_over_training(run: Run | str, steps: Iterable[int] | None = None, *, n_examples: int = 128,
                            per_class: int = 8, outputs: int | None = None, seed: int = 0, progress: bool = True,
                            threads: int | None = 1) -> LazyRichOverTraining:
    """Kernel-target alignment, kernel distance from initialization and relative weight movement on the
    checkpoints of ``run`` (Kumar et al. 2024; module docstring).

    Args:
        run: a ``Run`` or its folder, trained on a ``Task`` (one answer per example), with its step-0
            checkpoint (``mg.train`` always writes it).
        steps: checkpoint steps (default: every checkpoint); step 0 is measured in any case.
        n_examples: at most this many training examples and as many test examples (``balanced_rows``).
        per_class: examples per class in each subset (so that the label kernel has same-class pairs).
        outputs: None (exact) or the number of random output projections (``empirical_ntk``).
        seed: seeds the subsets (training, then test, from one generator) and the projection.
        progress: a tqdm bar over checkpoints.
        threads: torch threads meanwhile (restored afterwards; ``None`` leaves them).

    Returns:
        A ``LazyRichOverTraining``. Per checkpoint: a model load and two ``empirical_ntk`` calls (the
        training and the test subset); see the module docstring for their cost.
    """
    owner = "lazy_rich_over_training"
    run = run if isinstance(run, Run) else Run(run)
    n_examples = check_int(n_examples, "n_examples", low=2, owner=owner)
    per_class = check_int(per_class, "per_class", low=1, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    if outputs is not None:
        outputs = check_int(outputs, "outputs", low=1, owner=owner)
    available = run.select_steps(owner=owner)
    if available[0] != 0:
        raise ValueError(f"{run.path} has no step-0 checkpoint (its first is step {available[0]}); the initial weights "
                         "are the reference of every measure here")
    wanted = run.select_steps(None if steps is None else [0, *steps], owner=owner)
    task = run.task()
    if isinstance(task, SequenceTask):
        raise TypeError(f"{run.path} trains a SequenceTask (next-token); {owner} reads one answer per example (a "
                        "Task-trained run)")
    cfg = TrainConfig.from_dict(run.config["train"])
    alpha = cfg.output_scale
    train_rows = balanced_rows(task.labels, task.train, n_examples, per_class, seed)
    test_rows = balanced_rows(task.true_labels, task.test, n_examples, per_class, seed + 1)
    if len(train_rows) < 2:
        raise ValueError(f"{run.path}: the training split has {len(train_rows)} example(s); the kernel needs >= 2")
    x_tr, y_tr = task.inputs[train_rows], task.labels[train_rows]
    x_te, y_te = task.inputs[test_rows], task.true_labels[test_rows]
    masks = run.masks()
    ntk: Callable[[nn.Module, Tensor], Tensor] = lambda m, x: empirical_ntk(  # noqa: E731
        m, x, outputs=outputs, output_scale=alpha, seed=seed, masks=masks)
    hist = {r["step"]: r for r in run.history()}
    cols: dict[str, list[float]] = {k: [] for k in LAZY_RICH_SERIES}
    layers: dict[str, list[float]] = {}
    nan = float("nan")
    with torch_threads(threads):
        init = run.load_model(0)
        params0 = _trainable(init, owner)
        K0 = ntk(init, x_tr)
        for step in tqdm(wanted, desc=f"lazy/rich {run.name}", unit="ckpt", disable=not progress):
            model = init if step == 0 else run.load_model(step)
            K_tr = K0 if step == 0 else ntk(model, x_tr)
            K_te = ntk(model, x_te) if len(test_rows) >= 2 else None
            for name, K, y in (("train", K_tr, y_tr), ("test", K_te, y_te)):
                cols[f"alignment_{name}"].append(nan if K is None else kernel_target_alignment(K, y))
                cols[f"alignment_{name}_uncentered"].append(
                    nan if K is None else kernel_target_alignment(K, y, centered=False))
            cols["kernel_distance"].append(kernel_distance(K_tr, K0))
            cols["kernel_distance_centered"].append(kernel_distance(K_tr, K0, centered=True))
            cols["kernel_norm"].append(float(K_tr.norm()) / len(train_rows))
            total, _, per_layer = _movement(_trainable(model, owner), params0)
            cols["weight_movement"].append(total)
            for name, v in per_layer.items():
                layers.setdefault(name, []).append(v)
            row = hist.get(step, {})
            for k in ("train_acc", "test_acc", "train_loss", "test_loss"):
                v = row.get(k)
                cols[k].append(nan if v is None else float(v))
    return LazyRichOverTraining(run=str(run.path), steps=tuple(wanted), output_scale=alpha,
                                center_output=cfg.center_output, outputs=outputs, seed=seed,
                                train_rows=tuple(int(r) for r in train_rows),
                                test_rows=tuple(int(r) for r in test_rows),
                                **{k: tuple(v) for k, v in cols.items()},
                                movement_per_layer={k: tuple(v) for k, v in layers.items()})
