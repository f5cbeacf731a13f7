"""Atomic file and folder writes: a reader never sees a half-written result."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_dir", "atomic_path", "read_safetensors", "to_jsonable",
           "safe_name", "child_path"]


# A name that may become one path component: starts with a letter, digit or underscore, then letters,
# digits and ``_ . , = + -`` (no separators, no "..", nothing hidden, at most 200 characters).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,=+-]{0,199}$")


def safe_name(name: Any, *, what: str = "name", source: str | Path | None = None) -> str:
    """``name`` if it is safe as a single file or folder name, else a ``ValueError`` that says where the
    name came from (``source``, e.g. the JSON file that held it) and what a valid name looks like.

    Every name read from a file (sub-task names, cache entries, sweep points) goes through here
    before it becomes part of a path, so no crafted file can make mechgrok write or read outside the
    folder it was given.
    """
    where = f" in {source}" if source is not None else ""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r}{where} cannot be used as a file name: use letters, digits and "
                         "_ . , = + - only (no '/', no '..', not starting with '.'), at most 200 characters")
    return name


def child_path(folder: str | Path, name: Any, *, suffix: str = "", what: str = "name",
               source: str | Path | None = None) -> Path:
    """``folder / (name + suffix)`` for a ``name`` checked by ``safe_name`` (the result cannot leave ``folder``)."""
    return Path(folder) / f"{safe_name(name, what=what, source=source)}{suffix}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``path`` when the block succeeds.

    An existing ``path`` is replaced only after the new folder is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_safetensors(file: str | Path) -> dict:
    """``safetensors.torch.load_file`` with a clear error for damaged or truncated files."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise ValueError(f"{file} is damaged or truncated and cannot be read ({e}); delete it "
                         "(or fall back to an earlier checkpoint) and rebuild it") from e


def to_jsonable(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python numbers, tuples and tensors -> lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy / torch arrays
        return to_jsonable(value.tolist())
    return str(value)
