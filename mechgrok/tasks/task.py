"""The Task type: a labelled dataset as plain tensors plus the masks every analysis needs.

A Task is pure data. It never changes after construction (methods return new values) and it
round-trips through ``save``/``load`` as ``task.json`` (config and metadata) plus
``tensors.safetensors`` (the tensors). No pickle is involved.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from mechgrok._io import atomic_dir, atomic_write_text, read_json, read_safetensors, safe_name

if TYPE_CHECKING:
    from mechgrok.tasks.sequence import SequenceTask

__all__ = ["Task", "load"]

_TENSOR_FIELDS = ("inputs", "labels", "true_labels", "train", "train_corrupted", "task_ids")
SPLITS = ("train", "test", "train_clean", "train_corrupted")


@dataclass(frozen=True, eq=False)
class Task:
    """A supervised task over token sequences, with possible label corruption.

    Attributes:
        name: short human-readable name, e.g. ``"add_p59"``.
        inputs: token ids ``[N, n_ctx]``; the answer is predicted at the last position.
        labels: training targets ``[N]``; on corrupted training examples they differ from
            ``true_labels`` (see the constructor for the corruption rule).
        true_labels: the correct answers ``[N]``.
        train: ``[N]`` True for training examples; the rest form the test split.
        train_corrupted: ``[N]`` True for training examples whose label was corrupted.
        task_ids: ``[N]`` index into ``task_names`` (all zero for a single task).
        task_names: one name per sub-task (``("add",)`` for a single task).
        d_vocab: number of input token ids (operands plus special tokens).
        d_vocab_out: number of output classes.
        p: the modulus (the largest one for a multi-task mix).
        operand_positions: positions of the two operands in ``inputs`` (for the one-hot view
            and for analyses over the (a, b) grid).
        config: the constructor arguments; ``mechgrok.tasks.from_config`` rebuilds the task.
    """

    name: str
    inputs: Int[Tensor, "N n_ctx"]
    labels: Int[Tensor, " N"]
    true_labels: Int[Tensor, " N"]
    train: Bool[Tensor, " N"]
    train_corrupted: Bool[Tensor, " N"]
    task_ids: Int[Tensor, " N"]
    task_names: tuple[str, ...]
    d_vocab: int
    d_vocab_out: int
    p: int
    operand_positions: tuple[int, int] = (0, 1)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self)

    # ------------------------------------------------------------------ views
    @property
    def n_ctx(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def test(self) -> Bool[Tensor, " N"]:
        return ~self.train

    @property
    def train_clean(self) -> Bool[Tensor, " N"]:
        return self.train & ~self.train_corrupted

    def mask(self, split: str) -> Bool[Tensor, " N"]:
        """The boolean mask of ``split`` (one of ``train, test, train_clean, train_corrupted, all``)."""
        if split == "all":
            return torch.ones_like(self.train)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS + ('all',)}")
        return getattr(self, split)

    def onehot(self, dtype: torch.dtype = torch.float32) -> Float[Tensor, "N two_p"]:
        """The one-hot input view for MLP models: ``one_hot(a) ‖ one_hot(b)``, shape ``[N, 2p]``.

        Only defined for single-operation tasks (a multi-task mix needs the op token, which an MLP
        over two one-hot operands cannot see).
        """
        if len(self.task_names) != 1:
            raise ValueError("the one-hot view needs a single-operation task; this one mixes "
                             f"{self.task_names}")
        i, j = self.operand_positions
        a = torch.nn.functional.one_hot(self.inputs[:, i], self.p)  # [N, p]
        b = torch.nn.functional.one_hot(self.inputs[:, j], self.p)  # [N, p]
        return torch.cat([a, b], dim=-1).to(dtype)  # [N, 2p]

    def summary(self) -> dict[str, Any]:
        """Counts per split, for logs and reports."""
        return {
            "name": self.name,
            "n": int(self.inputs.shape[0]),
            **{f"n_{s}": int(self.mask(s).sum()) for s in SPLITS},
            "d_vocab": self.d_vocab,
            "d_vocab_out": self.d_vocab_out,
            "tasks": list(self.task_names),
        }

    # --------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Write ``path/task.json`` and ``path/tensors.safetensors`` atomically; returns ``path``."""
        path = Path(path)
        meta = {
            "format": "mechgrok.task/1",
            "name": self.name,
            "task_names": list(self.task_names),
            "d_vocab": self.d_vocab,
            "d_vocab_out": self.d_vocab_out,
            "p": self.p,
            "operand_positions": list(self.operand_positions),
            "config": self.config,
        }
        with atomic_dir(path) as tmp:
            try:
                save_file({k: getattr(self, k).contiguous() for k in _TENSOR_FIELDS},
                          str(tmp / "tensors.safetensors"))
            except SafetensorError as e:  # e.g. a full disk: "I/O error: ... (os error 28)"
                raise OSError(f"cannot write {path / 'tensors.safetensors'} ({e}); free space on that disk or "
                              "choose another folder") from e
            atomic_write_text(tmp / "task.json", json.dumps(meta, indent=2))
        return path


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check(task: Task) -> None:
    """Every invariant of a Task (shapes, dtypes, index ranges, sub-task names), with what to fix."""
    if not isinstance(task.name, str):
        raise TypeError(f"Task.name must be a string, got {type(task.name).__name__}")
    for f in _TENSOR_FIELDS:
        if not isinstance(getattr(task, f), Tensor):
            raise TypeError(f"Task.{f} must be a torch.Tensor, got {type(getattr(task, f)).__name__}")
    if task.inputs.ndim != 2:
        raise ValueError(f"Task.inputs must have shape [N, n_ctx], got {tuple(task.inputs.shape)}")
    n = task.inputs.shape[0]
    for f in _TENSOR_FIELDS[1:]:
        if getattr(task, f).shape != (n,):
            raise ValueError(f"Task.{f} must have shape [{n}], got {tuple(getattr(task, f).shape)}")
    for f in _TENSOR_FIELDS:
        want = (torch.bool,) if f in ("train", "train_corrupted") else _INT_DTYPES
        if getattr(task, f).dtype not in want:
            raise TypeError(f"Task.{f} must be {'bool' if len(want) == 1 else 'an integer tensor'}, "
                            f"got {getattr(task, f).dtype}")
    for f in ("d_vocab", "d_vocab_out", "p"):
        if not _is_int(getattr(task, f)) or getattr(task, f) < 1:
            raise ValueError(f"Task.{f} must be a positive integer, got {getattr(task, f)!r}")
    pos = task.operand_positions
    if (not isinstance(pos, tuple) or len(pos) != 2 or not all(_is_int(i) and 0 <= i < task.n_ctx for i in pos)
            or pos[0] == pos[1]):
        raise ValueError(f"Task.operand_positions must be two different positions in [0, {task.n_ctx}), got {pos!r}")
    if not isinstance(task.config, dict):
        raise TypeError(f"Task.config must be a dict, got {type(task.config).__name__}")
    names = task.task_names
    if not isinstance(names, tuple) or not names:
        raise ValueError(f"Task.task_names must be a non-empty tuple of names, got {names!r}")
    for name in names:  # they become file names (analysis/overlap/NAME.json)
        safe_name(name, what="sub-task name")
    if len(set(names)) != len(names):
        raise ValueError(f"Task.task_names must be unique, got {list(names)}")
    for f, hi, what in (("inputs", task.d_vocab, "d_vocab"), ("labels", task.d_vocab_out, "d_vocab_out"),
                        ("true_labels", task.d_vocab_out, "d_vocab_out"),
                        ("task_ids", len(names), f"the number of task_names ({len(names)})")):
        t = getattr(task, f)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
            raise ValueError(f"Task.{f} must lie in [0, {what}) = [0, {hi}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    if bool((task.train_corrupted & ~task.train).any()):
        raise ValueError("Task.train_corrupted marks examples outside the training split")


def _n_subtasks(config: dict[str, Any]) -> int | None:
    """How many sub-tasks a task config describes (None when the config does not say)."""
    kind = config.get("kind")
    if kind == "modular_arithmetic":
        return 1
    if kind == "multi_task" and isinstance(config.get("specs"), list):
        return len(config["specs"])
    if kind == "knowledge":
        return 3
    if kind == "induction":
        return 1
    if kind == "lm_corpus":  # a SequenceTask: task_names is ("lm",)
        return 1
    return None


_META_KEYS = {"name": str, "task_names": list, "d_vocab": int, "d_vocab_out": int, "p": int,
              "operand_positions": list, "config": dict}


def read_meta(path: Path, what: str, writer: str, fix: str) -> tuple[Any, Path, Path]:
    """``task.json`` of a saved task folder (parsed, not yet checked), with the paths of it and of
    ``tensors.safetensors``; a missing or unreadable file is an error naming it and ``fix``."""
    meta_file, tensor_file = path / "task.json", path / "tensors.safetensors"
    if not meta_file.exists() or not tensor_file.exists():
        raise FileNotFoundError(f"{path} is not a saved {what}: expected task.json and "
                                f"tensors.safetensors (write one with {writer})")
    try:
        return read_json(meta_file, hint=fix), meta_file, tensor_file  # a damaged file: a ValueError naming it
    except UnicodeDecodeError as e:
        raise ValueError(f"{meta_file} is damaged (not UTF-8 text: {e.reason} at byte {e.start}); {fix}") from e


def check_meta(meta: dict, keys: dict[str, type], meta_file: Path, fix: str) -> None:
    """A ValueError naming ``meta_file`` when ``meta`` lacks one of ``keys`` or has it with another type."""
    bad = [f"{k} (expected {t.__name__})" for k, t in keys.items()
           if not isinstance(meta.get(k), t) or (t is int and isinstance(meta.get(k), bool))]
    if bad:
        raise ValueError(f"{meta_file} lacks or has wrong types for {', '.join(bad)}; {fix}")


def load(path: str | Path) -> Task | SequenceTask:
    """Load a task written by ``Task.save`` (or a ``SequenceTask`` written by ``SequenceTask.save``, told
    apart by the ``format`` in ``task.json``); a damaged or inconsistent folder raises ``ValueError`` naming
    the file and what is wrong with it."""
    path = Path(path)
    fix = "restore it, or write the task again with Task.save (a run's task: retrain the run into a new folder)"
    meta, meta_file, tensor_file = read_meta(path, "task", "Task.save", fix)
    if isinstance(meta, dict) and meta.get("format") == "mechgrok.sequence_task/1":
        from mechgrok.tasks.sequence import load_sequence_task  # noqa: PLC0415 (sequence imports this module)

        return load_sequence_task(path, meta)
    if not isinstance(meta, dict) or meta.get("format") != "mechgrok.task/1":
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_file}: unknown task format {got!r}, expected 'mechgrok.task/1' (or "
                         f"'mechgrok.sequence_task/1'); {fix}")
    check_meta(meta, _META_KEYS, meta_file, fix)
    for name in meta["task_names"]:
        safe_name(name, what="sub-task name", source=meta_file)
    n_sub = _n_subtasks(meta["config"])
    if n_sub is not None and n_sub != len(meta["task_names"]):
        raise ValueError(f"{meta_file} names {len(meta['task_names'])} sub-tasks ({meta['task_names']}) but its "
                         f"config describes {n_sub}; {fix}")
    tensors = read_safetensors(tensor_file)
    missing = [k for k in _TENSOR_FIELDS if k not in tensors]
    if missing:
        raise ValueError(f"{tensor_file} lacks tensors {missing}; {fix}")
    try:
        return Task(
            name=meta["name"],
            task_names=tuple(meta["task_names"]),
            d_vocab=meta["d_vocab"],
            d_vocab_out=meta["d_vocab_out"],
            p=meta["p"],
            operand_positions=tuple(meta["operand_positions"]),
            config=meta["config"],
            **{k: tensors[k] for k in _TENSOR_FIELDS},
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} (task.json and tensors.safetensors) do not agree: {e}; {fix}") from e
