"""Which SAE features each task uses, and how many of them tasks share (circuit reuse at the level of
features rather than neurons).

For sub-task t of a multi-task dataset (e.g. add, sub and mul with an op token) and its
generalization metric m_t (correct-answer logit minus the mean logit, averaged over t's held-out
examples x_1..x_n), the attribution of feature f is

    attr_t(f) = (1/n) Σ_i (a_f(x_i) − ā_f) · (W_dec[f] · ∇_x m_t(x_i)),   ā_f = (1/n) Σ_i a_f(x_i),

the first-order (attribution-patching) effect of replacing f's contribution by its mean over those
examples, with the SAE's error term kept (Marks et al. 2024, "Sparse feature circuits", use the
same linearisation for feature circuits). It is exact where the site reaches the logits linearly,
as the MLP neurons of the last layer do in mechgrok's models (no LayerNorm after them); a test checks
it against the ablation itself. For an SAE of every position the sum also runs over positions, with
ā_f the mean at each position: the first-order effect of mean-ablating f at every position.

t's features: the smallest top-|attr| set whose attributions sum to ``target`` of the total. At a
linear site that total is m(model) − m(every feature mean-ablated), so the set is exactly the
smallest top-|attr| set whose mean-ablation faithfulness (DESIGN's F) reaches ``target``.
``feature_overlap`` compares the sets and the attributions of every pair of sub-tasks with
``circuits.score_overlap``: set statistics against random sets of the same sizes (hypergeometric),
weighted Jaccard and Spearman against permuted attributions.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok.circuits.overlap import score_overlap
from mechgrok.circuits.reuse import split_for
from mechgrok.sae.features import _site_gradient
from mechgrok.sae.intervene import _indices, ablate
from mechgrok.sae.train import activations, encode, site
from mechgrok.tasks import Task
from mechgrok.train import evaluate

__all__ = ["task_attribution", "select_features", "feature_overlap", "cross_ablation"]


def _examples(task: Task, task_name: str | None, split: str) -> Tensor:
    """Indices of ``split``'s examples of sub-task ``task_name`` (all sub-tasks when None)."""
    mask = task.mask(split)
    if task_name is not None:
        if task_name not in task.task_names:
            raise ValueError(f"unknown task {task_name!r}; this task has {list(task.task_names)}")
        mask = mask & (task.task_ids == task.task_names.index(task_name))
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        raise ValueError(f"sub-task {task_name!r} has no {split!r} examples; pass split='train' or 'all'")
    return idx


def task_attribution(model: nn.Module, sae, task: Task, task_name: str | None = None, *,
                     split: str = "test") -> Float[Tensor, " d_sae"]:
    """``attr_t(f)`` for every feature (module docstring), float64 ``[d_sae]``, in logits.

    Args:
        task_name: the sub-task whose examples and metric are used (None: every example).
        split: whose examples (default the held-out ones).
    """
    hook, position = site(sae)
    idx = _examples(task, task_name, split)
    y = task.labels[idx]

    def metric(logits: Tensor) -> Tensor:  # Σ_i m(x_i), in float64
        logits = logits.double()
        return (logits.gather(1, y[:, None].to(logits.device)).squeeze(1) - logits.mean(1)).sum()

    x, g = _site_gradient(model, task.inputs[idx], hook, position, metric)  # [n, (pos,) d_in] each
    with torch.no_grad():
        a = encode(sae, x.reshape(-1, x.shape[-1]).float()).reshape(*x.shape[:-1], -1).double()  # [n, (pos,) d_sae]
        push = g.double() @ sae.W_dec.detach().to(g.device).double().T  # [n, (pos,) d_sae]: W_dec[f] · ∇_x m(x_i)
        contrib = (a - a.mean(0)) * push
        return (contrib.sum(1) if contrib.ndim == 3 else contrib).mean(0).cpu()


def select_features(scores: Float[Tensor, " d_sae"], target: float = 0.8) -> tuple[Int[Tensor, " k"], float]:
    """The smallest top-|score| set of features whose scores sum to ``target`` of the total, and
    the share it reaches (at a linear site: its mean-ablation faithfulness).

    Returns ``(indices by decreasing |score|, share)``; when the total is not positive (the
    features do not raise the metric: nothing to explain) every feature, and share 1.0."""
    target = check_float(target, "target", low=0.0, high=1.0, low_open=True, owner="select_features (share of the total)")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    total = float(scores.sum())
    order = torch.sort(-scores.abs(), stable=True).indices
    if total <= 0:
        return order, 1.0
    share = scores[order].cumsum(0) / total  # [d_sae]
    reached = torch.nonzero(share >= target - 1e-12).flatten()
    k = int(reached[0]) + 1 if reached.numel() else scores.numel()
    return order[:k], float(share[k - 1])


def feature_overlap(model: nn.Module, sae, task: Task, *, target: float = 0.8, split: str = "test",
                    baseline: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each sub-task's features and every pair's overlap (module docstring).

    A sub-task without ``split`` examples (the atomic facts of a knowledge task) uses its training
    examples (``splits`` records which).

    Returns:
        ``{"names", "target", "split", "splits", "scores": {name: [d_sae]}, "features": {name: [indices]},
        "share": {name: share reached}, "pairs": {"a|b": score_overlap(...)}}`` (JSON-ready).
    """
    names = list(task.task_names)
    if len(names) < 2:
        raise ValueError(f"feature_overlap compares the sub-tasks of a multi-task dataset; {task.name!r} has one")
    splits = {n: split_for(task, n, split) for n in names}  # "train" for a sub-task without `split` examples
    scores = {n: task_attribution(model, sae, task, n, split=splits[n]) for n in names}
    chosen = {n: select_features(s, target) for n, s in scores.items()}
    pairs = {f"{a}|{b}": score_overlap(scores[a], scores[b], chosen[a][0], chosen[b][0], baseline=baseline, seed=seed)
             for i, a in enumerate(names) for b in names[i + 1:]}
    return {"names": names, "target": target, "split": split, "splits": splits,
            "scores": {n: s.tolist() for n, s in scores.items()},
            "features": {n: c[0].tolist() for n, c in chosen.items()},
            "share": {n: c[1] for n, c in chosen.items()}, "pairs": pairs}


def cross_ablation(model: nn.Module, sae, task: Task, features: dict[str, Any], *, split: str = "test",
                   n_random: int = 5, seed: int = 0) -> dict[str, Any]:
    """Accuracy of every sub-task after ablating each sub-task's features (their decoder
    contributions removed, the error term kept), beside as many random live features.

    Args:
        features: ``{name: feature indices}``, e.g. ``feature_overlap(...)["features"]``.
        n_random: random draws per set, from the features that fire on some example.

    Returns:
        ``{"names" (sub-tasks), "sets" (the ablated sets' names), "original": {task: acc},
        "ablated": {set: {task: acc}}, "random_mean" / "random_std": {set: {task: acc}}, "n": {set: size},
        "split"}``.
    """
    n_random = check_int(n_random, "n_random", low=1, owner="cross_ablation")
    seed = check_int(seed, "seed", low=0, owner="cross_ablation")
    features = {name: _indices(idx, sae.cfg.d_sae) for name, idx in features.items()}
    hook, position = site(sae)
    with torch.no_grad():
        alive = (encode(sae, activations(model, task, hook, position)) > 0).any(0).nonzero().flatten()

    def accuracy(m: nn.Module) -> dict[str, float]:
        by = evaluate(m, task, by_task=True)
        return {name: by[name][split]["acc"] for name in task.task_names}

    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"names": list(task.task_names), "sets": list(features), "split": split,
                           "original": accuracy(model), "ablated": {}, "random_mean": {}, "random_std": {}, "n": {}}
    for name, idx in features.items():
        out["n"][name] = int(idx.numel())
        out["ablated"][name] = accuracy(ablate(model, sae, idx))
        draws = [accuracy(ablate(model, sae, alive[torch.randperm(alive.numel(), generator=g)[: idx.numel()]]))
                 for _ in range(n_random)]
        stack = torch.tensor([[d[t] for t in task.task_names] for d in draws], dtype=torch.float64)
        out["random_mean"][name] = dict(zip(task.task_names, stack.mean(0).tolist()))
        out["random_std"][name] = dict(zip(task.task_names, (stack.std(0) if n_random > 1 else 0 * stack[0]).tolist()))
    return out
