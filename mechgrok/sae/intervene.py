"""Interventions through an SAE at its hook: splice in the reconstruction, ablate or scale features.

Each function returns an edited *copy* of the model (``mechgrok.capture.edit_output``) that
rewrites the SAE's site (``sae.cfg.metadata.hook_name``): a permanent transformer-lens hook on a
``HookedRootModule``'s hook point, or a forward hook replacing the output of any other module path
(a Hugging Face ``transformer.h.0``). It edits the saved position of a ``[N, pos, d]`` hook, or
every position of an SAE trained with ``position="all"``. The copy goes straight into
``mechgrok.evaluate`` and every other analysis; the original is untouched. The SAE may sit on
another device than the model: activations go to it and come back.

- ``splice``: the activation x is replaced by the SAE's reconstruction x̂ = decode(encode(x)).
- ``ablate(features, scale)``: x → x + (scale − 1) Σ_{f ∈ features} a_f(x) W_dec[f]. Only the chosen
  features' contributions change; the reconstruction error and every other feature are kept, so
  an empty feature list leaves the model exactly as it was (scale 0: ablation; 2: doubling).
- ``mean_ablate``: x → the mean of x over given activations (the baseline of "loss recovered").

``ablation_study`` compares ablating named feature groups with ablating the same number of random
live features (several seeds), per split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok.capture import edit_output
from mechgrok.sae.train import ALL, encode, reconstruct, site
from mechgrok.tasks import Task
from mechgrok.train import evaluate as evaluate_model

__all__ = ["splice", "ablate", "mean_ablate", "ablation_study", "edit"]


def edit(model: nn.Module, sae, replace: Callable[[Tensor], Tensor]) -> nn.Module:
    """A copy of ``model`` whose activation at the SAE's site, ``[rows, d]``, is ``replace(x)``.

    ``rows`` is the batch for one position (or a position-free ``[batch, d]`` hook) and
    ``batch * pos`` (row ``b * pos + t``) for an SAE of every position.
    """
    hook, position = site(sae)

    def fn(act: Tensor) -> Tensor:  # [batch, d] or [batch, pos, d]
        if act.ndim == 2:
            return replace(act)
        if position is None or act.ndim != 3:
            raise ValueError(f"{hook!r} gives {tuple(act.shape)} but the SAE reads [batch, d] (no position); "
                             "retrain it with a position (e.g. position=-1 or 'all')")
        if position == ALL:
            return replace(act.reshape(-1, act.shape[-1])).reshape(act.shape)  # [batch * pos, d] -> back
        act = act.clone()
        act[:, position] = replace(act[:, position])
        return act

    try:
        return edit_output(model, hook, fn)
    except ValueError as e:
        raise ValueError(f"the SAE reads {hook!r}, which this model does not have ({e})") from None


def splice(model: nn.Module, sae) -> nn.Module:
    """A copy of ``model`` that runs on the SAE's reconstruction x̂ = decode(encode(x)) at its site
    (at every position of an SAE trained on all positions)."""
    return edit(model, sae, lambda x: reconstruct(sae, x))


def _indices(features: Sequence[int] | Tensor, d_sae: int) -> Tensor:
    if isinstance(features, (int, float, str, bytes)):
        raise TypeError(f"features must be a list of feature indices, e.g. [{features!r}], got {type(features).__name__}")
    arr = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else list(features)).reshape(-1)
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"feature indices must be integers, got dtype {arr.dtype} (e.g. {arr[:3].tolist()}); for a "
                        "boolean mask m pass m.nonzero().flatten()")
    idx = torch.as_tensor(arr.astype(np.int64))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_sae):
        raise ValueError(f"feature indices must be in [0, {d_sae}); got {idx.tolist()[:10]}")
    return idx.unique()


def ablate(model: nn.Module, sae, features: Sequence[int] | Tensor, scale: float = 0.0) -> nn.Module:
    """A copy of ``model`` with the contribution of ``features`` multiplied by ``scale`` (0: removed)."""
    idx = _indices(features, sae.cfg.d_sae)
    scale = check_float(scale, "scale", owner="ablate (0 removes the features, 1 changes nothing)")
    W = sae.W_dec.detach()[idx.to(sae.W_dec.device)]  # [n_features, d]

    def replace(x: Tensor) -> Tensor:  # [rows, d]
        if not idx.numel():
            return x
        a = encode(sae, x)[:, idx.to(x.device)]  # [rows, n_features]
        return x + ((scale - 1.0) * a @ W.to(x.device, a.dtype)).to(x.dtype)

    return edit(model, sae, replace)


def mean_ablate(model: nn.Module, sae, acts: Tensor) -> nn.Module:
    """A copy of ``model`` whose activation at the SAE's site is the mean of ``acts`` ``[rows, d]``
    (``[N, pos, d]`` is averaged over examples and positions alike: one mean vector for every
    position of an all-positions SAE)."""
    mean = acts.reshape(-1, acts.shape[-1]).mean(0)  # [d]
    return edit(model, sae, lambda x: mean.to(x.device, x.dtype).expand_as(x).clone())


def _accuracies(result: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {split: m["acc"] for split, m in result.items()}


def ablation_study(model: nn.Module, sae, task: Task, groups: Mapping[str, Sequence[int] | Tensor], *,
                   alive: Sequence[int] | Tensor | None = None, n_random: int = 5, seed: int = 0,
                   loss: str = "cross_entropy") -> dict[str, Any]:
    """Accuracy and loss per split after ablating each feature group, beside the same number of
    random features.

    Args:
        groups: name -> feature indices (e.g. ``{"memorizing": stats.memorizing}``).
        alive: the features random ones are drawn from (default: all); pass the features that fire
            on the task, so a random draw is not mostly dead features that change nothing.
        n_random: random draws per group (seeds ``seed``, ``seed + 1``, ...).

    Returns:
        ``{"none": evaluate(model), "spliced": evaluate(splice(model, sae)), "groups": {name:
        {"n": size, "ablated": evaluate(...), "random": {"acc_mean": {split: ...}, "acc_std": ...,
        "draws": [accuracies per draw]}}}}``; splits without
        examples are left out of the random means.
    """
    n_random = check_int(n_random, "n_random", low=0, owner="ablation_study")
    seed = check_int(seed, "seed", low=0, owner="ablation_study")
    pool = _indices(range(sae.cfg.d_sae) if alive is None else alive, sae.cfg.d_sae)
    out: dict[str, Any] = {"none": evaluate_model(model, task, loss), "spliced": evaluate_model(splice(model, sae), task, loss),
                           "n_random": n_random, "pool": int(pool.numel()), "groups": {}}
    for name, feats in groups.items():
        idx = _indices(feats, sae.cfg.d_sae)
        draws = []
        for r in range(n_random if idx.numel() else 0):
            g = torch.Generator().manual_seed(seed + r)
            pick = pool[torch.randperm(len(pool), generator=g)[: min(len(idx), len(pool))]]
            draws.append(_accuracies(evaluate_model(ablate(model, sae, pick), task, loss)))
        splits = [s for s in (draws[0] if draws else {}) if all(np.isfinite(d[s]) for d in draws)]
        out["groups"][name] = {
            "n": int(idx.numel()), "features": idx.tolist(),
            "ablated": evaluate_model(ablate(model, sae, idx), task, loss),
            "random": {"acc_mean": {s: float(np.mean([d[s] for d in draws])) for s in splits},
                       "acc_std": {s: float(np.std([d[s] for d in draws])) for s in splits},
                       "draws": draws}}
    return out
