"""Report section for ``analysis/influence.json``: which training examples the predictions rest on
(EK-FAC influence), at the memorization checkpoint and at the end."""

from __future__ import annotations

from typing import Any

import numpy as np

from mechgrok.report.figures import new_figure
from mechgrok.report.sections import Figure, Section, Table, read_analysis, section
from mechgrok.run import Run

__all__ = ["influence_section"]


def _f(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _composition_figure(data: dict[str, Any]):
    steps = list(data["steps"])
    groups = sorted({g for row in data["steps"].values() for g in row["groups"]})
    stats = [("frac_corrupted", "are corrupted", data["base_rates"]["frac_corrupted"]),
             ("frac_same_answer", "share the query's label", data["base_rates"]["frac_same_answer"])]
    fig, axes = new_figure(len(stats), width=4.0 * len(stats) + 1.6, height=3.2)
    fig.subplots_adjust(left=0.08, right=0.8, bottom=0.2, wspace=0.35)
    width = 0.8 / max(1, len(steps))
    for ax, (key, label, base) in zip(axes, stats):
        x = np.arange(len(groups))
        for i, step in enumerate(steps):
            vals = [data["steps"][step]["groups"].get(g, {}).get(key, np.nan) for g in groups]
            ax.bar(x + i * width, vals, width, label=f"step {step}", color=f"C{i}")
        ax.axhline(base, color="0.3", ls="--", lw=1, label="base rate")
        ax.set_xticks(x + width * (len(steps) - 1) / 2, [f"{g} queries" for g in groups], fontsize=8)
        ax.set(ylim=(0, 1), title=f"top-{data['settings']['k']} influential examples that {label}")
        ax.title.set_fontsize(8)
    axes[-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def _self_influence_figure(row: dict[str, Any], step: str):
    fig, (ax,) = new_figure(width=6.0, height=3.2)
    values = {k: np.asarray(row["self_influence"][k], dtype=float) for k in ("clean", "corrupted")}
    positive = np.concatenate([v[v > 0] for v in values.values()])
    if not len(positive):
        return None
    bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 40)
    for (name, v), colour in zip(values.items(), ("tab:blue", "tab:red")):
        if len(v):
            ax.hist(np.clip(v, bins[0], None), bins=bins, alpha=0.6, color=colour, label=f"{name} ({len(v)})")
    ax.set(xscale="log", xlabel="self-influence", ylabel="training examples",
           title=f"self-influence at step {step}")
    ax.legend(fontsize=8, frameon=False)
    return fig


@section(order=80, title="Influential training examples", analysis="influence")
def influence_section(run: Run) -> Section | None:
    """Report section: influential training examples via EK-FAC (``analysis/influence.json``)."""
    data = read_analysis(run, "influence")
    if data is None:
        return None
    st = data["settings"]
    steps = list(data["steps"])
    text = [f"EK-FAC influence (George et al. 2018; Grosse et al. 2023): {st['fisher']} Fisher, damping "
            f"{st['damping']} ({st['damping_mode']}), {st['loss']} loss, on every linear map; factors fitted on all "
            f"training examples at step{'s' if len(steps) > 1 else ''} {', '.join(steps)}"
            + (f" (the first checkpoint after the model fit its training set at step {data['fit_step']}, and the "
               "last)" if len(steps) > 1 else "")
            + f". Queries: up to {st['n_queries']} corrupted training examples (with the label the model memorized) "
            f"and held-out examples (true label). For each, the top {st['k']} training examples by influence. "
            f"Base rates: {data['base_rates']['frac_corrupted']:.1%} of training examples are corrupted; a random "
            f"example shares a given label with probability {data['base_rates']['frac_same_answer']:.1%}."]
    rows = []
    for step, row in data["steps"].items():
        for g, r in row["groups"].items():
            rows.append([step, _f(row["accuracy"].get("test")), g, r["n_queries"], _f(r["frac_corrupted"]),
                         _f(r["frac_same_answer"]), _f(r["frac_same_true_answer"])])
        auc = row["self_influence"]["auroc_corrupted"]
        if auc is not None:
            text.append(f"Step {step}: self-influence separates corrupted from clean training examples with "
                        f"AUROC {auc:.3f}" + (" (memorized examples are their own strongest support)." if auc >= 0.9
                                              else "."))
    tables = [Table(["step", "test acc.", "queries", "n", "top-k corrupted", "top-k same label",
                     "top-k same true answer"], rows,
                    "Composition of each query's most influential training examples, averaged over queries.")]
    last = data["steps"][steps[-1]]
    for g, r in last["groups"].items():
        ex = r["example"]
        q = ex["query"]
        tables.append(Table(["a", "b", "label", "true label", "corrupted", "score"],
                            [[t["a"], t["b"], t["label"], t["true_label"], "yes" if t["corrupted"] else "no",
                              f"{t['score']:.3g}"] for t in ex["top"]],
                            f"Step {steps[-1]}, one {g} query: ({q['a']}, {q['b']}) → {q['label']}"
                            + (f" (true {q['true_label']})" if q["label"] != q["true_label"] else "")
                            + ", its five most influential training examples."))
    recall = [[g, key.split("@")[0], int(key.split("@")[1]), f"{v['recall']:.2f}", f"{v['random']:.2f}"]
              for g, r in last["groups"].items() for key, v in r.get("tfidf_recall", {}).items()]
    if recall:
        tables.append(Table(["queries", "TF-IDF terms", "candidates", "top-k kept", "random candidates"], recall,
                            f"Step {steps[-1]}: share of each query's top {st['k']} that TF-IDF candidate filtering "
                            "(Grosse et al. 2023) would keep, with the input tokens as terms and with the answer "
                            "as a term too; check it before scoring only the candidates."))
    figs = [Figure.from_mpl(_composition_figure(data), "What the most influential training examples are, per "
                            "query group and checkpoint; dashed: the base rate.", name="influence-composition")]
    if last["self_influence"]["corrupted"]:
        fig = _self_influence_figure(last, steps[-1])
        if fig is not None:
            figs.append(Figure.from_mpl(fig, "Self-influence of clean and corrupted training examples.",
                                        name="influence-self"))
    parts = []
    for g, r in last["groups"].items():
        if g == "test":
            parts.append(f"a held-out query's top {st['k']} share its answer {_f(r['frac_same_answer'], 2)} of the "
                         f"time (base rate {data['base_rates']['frac_same_answer']:.2f})")
        else:
            parts.append(f"a memorized corrupted example's top {st['k']} are {_f(r['frac_corrupted'], 2)} corrupted "
                         f"(base rate {data['base_rates']['frac_corrupted']:.2f})")
    auc = last["self_influence"]["auroc_corrupted"]
    if auc is not None:
        parts.append(f"self-influence separates corrupted from clean examples with AUROC {auc:.3f}")
    return Section("Influential training examples", text="\n\n".join(text), figures=figs, tables=tables,
                   headline=f"at step {steps[-1]}, " + "; ".join(parts) + ".",
                   numbers={step: {"groups": {g: {k: v for k, v in r.items() if k != "example"}
                                              for g, r in row["groups"].items()},
                                   "auroc_corrupted": row["self_influence"]["auroc_corrupted"]}
                            for step, row in data["steps"].items()})
