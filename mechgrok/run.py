"""The Run type: a run folder, the unit of reproducibility.

Layout::

    RUN/
      config.json                      {"format", "task": task config, "model": model spec, "train": TrainConfig}
      task/                            the Task (task.json + tensors.safetensors)
      checkpoints/step_000100.safetensors   model parameters, optimizer state ("optim/..."), RNG state ("rng/...")
      history.jsonl                    one JSON object per evaluation (see mechgrok.train.HISTORY_KEYS)
      analysis/*.json                  results written by later analyses
      report.html, report.md           written by mechgrok.report.build

``Run`` only reads; ``mechgrok.train`` is what writes a run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from mechgrok import models
from mechgrok import tasks as _tasks
from mechgrok._io import atomic_write_text, read_safetensors, to_jsonable

__all__ = ["Run", "checkpoint_name", "RUN_FORMAT"]

RUN_FORMAT = "mechgrok.run/1"
_CKPT = re.compile(r"^step_(\d+)\.safetensors$")


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
        cfg = json.loads((self.path / "config.json").read_text())
        if cfg.get("format") != RUN_FORMAT:
            raise ValueError(f"{self.path}/config.json has format {cfg.get('format')!r}, expected {RUN_FORMAT!r}")
        return cfg

    @property
    def name(self) -> str:
        return self.path.name

    def task(self) -> _tasks.Task:
        return _tasks.load(self.path / "task")

    def history(self) -> list[dict[str, Any]]:
        """One dict per evaluation step, in order (see ``mechgrok.train.HISTORY_KEYS``)."""
        f = self.path / "history.jsonl"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def steps(self) -> list[int]:
        """Steps that have a checkpoint, ascending."""
        d = self.path / "checkpoints"
        if not d.exists():
            return []
        return sorted(int(m.group(1)) for f in d.iterdir() if (m := _CKPT.match(f.name)))

    def checkpoint(self, step: int) -> Path:
        return self.path / "checkpoints" / checkpoint_name(step)

    def load_model(self, step: int | None = None) -> nn.Module:
        """The model at ``step`` (default: the last checkpoint)."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.path} has no checkpoints yet")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step}; available: {steps}")
        model = models.build(self.config["model"])
        tensors = read_safetensors(self.checkpoint(step))
        models.load_state(model, {k: v for k, v in tensors.items() if "/" not in k},
                          source=str(self.checkpoint(step)))
        return model

    # --------------------------------------------------------------- analysis results
    def write_analysis(self, name: str, result: dict[str, Any]) -> Path:
        """Write ``analysis/NAME.json`` atomically (NaN/inf become null; tensors become lists)."""
        f = self.path / "analysis" / f"{name}.json"
        atomic_write_text(f, json.dumps(to_jsonable(result), indent=2, allow_nan=False))
        return f

    def read_analysis(self, name: str) -> dict[str, Any] | None:
        f = self.path / "analysis" / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None
