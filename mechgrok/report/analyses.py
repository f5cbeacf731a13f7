"""Report sections for ``mechgrok analyze``: progress measures and memorizing neurons.

Each reads one ``analysis/NAME.json`` written by ``mechgrok.analyze`` and returns ``None`` when it
is absent, so a run that was never analysed still gets a report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mechgrok.report.figures import line_figure, new_figure
from mechgrok.report.sections import (GENERALIZED_ACC, MEMORIZED_ACC, Figure, Section, Table, first_step,
                                      read_analysis, run_file, section)
from mechgrok.run import Run

__all__ = ["progress_measures", "neuron_analysis", "circuit_section", "overlap_section", "phase_boundaries"]

_SPLITS = {"train_clean_acc": "clean train", "train_corrupted_acc": "corrupted (vs corrupted label)",
           "train_corrupted_true_acc": "corrupted (vs true label)", "test_acc": "test"}


def _arr(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _first_below(steps: np.ndarray, y: np.ndarray, level: float, after: int = 0) -> int | None:
    ok = np.nonzero((y < level) & (steps >= after))[0]
    return int(steps[ok[0]]) if len(ok) else None


def phase_boundaries(prog: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase boundaries read off the progress measures (Nanda et al. 2023's three phases).

    - memorization ends at the first logged step with train accuracy 100%;
    - circuit formation shows as restricted loss falling: the first checkpoint after memorization
      with restricted loss below 1 nat, compared with the first where test loss is below 1 nat;
    - excluded loss peaks during circuit formation (its argmax after memorization);
    - cleanup ends at the first logged step with test accuracy >= 95%.
    Resolution: the checkpoint cadence (restricted/excluded) and ``eval_every`` (accuracies).
    """
    steps = np.array(prog["step"], dtype=np.int64)
    memorized = first_step(history, "train_acc", MEMORIZED_ACC)
    out: dict[str, Any] = {"memorized": memorized,
                           "generalized": first_step(history, "test_acc", GENERALIZED_ACC)}
    after = memorized or 0
    test = _arr(prog["test_loss"])
    out["test_loss_below_1"] = _first_below(steps, test, 1.0, after)
    if any(v is not None for v in prog.get("restricted_loss", [])):
        restricted, excluded = _arr(prog["restricted_loss"]), _arr(prog["excluded_loss"])
        out["restricted_loss_below_1"] = _first_below(steps, restricted, 1.0, after)
        late = steps >= after
        out["excluded_loss_peak"] = int(steps[late][np.nanargmax(excluded[late])]) if late.any() else None
    return out


@section(order=30, title="Progress measures", analysis="progress")
def progress_measures(run: Run) -> Section | None:
    """Report section: the progress measures over checkpoints (``analysis/progress.json``)."""
    prog = read_analysis(run, "progress")
    if prog is None:
        return None
    history = run.history()
    steps = np.array(prog["step"], dtype=np.float64)
    x = steps + 1
    bounds = phase_boundaries(prog, history)
    phases = {"memorized": (bounds["memorized"] or 0) + 1 if bounds["memorized"] is not None else None,
              "generalized": bounds["generalized"] + 1 if bounds["generalized"] is not None else None}
    key = prog.get("key_frequencies", {})
    losses = {k.replace("_", " "): _arr(prog[k]) for k in ("train_loss", "test_loss", "restricted_loss",
                                                             "excluded_loss") if k in prog}
    figs = [Figure.from_mpl(line_figure(x, losses, ylabel="loss", title="Losses on every checkpoint", logy=True,
                                        phases=phases),
                            "Train and test loss with Nanda et al.'s restricted loss (logits restricted to the key "
                            "frequencies, all pairs) and excluded loss (key frequencies removed, training pairs).",
                            name="progress-losses")]
    shares = {k.replace("_", " "): _arr(prog[k]) for k in ("gini_embedding", "gini_unembedding", "mean_neuron_ipr",
                                                             "frac_neurons_explained", "key_embedding_share")
              if k in prog}
    figs.append(Figure.from_mpl(line_figure(x, shares, ylabel="value in [0, 1]", title="Fourier sparsity",
                                            ylim=(0, 1.02), phases=phases),
                                "Gini coefficient of the Fourier norms of the embedding and of the neuron-to-logit "
                                "map, mean activation IPR of the neurons, share of neurons explained >= 50% by one "
                                "frequency, and share of embedding power in the key frequencies.",
                                name="progress-sparsity"))
    meta = prog.get("meta", {})
    of = (f" The measures use the {meta['operation']} examples (this run's first operation)."
          if "+" in str(meta.get("task", "")) and meta.get("operation") else "")
    text = [f"{len(steps)} checkpoints from step {int(steps[0])} to {int(steps[-1])}.{of} Key frequencies "
            f"(from the {key.get('source', '?')} at step {key.get('step')}): **{key.get('freqs')}**; rule: "
            f"{key.get('rule', '—')}."]
    r1, t1 = bounds.get("restricted_loss_below_1"), bounds.get("test_loss_below_1")
    if r1 is not None and t1 is not None:
        order = "before" if r1 < t1 else ("together with" if r1 == t1 else "after")
        text.append(f"Restricted loss fell below 1 nat at step **{r1}**, {order} test loss (step **{t1}**); "
                    f"excluded loss peaked at step **{bounds.get('excluded_loss_peak')}**.")
    for note in prog.get("meta", {}).get("notes", []):
        text.append(f"Note: {note}")
    rows = [[k.replace("_", " "), "—" if v is None else v] for k, v in bounds.items()]
    return Section("Progress measures", text="\n\n".join(text), figures=figs,
                   tables=[Table(["phase boundary", "step"], rows, "How each boundary is defined: "
                                 "mechgrok.report.analyses.phase_boundaries.")],
                   numbers={"phase_boundaries": bounds, "key_frequencies": key.get("freqs")},
                   headline=(f"on the {meta['operation']} examples, " if of else "")
                   + (f"restricted loss fell below 1 nat at step **{r1}**, {order} test loss (step {t1}); "
                             if r1 is not None and t1 is not None else "")
                   + (f"key frequencies {key.get('freqs')}." if key.get("freqs") else
                      "no key frequencies (no frequency dominates enough neurons; see the note)."))


def _sweep_figure(rows: list[dict[str, Any]], score: str, n_neurons: int):
    fig, axes = new_figure(3, width=12.0, height=3.6)
    for ax, order in zip(axes, ("low-first", "random", "high-first")):
        mine = [r for r in rows if r["order"] == order]
        counts = sorted({r["n_pruned"] for r in mine})
        for key, label in _SPLITS.items():
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


def _spectrum(data: dict[str, Any]):
    fig, axes = new_figure(2, width=11.0, height=3.4)
    dominant = np.asarray(data["neuron_frequency"]["dominant"])
    fraction = np.asarray(data["neuron_frequency"]["fraction"])
    power = np.asarray(data["embedding_power"], dtype=float)
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
def neuron_analysis(run: Run) -> Section | None:
    """Report section: memorizing / generalizing neurons and pruning sweeps (``analysis/neurons.json``)."""
    data = read_analysis(run, "neurons")
    if data is None:
        return None
    groups, sweeps = data["groups"], data["sweeps"]
    if not groups:
        return Section("Neurons", text="No neuron score applies to this task (it is neither a single modular "
                                       "operation nor corrupted).")
    n = len(next(iter(data["scores"].values())))
    text = [f"MLP layer {data['layer']} at step {data.get('step')}: {n} neurons."]
    table_rows = [["(none pruned)", "—", *[_acc(data["evaluate"], k) for k in _SPLITS]]]
    for score, g in groups.items():
        text.append(f"**{score}**: {len(g['memorizing'])} memorizing, {len(g['generalizing'])} generalizing; "
                    f"rule: {g['rule']}; separability η = {g['separability']:.3f} (near 1: bimodal).")
        table_rows.append([f"memorizing by {score}", len(g["memorizing"]),
                           *[_acc(data["pruned_memorizing"][score], k) for k in _SPLITS]])
    figs = [Figure.from_mpl(_histogram(data["scores"], groups),
                            "Distribution of each neuron score; the dashed line is the classification threshold.",
                            name="neurons-histogram")]
    for score, rows in sweeps.items():
        figs.append(Figure.from_mpl(_sweep_figure(rows, score, n),
                                    f"Accuracy per split while pruning neurons ordered by the {score} score: lowest "
                                    "first, in random order (several seeds), highest first.",
                                    name=f"neurons-prune-{score}"))
    if "neuron_frequency" in data:
        figs.append(Figure.from_mpl(_spectrum(data), "Key-frequency spectrum: how many neurons each frequency "
                                    "dominates, and the embedding's power per frequency.", name="neurons-spectrum"))
    header = ["pruned", "neurons", *_SPLITS.values()]
    before = data["evaluate"]

    def change(split: str, after: dict[str, Any]) -> str:
        label = {"train_corrupted": "corrupted-label", "test": "test"}[split]
        return f"{label} accuracy {_acc(before, split + '_acc')} → {_acc(after, split + '_acc')}"

    headline = "; ".join(
        f"{len(g['memorizing'])} of {n} neurons memorizing by {score}; pruning them: "
        + ", ".join(change(split, data["pruned_memorizing"][score])
                    for split in ("train_corrupted", "test") if before.get(split, {}).get("acc") is not None)
        for score, g in groups.items()) + "."
    return Section("Neurons", text="\n\n".join(text), figures=figs, headline=headline,
                   tables=[Table(header, table_rows, "Accuracy after pruning each score's memorizing group.")],
                   numbers={"groups": {s: {"n_memorizing": len(g["memorizing"]), "threshold": g["threshold"],
                                           "separability": g["separability"]} for s, g in groups.items()},
                            "pruned_memorizing": data["pruned_memorizing"], "unpruned": data["evaluate"]})


def _acc(ev: dict[str, Any], key: str) -> Any:
    split = key[: -len("_acc")]
    v = ev.get(split, {}).get("acc")
    return "—" if v is None else f"{v:.3f}"


@section(order=50, title="Circuits", analysis="circuits")
def circuit_section(run: Run) -> Section | None:
    """Report section: generalizing vs memorizing circuits (``analysis/circuits.json``)."""
    data = read_analysis(run, "circuits")
    if data is None:
        return None
    from mechgrok.circuits import Circuit

    text = [f"Circuits found with **{data['method']}** at the **{data['level']}** level (resample ablation: each "
            "example's operands replaced by another example's; selection: the smallest top-|score| circuit with "
            f"faithfulness ≥ 0.8) at step {data.get('step')}."]
    figs, rows = [], []
    for role, metric in (("generalizing", "correct logit − mean logit on held-out examples"),
                         ("memorizing", "corrupted-label logit − true-label logit on corrupted training examples")):
        if role not in data:
            continue
        info = data[role]
        circ = Circuit.load(run_file(run, info["file"], source="analysis/circuits.json"))
        text.append(f"**{role.capitalize()} circuit** ({metric}): {info['size']} of {info['n_components']} "
                    f"components, faithfulness {info['faithfulness']:.3f}.")
        figs.append(Figure.from_mpl(circ.draw(), f"The {role} circuit.", name=f"circuit-{role}"))
    if "overlap" in data:
        text.append(f"They share {data['overlap']['shared']} components (Jaccard {data['overlap']['jaccard']:.3f}).")
        for key, label in (("ablate_memorizing_only", "memorizing-only neurons"),
                           ("ablate_generalizing_only", "generalizing-only neurons")):
            ab = data[key]
            rows.append([f"{label} zeroed", ab["n_neurons"], *[_acc(ab["evaluate"], k) for k in _SPLITS]])
        rows.insert(0, ["(none)", 0, *[_acc(data["evaluate"], k) for k in _SPLITS]])
    tables = [Table(["ablated", "neurons", *_SPLITS.values()], rows,
                    "Accuracy per split after zero-ablating the neurons that only one circuit contains.")] if rows else []
    numbers = {role: {"size": data[role]["size"], "faithfulness": data[role]["faithfulness"]}
               for role in ("generalizing", "memorizing") if role in data}
    if "overlap" in data:
        numbers["overlap"] = data["overlap"]
        numbers["ablate_memorizing_only"] = data["ablate_memorizing_only"]
    parts = [f"{role} circuit {data[role]['size']} of {data[role]['n_components']} components "
             f"(faithfulness {_two(data[role]['faithfulness'])})" for role in ("generalizing", "memorizing") if role in data]
    if "overlap" in data:
        ab = data["ablate_memorizing_only"]
        parts.append(f"they share {data['overlap']['shared']} (Jaccard {_two(data['overlap']['jaccard'])}); zeroing the "
                     f"{ab['n_neurons']} memorizing-only neurons: corrupted-label accuracy "
                     f"{_acc(data['evaluate'], 'train_corrupted_acc')} → {_acc(ab['evaluate'], 'train_corrupted_acc')}, "
                     f"test {_acc(data['evaluate'], 'test_acc')} → {_acc(ab['evaluate'], 'test_acc')}")
    return Section("Circuits", text="\n\n".join(text), figures=figs, tables=tables, numbers=numbers,
                   headline="; ".join(parts) + ".")


@section(order=60, title="Circuit overlap across tasks", analysis="overlap")
def overlap_section(run: Run) -> Section | None:
    """Report section: circuit overlap across the sub-tasks of a multi-task run (``analysis/overlap.json``)."""
    data = read_analysis(run, "overlap")
    if data is None:
        return None
    from mechgrok.circuits import Circuit, draw_shared, overlap_heatmap, overlap_vs_k_figure
    from mechgrok.report.figures import line_figure

    names = data["names"]
    learned_acc = data.get("learned_acc")
    if "skipped" in data:
        acc = ", ".join(f"{k} {_two(v['test'])}" for k, v in data["accuracy"].items())
        return Section("Circuit overlap across tasks",
                       text=f"Not computed: {data['skipped']}. Test accuracy at step {data['step']:,}: {acc}.",
                       headline=f"Not computed: the model learned {len(names)} of {len(data['accuracy'])} operations "
                                f"(test accuracy {acc}; learned means ≥ {learned_acc:g}).",
                       numbers={"accuracy": data["accuracy"], "not_learned": data["not_learned"]})
    text = [f"One circuit per operation ({data['method']}, {data['level']} level, smallest top-|score| circuit with "
            f"faithfulness ≥ {data['target']}, generalization metric on each operation's held-out examples, resample "
            "ablation within the operation). Baselines: random circuits of the same sizes from the same graph "
            "(1,000 draws; p-value = share of draws at least as large, +1 smoothing). A uniform random circuit "
            "is a weak null."]
    if "accuracy" in data:  # written by analyses since the demo gained its multi-task run
        text.append(f"The model at step {data['step']:,}: " + ", ".join(
            f"{k} train {_two(v['train'])} / test {_two(v['test'])}" for k, v in data["accuracy"].items())
            + " accuracy. Circuits of an operation that has not generalized describe its memorization as much "
            "as its algorithm" + (f", so only operations with test accuracy ≥ {learned_acc:g} are compared"
                                  + (f" ({', '.join(data['not_learned'])} left out)." if data.get("not_learned") else ".")
                                  if learned_acc is not None else "."))
    text.append("Sizes: " + ", ".join(f"{k} {v} (F = {data['faithfulness'][k]:.2f})" for k, v in data["sizes"].items())
                + ".")
    rows = []
    for pair, res in data["pairs"].items():
        a, b = pair.split("|")
        for stat in ("jaccard", "overlap_coefficient", "weighted_jaccard", "spearman"):
            s = res[stat]
            rows.append([f"{a} vs {b}", stat.replace("_", " "), _fmt(s["value"]), _fmt(s["baseline_mean"]),
                         _fmt(s["p95"]), _fmt(s["p_value"])])
    cf = data["cross_faithfulness"]
    cf_rows = [[f"C_{a}", *[f"{cf['faithfulness'][i][j]:.2f} (random {cf['random_mean'][i][j]:.2f} ± "
                            f"{cf['random_std'][i][j]:.2f})" for j in range(len(names))]]
               for i, a in enumerate(cf["names"])]
    ot = data["over_training"]
    steps = np.array(ot["steps"], dtype=float)
    series = {"Jaccard with the final circuit": ot["jaccard_final"], "faithfulness": ot["faithfulness"]}
    if ot.get("jaccard_memorization") is not None:
        series[f"Jaccard with the memorization-phase circuit (step {ot['memorization_step']})"] = ot["jaccard_memorization"]
    series["random Jaccard"] = [ot["random_jaccard"]] * len(steps)
    figs = [Figure.from_mpl(overlap_heatmap(data["matrix"], title="Jaccard of the operations' circuits"),
                            "Pairwise Jaccard of the circuits, with the random baseline mean and p-value.",
                            name="overlap-heatmap"),
            Figure.from_mpl(overlap_vs_k_figure({k.replace("|", " vs "): v for k, v in data["overlap_vs_k"].items()}),
                            "Jaccard of the top-k components of two circuits against k/n; dashed: random k-subsets.",
                            name="overlap-vs-k"),
            Figure.from_mpl(line_figure(steps + 1, series, ylabel="value", ylim=(0, 1.05),
                                        title=f"The {ot['task']} circuit over training (top {ot['top_k']})"),
                            "How the circuit of the first operation changes over training.", name="overlap-training")]
    if "files" in data:  # analyses written before the circuits were listed have no side-by-side figure
        circs = {name: Circuit.load(run_file(run, f, source="analysis/overlap.json"))
                 for name, f in data["files"].items()}
        figs.insert(1, Figure.from_mpl(draw_shared(circs), "The circuits side by side; components that another "
                                       "operation's circuit also holds are outlined in orange.", name="overlap-circuits"))
    tables = [Table(["pair", "statistic", "value", "random mean", "random 95th pct", "p-value"], rows),
              Table(["circuit", *[f"on {b}" for b in names]], cf_rows,
                    "Cross-task faithfulness F_B(C_A): each operation's circuit evaluated on each operation's data.")]
    headline = "Jaccard of the operations' circuits: " + _jaccards(data["pairs"]) + "."
    if "features" in data:
        fe = data["features"]
        text.append(_feature_text(fe))
        tables += _feature_tables(fe)
        headline += " Of their SAE features: " + _jaccards(fe["pairs"]) + "."
    if "accuracy" in data:
        headline += " Test accuracy " + ", ".join(f"{k} {_two(v['test'])}" for k, v in data["accuracy"].items()) + "."
    return Section("Circuit overlap across tasks", text="\n\n".join(text), figures=figs, tables=tables,
                   headline=headline,
                   numbers={"sizes": data["sizes"], "accuracy": data.get("accuracy"), "matrix": data["matrix"]["matrix"],
                            "cross_faithfulness": cf["faithfulness"],
                            "feature_jaccard": {p: r["jaccard"] for p, r in data["features"]["pairs"].items()}
                            if "features" in data else None})


def _jaccards(pairs: dict[str, Any]) -> str:
    return ", ".join(f"{pair.replace('|', '–')} {r['jaccard']['value']:.2f} (random {r['jaccard']['baseline_mean']:.2f}, "
                     f"p = {r['jaccard']['p_value']:.3f})" for pair, r in pairs.items())


def _feature_text(fe: dict[str, Any]) -> str:
    st = fe["settings"]
    return (f"**SAE features.** A {st['architecture']} SAE ({st['d_sae']} latents, k = {fe['settings']['k']:g}, "
            f"{st['steps']} steps, every example) on `{fe['hook']}`: explained variance "
            f"{_two(fe['explained_variance_test'])} on held-out examples, L0 {fe['l0']:.1f}, {fe['dead_fraction']:.0%} "
            "dead. Each operation's features: the smallest top-|attribution| set whose attributions to its "
            f"generalization metric sum to {fe['target']} of the total (attribution: the first-order effect of "
            "mean-ablating the feature, exact when only linear maps lie between the site and the logits, as after "
            "the last MLP layer of a model without LayerNorm; `mg.sae.feature_overlap`). Sizes: "
            + ", ".join(f"{k} {len(v)}" for k, v in fe["features"].items()) + ".")


def _feature_tables(fe: dict[str, Any]) -> list[Table]:
    rows = [[pair.replace("|", " vs "), stat.replace("_", " "), _fmt(r[stat]["value"]), _fmt(r[stat]["baseline_mean"]),
             _fmt(r[stat]["p_value"])]
            for pair, r in fe["pairs"].items() for stat in ("jaccard", "overlap_coefficient", "weighted_jaccard",
                                                            "spearman")]
    ab = fe["ablation"]
    names = ab["names"]
    abl = [["(none)", 0, *[_two(ab["original"][t]) for t in names]]]
    abl += [[f"{s}'s features", ab["n"][s], *[f"{_two(ab['ablated'][s][t])} (random {_two(ab['random_mean'][s][t])} ± "
                                              f"{_two(ab['random_std'][s][t])})" for t in names]] for s in ab["sets"]]
    return [Table(["pair", "statistic", "value", "random mean", "p-value"], rows,
                  "SAE features shared by the operations; random: feature sets of the same sizes (set statistics) "
                  "or permuted attributions (weighted Jaccard, Spearman)."),
            Table(["ablated", "features", *[f"{t} {ab['split']} acc." for t in names]], abl,
                  "Accuracy per operation after ablating one operation's features, beside as many random live "
                  "features (mean ± std over draws).")]


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3g}"


def _two(v: float | None) -> str:
    """Two decimals, or an em dash for a missing value (a split with no examples)."""
    return "—" if v is None else f"{v:.2f}"
