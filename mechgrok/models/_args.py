"""Argument checks shared by the model builders: each error names the argument and how to fix it.

>>> _check_choice("relu", "act_fn", ("gelu", "relu"), "models.transformer")
'relu'
>>> _check_choice("rleu", "act_fn", ("gelu", "relu"), "models.transformer")
Traceback (most recent call last):
    ...
ValueError: models.transformer: unknown act_fn 'rleu'; choose one of ['gelu', 'relu']; did you mean 'relu'?
"""

from __future__ import annotations

from typing import Any

from mechgrok.tasks import SequenceTask, Task


def _check_choice(value: Any, name: str, choices: tuple[str, ...], owner: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them (with close matches)."""
    import difflib

    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {list(choices)}{hint}")
    return value


def _check_bool(value: Any, name: str, owner: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


def _need(task: Task | None, attr: str) -> int:
    if task is None:
        raise ValueError(f"pass a task or {attr}=...")
    return int(getattr(task, attr))


def _check_task(task: Any, owner: str, sequences: bool = True) -> None:
    if sequences and isinstance(task, SequenceTask):
        return
    if isinstance(task, SequenceTask):
        raise TypeError(f"{owner}: {task.name!r} is a SequenceTask (a target per position), which this model cannot "
                        "predict; build a transformer with mg.models.transformer(task, ...)")
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"{owner}: task must be a mechgrok Task (e.g. mg.tasks.modular_arithmetic(p=113)), a "
                        f"SequenceTask (mg.tasks.lm_corpus(...)) or None, got {type(task).__name__}")
