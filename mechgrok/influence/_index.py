"""Index arguments: integer indices, boolean masks or split names -> a LongTensor of example indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mechgrok.tasks import Task

__all__ = ["as_index"]


def as_index(idx: Tensor | np.ndarray | Sequence[int] | str | range, task, what: str = "indices") -> Tensor:
    """Normalise ``idx`` to a 1-D LongTensor of indices into the examples of ``task`` (a Task or a
    :class:`~mechgrok.influence.Sequences`).

    Accepts integer indices, a boolean mask of length ``N`` (``task.train``), ``"all"``, or for a Task
    a split name (``"train"``, ``"test"``, ``"train_clean"``, ``"train_corrupted"``).
    """
    is_task = isinstance(task, Task)
    n = int(task.inputs.shape[0]) if is_task else int(task.tokens.shape[0])
    if isinstance(idx, str):
        if is_task:
            idx = task.mask(idx)
        elif idx == "all":
            idx = torch.ones(n, dtype=torch.bool)
        else:
            raise ValueError(f"{what}: split names such as {idx!r} belong to a Task; index Sequences with integer "
                             f"indices, a boolean mask [{n}] or 'all'")
    t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, Tensor) else idx)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"{what}: a boolean mask must have shape [{n}] (one entry per example of "
                             f"{task.name!r}), got {tuple(t.shape)}")
        t = t.nonzero().flatten()
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integer indices, a boolean mask or a split name, got dtype {t.dtype}")
    t = t.long().flatten().cpu()
    if t.numel() == 0:
        raise ValueError(f"{what} selects no example; pass a non-empty index or mask")
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise IndexError(f"{what} has indices outside [0, {n}) ({task.name!r} has {n} examples)")
    return t
