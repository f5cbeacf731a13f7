"""Expert pathways of a mixture-of-experts model over training (Li et al. 2025, ``mg.measures.pathways``):
the analysis ``moe_pathways``, its result and its report section.

It applies to runs whose model has mixture-of-experts blocks (``mg.models.transformer(task,
num_experts=E, experts_per_token=k)``), on one-answer tasks and language-model corpora alike; any
other run is skipped with the reason (a dense model has no router, so its examples have no pathway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis
from mechgrok.report.figures import mark_phases, new_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.report.text import fixed
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, Run, first_step

__all__ = ["MoEPathwaysAnalysis", "moe_pathways_analysis", "moe_pathways_section", "moe_model"]


@dataclass(frozen=True)
class MoEPathwaysAnalysis(Result):
    """``pathways_over_training`` of a run on its training examples.

    Attributes:
        pathways: ``PathwaysOverTraining.to_dict()`` (steps; pathway edit distance over random and
            same-answer pairs, consistency and expert-usage entropy per step; train/test accuracy
            from the history; each metric's Pearson and Spearman correlation with test accuracy).
    """

    name: ClassVar[str] = "moe_pathways"
    pathways: dict[str, Any]

    def over_training(self):
        """The stored result as a ``PathwaysOverTraining``."""
        from mechgrok.measures.pathways import PathwaysOverTraining  # noqa: PLC0415

        return PathwaysOverTraining.from_dict(self.pathways)


def moe_model(run: Run) -> str | None:
    """``applies``: None for a run whose model has mixture-of-experts blocks, else the reason."""
    from mechgrok.measures.pathways import moe_layers  # noqa: PLC0415

    model = run.load_model(run.steps()[0])
    try:
        moe_layers(model)
    except TypeError:
        return (f"expert pathways (Li et al. 2025) need a mixture-of-experts model, whose router picks experts per "
                f"token; this run's {type(model).__name__} has none (train mg.models.transformer(task, num_experts=4, "
                "experts_per_token=1, ...) to measure them)")
    return None


def moe_pathways_analysis(run: Run, *, n_examples: int = 512, n_pairs: int = 2000, position: str | int = "all",
                          progress: bool = True) -> MoEPathwaysAnalysis:
    """Pathway distance and consistency of ``run``'s training examples on every checkpoint
    (``mg.measures.pathways_over_training``; the test split is never read)."""
    from mechgrok.measures.pathways import pathways_over_training  # noqa: PLC0415

    return MoEPathwaysAnalysis(pathways=pathways_over_training(
        run, n_examples=n_examples, n_pairs=n_pairs, position=position, progress=progress).to_dict())


@analysis(MoEPathwaysAnalysis, applies=moe_model)
def _moe_pathways(run: Run, progress: bool) -> MoEPathwaysAnalysis:
    return moe_pathways_analysis(run, progress=progress)


_LABELS = {"edit_distance": "edit distance, random pairs", "edit_distance_same_answer": "edit distance, same answer",
           "edit_distance_shuffled": "edit distance, shuffled slots", "consistency": "consistency (MoE output)",
           "consistency_router": "consistency (router)", "usage_entropy": "expert-usage entropy"}


def _series(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _corr(c: dict[str, Any]) -> str:
    return f"Pearson {fixed(c.get('pearson'), 2)}, Spearman {fixed(c.get('spearman'), 2)}"


def _figure(d: dict[str, Any], phases: dict[str, float | None]):
    x = np.array(d["steps"], dtype=float)
    fig, axes = new_figure(3, width=12.0, height=3.4)
    panels = [({k: d[k] for k in ("edit_distance", "edit_distance_same_answer", "edit_distance_shuffled")},
               f"mean edit distance (of {d['pathway_length']})", "Pathway distance (train pairs)"),
              ({k: d[k] for k in ("consistency", "consistency_router", "usage_entropy")},
               "cosine / normalised entropy", "Consistency and expert use"),
              ({"train acc.": d["train_acc"], "test acc.": d["test_acc"]}, "accuracy", "Accuracy (history)")]
    for ax, (series, ylabel, title) in zip(axes, panels):
        for label, y in series.items():
            y = _series(y)
            if np.isfinite(y).any():
                ax.plot(x, y, label=_LABELS.get(label, label), linewidth=1.6)
        mark_phases(ax, phases)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", framealpha=0.85, edgecolor="none")
    return fig


@section(order=37, title="MoE expert pathways", analysis="moe_pathways")
def moe_pathways_section(run: Run) -> Section | None:
    """Report section: pathway metrics over training and their correlation with test accuracy
    (``analysis/moe_pathways.json``; absent for runs without mixture-of-experts blocks)."""
    data = MoEPathwaysAnalysis.load(run)
    if data is None:
        return None
    d = data.pathways
    steps = np.array(d["steps"], dtype=float)
    hist = run.history()
    mem, gen = first_step(hist, "train_acc", MEMORIZED_ACC), first_step(hist, "test_acc", GENERALIZED_ACC)
    fig = _figure(d, {"memorized": mem, "generalized": gen})
    marks = {"first": 0, "memorized": None, "generalized": None, "last": len(steps) - 1}
    for label, step in (("memorized", mem), ("generalized", gen)):
        if step is not None and (later := np.nonzero(steps >= step)[0]).size:
            marks[label] = int(later[0])
    rows = [[f"{int(steps[i])} ({label})", fixed(d["train_acc"][i], 2), fixed(d["test_acc"][i], 2),
             *[fixed(d[m][i], 2) for m in _LABELS]] for label, i in marks.items() if i is not None]
    corr = d["correlations"]
    lines = "; ".join(f"{_LABELS[m]}: {_corr(corr[m])}" for m in _LABELS)
    text = (f"Expert pathways (Li et al. 2025, `mg.measures.pathways`): the experts each of {d['n_examples']} "
            f"training examples visits in the {len(d['layers'])} mixture-of-experts layers ({d['num_experts']} "
            f"experts, top-{d['experts_per_token']}, positions {d['positions']}), on every checkpoint. Pathway distance: the "
            f"mean edit distance between the expert sequences of {d['n_pairs']} random pairs of training examples "
            f"(and of {d['n_pairs_same_answer']} pairs with the same answer); consistency: the mean cosine between "
            "consecutive layers' weighted expert embeddings (the MoE output, and the routing-weighted router rows: "
            "the paper's text fixes neither). The paper's claim: after the "
            "training loss has converged, distance falls and consistency rises while test accuracy rises, so the "
            "two track generalization without test data. Test accuracy here is the run's own held-out split, read "
            "from its history and never used by the metrics. A router that concentrates on fewer experts lowers "
            "the distance without any example-specific structure, so two controls are shown: the expert-usage "
            "entropy, and the distance after each (layer, position) slot's choices are shuffled across the "
            "examples (what the usage alone gives).\n\n"
            f"Correlation with test accuracy over the {len(steps)} checkpoints: {lines}.")
    headline = (f"pathway edit distance {fixed(d['edit_distance'][0], 2)} → {fixed(d['edit_distance'][-1], 2)}, "
                f"consistency {fixed(d['consistency'][0], 2)} → {fixed(d['consistency'][-1], 2)} (MoE output), "
                f"{fixed(d['consistency_router'][0], 2)} → {fixed(d['consistency_router'][-1], 2)} (router); "
                f"Spearman with test accuracy {fixed(corr['edit_distance'].get('spearman'), 2)}, "
                f"{fixed(corr['consistency'].get('spearman'), 2)} and "
                f"{fixed(corr['consistency_router'].get('spearman'), 2)}.")
    return Section("MoE expert pathways", text=text,
                   figures=[Figure.from_mpl(fig, "Pathway edit distance (random and same-answer pairs of training "
                                            "examples), consistency and expert-usage entropy per checkpoint, beside "
                                            "train and test accuracy.", name="moe-pathways")],
                   tables=[Table(["step", "train acc.", "test acc.", *_LABELS.values()], rows,
                                 "Pathway metrics at the first checkpoint, when the model memorized and generalized, "
                                 "and at the last.")],
                   headline=headline,
                   numbers={"correlations": corr, **{m: d[m][-1] for m in _LABELS}})
