"""The SequenceTask type: a language-model corpus as plain tensors, a sibling of :class:`~mechgrok.tasks.Task`.

Where a Task has one answer per example (read at the last position), a SequenceTask has a target
*per position*: ``targets[n, t]`` is the token that position ``t`` must predict, or ``IGNORE`` (-100,
the ignore index of PyTorch's ``cross_entropy`` and of Hugging Face ``labels``) where no loss is
taken. Named boolean ``groups`` (``"train"`` and ``"test"`` always, any others beside them) and
per-example ``metadata`` (e.g. ``"repeats"``) replace the Task's fixed splits.

Like a Task it is pure data: it never changes after construction (``with_groups`` returns a new
one) and it round-trips through ``save`` / ``load_sequence_task`` (or ``mechgrok.tasks.load``) as
``task.json`` plus ``tensors.safetensors``. No pickle is involved.

>>> import torch
>>> x = torch.tensor([[3, 0, 1, 2], [3, 2, 1, 0]])
>>> y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE)], dim=1)  # next-token targets
>>> t = SequenceTask("toy", x, y, groups={"train": torch.tensor([True, False]), "test": torch.tensor([False, True])},
...                  d_vocab=4)
>>> t.summary()["n_loss_tokens"], t.sequences("train").n_targets
(6, 3)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from mechgrok._io import atomic_dir, atomic_write_text, read_safetensors, safe_name
from mechgrok.losses import IGNORE
from mechgrok.tasks.task import _INT_DTYPES, _is_int, check_meta, read_meta

if TYPE_CHECKING:
    from mechgrok.influence import Sequences

__all__ = ["SequenceTask", "IGNORE", "FORMAT", "load_sequence_task"]


FORMAT = "mechgrok.sequence_task/1"
_META_DTYPES = (*_INT_DTYPES, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)


@dataclass(frozen=True, eq=False)
class SequenceTask:
    """A language-model corpus: token sequences, a target per position, named groups of examples.

    Attributes:
        name: short human-readable name, e.g. ``"lm_induction_v64_t32"``.
        inputs: token ids ``[N, T]`` (``T >= 2``) in ``[0, d_vocab)``.
        targets: ``[N, T]``: ``targets[n, t]`` is the token position ``t`` must predict, in
            ``[0, d_vocab)``, or ``IGNORE`` where no loss is taken. For a next-token corpus
            ``targets[:, t] = inputs[:, t + 1]`` where not ``IGNORE`` and the last column is ``IGNORE``
            (:meth:`sequences` needs that); other targets (e.g. a masked-token objective) are allowed.
            A sequence may have no target at all (``summary`` counts those).
        groups: named boolean masks ``[N]``; must hold ``"train"`` and ``"test"`` (disjoint), may hold
            any others (``"planted_r10"``, ``"held_out_planted"``). Names become file names, so they
            pass ``safe_name``; ``"all"`` is reserved (``mask("all")``).
        metadata: named per-example values ``[N]`` (integer, float or bool), e.g. ``"repeats"``: how
            many times per epoch a trainer shows row ``n`` (see :meth:`epoch_rows`).
        d_vocab: number of token ids (inputs and targets).
        config: the constructor arguments; ``mechgrok.tasks.from_config`` rebuilds the task from it.
    """

    name: str
    inputs: Int[Tensor, "N T"]
    targets: Int[Tensor, "N T"]
    groups: dict[str, Bool[Tensor, " N"]]
    d_vocab: int
    metadata: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("groups", "metadata", "config"):  # own copies: a caller's dict cannot change the task
            if isinstance(getattr(self, f), dict):
                object.__setattr__(self, f, dict(getattr(self, f)))
        _check(self)

    # ------------------------------------------------------------------ views (Task's interface)
    @property
    def n_ctx(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def train(self) -> Bool[Tensor, " N"]:
        return self.groups["train"]

    @property
    def test(self) -> Bool[Tensor, " N"]:
        return self.groups["test"]

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def task_names(self) -> tuple[str, ...]:
        """``("lm",)``: one sub-task, next-token (language) modelling, as a Task names its operations."""
        return ("lm",)

    @property
    def loss_mask(self) -> Bool[Tensor, "N T"]:
        """``targets != IGNORE``, aligned with ``targets`` (entry ``[n, t]``: position ``t`` carries loss)."""
        return self.targets != IGNORE

    def mask(self, split: str) -> Bool[Tensor, " N"]:
        """The boolean mask ``[N]`` of a group name, or of ``"all"``."""
        if split == "all":
            return torch.ones(self.n, dtype=torch.bool)
        if split not in self.groups:
            raise ValueError(f"unknown group {split!r} of task {self.name!r}; choose one of "
                             f"{sorted(self.groups) + ['all']}")
        return self.groups[split]

    def summary(self) -> dict[str, Any]:
        """Counts per group, vocabulary, length and tokens with loss, for logs and reports."""
        per_seq = self.loss_mask.sum(dim=1)  # [N] targets per sequence
        return {
            "name": self.name,
            "n": self.n,
            **{f"n_{g}": int(m.sum()) for g, m in self.groups.items()},
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "n_loss_tokens": int(per_seq.sum()),
            "n_without_loss": int((per_seq == 0).sum()),
            "metadata": sorted(self.metadata),
            "tasks": list(self.task_names),
        }

    def sequences(self, split: str = "train") -> Sequences:
        """The rows of ``split`` as :class:`mechgrok.influence.Sequences` (tokens and a ``[N, T-1]`` loss mask).

        Sequences express a next-token loss only, so this needs ``targets[:, t] == inputs[:, t + 1]``
        wherever a target is set and the last column ``IGNORE``; otherwise a ``ValueError`` says where.
        """
        from mechgrok.influence.data import Sequences  # noqa: PLC0415 (influence imports tasks)

        m = self.mask(split)
        if not bool(m.any()):
            raise ValueError(f"group {split!r} of task {self.name!r} is empty: there are no sequences to convert")
        rows = m.nonzero().squeeze(1)  # [n] original row indices, for the messages
        x, keep = self.inputs[m], self.loss_mask[m]  # [n, T] each
        if bool(keep[:, -1].any()):
            r = int(rows[keep[:, -1].nonzero()[0, 0]])
            raise ValueError(f"task {self.name!r}: row {r} has a target at the last position {self.n_ctx - 1}, which "
                             "no next token follows, so these targets are not a next-token loss and cannot become "
                             "Sequences; set targets[:, -1] = IGNORE, or use the targets directly")
        bad = keep[:, :-1] & (self.targets[m][:, :-1] != x[:, 1:])  # [n, T-1]
        if bool(bad.any()):
            i, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"task {self.name!r}: targets are not the shifted inputs at {int(bad.sum())} positions "
                             f"(first: row {int(rows[i])}, position {t}: target {int(self.targets[rows[i], t])}, next "
                             f"token {int(x[i, t + 1])}); Sequences express a next-token loss only, so use the targets "
                             "directly for this objective")
        return Sequences(x, loss_mask=keep[:, :-1], name=f"{self.name}:{split}")

    def epoch_rows(self, generator: torch.Generator | None = None) -> Int[Tensor, " M"]:
        """One epoch's training rows for a trainer: each train row ``n`` repeated ``metadata["repeats"][n]``
        times (once when the task has no ``"repeats"``), shuffled with ``generator``.

        Each sequence is stored once; repetition (Hernandez et al. 2022) lives here, so a row with
        ``repeats = R`` is seen R times per epoch and a train row with ``repeats = 0`` not at all.
        """
        idx = self.train.nonzero().squeeze(1)  # [n_train]
        if "repeats" in self.metadata:
            idx = torch.repeat_interleave(idx, self.metadata["repeats"][idx].long())  # [sum of repeats]
        return idx[torch.randperm(len(idx), generator=generator)]

    def with_groups(self, **masks: Bool[Tensor, " N"]) -> SequenceTask:
        """A new task with the extra groups ``masks`` (``name=mask [N]``); existing names are refused.

        The new groups are not in ``config``: ``from_config`` rebuilds the task without them.
        """
        clash = sorted(set(masks) & set(self.groups))
        if clash:
            raise ValueError(f"task {self.name!r} already has groups {clash}; pick new names (with_groups only adds)")
        return SequenceTask(name=self.name, inputs=self.inputs, targets=self.targets,
                            groups={**self.groups, **masks}, d_vocab=self.d_vocab, metadata=self.metadata,
                            config=self.config)

    # --------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Write ``path/task.json`` and ``path/tensors.safetensors`` atomically; returns ``path``."""
        path = Path(path)
        meta = {"format": FORMAT, "name": self.name, "d_vocab": self.d_vocab, "groups": list(self.groups),
                "metadata": list(self.metadata), "config": self.config}
        tensors = {"inputs": self.inputs, "targets": self.targets,
                   **{f"group.{g}": m for g, m in self.groups.items()},
                   **{f"meta.{k}": v for k, v in self.metadata.items()}}
        text = json.dumps(meta, indent=2)  # before writing anything: a config that is not JSON fails here
        with atomic_dir(path) as tmp:
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
            except SafetensorError as e:  # e.g. a full disk
                raise OSError(f"cannot write {path / 'tensors.safetensors'} ({e}); free space on that disk or "
                              "choose another folder") from e
            atomic_write_text(tmp / "task.json", text)
        return path


def _check(task: SequenceTask) -> None:
    """Every invariant of a SequenceTask, with what to fix."""
    if not isinstance(task.name, str):
        raise TypeError(f"SequenceTask.name must be a string, got {type(task.name).__name__}")
    for f in ("inputs", "targets"):
        v = getattr(task, f)
        if not isinstance(v, Tensor):
            raise TypeError(f"SequenceTask.{f} must be a torch.Tensor of token ids [N, T], got {type(v).__name__}")
        if v.dtype not in _INT_DTYPES:
            raise TypeError(f"SequenceTask.{f} must be an integer tensor of token ids, got {v.dtype} "
                            "(pass ids, e.g. x.long(), not embeddings or one-hot vectors)")
    x, y = task.inputs, task.targets
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"SequenceTask.inputs must have shape [N, T] with T >= 2, got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"SequenceTask.targets must have the shape of inputs {tuple(x.shape)} (one target per "
                         f"position, IGNORE = {IGNORE} where no loss is taken), got {tuple(y.shape)}")
    if not _is_int(task.d_vocab) or task.d_vocab < 1:
        raise ValueError(f"SequenceTask.d_vocab must be a positive integer, got {task.d_vocab!r}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= task.d_vocab):
        raise ValueError(f"SequenceTask.inputs must lie in [0, d_vocab) = [0, {task.d_vocab}), got values in "
                         f"[{int(x.min())}, {int(x.max())}]")
    bad = (y != IGNORE) & ((y < 0) | (y >= task.d_vocab))
    if bool(bad.any()):
        raise ValueError(f"SequenceTask.targets must lie in [0, d_vocab) = [0, {task.d_vocab}) or be IGNORE = "
                         f"{IGNORE}, got {int(bad.sum())} other values (e.g. {int(y[bad][0])})")
    n = x.shape[0]
    for f, what in (("groups", "group"), ("metadata", "metadata")):
        d = getattr(task, f)
        if not isinstance(d, dict):
            raise TypeError(f"SequenceTask.{f} must be a dict of name -> tensor [N], got {type(d).__name__}")
        for k, v in d.items():
            safe_name(k, what=f"SequenceTask {what} name")  # they become tensor keys and file names
            if not isinstance(v, Tensor) or v.shape != (n,):
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"SequenceTask.{f}[{k!r}] must be a tensor of shape [N] = [{n}], got {got}")
            ok = v.dtype == torch.bool if f == "groups" else v.dtype in _META_DTYPES
            if not ok:
                want = "bool (e.g. mask.bool())" if f == "groups" else "an integer, float or bool tensor"
                raise TypeError(f"SequenceTask.{f}[{k!r}] must be {want}, got {v.dtype}")
    if "all" in task.groups:
        raise ValueError("SequenceTask.groups cannot hold a group named 'all' (mask('all') means every example); "
                         "rename it")
    missing = [g for g in ("train", "test") if g not in task.groups]
    if missing:
        raise ValueError(f"SequenceTask.groups lacks {missing}; every task needs a 'train' and a 'test' mask (an "
                         "all-False mask is allowed)")
    both = task.groups["train"] & task.groups["test"]
    if bool(both.any()):
        raise ValueError(f"SequenceTask: {int(both.sum())} examples (e.g. row {int(both.nonzero()[0, 0])}) are in both "
                         "'train' and 'test'; remove them from one of the masks (train & ~test)")
    rep = task.metadata.get("repeats")
    if rep is not None and (rep.dtype not in _INT_DTYPES or (rep.numel() and int(rep.min()) < 0)):
        raise ValueError("SequenceTask.metadata['repeats'] must hold non-negative integers (times per epoch a row "
                         f"is seen), got dtype {rep.dtype}" + (f", minimum {int(rep.min())}" if rep.numel() else ""))
    if not isinstance(task.config, dict):
        raise TypeError(f"SequenceTask.config must be a dict, got {type(task.config).__name__}")


_META_KEYS = {"name": str, "d_vocab": int, "groups": list, "metadata": list, "config": dict}


def load_sequence_task(path: str | Path, meta: dict | None = None) -> SequenceTask:
    """Load a task written by ``SequenceTask.save``; a damaged or inconsistent folder raises ``ValueError``
    naming the file and what is wrong with it. ``meta``: its ``task.json`` when already read
    (``tasks.load``)."""
    path = Path(path)
    fix = "restore it, or write the task again with SequenceTask.save (or rebuild it with tasks.from_config)"
    if meta is None:
        meta, meta_file, tensor_file = read_meta(path, "sequence task", "SequenceTask.save", fix)
    else:
        meta_file, tensor_file = path / "task.json", path / "tensors.safetensors"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_file}: unknown task format {got!r}, expected {FORMAT!r}; {fix}")
    check_meta(meta, _META_KEYS, meta_file, fix)
    for key, what in (("groups", "group name"), ("metadata", "metadata name")):
        for name in meta[key]:
            safe_name(name, what=what, source=meta_file)
        if len(set(meta[key])) != len(meta[key]):
            raise ValueError(f"{meta_file} lists {key} names twice: {meta[key]}; {fix}")
    tensors = read_safetensors(tensor_file)
    want = ["inputs", "targets", *(f"group.{g}" for g in meta["groups"]), *(f"meta.{k}" for k in meta["metadata"])]
    missing = [k for k in want if k not in tensors]
    if missing:
        raise ValueError(f"{tensor_file} lacks tensors {missing} that {meta_file.name} lists; {fix}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise ValueError(f"{tensor_file} holds tensors {extra} that {meta_file.name} does not list; {fix}")
    try:
        return SequenceTask(name=meta["name"], inputs=tensors["inputs"], targets=tensors["targets"],
                            groups={g: tensors[f"group.{g}"] for g in meta["groups"]}, d_vocab=meta["d_vocab"],
                            metadata={k: tensors[f"meta.{k}"] for k in meta["metadata"]}, config=meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} (task.json and tensors.safetensors) do not agree: {e}; {fix}") from e
