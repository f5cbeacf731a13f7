"""How much of one operation's circuit another reuses, in a multi-task run
(``mg.circuits.overlap`` and friends): the analysis ``overlap``, its result and its report section."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, one_answer_task
from mechgrok.report.text import fixed, sig
from mechgrok.report.sections import Figure, Section, Table, run_file, section
from mechgrok.run import Run

__all__ = ["OverlapAnalysis", "overlap_analysis", "overlap_section", "LEARNED_ACC"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverlapAnalysis(Result):
    """Per-operation circuits of a multi-task run and their overlap (``overlap_analysis``).

    Always present: ``step``, ``method``, ``level``, ``target`` (faithfulness), ``names`` (the
    operations compared: those learned). Since the learned-only rule: ``accuracy`` (operation ->
    {"train", "test"}), ``learned_acc``, ``not_learned``; ``skipped`` says why nothing was
    compared (then the rest is None). Otherwise: ``sizes``, ``files`` (circuit JSON per
    operation, relative to the run), ``faithfulness``, ``matrix`` (``overlap_matrix``), ``pairs``
    ("a|b" -> ``overlap``), ``overlap_vs_k``, ``cross_faithfulness``, ``over_training``
    (``overlap_over_training`` of the first operation) and ``features`` (SAE features shared
    across operations, when every operation is learned).
    """

    name: ClassVar[str] = "overlap"
    step: int
    method: str
    level: str
    target: float
    names: list[str]
    accuracy: dict[str, dict[str, float]] | None = None
    learned_acc: float | None = None
    not_learned: list[str] = field(default_factory=list)
    skipped: str | None = None
    sizes: dict[str, int] | None = None
    files: dict[str, str] | None = None
    faithfulness: dict[str, float] | None = None
    matrix: dict[str, Any] | None = None
    pairs: dict[str, Any] | None = None
    overlap_vs_k: dict[str, Any] | None = None
    cross_faithfulness: dict[str, Any] | None = None
    over_training: dict[str, Any] | None = None
    features: dict[str, Any] | None = None


#: test accuracy at which an operation counts as learned; the overlap analysis compares only those
#: (a circuit of an operation the model has not generalized describes its memorization, not its algorithm)
LEARNED_ACC = 0.95


def _multi_task(run: Run) -> str | None:
    """``applies``: a multi-task run on a one-answer task."""
    if (reason := one_answer_task(run)) is not None:
        return reason
    if len(run.task().task_names) < 2:
        return "the run trains a single operation; there is nothing to compare its circuit with"
    return None


def overlap_analysis(run: Run, *, method: str = "eap-ig", level: str = "neuron", target: float = 0.8,
                     n_training_steps: int = 8, features: bool = True, learned_acc: float | None = None,
                     progress: bool = True) -> OverlapAnalysis:
    """Per sub-task circuits of a multi-task run, their pairwise overlap with random baselines,
    cross-task faithfulness, and the first sub-task's circuit over training (issue: circuit reuse).
    With ``features``, the same question for SAE features: an SAE on the last MLP layer's neurons
    (``sae_config`` defaults, every example; saved in ``analysis/overlap/sae``), each sub-task's
    features (``mg.sae.feature_overlap``) and a cross-task ablation against random features.

    Only operations the model has **learned** (test accuracy ≥ ``learned_acc``, default
    ``LEARNED_ACC`` = 0.95, at the last checkpoint) get a circuit: the others are listed in
    ``not_learned`` with their accuracy, and with fewer than two learned operations nothing is
    compared (``skipped`` says why). The feature part runs only when every operation is learned
    (the SAE's features are attributed to all of them).

    Raises:
        ValueError: a single-task run (nothing to compare), or ``learned_acc`` outside [0, 1].
    """
    from mechgrok import circuits  # noqa: PLC0415
    from mechgrok._config import check_float  # noqa: PLC0415
    from mechgrok._io import child_path  # noqa: PLC0415
    from mechgrok.train import evaluate  # noqa: PLC0415

    if (reason := _multi_task(run)) is not None:
        raise ValueError(f"overlap_analysis({run.path}): {reason}")
    task = run.task()
    learned_acc = check_float(LEARNED_ACC if learned_acc is None else learned_acc, "learned_acc", low=0, high=1,
                              owner="overlap_analysis")
    out_dir = run.path / "analysis" / "overlap"
    # a sub-task name becomes a file name: checked again here (tasks.load checks it too), so no crafted
    # task.json can make this write outside the run
    source = run.path / "task" / "task.json"
    files = {name: child_path(out_dir, name, suffix=".json", what="sub-task name", source=source)
             for name in task.task_names}
    step = run.steps()[-1]
    model = run.load_model(step)
    by_task = evaluate(model, task, by_task=True)
    accuracy = {k: {split: by_task[k][split]["acc"] for split in ("train", "test")} for k in task.task_names}
    learned = [k for k in task.task_names if accuracy[k]["test"] == accuracy[k]["test"]
               and accuracy[k]["test"] >= learned_acc]
    not_learned = [k for k in task.task_names if k not in learned]
    head = dict(step=step, method=method, level=level, target=target, accuracy=accuracy, learned_acc=learned_acc,
                not_learned=not_learned)
    if len(learned) < 2:
        reason = (f"{len(learned)} of {len(task.task_names)} operations reached test accuracy {learned_acc:g} at "
                  f"step {step:,}; circuits of unlearned operations would describe memorization, so no overlap "
                  "is computed (train longer, or see docs/reproductions.md for settings that generalize)")
        log.warning("overlap: %s: %s", run.path, reason)
        return OverlapAnalysis(names=learned, skipped=reason, **head)
    if not_learned:
        log.warning("overlap: %s: leaving out %s (test accuracy below %g)", run.path, not_learned, learned_acc)
    circs: dict[str, Any] = {}
    for name in learned:
        split = circuits.reuse.split_for(task, name)
        x, xc, y, _ = circuits.contrast(task, split, task_name=name)
        circs[name] = circuits.discover(model, x, xc, circuits.metrics.generalization(y), method=method, level=level,
                                        target=target, progress=progress,
                                        provenance={"task": name, "split": split, "step": step})
        circs[name].save(files[name])
    names = list(circs)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    steps = run.steps()
    pick = sorted({steps[round(i * (len(steps) - 1) / max(1, n_training_steps - 1))] for i in range(n_training_steps)})
    return OverlapAnalysis(
        names=names, sizes={k: len(c) for k, c in circs.items()},
        files={k: files[k].relative_to(run.path).as_posix() for k in circs},
        faithfulness={k: c.provenance["faithfulness"] for k, c in circs.items()},
        matrix=circuits.overlap_matrix(circs),
        pairs={f"{a}|{b}": circuits.overlap(circs[a], circs[b]) for a, b in pairs},
        overlap_vs_k={f"{a}|{b}": circuits.overlap_vs_k(circs[a], circs[b]) for a, b in pairs},
        cross_faithfulness=circuits.cross_faithfulness(model, circs, task),
        over_training=circuits.overlap_over_training(run, names[0], level=level, steps=pick, progress=progress),
        features=_feature_overlap(run, model, task, out_dir / "sae", target, progress)
        if features and not not_learned else None,
        **head)


def _feature_overlap(run: Run, model, task, folder: Path, target: float, progress: bool) -> dict[str, Any]:
    """SAE features shared across the sub-tasks (see ``overlap_analysis``)."""
    from mechgrok import models, sae as saes  # noqa: PLC0415
    from mechgrok.analyses.sae import sae_config  # noqa: PLC0415

    hook = models.mlp_hook(models.n_layers(model) - 1)
    config = sae_config(model, task, hook, "all")
    sae = saes.train(model, task, hook, config, out=folder, overwrite=True, progress=progress)
    ev = saes.evaluate(model, sae, task)
    res = saes.feature_overlap(model, sae, task, target=target, split="test")
    return {"hook": hook, "settings": config.to_dict(), "folder": str(folder.relative_to(run.path)),
            "explained_variance_test": ev["by_split"]["test"]["explained_variance"],
            "l0": ev["by_split"]["all"]["l0"], "dead_fraction": ev["dead_fraction"],
            **{k: v for k, v in res.items() if k != "scores"},
            "ablation": saes.cross_ablation(model, sae, task, res["features"])}


@analysis(OverlapAnalysis, applies=_multi_task)
def _overlap(run: Run, progress: bool) -> OverlapAnalysis:
    return overlap_analysis(run, progress=progress)


@section(order=60, title="Circuit overlap across tasks", analysis="overlap")
def overlap_section(run: Run) -> Section | None:
    """Report section: circuit overlap across the sub-tasks of a multi-task run (``analysis/overlap.json``)."""
    data = OverlapAnalysis.load(run)
    if data is None:
        return None
    from mechgrok.circuits import Circuit, draw_shared, overlap_heatmap, overlap_vs_k_figure  # noqa: PLC0415
    from mechgrok.report.figures import line_figure  # noqa: PLC0415

    names, learned_acc = data.names, data.learned_acc
    if data.skipped is not None:
        acc = ", ".join(f"{k} {fixed(v['test'], 2)}" for k, v in (data.accuracy or {}).items())
        return Section("Circuit overlap across tasks",
                       text=f"Not computed: {data.skipped}. Test accuracy at step {data.step:,}: {acc}.",
                       headline=f"Not computed: the model learned {len(names)} of {len(data.accuracy or {})} operations "
                                f"(test accuracy {acc}; learned means ≥ {learned_acc:g}).",
                       numbers={"accuracy": data.accuracy, "not_learned": data.not_learned})
    text = [f"One circuit per operation ({data.method}, {data.level} level, smallest top-|score| circuit with "
            f"faithfulness ≥ {data.target}, generalization metric on each operation's held-out examples, resample "
            "ablation within the operation). Baselines: random circuits of the same sizes from the same graph "
            "(1,000 draws; p-value = share of draws at least as large, +1 smoothing). A uniform random circuit "
            "is a weak null."]
    if data.accuracy is not None:  # written by analyses since the demo gained its multi-task run
        text.append(f"The model at step {data.step:,}: " + ", ".join(
            f"{k} train {fixed(v['train'], 2)} / test {fixed(v['test'], 2)}" for k, v in data.accuracy.items())
            + " accuracy. Circuits of an operation that has not generalized describe its memorization as much "
            "as its algorithm" + (f", so only operations with test accuracy ≥ {learned_acc:g} are compared"
                                  + (f" ({', '.join(data.not_learned)} left out)." if data.not_learned else ".")
                                  if learned_acc is not None else "."))
    text.append("Sizes: " + ", ".join(f"{k} {v} (F = {data.faithfulness[k]:.2f})" for k, v in data.sizes.items())
                + ".")
    rows = []
    for pair, res in data.pairs.items():
        a, b = pair.split("|")
        for stat in ("jaccard", "overlap_coefficient", "weighted_jaccard", "spearman"):
            s = res[stat]
            rows.append([f"{a} vs {b}", stat.replace("_", " "), sig(s["value"]), sig(s["baseline_mean"]),
                         sig(s["p95"]), sig(s["p_value"])])
    cf = data.cross_faithfulness
    cf_rows = [[f"C_{a}", *[f"{cf['faithfulness'][i][j]:.2f} (random {cf['random_mean'][i][j]:.2f} ± "
                            f"{cf['random_std'][i][j]:.2f})" for j in range(len(names))]]
               for i, a in enumerate(cf["names"])]
    ot = data.over_training
    steps = np.array(ot["steps"], dtype=float)
    series = {"Jaccard with the final circuit": ot["jaccard_final"], "faithfulness": ot["faithfulness"]}
    if ot.get("jaccard_memorization") is not None:
        series[f"Jaccard with the memorization-phase circuit (step {ot['memorization_step']})"] = ot["jaccard_memorization"]
    series["random Jaccard"] = [ot["random_jaccard"]] * len(steps)
    figs = [Figure.from_mpl(overlap_heatmap(data.matrix, title="Jaccard of the operations' circuits"),
                            "Pairwise Jaccard of the circuits, with the random baseline mean and p-value.",
                            name="overlap-heatmap"),
            Figure.from_mpl(overlap_vs_k_figure({k.replace("|", " vs "): v for k, v in data.overlap_vs_k.items()}),
                            "Jaccard of the top-k components of two circuits against k/n; dashed: random k-subsets.",
                            name="overlap-vs-k"),
            Figure.from_mpl(line_figure(steps + 1, series, ylabel="value", ylim=(0, 1.05),
                                        title=f"The {ot['task']} circuit over training (top {ot['top_k']})"),
                            "How the circuit of the first operation changes over training.", name="overlap-training")]
    if data.files is not None:  # analyses written before the circuits were listed have no side-by-side figure
        circs = {name: Circuit.load(run_file(run, f, source="analysis/overlap.json"))
                 for name, f in data.files.items()}
        figs.insert(1, Figure.from_mpl(draw_shared(circs), "The circuits side by side; components that another "
                                       "operation's circuit also holds are outlined in orange.", name="overlap-circuits"))
    tables = [Table(["pair", "statistic", "value", "random mean", "random 95th pct", "p-value"], rows),
              Table(["circuit", *[f"on {b}" for b in names]], cf_rows,
                    "Cross-task faithfulness F_B(C_A): each operation's circuit evaluated on each operation's data.")]
    headline = "Jaccard of the operations' circuits: " + _jaccards(data.pairs) + "."
    if data.features is not None:
        fe = data.features
        text.append(_feature_text(fe))
        tables += _feature_tables(fe)
        headline += " Of their SAE features: " + _jaccards(fe["pairs"]) + "."
    if data.accuracy is not None:
        headline += " Test accuracy " + ", ".join(f"{k} {fixed(v['test'], 2)}" for k, v in data.accuracy.items()) + "."
    return Section("Circuit overlap across tasks", text="\n\n".join(text), figures=figs, tables=tables,
                   headline=headline,
                   numbers={"sizes": data.sizes, "accuracy": data.accuracy, "matrix": data.matrix["matrix"],
                            "cross_faithfulness": cf["faithfulness"],
                            "feature_jaccard": {p: r["jaccard"] for p, r in data.features["pairs"].items()}
                            if data.features is not None else None})


def _jaccards(pairs: dict[str, Any]) -> str:
    return ", ".join(f"{pair.replace('|', '–')} {r['jaccard']['value']:.2f} (random {r['jaccard']['baseline_mean']:.2f}, "
                     f"p = {r['jaccard']['p_value']:.3f})" for pair, r in pairs.items())


def _feature_text(fe: dict[str, Any]) -> str:
    st = fe["settings"]
    return (f"**SAE features.** A {st['architecture']} SAE ({st['d_sae']} latents, k = {fe['settings']['k']:g}, "
            f"{st['steps']} steps, every example) on `{fe['hook']}`: explained variance "
            f"{fixed(fe['explained_variance_test'], 2)} on held-out examples, L0 {fe['l0']:.1f}, {fe['dead_fraction']:.0%} "
            "dead. Each operation's features: the smallest top-|attribution| set whose attributions to its "
            f"generalization metric sum to {fe['target']} of the total (attribution: the first-order effect of "
            "mean-ablating the feature, exact when only linear maps lie between the site and the logits, as after "
            "the last MLP layer of a model without LayerNorm; `mg.sae.feature_overlap`). Sizes: "
            + ", ".join(f"{k} {len(v)}" for k, v in fe["features"].items()) + ".")


def _feature_tables(fe: dict[str, Any]) -> list[Table]:
    rows = [[pair.replace("|", " vs "), stat.replace("_", " "), sig(r[stat]["value"]), sig(r[stat]["baseline_mean"]),
             sig(r[stat]["p_value"])]
            for pair, r in fe["pairs"].items() for stat in ("jaccard", "overlap_coefficient", "weighted_jaccard",
                                                            "spearman")]
    ab = fe["ablation"]
    names = ab["names"]
    abl = [["(none)", 0, *[fixed(ab["original"][t], 2) for t in names]]]
    abl += [[f"{s}'s features", ab["n"][s], *[f"{fixed(ab['ablated'][s][t], 2)} (random {fixed(ab['random_mean'][s][t], 2)} ± "
                                              f"{fixed(ab['random_std'][s][t], 2)})" for t in names]] for s in ab["sets"]]
    return [Table(["pair", "statistic", "value", "random mean", "p-value"], rows,
                  "SAE features shared by the operations; random: feature sets of the same sizes (set statistics) "
                  "or permuted attributions (weighted Jaccard, Spearman)."),
            Table(["ablated", "features", *[f"{t} {ab['split']} acc." for t in names]], abl,
                  "Accuracy per operation after ablating one operation's features, beside as many random live "
                  "features (mean ± std over draws).")]

