"""Scoring a model on a task: accuracy and loss per split (a ``Task``), or next-token loss, token
accuracy and exact match per group (a ``SequenceTask``). ``mechgrok.train`` writes these into
``history.jsonl``; ``mg.evaluate`` is the one call for a model in hand."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mechgrok import models
from mechgrok.losses import IGNORE, loss_fn
from mechgrok.tasks import SequenceTask, Task

__all__ = ["evaluate", "metrics_from_logits", "sequence_metrics", "SEQUENCE_METRICS", "EVAL_SPLITS"]

# evaluate() splits: train_corrupted scores corrupted examples against their (corrupted) training
# label, train_corrupted_true against their true label.
EVAL_SPLITS = ("train", "test", "train_clean", "train_corrupted", "train_corrupted_true")

@torch.no_grad()
def evaluate(model: nn.Module, task: Task | SequenceTask, loss: str = "cross_entropy", by_task: bool = False, *,
             loss_dtype: str = "float64") -> dict:
    """Accuracy and loss per split: ``{"train": {"acc", "loss"}, "test": ..., "train_clean": ...,
    "train_corrupted": ... (against the corrupted label), "train_corrupted_true": ... (against the
    true label)}``. Empty splits give NaN. One forward pass over all examples.

    ``by_task=True`` (multi-task data) returns ``{sub-task name: that dict}`` instead.

    A ``SequenceTask`` gives ``{group: {"loss", "acc", "exact"}}`` for each of its groups
    (``sequence_metrics``). The loss is ``loss`` computed in ``loss_dtype`` (``TrainConfig``'s fields).
    """
    models.check_compatible(model, task)
    if isinstance(task, SequenceTask):
        if by_task:
            raise ValueError(f"{task.name!r} is a SequenceTask, which has one sub-task ('lm'); evaluate it with "
                             "by_task=False")
        return sequence_metrics(model, task, loss, loss_dtype=loss_dtype)
    was_training = model.training
    model.eval()
    try:
        logits = models.final_logits(model, task.inputs).cpu()  # [N, d_out], scored next to the task's labels
    finally:
        model.train(was_training)
    if by_task:
        return {name: metrics_from_logits(logits, task, loss, task_id=i, loss_dtype=loss_dtype)
                for i, name in enumerate(task.task_names)}
    return metrics_from_logits(logits, task, loss, loss_dtype=loss_dtype)


def metrics_from_logits(logits: Tensor, task: Task, loss: str = "cross_entropy",
                        task_id: int | None = None, *, loss_dtype: str = "float64") -> dict[str, dict[str, float]]:
    """``evaluate``'s per-split accuracy and loss (``loss`` in ``loss_dtype``) from final-position
    logits ``[N, d_out]`` (only the examples of sub-task ``task_id`` when given)."""
    fn = loss_fn(loss, loss_dtype)
    out = {}
    for split in EVAL_SPLITS:
        mask = task.mask("train_corrupted" if split == "train_corrupted_true" else split)
        if task_id is not None:
            mask = mask & (task.task_ids == task_id)
        labels = (task.true_labels if split in ("test", "train_corrupted_true") else task.labels)[mask]
        if not bool(mask.any()):
            out[split] = {"acc": float("nan"), "loss": float("nan")}
            continue
        lg = logits[mask]
        out[split] = {"acc": float((lg.argmax(-1) == labels).double().mean()), "loss": float(fn(lg, labels))}
    return out


#: What ``sequence_metrics`` (and a next-token run's history, as ``GROUP_METRIC``) gives per group.
SEQUENCE_METRICS = {
    "loss": "mean loss (cross-entropy: nats) per target token of the group, every token weighted equally",
    "acc": "share of target tokens whose argmax is right (teacher forcing: each position sees the true prefix)",
    "exact": "share of sequences with every target token right; for a sequence whose targets are all the tokens "
             "after position k - 1 this equals k-extractability (greedy decoding from the true k-token prefix "
             "reproduces the rest: see mg.memorization.extract)",
}
_EVAL_BATCH = 512  # sequences per forward in sequence_metrics


@torch.no_grad()
def sequence_metrics(model: nn.Module, task: SequenceTask, loss: str = "cross_entropy",
                     batch_size: int = _EVAL_BATCH, *, loss_dtype: str = "float64") -> dict[str, dict[str, float]]:
    """Next-token loss, token accuracy and sequence exact match per group of ``task``
    (``SEQUENCE_METRICS``): ``{group: {"loss", "acc", "exact"}}``; NaN for a group without targets.

    The model runs in eval mode (restored afterwards) on batches of ``batch_size`` sequences; the
    loss is ``TrainConfig.loss`` (cross-entropy by default) in ``loss_dtype`` (float64 by default).
    """
    stats = _token_stats(model, task, loss_fn(loss, loss_dtype), batch_size)
    return {g: _group_metrics(stats, m) for g, m in task.groups.items()}


@torch.no_grad()
def _token_stats(model: nn.Module, task: SequenceTask, fn: Callable, batch_size: int) -> tuple[Tensor, ...]:
    """Per sequence ``[N]`` (float64): summed loss over its targets, targets whose argmax is right,
    number of targets."""
    was_training = model.training
    model.eval()
    device = models.device_of(model)
    loss_sum, right, count = (torch.zeros(task.n, dtype=torch.float64) for _ in range(3))
    try:
        for i in range(0, task.n, batch_size):
            y = task.targets[i:i + batch_size]  # [b, T]
            logits = model(task.inputs[i:i + batch_size].to(device)).cpu()  # [b, T, d_vocab_out]
            keep = y != IGNORE  # [b, T]
            rows = keep.nonzero()[:, 0]  # [tokens] the batch row of each target token
            flat_logits, flat_y = logits[keep], y[keep]  # [tokens, d_vocab_out], [tokens]
            per_token = fn(flat_logits, flat_y, reduction="none").double()  # [tokens], summed in float64
            loss_sum[i:i + batch_size] = torch.zeros(len(y), dtype=torch.float64).index_add_(0, rows, per_token)
            right[i:i + batch_size] = torch.zeros(len(y), dtype=torch.float64).index_add_(
                0, rows, (flat_logits.argmax(-1) == flat_y).double())
            count[i:i + batch_size] = keep.sum(-1).double()
    finally:
        model.train(was_training)
    return loss_sum, right, count


def _group_metrics(stats: tuple[Tensor, ...], mask: Tensor) -> dict[str, float]:
    loss_sum, right, count = (t[mask] for t in stats)
    n_tokens = float(count.sum())
    if n_tokens == 0:
        return {"loss": float("nan"), "acc": float("nan"), "exact": float("nan")}
    has = count > 0
    return {"loss": float(loss_sum.sum()) / n_tokens, "acc": float(right.sum()) / n_tokens,
            "exact": float((right[has] == count[has]).double().mean())}
