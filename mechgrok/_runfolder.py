"""Opening a run folder for ``mechgrok.train``: created atomically, locked against a second writer,
cleared of what killed writes left behind, and checked before a resume.

- A new run folder is built (``.lock``, ``task/``, ``config.json``) in a temporary sibling
  ``.NAME.<pid>.<random>.tmp`` and renamed into place, so a kill never leaves a half-made run; such
  siblings whose process is gone are deleted on the next start. An existing empty folder (the
  working directory, a ``mkdtemp``) is filled in place instead: lock first, ``config.json`` last, so
  a killed creation (``.lock`` and no ``config.json``) is recognised and redone. ``overwrite`` builds the new folder
  the same way and swaps it in (the old one is deleted only once the new one is in place).
- ``RUN/.lock`` (``mechgrok._io.FolderLock``) is held while training: a second writer is refused
  with the folder and the holder's pid; a lock left by a killed process is taken over.
- Temporary files of interrupted atomic writes (``.*.tmp``) in ``RUN/`` and ``RUN/checkpoints/``
  are deleted once the lock is held (analyses clean their own folder).
- ``resume_point`` picks the checkpoint to resume from and checks that ``history.jsonl`` holds
  every evaluation row before it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mechgrok._io import FolderLock, atomic_write_text, pid_alive, read_json
from mechgrok.checkpoints import DamagedCheckpoint, is_intact, move_aside
from mechgrok.run import RESUME_INTACT, HistoryFile, Run, read_history
from mechgrok.tasks import Task

__all__ = ["open_run", "resume_point", "check_out_path", "RUN_FILES"]

log = logging.getLogger("mechgrok.train")

#: Files besides ``task/`` and ``config.json`` that a run folder may be created with (``open_run(files=)``).
RUN_FILES = ("masks.safetensors",)
_Files = dict[str, Callable[[Path], None]]

_TMP_FILE = re.compile(r"^\..+\.tmp$")  # what mechgrok._io.atomic_path leaves when its writer is killed
# What a run folder made by an older mechgrok holds when it was killed while being created.
_CREATION_LEFTOVER = re.compile(r"^\.(task|config\.json|history\.jsonl)\..+\.tmp$")


def check_out_path(out: Path) -> None:
    """Refuse an ``out`` that is a file, or that lies under one, with a message saying so."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == out else f" (inside {p}, which is a file)"
                raise FileExistsError(f"{out} cannot be a run folder{where}: {p} is a file, not a folder; choose "
                                      "a folder path for the run (out= / --out)")
            return


def _write_files(folder: Path, files: _Files) -> None:
    for name, write in files.items():
        if name not in RUN_FILES:
            raise ValueError(f"a run folder holds no file {name!r} (it may hold {RUN_FILES})")
        write(folder / name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_siblings(out: Path) -> None:
    """Delete ``.NAME.<pid>.*.tmp`` folders next to ``out`` whose process no longer runs."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            log.info("deleting %s, left by an interrupted run creation (pid %s)", p, m.group(1))
            shutil.rmtree(p, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Delete temporary files of interrupted writes in ``out`` and ``out/checkpoints`` (lock held)."""
    removed = [p for d in (out, out / "checkpoints") if d.is_dir() for p in d.iterdir()
               if _TMP_FILE.match(p.name) and p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        log.info("deleted %d temporary files left by interrupted writes in %s: %s", len(removed), out,
                 ", ".join(str(p.relative_to(out)) for p in removed[:5]))


def _build(out: Path, run_config: dict, task: Task, files: _Files) -> tuple[Path, FolderLock]:
    """A complete new run folder in a temporary sibling of ``out``, its lock held."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    lock = FolderLock(tmp, what="run").acquire()
    try:
        task.save(tmp / "task")
        _write_files(tmp, files)
        atomic_write_text(tmp / "config.json", json.dumps(run_config, indent=2))
    except BaseException:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, lock


def _create(out: Path, run_config: dict, task: Task, files: _Files) -> FolderLock | None:
    """Create the missing run folder ``out`` atomically (built in a sibling, then renamed); ``None``
    when another process created it first."""
    tmp, lock = _build(out, run_config, task, files)
    try:
        os.rename(tmp, out)
    except OSError:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():  # lost the race: another process made it in the meantime
            return None
        raise
    lock.moved(out)
    return lock


def _create_in_place(out: Path, run_config: dict, task: Task, files: _Files) -> FolderLock | None:
    """Make a run in the existing folder ``out`` (empty, or holding only what an interrupted creation
    left). The folder stays (it may be a working directory, or one the caller made); the lock is taken
    first and ``config.json`` written last, so an interrupted creation is recognised as one next time
    (``.lock`` without ``config.json``). ``None`` when another process finished it meanwhile."""
    lock = FolderLock(out, what="run").acquire()
    try:
        if (out / "config.json").exists():
            lock.release()
            return None
        for p in out.iterdir():
            if p.name == "task" or p.name in RUN_FILES or _CREATION_LEFTOVER.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        task.save(out / "task")
        _write_files(out, files)
        atomic_write_text(out / "config.json", json.dumps(run_config, indent=2))
    except BaseException:
        shutil.rmtree(out / "task", ignore_errors=True)
        for name in files:
            (out / name).unlink(missing_ok=True)
        lock.release()
        raise
    return lock


def _replace(out: Path, run_config: dict, task: Task, old_lock: FolderLock | None, files: _Files) -> FolderLock:
    """Swap a new run folder in for ``out``; the old one is deleted once the new one is in place."""
    tmp, lock = _build(out, run_config, task, files)
    trash = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.rename(out, trash)
    except BaseException:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old_lock is not None:
        old_lock.moved(trash)
    os.rename(tmp, out)
    lock.moved(out)
    if old_lock is not None:
        old_lock.release()
    shutil.rmtree(trash, ignore_errors=True)
    return lock


def _interrupted_creation(out: Path) -> bool:
    """``out`` holds nothing but what a creation leaves when killed: nothing, temporary files, or
    mechgrok's ``.lock`` with (perhaps) ``task/`` and no ``config.json``."""
    names = {p.name for p in out.iterdir() if not _CREATION_LEFTOVER.match(p.name)}
    return not names or (".lock" in names and names <= {".lock", "task", *RUN_FILES})


def open_run(out: Path, run_config: dict, task: Task, overwrite: bool, *, files: _Files | None = None) -> FolderLock:
    """Create or reuse the run folder ``out`` (a path with a name: not ``.``) for ``run_config`` and
    return its lock, held.

    ``files`` (names from ``RUN_FILES``) are written into a new folder before its ``config.json``
    (``{name: writer(path)}``; a reused folder already has them, as its equal config records).

    A folder with the same config is reused; one with another config, a damaged ``config.json``,
    or other contents is refused unless ``overwrite``.
    """
    files = {} if files is None else files
    check_out_path(out)
    _remove_stale_siblings(out)
    for _ in range(3):
        if not out.exists() or _interrupted_creation(out):
            lock = (_create if not out.exists() else _create_in_place)(out, run_config, task, files)
            if lock is not None:
                return lock
            continue
        cfg_file = out / "config.json"
        if not cfg_file.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists and is not a mechgrok run; choose another folder or "
                                      "pass overwrite=True (--overwrite) to replace it")
            log.warning("overwriting %s as requested", out)
            return _replace(out, run_config, task, None, files)
        lock = FolderLock(out, what="run").acquire()
        try:
            _remove_leftovers(out)
            try:
                old = read_json(cfg_file, hint="restore it, or pass overwrite=True (--overwrite) to replace the run")
            except ValueError:
                if not overwrite:
                    raise
                old = None
            if old == run_config:
                return lock
            if not overwrite:
                diff = _diff(old, run_config) if isinstance(old, dict) else "not a run config"
                raise FileExistsError(f"{out} holds a run with a different config ({diff}); choose another "
                                      "folder or pass overwrite=True (--overwrite) to replace it")
            log.warning("overwriting %s as requested", out)
            return _replace(out, run_config, task, lock, files)
        except BaseException:
            lock.release()
            raise
    raise FileExistsError(f"{out} kept changing while it was being opened; is another process creating and "
                          "deleting it? Try again")


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{k}.")
            if sub:
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return "; ".join(parts[:6])


# ---------------------------------------------------------------------------- where to resume


def resume_point(out: Path, eval_every: int, intact: bool,
                 load: Callable[[Path], None]) -> tuple[int | None, HistoryFile]:
    """The checkpoint step to resume from (``None``: no checkpoint, start afresh) after ``load``-ing it,
    and the history read from ``out/history.jsonl``.

    The checkpoint is the newest one, provided it is intact and the history holds every evaluation
    row before it; otherwise an error saying what is wrong and how to resume past it. With
    ``intact=True``, the newest checkpoint that passes both checks; damaged ones are moved to
    ``checkpoints/damaged/`` (never deleted), each with a warning.
    """
    run, hist_file = Run(out), out / "history.jsonl"
    steps = run.steps()
    history = read_history(hist_file) if hist_file.exists() else HistoryFile([], torn=False, damaged=None)
    if not steps:
        return None, history
    if history.damaged and not intact:
        raise ValueError(f"{hist_file} is damaged at {history.damaged}: restore the file, or {RESUME_INTACT}")
    have = [r["step"] for r in history.rows]

    def missing_rows(s: int) -> list[int]:  # evaluation steps before s without their row
        return sorted(set(range(0, s, eval_every)) - set(have))

    if not intact:
        start = steps[-1]
        try:
            load(run.checkpoint(start))
        except DamagedCheckpoint as e:
            fallback = next((s for s in reversed(steps[:-1]) if not missing_rows(s) and is_intact(run.checkpoint(s))),
                            None)
            where = f"step {fallback}" if fallback is not None else "none is left, so it starts from the model you pass"
            raise DamagedCheckpoint(e.file, f"{e}. To resume past it, {RESUME_INTACT}; newest intact checkpoint: "
                                            f"{where}") from None
        if gap := missing_rows(start):
            if not hist_file.exists():
                raise FileNotFoundError(f"{hist_file} is missing, but {out} has checkpoints up to step {start}: "
                                        f"restore the file, or {RESUME_INTACT}")
            raise ValueError(f"{hist_file} lacks the rows of steps {gap[:5]} (cut or edited), but {out} has "
                             f"checkpoints up to step {start}: restore the file, or {RESUME_INTACT}")
        if history.torn:
            log.warning("%s: its last line was cut by an interrupted write; dropping it (it is recomputed)", hist_file)
        return start, history
    for s in reversed(steps):
        if gap := missing_rows(s):
            log.warning("not resuming from step %d: %s lacks the rows of steps %s", s, hist_file, gap[:5])
            continue
        try:
            load(run.checkpoint(s))
        except DamagedCheckpoint as e:
            log.warning("%s; moved it to %s", e, move_aside(run.checkpoint(s)))
            continue
        log.warning("resuming %s from step %d, its newest intact checkpoint with a complete history", out, s)
        return s, history
    log.warning("%s has no intact checkpoint with a complete history; starting again from the model you pass", out)
    return None, history
