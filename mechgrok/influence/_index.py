"""Index arguments: integer indices, boolean masks or split names -> a LongTensor of example indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mechgrok.tasks import Task

__all__ = ["as_index"]


def as_index(idx: Tensor | np.ndarray | Sequence[int] | str | range, task: Task, what: str = "indices") -> Tensor:
    """Normalise ``idx`` to a 1-D LongTensor of indices into ``task``'s examples.

    Accepts integer indices, a boolean mask of length ``N`` (``task.train``), or a split name
    (``"train"``, ``"test"``, ``"train_clean"``, ``"train_corrupted"``, ``"all"``).
    """
    n = int(task.inputs.shape[0])
    if isinstance(idx, str):
        idx = task.mask(idx)
    t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, Tensor) else idx)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"{what}: a boolean mask must have shape [{n}] (one entry per example of task "
                             f"{task.name!r}), got {tuple(t.shape)}")
        t = t.nonzero().flatten()
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integer indices, a boolean mask or a split name, got dtype {t.dtype}")
    t = t.long().flatten()
    if t.numel() == 0:
        raise ValueError(f"{what} selects no example; pass a non-empty index or mask")
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise IndexError(f"{what} has indices outside [0, {n}) (task {task.name!r} has {n} examples)")
    return t
