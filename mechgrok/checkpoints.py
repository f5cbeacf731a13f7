"""Checkpoint files: safetensors with a content hash, verified on every read.

A checkpoint ``RUN/checkpoints/step_XXXXXX.safetensors`` holds the model's parameters (keys without
a ``/``), the optimizer state (``optim/<parameter>/<state key>``) and the training RNG
(``rng/train``). Its safetensors metadata holds ``{"format": "mechgrok.checkpoint/1", "sha256": H}``,
where ``H`` is the sha256 of every tensor in key order: the key, dtype and shape, then the raw bytes.
The hash covers the tensors, not the file's bytes, so it can be computed before the file exists and
checked after safetensors parsed it. A bit flipped anywhere in the payload (or in the recorded hash)
makes ``read`` fail with a ``DamagedCheckpoint`` naming the file; a damaged header, or a truncated
file, already fails to parse.

Limits: the hash detects damage, not tampering (whoever can rewrite the file can rewrite the hash).
Checkpoints written before hashes existed (no ``sha256`` in their metadata) are read unverified,
with one warning per file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mechgrok import models
from mechgrok._io import atomic_path, read_safetensors_with_metadata

__all__ = ["CHECKPOINT_FORMAT", "DamagedCheckpoint", "content_hash", "write", "read", "is_intact",
           "save_training_state", "load_training_state", "move_aside"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mechgrok.checkpoint/1"
_unverified_warned: set[str] = set()  # files already warned about (one warning per file and process)


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be read or whose content does not match its recorded hash."""

    def __init__(self, file: Path, message: str):
        super().__init__(message)
        self.file = Path(file)


def content_hash(tensors: dict[str, Tensor]) -> str:
    """sha256 (hex) over ``tensors`` in key order: per tensor its key, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write(path: str | Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically, with their content hash in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "sha256": content_hash(tensors)})


def read(path: str | Path) -> dict[str, Tensor]:
    """The tensors of checkpoint ``path``, after checking them against the hash recorded in the file.

    Raises:
        DamagedCheckpoint: the file cannot be parsed (truncated, damaged header) or its tensors do
            not match the recorded hash. The message names the file.
    """
    path = Path(path)
    try:
        tensors, meta = read_safetensors_with_metadata(path)
    except ValueError as e:
        raise DamagedCheckpoint(path, str(e)) from e
    recorded = meta.get("sha256")
    if recorded is None:
        if str(path) not in _unverified_warned:
            _unverified_warned.add(str(path))
            log.warning("%s has no content hash (written before mechgrok hashed checkpoints): loading it "
                        "unverified", path)
        return tensors
    actual = content_hash(tensors)
    if actual != recorded:
        raise DamagedCheckpoint(path, f"{path} is damaged: its tensors do not match the sha256 recorded when it "
                                      f"was written (recorded {recorded[:16]}…, now {actual[:16]}…)")
    return tensors


def is_intact(path: str | Path) -> bool:
    """Whether ``read(path)`` succeeds."""
    try:
        read(path)
    except DamagedCheckpoint:
        return False
    return True


def move_aside(path: str | Path) -> Path:
    """Move a damaged checkpoint into ``damaged/`` next to it (never deleted); returns its new path."""
    path = Path(path)
    dest = path.parent / "damaged" / path.name
    dest.parent.mkdir(exist_ok=True)
    n = 1
    while dest.exists():  # keep earlier damaged copies of the same step
        dest, n = path.parent / "damaged" / f"{path.stem}.{n}{path.suffix}", n + 1
    os.replace(path, dest)
    return dest


# ---------------------------------------------------------------------------- the training state


def save_training_state(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    """Checkpoint ``model``'s parameters, ``opt``'s state and the generator ``g`` at ``path``."""
    tensors = models.state_tensors(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for k, v in state.items():
            tensors[f"optim/{names[id(p)]}/{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    tensors["rng/train"] = g.get_state()
    write(path, tensors)


def load_training_state(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    """Restore what ``save_training_state`` wrote (verifying the hash) into ``model``, ``opt`` and ``g``,
    on the devices they are on (a checkpoint holds CPU tensors)."""
    tensors = read(path)
    if "rng/train" not in tensors:
        raise DamagedCheckpoint(path, f"{path} has no training RNG state; it was not written by mechgrok.train")
    models.load_state(model, {k: v for k, v in tensors.items() if "/" not in k}, source=str(path))
    params = dict(model.named_parameters())
    on_device = {id(p) for group in opt.param_groups if group.get("capturable") or group.get("fused")
                 for p in group["params"]}  # optimizers whose step counter lives with the parameter
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, name, k = key.split("/")
            if name not in params:
                raise DamagedCheckpoint(path, f"{path} holds optimizer state for {name!r}, which the model lacks")
            p = params[name]
            # moments go to the parameter's device; AdamW's "step" stays a CPU scalar unless capturable/fused
            opt.state[p][k] = v.clone() if k == "step" and id(p) not in on_device else v.to(p.device, copy=True)
    g.set_state(tensors["rng/train"])
