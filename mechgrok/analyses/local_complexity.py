"""Local complexity of a ReLU MLP over training (Humayun et al. 2024, ``mg.measures.local_complexity``):
the analysis ``local_complexity``, its result and its report section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, one_answer_task
from mechgrok.report.figures import line_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.report.text import fixed
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, Run, first_step

__all__ = ["LocalComplexityAnalysis", "local_complexity_analysis", "local_complexity_section", "LC_RADII"]

#: The radii the analysis measures at: 0.1 (neighbourhoods about a fourteenth of the √2 distance between two
#: one-hot examples that differ in one operand) and 1.0 (reaching across to the neighbouring examples).
LC_RADII = (0.1, 1.0)


@dataclass(frozen=True)
class LocalComplexityAnalysis(Result):
    """``local_complexity_over_training`` of a run at each of ``radii``.

    Attributes:
        radii: the neighbourhood radii.
        results: one ``LocalComplexityOverTraining.to_dict()`` per radius (steps, mean/std/per-layer
            LC at training, test and decision-boundary points, accuracies).
    """

    name: ClassVar[str] = "local_complexity"
    radii: list[float]
    results: list[dict[str, Any]]


def _relu_mlp(run: Run) -> str | None:
    """``applies``: a ReLU MLP (the only networks whose linear regions the measure counts)."""
    if (reason := one_answer_task(run)) is not None:
        return reason
    from mechgrok.measures.local_complexity import relu_layers  # noqa: PLC0415

    model = run.load_model(run.steps()[0])
    try:
        relu_layers(model)
    except TypeError:
        return (f"local complexity counts the linear regions of a ReLU MLP; this run's model is a "
                f"{type(model).__name__} that is not one (train mg.models.mlp(task, act='relu') to measure it)")
    return None


def local_complexity_analysis(run: Run, *, radii: tuple[float, ...] = LC_RADII, n_points: int = 256,
                              progress: bool = True) -> LocalComplexityAnalysis:
    """Local complexity at training, test and decision-boundary points on every checkpoint of ``run``
    (a ReLU MLP), at each radius in ``radii`` (``mg.measures.local_complexity_over_training``)."""
    from mechgrok.measures.local_complexity import local_complexity_over_training  # noqa: PLC0415

    return LocalComplexityAnalysis(
        radii=[float(r) for r in radii],
        results=[local_complexity_over_training(run, radius=r, n_points=n_points, n_boundary=n_points,
                                                progress=progress).to_dict() for r in radii])


@analysis(LocalComplexityAnalysis, applies=_relu_mlp)
def _local_complexity(run: Run, progress: bool) -> LocalComplexityAnalysis:
    return local_complexity_analysis(run, progress=progress)


_SETS = {"train": "training points", "test": "test points", "boundary": "decision-boundary points"}


def _series(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@section(order=35, title="Local complexity", analysis="local_complexity")
def local_complexity_section(run: Run) -> Section | None:
    """Report section: local complexity over training (``analysis/local_complexity.json``)."""
    data = LocalComplexityAnalysis.load(run)
    if data is None:
        return None
    hist = run.history()
    mem, gen = first_step(hist, "train_acc", MEMORIZED_ACC), first_step(hist, "test_acc", GENERALIZED_ACC)
    figs, rows, headline = [], [], []
    for r in data.results:
        steps = np.array(r["steps"], dtype=float)
        series = {_SETS[s]: _series(r["mean"][s]) for s in _SETS}
        figs.append(Figure.from_mpl(
            line_figure(steps + 1, series, ylabel="mean LC (neurons)", title=f"Local complexity, radius {r['radius']:g}"),
            f"Mean number of ReLU hyperplanes cutting a cross-polytope of radius {r['radius']:g} ({r['n_directions']} "
            "directions) around each point, per checkpoint.", name=f"local-complexity-r{r['radius']:g}"))
        marks = {"first": 0, "memorized": None, "generalized": None, "last": len(steps) - 1}
        for label, step in (("memorized", mem), ("generalized", gen)):
            if step is not None and (later := np.nonzero(steps >= step)[0]).size:
                marks[label] = int(later[0])
        for label, i in marks.items():
            if i is not None:
                rows.append([f"{r['radius']:g}", f"{int(steps[i])} ({label})", fixed(r["test_acc"][i], 2),
                             *[fixed(r["mean"][s][i], 1) for s in _SETS]])
        headline.append(f"radius {r['radius']:g}: training points {fixed(r['mean']['train'][0], 1)} → "
                        f"{fixed(r['mean']['train'][-1], 1)}, boundary points {fixed(r['mean']['boundary'][0], 1)} → "
                        f"{fixed(r['mean']['boundary'][-1], 1)}")
    text = ("Local complexity (Humayun et al. 2024): for each point, the number of ReLU neurons whose pre-activation "
            "changes sign over the vertices of a random cross-polytope around it (`mg.measures.local_complexity`), "
            f"on {data.results[0]['n_points']['train'][0]} training and {data.results[0]['n_points']['test'][0]} test "
            "points (the same points and frames on every checkpoint) and on points of the decision boundary "
            "(bisected along segments between examples predicted differently). Their claim: around grokking the "
            "regions leave the training points and gather at the boundary. Boundary points lie between examples, "
            "off the data: compare them with points on the same segments (docs/reproductions.md, where the "
            "difference came from the position, not from the boundary).")
    return Section("Local complexity", text=text, figures=figs,
                   tables=[Table(["radius", "step", "test acc.", *_SETS.values()], rows,
                                 "Mean local complexity at the first checkpoint, when the model memorized and "
                                 "generalized, and at the last.")],
                   headline="; ".join(headline) + ".",
                   numbers={f"r{r['radius']:g}": {s: r["mean"][s][-1] for s in _SETS} for r in data.results})
