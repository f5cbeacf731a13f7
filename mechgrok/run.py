"""The Run type: a run folder, the unit of reproducibility.

Layout::

    RUN/
      config.json                      {"format", "task": task config, "model": model spec (mg.models.spec: a
                                       builder's arguments, or a HookedTransformer's transformer-lens config),
                                       "train": TrainConfig}
      task/                            the Task (task.json + tensors.safetensors)
      checkpoints/step_000100.safetensors   model parameters, optimizer state ("optim/..."), RNG state ("rng/...");
                                       a content hash in the metadata, checked on every load (mechgrok.checkpoints)
      checkpoints/damaged/             checkpoints that failed that check, moved here by train(resume="intact")
      history.jsonl                    one JSON object per evaluation (see mechgrok.train.HISTORY_KEYS)
      .lock                            while a process trains the run: its pid (mechgrok._io.FolderLock)
      analysis/*.json                  results written by later analyses
      report.html, report.md           written by mechgrok.report.build

``Run`` only reads; ``mechgrok.train`` is what writes a run. A run folder appears complete
(``config.json`` and ``task/`` built in a temporary sibling ``.RUN.<pid>.<random>.tmp``, then renamed).
Damaged files are errors that name the file and what to do, never silently replaced: a checkpoint
whose content does not match its hash, a missing ``history.jsonl`` in a run with checkpoints, a
damaged line in it, a ``config.json`` that is not valid JSON. Only the last line of
``history.jsonl``, when a kill cut it mid-write, is left out (with a warning; ``train`` recomputes it).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mechgrok import checkpoints, models
from mechgrok import tasks as _tasks
from mechgrok._config import check_int
from mechgrok._io import atomic_write_text, child_path, read_json, to_jsonable

__all__ = ["Run", "checkpoint_name", "read_history", "HistoryFile", "RUN_FORMAT", "RESUME_INTACT", "first_step",
           "MEMORIZED_ACC", "GENERALIZED_ACC"]

log = logging.getLogger(__name__)

RUN_FORMAT = "mechgrok.run/1"
_CKPT = re.compile(r"^step_(\d+)\.safetensors$")
# What to do about a damaged checkpoint or history: the one way to resume past it.
RESUME_INTACT = ("train again with resume='intact' (mg.train(..., resume='intact'), or `mechgrok train ... "
                 "--resume-intact`): it moves damaged checkpoints to checkpoints/damaged/ and resumes from the "
                 "newest intact checkpoint whose history is complete (bitwise the same weights as before)")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint of ``step`` inside ``RUN/checkpoints/``."""
    return f"step_{step:06d}.safetensors"


@dataclass(frozen=True)
class Run:
    """A read-only view of a run folder written by ``mechgrok.train``."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path} is not a mechgrok run (no config.json); "
                                    "create one with mg.train(...) or `mechgrok train`")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @cached_property
    def config(self) -> dict[str, Any]:
        f = self.path / "config.json"
        cfg = read_json(f, hint="restore it, or recreate the run (mg.train(..., overwrite=True) / "
                                "`mechgrok train --overwrite`)")
        if not isinstance(cfg, dict):
            raise ValueError(f"{f} holds {type(cfg).__name__}, not a run config (a JSON object)")
        if cfg.get("format") != RUN_FORMAT:
            raise ValueError(f"{self.path}/config.json has format {cfg.get('format')!r}, expected {RUN_FORMAT!r}")
        return cfg

    @property
    def name(self) -> str:
        return self.path.name

    def task(self) -> _tasks.Task:
        return _tasks.load(self.path / "task")

    def history(self) -> list[dict[str, Any]]:
        """One dict per evaluation step, in order (see ``mechgrok.train.HISTORY_KEYS``).

        A run without history and without checkpoints (just created) has ``[]``. A missing
        ``history.jsonl`` in a run with checkpoints, or a damaged line before its last, is an error
        naming the file; a cut last line (a kill while it was written) is left out with a warning.
        """
        f = self.path / "history.jsonl"
        if not f.exists():
            if steps := self.steps():
                raise FileNotFoundError(f"{f} is missing, but {self.path} has checkpoints up to step {steps[-1]}: "
                                        f"restore the file, or {RESUME_INTACT}")
            return []
        h = read_history(f)
        if h.damaged:
            raise ValueError(f"{f} is damaged at {h.damaged}: restore the file, or {RESUME_INTACT}")
        if h.torn:
            log.warning("%s: its last line is cut (a write was interrupted); leaving that row out", f)
        return h.rows

    def steps(self) -> list[int]:
        """Steps that have a checkpoint, ascending."""
        d = self.path / "checkpoints"
        if not d.exists():
            return []
        return sorted(int(m.group(1)) for f in d.iterdir() if (m := _CKPT.match(f.name)))

    def select_steps(self, steps: Iterable[int] | None = None, *, owner: str = "") -> list[int]:
        """``steps`` (default: every checkpoint) sorted and de-duplicated, after checking that each has a
        checkpoint; the error names the missing ones and those available (``owner``: who asks)."""
        available = self.steps()
        if not available:
            raise FileNotFoundError(f"{self.path} has no checkpoints; train it first")
        if steps is None:
            return available
        wanted = sorted({check_int(s, "steps", low=0, owner=owner) for s in steps})
        if missing := [s for s in wanted if s not in available]:
            raise ValueError(f"{owner + ': ' if owner else ''}no checkpoints at steps {missing} in {self.path}; "
                             f"available: {available}")
        return wanted

    def checkpoint(self, step: int) -> Path:
        return self.path / "checkpoints" / checkpoint_name(step)

    def load_model(self, step: int | None = None, *, device: str | torch.device | None = None) -> nn.Module:
        """The model at ``step`` (default: the last checkpoint), on ``device`` (default: torch's default device)."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.path} has no checkpoints yet")
        step = steps[-1] if step is None else check_int(step, "step", low=0, owner="Run.load_model")
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step}; available: {steps}")
        model = models.build(self.config["model"], device=device)
        try:
            tensors = checkpoints.read(self.checkpoint(step))  # the content hash is checked here
        except checkpoints.DamagedCheckpoint as e:
            raise checkpoints.DamagedCheckpoint(e.file, f"{e}; load another step (available: {steps}), or "
                                                        f"{RESUME_INTACT}") from None
        models.load_state(model, {k: v for k, v in tensors.items() if "/" not in k},
                          source=str(self.checkpoint(step)))
        return model

    def masks(self) -> dict[str, torch.Tensor] | None:
        """The weight masks this run trained with (``train(..., masks=...)``, a lottery ticket):
        ``{parameter name: bool tensor}``, checked against the hash in ``config.json``; ``None`` for a
        run without masks. ``config["masks"]`` holds their summary and where they came from."""
        info = self.config.get("masks")
        if info is None:
            return None
        f = child_path(self.path, info.get("file", "masks.safetensors"), what="masks file", source=self.path / "config.json")
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing, but {self.path}/config.json says the run trained with masks: "
                                    "restore the file (the checkpoints hold the masked weights, not the masks)")
        tensors = checkpoints.read(f)
        if checkpoints.content_hash(tensors) != info.get("sha256"):
            raise checkpoints.DamagedCheckpoint(f, f"{f} holds other masks than {self.path}/config.json records "
                                                   "(their hashes differ); restore the file")
        return {k: v.bool() for k, v in tensors.items()}

    # --------------------------------------------------------------- analysis results
    def write_analysis(self, name: str, result: dict[str, Any]) -> Path:
        """Write ``analysis/NAME.json`` atomically (NaN/inf become null; tensors become lists)."""
        f = self.path / "analysis" / f"{name}.json"
        atomic_write_text(f, json.dumps(to_jsonable(result), indent=2, allow_nan=False))
        return f

    def read_analysis(self, name: str) -> dict[str, Any] | None:
        f = self.path / "analysis" / f"{name}.json"
        if not f.exists():
            return None
        return read_json(f, hint=f"delete it and run the analysis again (mechgrok analyze {self.path} --only {name})")


@dataclass(frozen=True)
class HistoryFile:
    """What ``read_history`` found in a ``history.jsonl``."""

    rows: list[dict[str, Any]]  # the rows before the first damaged line, in order
    torn: bool  # the last line lacks its newline and does not parse: cut by a kill mid-write, left out
    damaged: str | None  # where an earlier line is damaged ("line 7: ..."), or None


def read_history(file: str | Path) -> HistoryFile:
    """Parse a ``history.jsonl``: every line a JSON object with an integer ``step``, steps increasing."""
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None
        except json.JSONDecodeError as e:
            row, problem = None, f"not valid JSON ({e.msg} at column {e.colno})"
        if problem is None:
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                problem = "not a history row (a JSON object with an integer 'step')"
            elif rows and step <= rows[-1]["step"]:
                problem = f"step {step} after step {rows[-1]['step']}"
        if problem is None:
            rows.append(row)
            continue
        if i == last and not text.endswith("\n") and row is None:
            return HistoryFile(rows, torn=True, damaged=None)
        return HistoryFile(rows, torn=False, damaged=f"line {i + 1}: {problem}")
    return HistoryFile(rows, torn=False, damaged=None)


# ---------------------------------------------------------------------------- phases of a history
# The one definition of "memorized" and "generalized" (the report's phases, the influence analysis'
# early checkpoint, circuits over training all read these).
#: Memorization done: every training example right (train_acc >= 1 - 1e-9; the 1e-9 only absorbs
#: float rounding). Training accuracy counts corrupted examples against their corrupted label.
MEMORIZED_ACC = 1.0 - 1e-9
#: Generalization done: test accuracy at least 95%.
GENERALIZED_ACC = 0.95


def first_step(history: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """The first logged ``step`` whose ``key`` is ``>= threshold``; None if never (None/NaN skipped).

    >>> first_step([{"step": 0, "acc": 0.1}, {"step": 10, "acc": None}, {"step": 20, "acc": 0.99}], "acc", 0.95)
    20
    """
    for row in history:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= threshold:
            return int(row["step"])
    return None
