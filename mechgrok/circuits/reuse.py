"""Circuit reuse across tasks: does task A's circuit also do task B?

``cross_faithfulness`` evaluates every task's circuit on every task's data, ``F_B(C_A)``, beside
``F_B(C_B)`` and random circuits of the same size (Merullo et al. 2023, "Circuit component reuse
across tasks in transformer language models", who report about 78% of in-circuit heads shared
between IOI and Colored Objects).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechgrok._threads import torch_threads
from mechgrok.circuits import metrics as _metrics
from mechgrok.circuits.circuit import Circuit
from mechgrok.circuits.circuit import faithfulness as _faithfulness
from mechgrok.circuits.discover import circuit_metric, contrast
from mechgrok.circuits.graph import graph as build_graph
from mechgrok.circuits.patching import Patcher
from mechgrok.tasks import Task

__all__ = ["cross_faithfulness", "overlap_over_training", "split_for"]


def split_for(task: Task, name: str, split: str = "test") -> str:
    """``split``, or "train" when sub-task ``name`` has no ``split`` examples (e.g. the atomic facts
    of a knowledge task, which are all training data)."""
    i = task.task_names.index(name)
    return split if bool((task.mask(split) & (task.task_ids == i)).any()) else "train"


def cross_faithfulness(model: nn.Module, circuits: dict[str, Circuit], task: Task, *, n: int = 256, seed: int = 0,
                       n_random: int = 20, split: str = "test", corruption: str = "resample",
                       threads: int | None = 1) -> dict[str, Any]:
    """``F_B(C_A)`` for every ordered pair of sub-tasks, with random-circuit baselines.

    Args:
        circuits: sub-task name -> its circuit (all at one level, of this model).
        task: the multi-task data; sub-task B is evaluated on its ``split`` examples (its training
            examples when it has none) with the generalization metric (correct logit minus mean
            logit) and resample ablation.
        n_random: random circuits per (size, task): uniformly drawn components of the graph, as
            many as ``C_A`` has.

    Returns:
        ``{"names", "faithfulness": F[A][B] = F_B(C_A), "random_mean": [A][B], "random_std": [A][B],
        "sizes": {A: |C_A|}}``; the diagonal is each circuit on its own task.
    """
    names = list(circuits)
    levels = {c.level for c in circuits.values()}
    if len(levels) != 1:
        raise ValueError(f"circuits must share one level, got {sorted(levels)}")
    g = build_graph(model, levels.pop())
    comps = list(g.components)
    rng = torch.Generator().manual_seed(seed)
    F = {a: {} for a in names}
    R_mean = {a: {} for a in names}
    R_std = {a: {} for a in names}
    with torch_threads(threads):
        for b in names:
            x, xc, y, _ = contrast(task, split_for(task, b, split), n, seed, task_name=b)
            metric = _metrics.generalization(y)
            p = Patcher(model, g, x, xc, corruption)
            with torch.no_grad():
                full = float(metric(p.run()[0]))
            empty = circuit_metric(p, metric, None)

            def faith(c: Circuit) -> float:
                return _faithfulness(circuit_metric(p, metric, c), empty, full)

            for a in names:
                circ = circuits[a]
                F[a][b] = faith(circ)
                draws = []
                for _ in range(n_random):
                    pick = torch.randperm(len(comps), generator=rng)[: len(circ)]
                    draws.append(faith(Circuit.from_graph(g, [comps[i] for i in pick], circ.scores)))
                t = torch.tensor(draws, dtype=torch.float64)
                R_mean[a][b], R_std[a][b] = float(t.mean()), float(t.std()) if len(t) > 1 else 0.0
    return {"names": names, "faithfulness": [[F[a][b] for b in names] for a in names],
            "random_mean": [[R_mean[a][b] for b in names] for a in names],
            "random_std": [[R_std[a][b] for b in names] for a in names],
            "sizes": {a: len(circuits[a]) for a in names}, "n_random": n_random, "split": split}


def overlap_over_training(run, task: str | None = None, *, method: str = "eap-ig", level: str = "neuron",
                          top_k: int | None = None, steps=None, n: int = 256, seed: int = 0,
                          progress: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """The circuit of one (sub-)task on every checkpoint, and how it overlaps the final circuit and
    the memorization-phase circuit (the first checkpoint at or after training accuracy 100%).

    Every circuit is the top-``top_k`` components by |score| (default: a fifth of the graph), so
    sizes are equal and overlaps comparable across checkpoints. Resample ablation, generalization
    metric on the sub-task's held-out examples.

    Returns:
        ``{"steps", "components" (per step), "faithfulness", "jaccard_final", "jaccard_memorization",
        "memorization_step", "random_jaccard" (expected Jaccard of two random top-k sets)}``.
    """
    from mechgrok.circuits.discover import discover
    from mechgrok.circuits.overlap import expected_jaccard, jaccard
    from mechgrok.report.sections import MEMORIZED_ACC, first_step

    data = run.task()
    available = run.steps()
    steps = available if steps is None else sorted(set(int(s) for s in steps) & set(available))
    if not steps:
        raise ValueError(f"no checkpoints to analyse in {run.path}")
    mem_seen = first_step(run.history(), "train_acc", MEMORIZED_ACC)
    mem_step = next((s for s in available if mem_seen is not None and s >= mem_seen), None)
    if mem_step is not None and mem_step not in steps:
        steps = sorted({*steps, mem_step})
    x, xc, y, _ = contrast(data, split_for(data, task) if task is not None else "test", n, seed, task_name=task)
    metric = _metrics.generalization(y)
    comps, faith = {}, {}
    with torch_threads(threads):
        for s in steps:
            model = run.load_model(s)
            k = top_k or max(1, len(build_graph(model, level).components) // 5)
            c = discover(model, x, xc, metric, method=method, level=level, top_k=k, progress=False)
            comps[s], faith[s] = list(c.components), c.provenance["faithfulness"]
    final = set(comps[steps[-1]])
    n_comp = len(build_graph(run.load_model(steps[-1]), level).components)
    return {"steps": steps, "components": [comps[s] for s in steps], "faithfulness": [faith[s] for s in steps],
            "jaccard_final": [jaccard(set(comps[s]), final) for s in steps],
            "jaccard_memorization": ([jaccard(set(comps[s]), set(comps[mem_step])) for s in steps]
                                     if mem_step is not None else None),
            "memorization_step": mem_step, "top_k": k, "method": method, "level": level, "task": task,
            "random_jaccard": expected_jaccard(k, k, n_comp)}
