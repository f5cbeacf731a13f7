"""Memorizing and generalizing MLP neurons (``mg.neurons``): the analysis ``neurons``, its result
and its report section (score histograms, pruning sweeps, the key-frequency spectrum)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, dense_mlp_task
from mechgrok.report.text import acc
from mechgrok.report.figures import new_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.run import Run

__all__ = ["NeuronAnalysis", "neuron_analysis", "neuron_section", "SPLITS"]

#: accuracy key of ``mg.evaluate`` -> its label in the tables and figures
SPLITS = {"train_clean_acc": "clean train", "train_corrupted_acc": "corrupted (vs corrupted label)",
          "train_corrupted_true_acc": "corrupted (vs true label)", "test_acc": "test"}


@dataclass(frozen=True)
class NeuronAnalysis(Result):
    """Scores, groups and pruning sweeps of the MLP neurons of one layer.

    Attributes:
        layer: the MLP layer.
        evaluate: ``mg.evaluate`` of the unpruned model (split -> {"loss", "acc"}).
        scores: score name ("ipr", "memorization") -> ``[d_mlp]`` neuron scores.
        groups: score name -> ``NeuronGroups.to_dict()`` without its scores (memorizing,
            generalizing, threshold, rule, separability).
        sweeps: score name -> rows of ``neurons.prune_sweep`` (order, seed, n_pruned, accuracies).
        pruned_memorizing: score name -> ``mg.evaluate`` after pruning that score's memorizing group.
        neuron_frequency: {"dominant", "fraction"} per neuron (single modular operation), else None.
        embedding_power: the embedding's power per frequency (single modular operation), else None.
        step: the checkpoint analysed (None for a model passed directly).
    """

    name: ClassVar[str] = "neurons"
    layer: int
    evaluate: dict[str, Any]
    scores: dict[str, list[float]]
    groups: dict[str, dict[str, Any]]
    sweeps: dict[str, list[dict[str, Any]]]
    pruned_memorizing: dict[str, dict[str, Any]]
    neuron_frequency: dict[str, list] | None = None
    embedding_power: list[float] | None = None
    step: int | None = None


def neuron_analysis(model, task, *, layer: int = 0, seeds: Sequence[int] = (0, 1, 2),
                    progress: bool = True) -> NeuronAnalysis:
    """Scores, groups and pruning sweeps of the MLP neurons of ``layer``.

    Scores: IPR when the task is a single modular operation, the memorization score when the task
    has corrupted labels. For each available score: the classification (``neurons.classify``), a
    pruning sweep in the three orders, and the accuracies after pruning the memorizing group.
    """
    from mechgrok import measures, neurons  # noqa: PLC0415
    from mechgrok.train import evaluate  # noqa: PLC0415

    scores, groups_, sweeps, pruned = {}, {}, {}, {}
    available = []
    if len(task.task_names) == 1:
        available.append("ipr")
    if bool(task.train_corrupted.any()):
        available.append("memorization")
    for score in available:
        groups = neurons.classify(model, task, score=score, layer=layer)
        scores[score] = groups.scores.tolist()
        groups_[score] = {k: v for k, v in groups.to_dict().items() if k != "scores"}
        sweeps[score] = [row | {"score": score} for row in
                         neurons.prune_sweep(model, task, order=groups.scores, seeds=seeds, layer=layer, progress=progress)]
        pruned[score] = evaluate(neurons.prune(model, groups.memorizing, layer=layer), task)
    frequency = power = None
    if len(task.task_names) == 1:
        nf = measures.neuron_frequencies(model, task, layer=layer)
        frequency = {"dominant": nf.dominant.tolist(), "fraction": nf.fraction.tolist()}
        power = measures.embedding_frequency_norms(model, task).tolist()
    return NeuronAnalysis(layer, evaluate(model, task), scores, groups_, sweeps, pruned, frequency, power)


@analysis(NeuronAnalysis, applies=dense_mlp_task)
def _neurons(run: Run, progress: bool) -> NeuronAnalysis:
    step = run.steps()[-1]
    return dataclasses.replace(neuron_analysis(run.load_model(step), run.task(), progress=progress), step=step)


def _sweep_figure(rows: list[dict[str, Any]], score: str, n_neurons: int):
    fig, axes = new_figure(3, width=12.0, height=3.6)
    for ax, order in zip(axes, ("low-first", "random", "high-first")):
        mine = [r for r in rows if r["order"] == order]
        counts = sorted({r["n_pruned"] for r in mine})
        for key, label in SPLITS.items():
            vals = np.array([[np.nan if r[key] is None else r[key] for r in mine if r["n_pruned"] == c]
                             for c in counts], dtype=float)  # [n_counts, n_seeds]
            if not np.isfinite(vals).any():
                continue
            ax.plot(counts, np.nanmean(vals, 1), label=label, linewidth=1.6)
            if vals.shape[1] > 1:
                ax.fill_between(counts, np.nanmin(vals, 1), np.nanmax(vals, 1), alpha=0.2)
        ax.set_title(f"{order} by {score}" if order != "random" else "random order (mean, min-max)")
        ax.set_xlabel(f"neurons pruned (of {n_neurons})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize="x-small", framealpha=0.85, edgecolor="none")
    return fig


def _histogram(scores: dict[str, list[float]], groups: dict[str, Any]):
    fig, axes = new_figure(len(scores), width=5.2 * len(scores), height=3.4)
    for ax, (name, vals) in zip(axes, scores.items()):
        ax.hist(np.asarray(vals, dtype=float), bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(groups[name]["threshold"], color="tab:red", linestyle="--", label="threshold")
        ax.set_xlabel(f"{name} score")
        ax.set_ylabel("neurons")
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    return fig


def _spectrum(data: NeuronAnalysis):
    fig, axes = new_figure(2, width=11.0, height=3.4)
    dominant = np.asarray(data.neuron_frequency["dominant"])
    fraction = np.asarray(data.neuron_frequency["fraction"])
    power = np.asarray(data.embedding_power, dtype=float)
    n_freq = len(power)
    good = dominant[(fraction >= 0.5) & (dominant > 0)]
    axes[0].bar(np.arange(n_freq), np.bincount(good, minlength=n_freq), color="tab:green")
    axes[0].set_xlabel("frequency k")
    axes[0].set_ylabel("neurons (explained >= 50%)")
    axes[0].set_title("Dominant frequency of each neuron")
    share = power[1:] / max(power[1:].sum(), 1e-300)
    axes[1].bar(np.arange(1, n_freq), share, color="tab:purple")
    axes[1].set_xlabel("frequency k")
    axes[1].set_ylabel("share of power")
    axes[1].set_title("Embedding power per frequency")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig


@section(order=40, title="Neurons", analysis="neurons")
def neuron_section(run: Run) -> Section | None:
    """Report section: memorizing / generalizing neurons and pruning sweeps (``analysis/neurons.json``)."""
    data = NeuronAnalysis.load(run)
    if data is None:
        return None
    groups, sweeps = data.groups, data.sweeps
    if not groups:
        return Section("Neurons", text="No neuron score applies to this task (it is neither a single modular "
                                       "operation nor corrupted).")
    n = len(next(iter(data.scores.values())))
    text = [f"MLP layer {data.layer} at step {data.step}: {n} neurons."]
    table_rows = [["(none pruned)", "—", *[acc(data.evaluate, k) for k in SPLITS]]]
    for score, g in groups.items():
        text.append(f"**{score}**: {len(g['memorizing'])} memorizing, {len(g['generalizing'])} generalizing; "
                    f"rule: {g['rule']}; separability η = {g['separability']:.3f} (near 1: bimodal).")
        table_rows.append([f"memorizing by {score}", len(g["memorizing"]),
                           *[acc(data.pruned_memorizing[score], k) for k in SPLITS]])
    figs = [Figure.from_mpl(_histogram(data.scores, groups),
                            "Distribution of each neuron score; the dashed line is the classification threshold.",
                            name="neurons-histogram")]
    for score, rows in sweeps.items():
        figs.append(Figure.from_mpl(_sweep_figure(rows, score, n),
                                    f"Accuracy per split while pruning neurons ordered by the {score} score: lowest "
                                    "first, in random order (several seeds), highest first.",
                                    name=f"neurons-prune-{score}"))
    if data.neuron_frequency is not None:
        figs.append(Figure.from_mpl(_spectrum(data), "Key-frequency spectrum: how many neurons each frequency "
                                    "dominates, and the embedding's power per frequency.", name="neurons-spectrum"))
    header = ["pruned", "neurons", *SPLITS.values()]
    before = data.evaluate

    def change(split: str, after: dict[str, Any]) -> str:
        label = {"train_corrupted": "corrupted-label", "test": "test"}[split]
        return f"{label} accuracy {acc(before, split + '_acc')} → {acc(after, split + '_acc')}"

    headline = "; ".join(
        f"{len(g['memorizing'])} of {n} neurons memorizing by {score}; pruning them: "
        + ", ".join(change(split, data.pruned_memorizing[score])
                    for split in ("train_corrupted", "test") if before.get(split, {}).get("acc") is not None)
        for score, g in groups.items()) + "."
    return Section("Neurons", text="\n\n".join(text), figures=figs, headline=headline,
                   tables=[Table(header, table_rows, "Accuracy after pruning each score's memorizing group.")],
                   numbers={"groups": {s: {"n_memorizing": len(g["memorizing"]), "threshold": g["threshold"],
                                           "separability": g["separability"]} for s, g in groups.items()},
                            "pruned_memorizing": data.pruned_memorizing, "unpruned": data.evaluate})
