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

from mechgrok._config import check_int
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
    if name not in task.task_names:
        raise ValueError(f"unknown task {name!r}; this task has {task.task_names}")
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
    if not isinstance(circuits, dict) or not circuits:
        raise ValueError(f"circuits must be a non-empty dict sub-task name -> Circuit, got {circuits!r:.100}")
    if bad := [k for k, c in circuits.items() if not isinstance(c, Circuit)]:
        raise TypeError(f"circuits must map sub-task names to Circuits; {bad[:3]} do not")
    if unknown := [k for k in circuits if k not in task.task_names]:
        raise ValueError(f"unknown tasks {unknown}: circuits are keyed by sub-task name, and this task has "
                         f"{task.task_names}")
    n_random = check_int(n_random, "n_random", low=1, owner="cross_faithfulness (random circuits per pair)")
    names = list(circuits)
    levels = {c.level for c in circuits.values()}
    if len(levels) != 1:
        raise ValueError(f"circuits must share one level, got {sorted(levels)}")
    g = build_graph(model, levels.pop())
    if other := [k for k, c in circuits.items() if tuple(c.graph_nodes) != tuple(g.nodes)]:
        raise ValueError(f"circuits {other} were found on another graph than this model's; evaluate circuits on "
                         "the model they came from")
    comps = list(g.components)
    rng = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
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
    from mechgrok.run import MEMORIZED_ACC, first_step

    if top_k is not None:
        top_k = check_int(top_k, "top_k", low=1, owner="overlap_over_training")
    data = run.task()
    if task is not None and task not in data.task_names:
        raise ValueError(f"unknown task {task!r}; this run's task has {data.task_names}")
    available = run.steps()
    if steps is not None:
        asked = {check_int(s, "steps", low=0, owner="overlap_over_training (checkpoint steps)") for s in steps}
        if missing := sorted(asked - set(available)):
            raise ValueError(f"no checkpoints at steps {missing[:5]}; this run has {available[:5]}..."
                             f"{available[-3:]}")
    steps = available if steps is None else sorted(asked)
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
