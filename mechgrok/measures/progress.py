"""Every progress measure on every checkpoint of a run.

Nanda et al. 2023 ("Progress measures for grokking via mechanistic interpretability") show that
grokking splits into memorization, circuit formation and cleanup, visible in measures computed
over training: restricted loss (falls before test loss), excluded loss (rises during circuit
formation), Gini of the Fourier norms (rises at cleanup) and the weight norm (falls throughout).
Prieto et al. 2025 ("Grokking at the edge of numerical stability") add softmax collapse (in float32
and in float64) and the alignment of the gradient with naïve loss minimization
(``mechgrok.measures.stability``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mechgrok._threads import torch_threads
from mechgrok.losses import loss_fn, softmax_collapse
from mechgrok.measures.grid import TaskGrid, grid_forward, task_grid
from mechgrok.measures.keyfreq import (
    NEURON_THRESHOLD,
    KeyFrequencies,
    embedding_frequency_norms,
    frequency_fractions,
    key_frequencies_from,
    neuron_ipr,
)
from mechgrok.measures.restricted import PROJECTABLE_OPS, excluded_loss_from_logits, restricted_loss_from_logits
from mechgrok.measures.sparsity import gini, unembedding_frequency_norms, weight_norm
from mechgrok.measures.stability import nlm_alignment_on
from mechgrok.models import mlp_hook
from mechgrok.run import Run

__all__ = ["progress", "PROGRESS_COLUMNS", "PROGRESS_FORMAT"]

PROGRESS_FORMAT = "mechgrok.progress/1"
PROGRESS_COLUMNS = ("step", "train_loss", "test_loss", "train_acc", "test_acc", "restricted_loss", "excluded_loss",
                    "gini_embedding", "gini_unembedding", "weight_norm", "softmax_collapse",
                    "softmax_collapse_float64", "nlm_alignment", "mean_neuron_ipr", "frac_neurons_explained",
                    "key_embedding_share")


def _json_float(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


@torch.no_grad()
def _measure(model: torch.nn.Module, task, grid: TaskGrid, freqs: Sequence[int] | None, fn, hook: str
             ) -> dict[str, Any]:
    """All measures of one checkpoint (one row of the table): ONE forward pass over the grid, plus one
    forward and backward pass over the task's training split for ``nlm_alignment``."""
    logits, acts = grid_forward(model, grid, [hook])  # [p, p, d_out], {hook: [p, p, d_mlp]}
    flat = logits.reshape(grid.p * grid.p, -1)[grid.cells]  # [M, d_out], the operation's examples
    row: dict[str, Any] = {}
    for split, mask, labels in (("train", grid.train, grid.labels), ("test", ~grid.train, grid.true_labels)):
        if bool(mask.any()):
            lg = flat[mask]
            row[f"{split}_loss"] = float(fn(lg, labels[mask]))
            row[f"{split}_acc"] = float((lg.argmax(-1) == labels[mask]).double().mean())
        else:
            row[f"{split}_loss"] = row[f"{split}_acc"] = float("nan")
    projectable = grid.op in PROJECTABLE_OPS and freqs is not None
    row["restricted_loss"] = restricted_loss_from_logits(logits, grid, freqs) if projectable else None
    row["excluded_loss"] = excluded_loss_from_logits(logits, grid, freqs) if projectable else None
    power = embedding_frequency_norms(model, task, grid.index)[1:]  # [p//2], constant dropped
    row["gini_embedding"] = gini(power.sqrt())  # = fourier_gini(model, task)["embedding"]
    row["gini_unembedding"] = gini(unembedding_frequency_norms(model, task, grid.index)[1:].sqrt())
    row["weight_norm"] = weight_norm(model)
    row["softmax_collapse"] = softmax_collapse(flat[grid.train], grid.labels[grid.train])
    row["softmax_collapse_float64"] = softmax_collapse(flat[grid.train], grid.labels[grid.train], torch.float64)
    # the gradient of the run's own training loss over its whole training split (every operation of a
    # multi-task run: the full-batch step the optimizer takes), not only this grid's operation
    row["nlm_alignment"] = (nlm_alignment_on(model, task.inputs[task.train], task.labels[task.train], fn)
                            if bool(task.train.any()) else float("nan"))
    neurons = frequency_fractions(acts[hook])
    row["mean_neuron_ipr"] = float(neuron_ipr(acts[hook]).mean())
    row["frac_neurons_explained"] = float((neurons.fraction >= NEURON_THRESHOLD).double().mean())
    row["key_embedding_share"] = (float(power[[k - 1 for k in freqs]].sum() / power.sum())
                                  if freqs is not None else None)
    return row


def progress(run: Run | str, steps: Iterable[int] | None = None, freqs: Iterable[int] | None = None,
             progress: bool = True, *, key_source: str = "neurons", task_name: str | int | None = None,
             layer: int = 0, threads: int | None = 1) -> dict[str, Any]:
    """Evaluate the progress measures on every checkpoint of ``run`` (or on ``steps``).

    Args:
        run: a ``Run`` or its folder.
        steps: checkpoint steps to evaluate (default: all, ascending).
        freqs: key frequencies for restricted/excluded loss. Default: those of the run's FINAL
            checkpoint (as Nanda et al. 2023 do), chosen by ``key_frequencies_from`` with
            ``key_source`` ("neurons" or "embedding") and its default rule.
        progress: show a tqdm bar over checkpoints.
        task_name: the operation of a multi-task run to analyse (its grid); required for those.
        layer: the MLP layer whose neurons are analysed.
        threads: torch threads while measuring (restored afterwards; ``None`` leaves them as they
            are). 1 is fastest for these small models: on a shared, busy 2-core machine two
            threads ran up to 8x slower.

    Returns:
        A JSON-friendly dict: one list per column of ``PROGRESS_COLUMNS`` (one entry per step;
        NaN/inf become ``None``), ``"key_frequencies"`` (``KeyFrequencies.to_dict()`` plus the
        ``"step"`` they were read at, or the given ``freqs``) and ``"meta"`` (run, task, op, p,
        loss, loss_dtype, notes). ``train_loss``/``test_loss`` use the run's training loss in its
        ``loss_dtype`` (so they match ``history.jsonl``); restricted/excluded loss are cross-entropy,
        and ``None`` for ops other than add/sub. ``softmax_collapse`` is the share of the
        operation's training examples whose float32 softmax gives the label probability exactly 1
        (as in ``history.jsonl``), ``softmax_collapse_float64`` the same in float64 (what zeroes the
        gradient of a float64 loss); ``nlm_alignment`` is ``cos(−∇L, θ)`` of the run's training loss
        over the task's whole training split (``mechgrok.measures.stability``; NaN where the
        gradient is exactly 0). ``gini_*`` are ``fourier_gini``, ``mean_neuron_ipr`` averages
        ``neuron_ipr``, ``frac_neurons_explained`` is the share of neurons explained >= 0.5 by one frequency and
        ``key_embedding_share`` the share of non-constant embedding power in the key frequencies.

    Cost: per checkpoint, one model build and load, one forward pass over the ``p²`` grid, a
    2-D Fourier transform of the neurons, and one forward and backward pass over the training split
    (``nlm_alignment``, about one more grid forward's time; see benchmarks/bench_measures.py and
    benchmarks/repro_numerical_stability.py). The final checkpoint is evaluated once more to find
    the key frequencies when ``freqs`` is not given.
    """
    with torch_threads(threads):
        return _progress(Run(run) if not isinstance(run, Run) else run, steps, freqs, progress, key_source,
                         task_name, layer)


def _progress(run: Run, steps, freqs, show: bool, key_source: str, task_name, layer: int) -> dict[str, Any]:
    task = run.task()
    grid = task_grid(task, task_name)
    steps = run.select_steps(steps, owner="progress")
    if key_source not in ("neurons", "embedding"):
        raise ValueError(f"key_source must be 'neurons' or 'embedding', got {key_source!r}")
    loss_name = run.config["train"].get("loss", "cross_entropy")
    loss_dtype = run.config["train"].get("loss_dtype", "float64")  # absent: a float64 run (TrainConfig.to_dict)
    fn, hook = loss_fn(loss_name, loss_dtype), mlp_hook(layer)
    notes: list[str] = []

    key: dict[str, Any]
    if freqs is not None:
        freqs = sorted(set(int(k) for k in freqs))
        bad = [k for k in freqs if not 1 <= k <= grid.p // 2]
        if bad:
            raise ValueError(f"key frequencies {bad} are outside 1 .. {grid.p // 2} (p = {grid.p})")
        key = {"freqs": freqs, "scores": None, "source": "given", "rule": "passed as freqs=", "p": grid.p, "step": None}
    else:
        final = run.steps()[-1]
        model = run.load_model(final)
        if key_source == "neurons":
            _, acts = grid_forward(model, grid, [hook])
            kf: KeyFrequencies = key_frequencies_from(p=grid.p, neurons=frequency_fractions(acts[hook]))
        else:
            kf = key_frequencies_from(p=grid.p, embedding_power=embedding_frequency_norms(model, task, grid.index))
        freqs = list(kf.freqs)
        key = {**kf.to_dict(), "step": final}
        if not freqs:
            notes.append(f"no key frequencies at the final step {final} ({kf.rule}): restricted loss is the loss "
                         "of the constant logits and excluded loss the training loss")
    if grid.op not in PROJECTABLE_OPS:
        notes.append(f"restricted/excluded loss are defined for {sorted(PROJECTABLE_OPS)} only; op {grid.op!r} "
                     "gets None")

    cols: dict[str, list] = {c: [] for c in PROGRESS_COLUMNS}
    for step in tqdm(steps, desc=f"progress {run.name}", unit="ckpt", disable=not show):
        row = _measure(run.load_model(step), task, grid, freqs, fn, hook)
        row["step"] = step
        for c in PROGRESS_COLUMNS:
            v = row[c]
            cols[c].append(v if v is None or isinstance(v, int) else _json_float(v))
    meta = {"format": PROGRESS_FORMAT, "run": str(run.path), "task": task.name, "op": grid.op, "p": grid.p,
            "operation": grid.name, "loss": loss_name, "loss_dtype": loss_dtype, "layer": layer,
            "neuron_threshold": NEURON_THRESHOLD,
            "notes": notes}
    return {**cols, "key_frequencies": key, "meta": meta}
