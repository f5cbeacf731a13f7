"""The Task type: a labelled dataset as plain tensors plus the masks every analysis needs.

A Task is pure data. It never changes after construction (methods return new values) and it
round-trips through ``save``/``load`` as ``task.json`` (config and metadata) plus
``tensors.safetensors`` (the tensors). No pickle is involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import save_file
from torch import Tensor

from mechgrok._io import atomic_dir, atomic_write_text, read_safetensors

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
        n = self.inputs.shape[0]
        for name in _TENSOR_FIELDS[1:]:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Task.{name} must have shape [{n}], got {tuple(getattr(self, name).shape)}")
        if bool((self.train_corrupted & ~self.train).any()):
            raise ValueError("Task.train_corrupted marks examples outside the training split")

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
            save_file({k: getattr(self, k).contiguous() for k in _TENSOR_FIELDS},
                      str(tmp / "tensors.safetensors"))
            atomic_write_text(tmp / "task.json", json.dumps(meta, indent=2))
        return path


def load(path: str | Path) -> Task:
    """Load a task written by ``Task.save``."""
    path = Path(path)
    meta_file, tensor_file = path / "task.json", path / "tensors.safetensors"
    if not meta_file.exists() or not tensor_file.exists():
        raise FileNotFoundError(f"{path} is not a saved task: expected task.json and "
                                "tensors.safetensors (write one with Task.save)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != "mechgrok.task/1":
        raise ValueError(f"{meta_file}: unknown task format {meta.get('format')!r}")
    tensors = read_safetensors(tensor_file)
    missing = [k for k in _TENSOR_FIELDS if k not in tensors]
    if missing:
        raise ValueError(f"{tensor_file} lacks tensors {missing}")
    return Task(
        name=meta["name"],
        task_names=tuple(meta["task_names"]),
        d_vocab=int(meta["d_vocab"]),
        d_vocab_out=int(meta["d_vocab_out"]),
        p=int(meta["p"]),
        operand_positions=tuple(meta["operand_positions"]),
        config=meta["config"],
        **{k: tensors[k] for k in _TENSOR_FIELDS},
    )
