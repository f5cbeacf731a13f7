"""A ReLU MLP as a list of affine layers, each followed by a ReLU (all but the last), for counting its
linear regions (``mechgrok.measures.local_complexity``): ``relu_layers(model)`` reads a ``HookedMLP``
with ``act="relu"`` or an ``nn.Sequential`` of ``Linear`` / ``ReLU`` (``Flatten``, ``Identity``,
``Dropout`` pass through) and refuses anything else, saying why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok.models import HookedMLP, HookedTransformer

__all__ = ["relu_layers"]  # _ReluNet, _check_points, _check_frame: for local_complexity

_PLAIN = (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class _ReluNet:
    """A ReLU MLP seen as ``input [n, d_in] -> (pre-activations of each ReLU layer, logits)``."""

    d_in: int
    layers: tuple[str, ...]  # one name per ReLU layer: a hook name or a module path
    widths: tuple[int, ...]
    run: Callable[[Tensor], tuple[list[Tensor], Tensor]]  # x [n, d_in] -> ([n, width_l] per layer, logits [n, d_out])
    dtype: torch.dtype
    device: torch.device


def _leaves(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in seq.named_children():
        path = f"{prefix}{name}"
        if isinstance(m, nn.Sequential):
            out += _leaves(m, path + ".")
        else:
            out.append((path, m))
    return out


def relu_layers(model: nn.Module, owner: str = "local_complexity") -> _ReluNet:
    """The ReLU layers of ``model`` (a ``HookedMLP`` with ``act="relu"`` or an ``nn.Sequential`` of
    ``Linear`` / ``ReLU``); any other model is a ``TypeError`` saying what applies."""
    if isinstance(model, HookedMLP):
        mlp = model.blocks[0].mlp
        act = getattr(model, "mechgrok_spec", {}).get("kwargs", {}).get("act")
        if mlp.act is not torch.relu or act not in (None, "relu"):
            raise TypeError(f"{owner}: this HookedMLP's activation is {act!r}, not 'relu'; local complexity counts the "
                            "sign changes of ReLU pre-activations, which only a piecewise-linear network has. Build the "
                            "model with mg.models.mlp(task, act='relu')")
        hook = mlp.hook_pre

        def run(x: Tensor) -> tuple[list[Tensor], Tensor]:
            seen: list[Tensor] = []
            handle = hook.register_forward_hook(lambda _m, _i, out: seen.append(out))
            try:
                logits = model(x)  # a float input is the one-hot view [n, 2p]
            finally:
                handle.remove()
            return seen, logits

        return _ReluNet(2 * model.p, ("blocks.0.mlp.hook_pre",), (mlp.W_in.shape[1],), run, mlp.W_in.dtype,
                        mlp.W_in.device)
    if isinstance(model, HookedTransformer):
        raise TypeError(f"{owner} applies to ReLU MLPs on a continuous input (HookedMLP with act='relu', or an "
                        "nn.Sequential of Linear/ReLU); a HookedTransformer is not a piecewise-linear function of its "
                        "(discrete) input, so it has no spline partition to count. Train mg.models.mlp(task, "
                        "act='relu') to study local complexity")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{owner}: got a {type(model).__name__}; local complexity needs a ReLU MLP whose forward is "
                        "known: a HookedMLP with act='relu' or an nn.Sequential of Linear/ReLU layers (wrap yours in "
                        "nn.Sequential)")
    leaves = _leaves(model, "")
    for path, m in leaves:
        if not isinstance(m, _PLAIN):
            raise TypeError(f"{owner}: module {path!r} is a {type(m).__name__}; only "
                            f"{[c.__name__ for c in _PLAIN]} keep a network piecewise linear with ReLU hyperplanes")
    linears = [m for _, m in leaves if isinstance(m, nn.Linear)]
    relus = [p for p, m in leaves if isinstance(m, nn.ReLU)]
    if not linears or not relus:
        raise TypeError(f"{owner}: the nn.Sequential has {len(linears)} Linear and {len(relus)} ReLU layers; local "
                        "complexity needs at least one Linear followed by a ReLU")
    names = [p if relus.count(p) == 1 else f"{p}@{relus[:i + 1].count(p)}" for i, p in enumerate(relus)]
    widths, width = [], None
    for _, m in leaves:
        if isinstance(m, nn.Linear):
            width = m.out_features
        elif isinstance(m, nn.ReLU):
            widths.append(width)

    def run(x: Tensor) -> tuple[list[Tensor], Tensor]:
        seen: list[Tensor] = []
        for _, m in leaves:
            if isinstance(m, nn.ReLU):
                seen.append(x)
            x = m(x)
        return seen, x

    w = linears[0].weight
    return _ReluNet(linears[0].in_features, tuple(names), tuple(widths), run, w.dtype, w.device)


def _check_points(points: Any, net: _ReluNet, owner: str) -> Tensor:
    if not isinstance(points, Tensor):
        raise TypeError(f"{owner}: points must be a float tensor [n_points, {net.d_in}], got {type(points).__name__}")
    if not points.is_floating_point():
        raise TypeError(f"{owner}: points must be float inputs [n_points, {net.d_in}] (for a HookedMLP the one-hot "
                        f"view, task.onehot()), got {points.dtype} (token ids?)")
    if points.ndim != 2 or points.shape[1] != net.d_in:
        raise ValueError(f"{owner}: points must be [n_points, {net.d_in}] (the model's input size), got "
                         f"{tuple(points.shape)}" + (" (for a HookedMLP use task.onehot())" if points.ndim == 2 else ""))
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{owner}: points contain NaN or inf")
    return points.detach().to(net.device, net.dtype)


def _check_frame(directions: Any, d_in: int, owner: str) -> Tensor:
    if not isinstance(directions, Tensor) or not directions.is_floating_point() or directions.ndim != 2 \
            or directions.shape[1] != d_in or not 1 <= directions.shape[0] <= d_in:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise ValueError(f"{owner}: directions must be a float tensor [P, {d_in}] of orthonormal rows with "
                         f"1 <= P <= {d_in}, got {shape}")
    gram = directions.double() @ directions.double().T  # [P, P]
    if not torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-5):
        raise ValueError(f"{owner}: the rows of directions are not orthonormal (max |VVᵀ - I| = "
                         f"{float((gram - torch.eye(len(gram), dtype=torch.float64)).abs().max()):.2g}); "
                         "orthonormalise them, e.g. torch.linalg.qr(directions.T).Q.T")
    return directions.detach()
