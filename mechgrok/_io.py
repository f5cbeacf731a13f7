"""Atomic file and folder writes (a reader never sees a half-written result), reads that name the damaged
file, checked path names, and a lock file that keeps a second writer out of a folder."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_dir", "atomic_path", "read_safetensors",
           "read_safetensors_with_metadata", "read_json", "to_jsonable", "safe_name", "child_path", "FolderLock",
           "FolderLocked", "pid_alive"]

log = logging.getLogger(__name__)


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
    return read_safetensors_with_metadata(file)[0]


def read_safetensors_with_metadata(file: str | Path) -> tuple[dict, dict[str, str]]:
    """The tensors of a safetensors file and its string metadata (``{}`` when it has none), with a
    clear ``ValueError`` for damaged or truncated files."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise ValueError(f"{file} is damaged or truncated and cannot be read ({e}); delete it "
                         "(or fall back to an earlier checkpoint) and rebuild it") from e


def read_json(file: str | Path, *, hint: str = "") -> Any:
    """``json.loads`` of ``file``; a damaged or truncated file gives a ``ValueError`` that names it,
    says where the JSON broke, and ends with ``hint`` (what to do about it)."""
    text = Path(file).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is damaged or truncated (not valid JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}){'; ' + hint if hint else ''}") from None


# ---------------------------------------------------------------------------- a lock on a folder


class FolderLocked(FileExistsError):
    """Another process holds the lock of a folder (a ``FileExistsError``, so the CLI prints it as one line)."""


class FolderLock:
    """An exclusive lock on a folder: the file ``FOLDER/.lock`` holds the owner's pid while it is held.

    The lock itself is ``fcntl.flock`` on that file, so the kernel drops it when its process dies:
    a ``.lock`` left by a killed process is stale and is taken over (with a log line). Where ``fcntl``
    does not exist (Windows) the file is created with ``O_CREAT | O_EXCL`` and a lock whose pid no
    longer runs counts as stale. ``release`` deletes the file. Not reentrant: a second ``acquire`` of
    the same folder, even in the same process, is refused.

    >>> import tempfile
    >>> with FolderLock(tempfile.mkdtemp(), what="run") as lock:
    ...     lock.file.exists()
    True
    """

    def __init__(self, folder: str | Path, *, what: str = "folder"):
        self.folder, self.what, self._fd = Path(folder), what, None

    @property
    def file(self) -> Path:
        return self.folder / ".lock"

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _refuse(self, pid: str) -> None:
        raise FolderLocked(f"{self.folder} is in use: another process (pid {pid or '?'}) is writing this {self.what} "
                           f"and holds {self.file}; wait for it to finish, or stop it (kill {pid or 'PID'}) and "
                           "start again (a killed run resumes)")

    def acquire(self) -> FolderLock:
        """Take the lock or raise ``FolderLocked`` naming the folder and the pid that holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self._acquire_exclusive()
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                self._refuse(pid)
            try:  # the holder may have released (deleted) the file between our open and flock: retry
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.read(fd, 32).decode(errors="replace").strip()
            if old:
                log.warning("taking over the stale lock %s of pid %s (that process ended without releasing it)",
                            self.file, old)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return self

    def _acquire_exclusive(self) -> FolderLock:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                pid = self.file.read_text(errors="replace").strip()
                if pid.isdigit() and pid_alive(int(pid)):
                    self._refuse(pid)
                log.warning("taking over the stale lock %s of pid %s (that process no longer runs)", self.file, pid)
                self.file.unlink(missing_ok=True)
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        self._refuse("?")

    def moved(self, folder: str | Path) -> None:
        """Tell the lock that its folder was renamed to ``folder`` (the lock stays held)."""
        self.folder = Path(folder)

    def release(self) -> None:
        """Delete the lock file and drop the lock (the file goes first, while the lock is still held)."""
        if self._fd is None:
            return
        try:
            self.file.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. an invalid pid on some platforms
        return False
    return True


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
