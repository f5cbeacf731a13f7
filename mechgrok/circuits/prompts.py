"""Contrastive prompts: what circuit discovery runs on.

A ``Prompts`` holds a clean batch, its counterfactual (corrupted) batch of the same shape, the
position of the answer in each prompt and the correct and incorrect answer tokens there. Metrics
read the model's full ``[batch, pos, vocab]`` logits at those positions (the convention of
EAP-IG, auto-circuit and MIB), so prompts of different lengths can share a batch: right-pad them
and point ``answer_pos`` at each prompt's last real token (attention is causal, so what follows
the answer position cannot change the logits there).

>>> import torch
>>> p = Prompts(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 7, 3], [4, 6, 0]]),
...             answer_pos=torch.tensor([2, 1]), correct=torch.tensor([3, 5]), incorrect=torch.tensor([7, 6]))
>>> len(p), p.answer_pos.tolist()
(2, [2, 1])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Int
from torch import Tensor

from mechgrok._config import check_int
from mechgrok.tasks import Task

__all__ = ["Prompts", "from_task", "as_prompts"]


def _ids(value, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"Prompts.{name} must be a torch tensor of token ids, got {type(value).__name__} "
                        "(torch.as_tensor(...) turns a nested list into one)")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"Prompts.{name} must hold integer token ids, got dtype {value.dtype} (use .long())")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"Prompts.{name} must have shape {list(shape)} (one per clean prompt), got {list(value.shape)}")
    return value.long()


@dataclass(frozen=True, eq=False)
class Prompts:
    """A contrastive prompt set for patching and attribution.

    Attributes:
        clean: token ids ``[batch, pos]`` (a HookedMLP also takes its one-hot view ``[batch, 2p]``).
        corrupted: counterfactual ids of the same shape (resample ablation), or None for mean / zero
            ablation.
        answer_pos: ``[batch]`` position whose logits the metric reads (default: the last, ``pos − 1``);
            negative values count from the end. The corrupted prompts are read at the same positions.
        correct: ``[batch]`` the answer token of each clean prompt, or None.
        incorrect: ``[batch]`` the answer a metric contrasts it with (the corrupted prompt's answer,
            or the true label of a memorized example), or None.
    """

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"] | None = None
    answer_pos: Int[Tensor, " batch"] | None = None
    correct: Int[Tensor, " batch"] | None = None
    incorrect: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        clean = self.clean
        if not isinstance(clean, Tensor):
            raise TypeError(f"Prompts.clean must be a torch tensor [batch, pos], got {type(clean).__name__}")
        if clean.ndim != 2 or clean.shape[0] == 0 or clean.shape[1] == 0:
            raise ValueError(f"Prompts.clean must be [batch, pos] with batch, pos >= 1, got shape {list(clean.shape)}")
        onehot = clean.is_floating_point()  # a HookedMLP's one-hot view: one answer per row
        if not onehot:
            object.__setattr__(self, "clean", _ids(clean, "clean"))
        if self.corrupted is not None:
            if not isinstance(self.corrupted, Tensor) or tuple(self.corrupted.shape) != tuple(clean.shape):
                got = list(self.corrupted.shape) if isinstance(self.corrupted, Tensor) else type(self.corrupted).__name__
                raise ValueError(f"Prompts.corrupted must have the clean prompts' shape {list(clean.shape)}, got {got}; "
                                 "pair every clean prompt with one counterfactual of the same length")
            if self.corrupted.is_floating_point() != onehot:
                raise TypeError(f"Prompts.corrupted has dtype {self.corrupted.dtype} but clean has {clean.dtype}")
            if not onehot:
                object.__setattr__(self, "corrupted", _ids(self.corrupted, "corrupted"))
        n, n_pos = clean.shape[0], (1 if onehot else clean.shape[1])
        pos = self.answer_pos
        if pos is None:
            pos = torch.full((n,), n_pos - 1, dtype=torch.long)
        elif isinstance(pos, int) and not isinstance(pos, bool):
            pos = torch.full((n,), pos, dtype=torch.long)
        pos = _ids(pos, "answer_pos", (n,))
        if n and (int(pos.min()) < -n_pos or int(pos.max()) >= n_pos):
            raise ValueError(f"Prompts.answer_pos must lie in [-{n_pos}, {n_pos}) for prompts of {n_pos} positions, got "
                             f"values in [{int(pos.min())}, {int(pos.max())}]")
        object.__setattr__(self, "answer_pos", pos % n_pos)
        for name in ("correct", "incorrect"):
            if getattr(self, name) is not None:
                t = _ids(getattr(self, name), name, (n,))
                if int(t.min()) < 0:
                    raise ValueError(f"Prompts.{name} must be token ids >= 0, got {int(t.min())}")
                object.__setattr__(self, name, t)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def __repr__(self) -> str:
        has = [k for k in ("corrupted", "correct", "incorrect") if getattr(self, k) is not None]
        return f"Prompts({len(self)} x {self.clean.shape[1]} tokens; {', '.join(has) or 'clean only'})"

    @property
    def n_pos(self) -> int:
        """Positions the model's logits have for these prompts (1 for a HookedMLP's one-hot rows)."""
        return 1 if self.clean.is_floating_point() else int(self.clean.shape[1])

    def take(self, idx) -> Prompts:
        """The prompts at ``idx`` (indices or a boolean mask over the batch)."""
        def pick(t):
            return None if t is None else t[idx]
        return Prompts(self.clean[idx], pick(self.corrupted), self.answer_pos[idx], pick(self.correct),
                       pick(self.incorrect))

    def with_corrupted(self, corrupted: Tensor | None) -> Prompts:
        """The same prompts with another counterfactual batch (None for mean / zero ablation)."""
        return replace(self, corrupted=corrupted)

    def to(self, device) -> Prompts:
        """The prompts on ``device`` (the model's)."""
        def move(t):
            return None if t is None else t.to(device)
        return Prompts(self.clean.to(device), move(self.corrupted), self.answer_pos.to(device), move(self.correct),
                       move(self.incorrect))


def from_task(task: Task, split: str = "test", n: int | None = 256, seed: int = 0,
              task_name: str | None = None) -> Prompts:
    """Contrastive prompts from a mechgrok ``Task``: up to ``n`` examples of ``split`` (seeded choice;
    only sub-task ``task_name`` of a mix when given), each paired with a random other example of the
    same sub-task as its counterfactual, so resample ablation replaces the operands and keeps the op.

    ``correct`` is each example's training label, ``incorrect`` its true label on corrupted training
    examples (``split="train_corrupted"``: the memorized answer vs the right one), else None.
    The answer is read at the last position.
    """
    idx, other = sample(task, split, n, seed, task_name)
    memorized = split == "train_corrupted"
    return Prompts(task.inputs[idx], task.inputs[other], correct=task.labels[idx],
                   incorrect=task.true_labels[idx] if memorized else None)


def sample(task: Task, split: str, n: int | None, seed: int, task_name: str | None) -> tuple[Tensor, Tensor]:
    """Indices of up to ``n`` examples of ``split`` and of a same-sub-task counterfactual for each."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a mechgrok Task, got {type(task).__name__}")
    if n is not None:
        n = check_int(n, "n", low=1, owner="prompts (examples; None for all)")
    g = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
    mask = task.mask(split)
    if task_name is not None:
        if task_name not in task.task_names:
            raise ValueError(f"unknown task {task_name!r}; this task has {task.task_names}")
        mask = mask & (task.task_ids == task.task_names.index(task_name))
    idx = torch.nonzero(mask).flatten()
    if len(idx) == 0:
        raise ValueError(f"task {task.name!r} has no {split} examples" + (f" of {task_name!r}" if task_name else ""))
    if n is not None and len(idx) > n:
        idx = idx[torch.randperm(len(idx), generator=g)[:n]]
    other = torch.empty_like(idx)
    for t in range(len(task.task_names)):
        pool = torch.nonzero(task.task_ids == t).flatten()
        mine = task.task_ids[idx] == t
        other[mine] = pool[torch.randint(len(pool), (int(mine.sum()),), generator=g)]
    return idx, other


def as_prompts(model, prompts, args: tuple, owner: str) -> tuple[Prompts, object]:
    """``(prompts, metric)`` from either calling form of the circuit functions:
    ``f(model, prompts, metric)`` or the older ``f(model, clean, corrupted, metric)``; checked
    against ``model`` (device, and a HookedMLP's single answer position)."""
    from mechgrok import models

    if isinstance(prompts, Prompts):
        if len(args) != 1:
            raise TypeError(f"{owner}(model, prompts, metric, ...): expected one metric after the prompts, got "
                            f"{len(args)} positional arguments")
        metric = args[0]
    elif isinstance(prompts, Tensor):
        if len(args) != 2:
            raise TypeError(f"{owner}(model, clean, corrupted, metric, ...) or {owner}(model, prompts, metric, ...): "
                            f"got clean tokens and {len(args)} more positional arguments")
        corrupted, metric = args
        if corrupted is not None and not isinstance(corrupted, Tensor):
            raise TypeError(f"{owner}: corrupted must be a tensor like clean (or None for mean / zero ablation), got "
                            f"{type(corrupted).__name__}")
        prompts = Prompts(prompts, corrupted)
    else:
        raise TypeError(f"{owner}: expected mg.circuits.Prompts (or clean token ids [batch, pos]), got "
                        f"{type(prompts).__name__}")
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if param is not None and prompts.clean.device != param.device:
        raise ValueError(f"{owner}: the prompts are on {prompts.clean.device} but the model is on {param.device}; "
                         f"move them with prompts.to({str(param.device)!r})")
    if isinstance(model, models.HookedMLP) and prompts.n_pos > 1 and bool((prompts.answer_pos != prompts.n_pos - 1).any()):
        raise ValueError(f"{owner}: a HookedMLP predicts one answer per example, read at the last position; these "
                         "prompts put answers elsewhere")
    return prompts, metric
