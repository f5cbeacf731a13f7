"""The two types every analysis shares: ``Result`` (a typed, JSON-round-tripping result) and
``Analysis`` (a registered analysis: how it runs, where it applies, what it returns)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, TypeVar

from mechgrok.run import Run

__all__ = ["Result", "Analysis", "ANALYSES", "analysis", "one_answer_task", "dense_mlp_task", "moe_experts",
           "sequence_task"]

R = TypeVar("R", bound="Result")


class Result:
    """Base of the analyses' typed results (each a frozen dataclass).

    A result is stored as ``RUN/analysis/{name}.json``: one JSON key per field (``to_json``), read
    back with ``from_json`` (unknown keys are ignored, so files written by a newer mechgrok still
    load; a missing required field is an error naming the file and the command that rebuilds it).
    Fields with a default are optional: files written before they existed load with the default.
    """

    name: ClassVar[str]  # the analysis' name: its file is analysis/{name}.json

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict of the fields (values are plain lists/dicts/numbers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls: type[R], data: Any, *, source: str = "") -> R:
        """The result from its JSON dict (``source``: the file, for error messages)."""
        where = f"{source or f'analysis/{cls.name}.json'}"
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds {type(data).__name__}, not an object; rebuild it with "
                             f"`mechgrok analyze RUN --only {cls.name}`")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        missing = [f.name for f in fields if f.name not in data and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"{where} lacks {missing} (written by another version of mechgrok, or edited); rebuild "
                             f"it with `mechgrok analyze RUN --only {cls.name}`")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    @classmethod
    def load(cls: type[R], run: Run) -> R | None:
        """The result stored in ``run`` (None when the analysis was not run on it)."""
        from mechgrok.report.sections import read_analysis  # noqa: PLC0415 (reports its damage with the fix)

        data = read_analysis(run, cls.name)
        return None if data is None else cls.from_json(data, source=str(run.path / "analysis" / f"{cls.name}.json"))


@dataclass(frozen=True)
class Analysis:
    """One registered analysis.

    Attributes:
        name: its name (``mechgrok analyze --only NAME``; its file ``analysis/NAME.json``).
        run: ``(run, progress) -> Result``: computes it on a run's last checkpoint (or over its
            checkpoints).
        result: the type ``run`` returns.
        applies: ``run -> None`` when it applies, else the reason it does not (logged; no file).
    """

    name: str
    run: Callable[[Run, bool], Result]
    result: type[Result]
    applies: Callable[[Run], str | None]


#: name -> Analysis, in the order ``analyze`` runs them (the order their modules are imported).
ANALYSES: dict[str, Analysis] = {}


def _always(run: Run) -> None:
    return None


def analysis(result: type[Result], *, applies: Callable[[Run], str | None] | None = None
             ) -> Callable[[Callable[[Run, bool], Result]], Callable[[Run, bool], Result]]:
    """Register ``fn(run, progress) -> result`` as the analysis ``result.name``."""
    def register(fn: Callable[[Run, bool], Result]) -> Callable[[Run, bool], Result]:
        ANALYSES[result.name] = Analysis(result.name, fn, result, applies or _always)
        return fn

    return register


def one_answer_task(run: Run) -> str | None:
    """``applies`` of the analyses of one-answer tasks (a ``Task``): not for language-model runs."""
    from mechgrok.tasks import SequenceTask  # noqa: PLC0415

    if isinstance(run.task(), SequenceTask):
        return "a language-model run (a SequenceTask) has no single answer per example; its analysis is 'memorization'"
    return None


def moe_experts(run: Run) -> int | None:
    """The number of experts per block of the run's model (from its recorded spec), ``None`` for a dense one."""
    spec = run.config.get("model") or {}
    return (spec.get("kwargs") or {}).get("num_experts") or (spec.get("config") or {}).get("num_experts") or None


def dense_mlp_task(run: Run) -> str | None:
    """``applies`` of the analyses that read MLP neurons (``blocks.L.mlp.hook_post``) of a one-answer
    task: not for language-model runs, not for mixture-of-experts models (whose neurons belong to
    experts that each see only the tokens routed to them)."""
    if (reason := one_answer_task(run)) is not None:
        return reason
    if experts := moe_experts(run):
        return (f"this run's model is a mixture of {experts} experts per block, which has no single MLP neuron layer "
                "(blocks.L.mlp.hook_post) for this analysis to read; its analysis is 'moe_pathways'")
    return None


def sequence_task(run: Run) -> str | None:
    """``applies`` of the analyses of language-model runs (a ``SequenceTask``)."""
    from mechgrok.tasks import SequenceTask  # noqa: PLC0415

    task = run.task()
    if not isinstance(task, SequenceTask):
        return f"scores memorized sequences of a language-model corpus; this run trains on a {type(task).__name__}"
    return None
