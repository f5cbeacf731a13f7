"""The activation cache and its on-disk format: what ``mechgrok.capture`` returns and writes.

A capture folder holds ``meta.json`` (``{"format": FORMAT, "hooks", "n", "shapes", "dtypes",
"files", "backend", ...}``) and one standard ``.npy`` file (``numpy.lib.format``) per hook, each
``[N, ...]``. ``_Sink`` writes them: in memory, a pre-allocated tensor per hook; on disk, the
``.npy`` header first and then each batch's bytes appended in order, so peak memory does not grow
with ``N``. ``load_cache`` maps a folder back lazily (copy-on-write memory maps, no pickle).
Import these from ``mechgrok.capture``; this module is its storage half.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from numpy.lib import format as npformat
from torch import Tensor

from mechgrok._io import atomic_write_text, child_path, safe_name

__all__ = ["ActivationCache", "load_cache", "FORMAT"]

FORMAT = "mechgrok.activations/1"


class ActivationCache(Mapping[str, Tensor]):
    """Read-only mapping hook name -> activations ``[N, ...]``, plus metadata.

    Not transformer-lens' ``ActivationCache``: this one holds only the requested hooks, over a
    whole dataset, and may live on disk.

    Attributes:
        meta: ``{"hooks", "shapes", "dtypes", "n", "backend", ...}``.
        path: the folder the tensors are memory-mapped from, or ``None`` in memory.

    The mapping cannot be changed; the tensors of a disk cache are copy-on-write views of the
    files, so editing them in place never alters what is on disk.
    """

    def __init__(self, tensors: Mapping[str, Tensor], meta: dict[str, Any] | None = None,
                 path: str | Path | None = None):
        self._tensors = dict(tensors)
        self.meta = dict(meta) if meta is not None else {
            "format": FORMAT, "hooks": list(self._tensors), "n": len(next(iter(self._tensors.values()), [])),
            "shapes": {k: list(v.shape) for k, v in self._tensors.items()},
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in self._tensors.items()}}
        self.path = Path(path) if path is not None else None

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"hook {name!r} was not captured; this cache holds {list(self._tensors)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        where = f"disk {str(self.path)!r}" if self.path is not None else "memory"
        shapes = ", ".join(f"{k}: {list(v.shape)}" for k, v in self._tensors.items())
        return f"ActivationCache({where}; {shapes})"


def load_cache(path: str | Path) -> ActivationCache:
    """Open a folder written by ``capture(..., out=path)``; nothing is read until it is used.

    Each tensor is ``torch.from_numpy`` over ``np.load(mmap_mode="c")``: a copy-on-write memory
    map, so the OS pages data in on access, the file is opened read-only, and an in-place edit
    changes only the process's private copy (a read-only ``"r"`` map would make torch warn and
    crash on such an edit). No pickle is involved.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not an activation cache: no meta.json (write one with "
                                "mechgrok.capture(..., out=path))")
    meta = _read_meta(meta_file)
    tensors = {}
    for name in meta["hooks"]:
        # a crafted meta.json must not point the loader outside the folder ("../x.npy", "/tmp/x.npy")
        file = child_path(path, meta["files"][name], what=f"the file of hook {name!r}", source=meta_file)
        if not file.is_file():
            raise FileNotFoundError(f"{file} (hook {name!r}, listed in {meta_file}) is missing; capture again")
        try:
            array = np.load(file, mmap_mode="c", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{file} is damaged or truncated ({e}); capture again") from None
        if list(array.shape) != meta["shapes"][name]:
            raise ValueError(f"{file} has shape {list(array.shape)} but meta.json "
                             f"says {meta['shapes'][name]}; the cache is damaged, capture it again")
        tensors[name] = torch.from_numpy(array)
    return ActivationCache(tensors, meta, path)


def _read_meta(meta_file: Path) -> dict[str, Any]:
    """``meta.json`` of a disk cache, checked to hold the entries ``load_cache`` reads."""
    def damaged(what: str) -> ValueError:
        return ValueError(f"{meta_file} is not a valid activation-cache description ({what}); capture again")

    try:
        meta = json.loads(meta_file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise damaged(f"a JSON object is expected, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    hooks, files, shapes = meta.get("hooks"), meta.get("files"), meta.get("shapes")
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        raise damaged("'hooks' must be a list of hook names")
    for key, value in (("files", files), ("shapes", shapes)):
        if not isinstance(value, dict) or set(value) != set(hooks):
            raise damaged(f"{key!r} must map every hook in 'hooks' and no other")
    if not all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes.values()):
        raise damaged("every entry of 'shapes' must be a list of sizes")
    return meta


class _Sink:
    """Where activations go, one ``[N, ...]`` array per hook, shaped by its first batch.

    In memory (``folder=None``): a pre-allocated tensor that each batch is copied into, or the
    hook's own tensor when one batch holds all ``N`` examples (``keep``). On disk: a standard
    ``.npy`` file whose header is written first and each batch's bytes appended in order, then
    fsync'ed; sequential writes run several times faster than writing through a memory map,
    whose every new page costs a fault, and memory stays flat as ``N`` grows.
    """

    def __init__(self, n: int, folder: Path | None):
        self.n, self.folder = n, folder
        self.tensors: dict[str, Tensor] = {}  # in memory
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}
        self.files: dict[str, str] = {}  # on disk: hook -> file name in folder
        self._open: dict[str, BinaryIO] = {}  # on disk: hook -> open .npy file
        self._rows: dict[str, int] = {}  # on disk: hook -> rows written so far

    def keep(self, name: str, value: Tensor) -> None:
        """Hold ``value`` ``[N, ...]`` itself as ``name``'s activations (no copy)."""
        self._note(name, value)
        self.tensors[name] = value

    def write(self, name: str, start: int, value: Tensor) -> None:
        """Store ``value`` ``[rows, ...]`` as rows ``start:start + rows`` of ``name``."""
        if name not in self.shapes:
            self._note(name, value)
            self._allocate(name, value)
        elif list(value.shape[1:]) != self.shapes[name][1:]:
            raise ValueError(f"hook {name!r} gave per-example shape {list(value.shape[1:])} in one batch and "
                             f"{self.shapes[name][1:]} in another; capture needs one shape for all examples")
        if self.folder is None:
            self.tensors[name][start:start + len(value)].copy_(value)
            return
        if start != self._rows[name]:  # batches arrive in order, each hook once per batch
            raise RuntimeError(f"hook {name!r}: rows {start}: arrived after rows :{self._rows[name]}")
        self._open[name].write(memoryview(value.cpu().contiguous().numpy()))
        self._rows[name] += len(value)

    def _note(self, name: str, value: Tensor) -> None:
        self.shapes[name] = [self.n, *value.shape[1:]]
        self.dtypes[name] = str(value.dtype).removeprefix("torch.")

    def _allocate(self, name: str, value: Tensor) -> None:
        shape = (self.n, *value.shape[1:])
        if self.folder is None:
            self.tensors[name] = torch.empty(shape, dtype=value.dtype)
            return
        try:
            dtype = torch.empty(0, dtype=value.dtype).numpy().dtype
        except TypeError as e:
            raise TypeError(f"hook {name!r} has dtype {value.dtype}, which .npy cannot store; cast the "
                            "model (e.g. model.float()) or capture in memory (out=None)") from e
        self.files[name] = _file_name(name, set(self.files.values()))
        f = self._open[name] = open(self.folder / self.files[name], "wb")  # noqa: SIM115 - see close()
        self._rows[name] = 0
        npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False,
                                            "shape": shape})

    def finish(self, meta: dict[str, Any]) -> None:
        """On disk: close the ``.npy`` files, then write ``meta.json``: ``meta`` plus each hook's file."""
        self.close()
        meta = {**meta, "files": {h: self.files[h] for h in meta["hooks"]}}
        atomic_write_text(self.folder / "meta.json", json.dumps(meta, indent=2))

    def close(self) -> None:
        """Flush, fsync and close the ``.npy`` files (idempotent)."""
        while self._open:
            _, f = self._open.popitem()
            with f:
                f.flush()
                os.fsync(f.fileno())

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_name(hook: str, taken: set[str]) -> str:
    """A ``.npy`` name for ``hook`` that ``safe_name`` accepts and no other hook has: characters outside
    ``[A-Za-z0-9_.-]`` and runs of dots become ``_``; a name taken by another hook (``a b`` and
    ``a_b``) or too long gets a hash of the hook name."""
    stem = re.sub(r"^(?=[.-])", "_", re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", hook))) or "_"
    name = f"{stem}.npy"
    if name in taken or len(name) > 200:
        name = f"{stem[:180]}-{hashlib.sha256(hook.encode()).hexdigest()[:12]}.npy"
    return safe_name(name, what=f"the file name of hook {hook!r}")
