"""The report section that lists the analyses without a result in the run folder, each with the reason
it does not apply (``Analysis.applies``) or the command that runs it. Imported after every analysis,
so it sees them all."""

from __future__ import annotations

from mechgrok.analyses._base import ANALYSES
from mechgrok.report.sections import Section, Table, section
from mechgrok.run import Run

__all__ = ["not_run_section"]


def _reason(run: Run, name: str) -> str:
    try:
        reason = ANALYSES[name].applies(run)
    except Exception as e:  # noqa: BLE001 - a folder the check cannot read: say so, do not fail the report
        return f"could not tell whether it applies ({type(e).__name__}: {e})"
    if reason is None:
        return f"applies, not run yet: mechgrok analyze {run.path} --only {name}"
    return f"does not apply: {reason}"


@section(order=990, title="Analyses not shown")
def not_run_section(run: Run) -> Section | None:
    """One row per registered analysis without ``analysis/NAME.json``: why it does not apply, or how to run it."""
    missing = [name for name in ANALYSES if not (run.path / "analysis" / f"{name}.json").exists()]
    if not missing:
        return None
    rows = [[name, _reason(run, name)] for name in missing]
    return Section("Analyses not shown",
                   text="These analyses have no result in this run folder (`analysis/NAME.json`).",
                   tables=[Table(["analysis", "why"], rows)],
                   numbers={name: row[1] for name, row in zip(missing, rows)})
