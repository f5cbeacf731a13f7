"""Chang et al. 2024's two benchmarks of localization methods ("Do Localization Methods Actually
Localize Memorized Data in LLMs? A Tale of Two Benchmarks", NAACL 2024), on a ``SequenceTask``, for
the ``Localization`` that ``localize`` returns:

- **INJ** (ground truth by construction): ``inject`` fine-tunes only chosen neurons on some
  sequences, so those neurons hold them; ``inj_recall`` is the share of them a localization ranks
  in its top ``|injected|``, against ``random_recall`` for a random ranking.
- **DEL** (no ground truth): ``delete`` drops a localization's top neurons (in a copy) and
  ``deletion_curve`` measures whether the target stops being extractable (``extract``) while the
  loss of reference sequences stays where it was.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok import models
from mechgrok._config import check_float, check_int
from mechgrok._threads import torch_threads
from mechgrok.losses import IGNORE, token_nll
from mechgrok.memorization.extraction import extract, sequence_loss
from mechgrok.memorization.localize import Localization, _check_model, _others, _rows, _xy
from mechgrok.neurons import neuron_indices, prune
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["delete", "inject", "inj_recall", "random_recall", "DeletionPoint", "deletion_curve"]


def delete(model: nn.Module, localization: Localization, k: int | float) -> nn.Module:
    """A copy of ``model`` without the ``localization.top(k)`` neurons: ``mg.neurons.prune`` per
    layer zeroes their ``W_in[:, n]``, ``b_in[n]`` (a gated MLP's ``W_gate`` too) and ``W_out[n, :]``,
    so they read 0 at ``hook_post`` and add nothing. The caller's model is untouched (one deep copy
    per layer with dropped neurons)."""
    if not isinstance(localization, Localization):
        raise TypeError(f"delete needs a Localization (from localize), got {type(localization).__name__}")
    _check_model(model, None, "delete")
    shape = (models.n_layers(model), model.cfg.d_mlp)
    if tuple(localization.scores.shape) != shape:
        raise ValueError(f"delete: the localization scores {tuple(localization.scores.shape)} neurons, the model has "
                         f"{shape} (n_layers, d_mlp); localize this model first")
    by_layer: dict[int, list[int]] = {}
    for l, n in localization.top(k):
        by_layer.setdefault(l, []).append(n)
    for l, idx in sorted(by_layer.items()):
        model = prune(model, idx, layer=l)
    return model


def _neurons(model: nn.Module | None, neurons: Any, owner: str) -> list[tuple[int, int]]:
    """``neurons`` as distinct ``(layer, neuron)`` pairs (of ``model``'s MLPs when given), or a clear error."""
    if isinstance(neurons, (str, bytes)) or not hasattr(neurons, "__len__") or len(neurons) == 0:
        raise ValueError(f"{owner}: neurons must be a non-empty list of (layer, neuron) pairs, got {neurons!r}")
    if bad := [p for p in neurons if not (isinstance(p, (tuple, list)) and len(p) == 2)]:
        raise TypeError(f"{owner}: each neuron is a (layer, neuron) pair, got {bad[0]!r}")
    pairs = [(check_int(l, "layer", low=0, owner=owner), check_int(n, "neuron", low=0, owner=owner))
             for l, n in neurons]
    if len(set(pairs)) < len(pairs):
        raise ValueError(f"{owner}: neurons lists a (layer, neuron) pair more than once; pass each once")
    for l in sorted({l for l, _ in pairs}) if model is not None else ():
        neuron_indices(model, [n for m, n in pairs if m == l], layer=l)  # a clear error if out of range
    return pairs


def inject(model: nn.Module, task: SequenceTask, rows: str | Tensor, neurons: Sequence[tuple[int, int]], *,
           keep: str | Tensor | None = None, steps: int = 300, lr: float = 1e-2, batch_size: int | None = None,
           seed: int = 0, threads: int | None = 1) -> nn.Module:
    """INJ (Chang et al. 2024): a copy of ``model`` fine-tuned on the sequences ``rows`` (group or
    row indices) through ``neurons`` (``(layer, n)`` pairs) only; the caller's model is untouched.

    Plain Adam (``lr``, ``steps``, no weight decay) on the mean target-token NLL (``token_nll``) of
    ``rows``, plus that of ``keep`` when given (sequences whose predictions the injected neurons
    must leave alone, so that they fire on ``rows`` only). Only ``W_in[:, n]``, ``b_in[n]`` and
    ``W_out[n, :]`` of the chosen neurons get gradients (masked each step), so every other entry stays
    bitwise equal. ``batch_size`` None: all rows each step; else a random batch per step (``seed``).
    Chang et al. tune ``W_out`` only and keep nothing; here the input weights learn too.
    """
    owner = "memorization.inject"
    _check_model(model, task, owner)
    pairs = _neurons(model, neurons, owner)
    rows = _rows(task, rows, "rows", owner)
    keep = None if keep is None else _rows(task, keep, "keep", owner)
    if keep is not None and (both := sorted(set(keep.tolist()) & set(rows.tolist()))):
        raise ValueError(f"{owner}: rows {both[:10]} are in both rows and keep; a sequence is either injected or kept")
    steps = check_int(steps, "steps", low=0, owner=owner)
    lr = check_float(lr, "lr", low=0.0, low_open=True, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    batch_size = None if batch_size is None else check_int(batch_size, "batch_size", low=1, owner=owner)
    out = copy.deepcopy(model)
    masks: dict[Tensor, Tensor] = {}  # parameter -> 1 on the entries that learn
    for l in sorted({l for l, _ in pairs}):
        mlp = out.blocks[l].mlp
        idx = torch.tensor([n for m, n in pairs if m == l], device=mlp.W_out.device)
        for name, dim in (("W_in", 1), ("b_in", 0), ("W_out", 0)):
            masks[getattr(mlp, name)] = torch.zeros_like(getattr(mlp, name)).index_fill_(dim, idx, 1.0)
    params, g = list(masks), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    was_training = out.training
    out.eval()
    try:
        with torch_threads(threads), torch.enable_grad():
            for _ in range(steps):
                loss = 0.0
                for part in (rows,) if keep is None else (rows, keep):
                    b = part if batch_size is None else part[torch.randperm(len(part), generator=g)[:batch_size]]
                    x, y = _xy(out, task, b)
                    loss = loss + token_nll(out(x), y).sum() / (y != IGNORE).sum()  # mean over target tokens
                for p, grad in zip(params, torch.autograd.grad(loss, params)):  # no other .grad is touched
                    p.grad = grad * masks[p]
                opt.step()
    finally:
        out.train(was_training)
        for p in params:
            p.grad = None
    return out


def inj_recall(localization: Localization, injected_neurons: Sequence[tuple[int, int]]) -> float:
    """INJ recall (Chang et al. 2024): ``|top(|injected|) ∩ injected| / |injected|``."""
    pairs = _neurons(None, injected_neurons, "inj_recall")
    return len(set(localization.top(len(pairs))) & set(pairs)) / len(pairs)


def random_recall(n_injected: int, n_neurons: int) -> float:
    """The expected INJ recall of a random ranking: ``n_injected / n_neurons``."""
    n_neurons = check_int(n_neurons, "n_neurons", low=1, owner="random_recall")
    return check_int(n_injected, "n_injected", low=1, high=n_neurons, owner="random_recall") / n_neurons


@dataclass(frozen=True)
class DeletionPoint:
    """One point of a DEL curve (``deletion_curve``).

    Attributes:
        fraction: share of all neurons asked for; ``n_dropped = max(1, round(fraction * n_neurons))``.
        n_dropped: neurons dropped (the localization's top ones).
        target_extractable: share of target sequences still k-extractable after dropping.
        target_loss: mean ``sequence_loss`` of the target sequences after dropping.
        reference_loss_change: mean ``sequence_loss`` of the reference sequences, after − before.
    """

    fraction: float
    n_dropped: int
    target_extractable: float
    target_loss: float
    reference_loss_change: float

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "n_dropped": self.n_dropped, "target_extractable": self.target_extractable,
                "target_loss": self.target_loss, "reference_loss_change": self.reference_loss_change}


def deletion_curve(model: nn.Module, task: SequenceTask, localization: Localization,
                   fractions: Sequence[float] = (0.001, 0.005, 0.01), *, k: int, target: str | Tensor | None = None,
                   reference: str | Tensor | None = None, batch_size: int = 256,
                   threads: int | None = 1) -> list[DeletionPoint]:
    """DEL (Chang et al. 2024): for each fraction, drop the localization's top neurons (``delete``)
    and measure the target's extractability from ``k``-token prefixes (``extract``) and its loss,
    and the change of the reference loss. ``target`` defaults to ``localization.target_rows``,
    ``reference`` to the ``"train"`` rows not in the target. The caller's model is untouched."""
    owner = "memorization.deletion_curve"
    _check_model(model, task, owner)
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions:
        raise TypeError(f"{owner}: fractions must be a non-empty list of floats in (0, 1], got {fractions!r}")
    fractions = [check_float(f, "fractions[]", low=0.0, high=1.0, low_open=True, owner=owner) for f in fractions]
    k = check_int(k, "k", low=1, high=task.n_ctx - 1, owner=f"{owner} (prefix length, BOS included)")
    t_rows = _rows(task, localization.target_rows if target is None else target, "target", owner)
    r_rows = _rows(task, _others(task, t_rows) if reference is None else reference, "reference", owner)
    t_name, r_name = "_del_target", "_del_reference"
    while t_name in task.groups or r_name in task.groups:
        t_name, r_name = t_name + "_", r_name + "_"
    masks = [torch.zeros(task.n, dtype=torch.bool).index_fill_(0, r, True) for r in (t_rows, r_rows)]
    tk = task.with_groups(**{t_name: masks[0], r_name: masks[1]})  # extract and sequence_loss read groups

    def loss(m: nn.Module, name: str) -> float:
        return float(sequence_loss(m, tk, name, batch_size=batch_size, threads=threads).mean())

    before, points = loss(model, r_name), []
    for f in fractions:
        cut = delete(model, localization, f)
        rate = extract(cut, tk, k, t_name, batch_size=batch_size, threads=threads).rate
        points.append(DeletionPoint(f, max(1, round(f * localization.n_neurons)), rate, loss(cut, t_name),
                                    loss(cut, r_name) - before))
    return points
