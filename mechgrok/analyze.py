"""Run the analyses of a finished (or partly trained) run and store them in ``RUN/analysis/``.

``analyze(run)`` runs every registered analysis (``mechgrok.analyses``: one module each, with its
typed result and its report section), writing ``analysis/NAME.json`` atomically for those that
apply; ``mechgrok report RUN`` then shows them. An analysis that does not apply to a run (the
Fourier measures on a language-model corpus, say) is skipped with its reason logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechgrok._threads import torch_threads
from mechgrok.run import Run

__all__ = ["analyze"]

log = logging.getLogger(__name__)

# names that lived here before the analyses moved to mechgrok.analyses (kept for old imports)
_MOVED = {"ANALYSES", "neuron_analysis", "circuit_analysis", "overlap_analysis", "sae_analysis",
          "influence_analysis", "memorization_analysis", "DEL_FRACTIONS", "LEARNED_ACC"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import mechgrok.analyses  # noqa: PLC0415 (it imports the report, which `import mechgrok` should not)

        return getattr(mechgrok.analyses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def analyze(run: Run | str | Path, only: Sequence[str] | None = None, progress: bool = True,
            threads: int | None = 1) -> dict[str, Path]:
    """Run the analyses (all, or those named in ``only``) and write ``analysis/NAME.json``.

    ``threads``: torch threads while analysing (restored afterwards; ``None`` leaves them).

    Returns:
        name -> path of the written file, for the analyses that applied.
    """
    from mechgrok.analyses import ANALYSES  # noqa: PLC0415

    run = run if isinstance(run, Run) else Run(run)
    names = list(ANALYSES) if only is None else list(only)
    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    if not run.steps():
        raise ValueError(f"{run.path} has no checkpoints to analyse; train it first")
    written = {}
    with torch_threads(threads):
        for name in names:
            a = ANALYSES[name]
            if (reason := a.applies(run)) is not None:
                log.info("analysis %r on %s: not applicable: %s", name, run.path, reason)
                continue
            log.info("analysis %r on %s", name, run.path)
            t0 = time.perf_counter()
            result = a.run(run, progress)
            if not isinstance(result, a.result):
                raise TypeError(f"analysis {name!r} returned {type(result).__name__}, not {a.result.__name__}")
            written[name] = run.write_analysis(name, result.to_json())
            log.info("analysis %r on %s: done in %.0f s", name, run.path, time.perf_counter() - t0)
    return written
