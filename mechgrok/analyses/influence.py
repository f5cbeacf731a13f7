"""Which training examples a run's predictions rest on (EK-FAC influence, ``mg.influence``): the
analysis ``influence``, its result and its report section (at the memorization checkpoint and at
the end)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, dense_mlp_task
from mechgrok.report.text import fixed
from mechgrok.report.figures import new_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.run import MEMORIZED_ACC, Run, first_step

__all__ = ["InfluenceAnalysis", "influence_analysis", "influence_section"]


@dataclass(frozen=True)
class InfluenceAnalysis(Result):
    """EK-FAC influence at one or two checkpoints (``influence_analysis``).

    Attributes:
        settings: fisher, damping, damping_mode, loss, k, n_queries, seed.
        fit_step: the first step whose training accuracy reached ``MEMORIZED_ACC`` (None if never).
        steps: checkpoint (a string) -> {"groups": query group -> top-k composition (``TopInfluences.summary``
            plus n_queries, mean_top_score, example, tfidf_recall), "accuracy": split -> accuracy,
            "self_influence": {"clean", "corrupted", "auroc_corrupted"}, "damping": the damping used per layer}.
        base_rates: {"frac_corrupted", "frac_same_answer"} of a random training example.
        factors: the last checkpoint's saved EK-FAC factors, relative to the run.
    """

    name: ClassVar[str] = "influence"
    settings: dict[str, Any]
    fit_step: int | None
    steps: dict[str, dict[str, Any]]
    base_rates: dict[str, float]
    factors: str = "analysis/influence/factors"


def influence_analysis(run: Run, *, n_queries: int = 64, k: int = 20, fisher: str = "true", damping: float = 0.1,
                       damping_mode: str = "relative", seed: int = 0, progress: bool = True) -> InfluenceAnalysis:
    """Which training examples the model's predictions rest on (EK-FAC influence, Grosse et al. 2023),
    at the checkpoint where the model first fits its training set (memorization) and at the last one.

    Queries: up to ``n_queries`` corrupted training examples (labelled with their corrupted label:
    what the model memorized) and as many held-out examples (true label), drawn with ``seed``.
    For each query group: the composition of the top-``k`` most influential training examples
    (corrupted share against the base rate, sharing the query's label, sharing its true answer);
    for every training example: its self-influence, and how well that separates corrupted from
    clean examples (AUROC); and how much of the top-``k`` TF-IDF candidate filtering would keep
    (``_tfidf_recall``). The last checkpoint's factors are saved in
    ``run/analysis/influence/factors`` (replaced on a rerun).
    """
    import torch  # noqa: PLC0415

    from mechgrok._stats import auroc  # noqa: PLC0415
    from mechgrok.influence import EKFAC, top_influences  # noqa: PLC0415
    from mechgrok.train import evaluate  # noqa: PLC0415

    task, steps, history = run.task(), run.steps(), run.history()
    loss = run.config["train"].get("loss", "cross_entropy")
    fit_step = first_step(history, "train_acc", MEMORIZED_ACC)  # the report's "memorized"
    early = next((s for s in steps if fit_step is not None and s >= fit_step), None)
    chosen = sorted({s for s in (early, steps[-1]) if s is not None})
    g = torch.Generator().manual_seed(seed)

    def sample(mask: torch.Tensor) -> torch.Tensor:
        idx = mask.nonzero().flatten()
        return idx[torch.randperm(len(idx), generator=g)[:n_queries]].sort().values

    queries = {"corrupted train": sample(task.train_corrupted), "test": sample(task.test)}
    queries = {name: q for name, q in queries.items() if len(q)}
    train_idx = task.train.nonzero().flatten()
    corrupted = task.train_corrupted[train_idx]
    base = {"frac_corrupted": float(corrupted.double().mean()),
            "frac_same_answer": 1.0 / max(1, int(task.labels.max()) + 1)}
    by_step: dict[str, Any] = {}
    for step in chosen:
        model = run.load_model(step)
        ek = EKFAC(model, task, fisher=fisher, damping=damping, damping_mode=damping_mode, loss=loss, seed=seed,
                   progress=progress).fit(train_idx)
        row: dict[str, Any] = {"groups": {}, "accuracy": {s: m["acc"] for s, m in evaluate(model, task, loss).items()}}
        for name, q in queries.items():
            labels = "labels" if name == "corrupted train" else "true_labels"
            S = ek.scores(q, train_idx, query_labels=labels)
            top = top_influences(S, task, train_idx, k=k, query_idx=q)
            row["groups"][name] = top.summary() | {"n_queries": int(len(q)), "mean_top_score": float(top.scores.mean()),
                                                   "example": _example(task, top, 0),
                                                   "tfidf_recall": _tfidf_recall(task, q, train_idx, S, labels, k)}
        self_inf = ek.self_influence(train_idx)
        row["self_influence"] = {"clean": self_inf[~corrupted].tolist(), "corrupted": self_inf[corrupted].tolist(),
                                 "auroc_corrupted": auroc(self_inf[corrupted].numpy(), self_inf[~corrupted].numpy())}
        row["damping"] = {name: float(v) for name, v in ek.damping_.items()}
        by_step[str(step)] = row
        if step == steps[-1]:
            ek.save(run.path / "analysis" / "influence" / "factors")
    return InfluenceAnalysis(settings={"fisher": fisher, "damping": damping, "damping_mode": damping_mode,
                                       "loss": loss, "k": k, "n_queries": n_queries, "seed": seed},
                             fit_step=fit_step, steps=by_step, base_rates=base, factors="analysis/influence/factors")


def _tfidf_recall(task, q, train_idx, S, labels: str, k: int, sizes: Sequence[int] = (50, 200)) -> dict[str, Any]:
    """How much of each query's top-``k`` TF-IDF candidate sets of ``sizes`` keep, with the input
    tokens alone and with the answer as a term (Grosse et al. 2023's filter; ``mg.influence.candidates``)."""
    from mechgrok.influence import candidate_recall, tfidf_candidates  # noqa: PLC0415

    out: dict[str, Any] = {}
    for answers in (False, True):
        for size in sorted({min(s, len(train_idx)) for s in sizes}):
            cand = tfidf_candidates(task, q, train_idx, k=size, answers=answers, query_labels=labels)
            r = candidate_recall(S, train_idx, cand, task, top=k)
            out[f"{'tokens+answer' if answers else 'tokens'}@{size}"] = {"recall": r["recall"], "random": r["random"]}
    return out


def _example(task, top, i: int) -> dict[str, Any]:
    """Query ``i`` and its top influences as operands and labels, for the report."""
    a, b = task.operand_positions

    def describe(j: int) -> dict[str, Any]:
        return {"index": j, "a": int(task.inputs[j, a]), "b": int(task.inputs[j, b]), "label": int(task.labels[j]),
                "true_label": int(task.true_labels[j]), "corrupted": bool(task.train_corrupted[j])}

    return {"query": describe(int(top.query[i])),
            "top": [describe(int(j)) | {"score": float(sv)} for j, sv in zip(top.indices[i][:5], top.scores[i][:5])]}


@analysis(InfluenceAnalysis, applies=dense_mlp_task)
def _influence(run: Run, progress: bool) -> InfluenceAnalysis:
    return influence_analysis(run, progress=progress)


def _composition_figure(data: InfluenceAnalysis):
    steps = list(data.steps)
    groups = sorted({g for row in data.steps.values() for g in row["groups"]})
    stats = [("frac_corrupted", "are corrupted", data.base_rates["frac_corrupted"]),
             ("frac_same_answer", "share the query's label", data.base_rates["frac_same_answer"])]
    fig, axes = new_figure(len(stats), width=4.0 * len(stats) + 1.6, height=3.2)
    fig.subplots_adjust(left=0.08, right=0.8, bottom=0.2, wspace=0.35)
    width = 0.8 / max(1, len(steps))
    for ax, (key, label, base) in zip(axes, stats):
        x = np.arange(len(groups))
        for i, step in enumerate(steps):
            vals = [data.steps[step]["groups"].get(g, {}).get(key, np.nan) for g in groups]
            ax.bar(x + i * width, vals, width, label=f"step {step}", color=f"C{i}")
        ax.axhline(base, color="0.3", ls="--", lw=1, label="base rate")
        ax.set_xticks(x + width * (len(steps) - 1) / 2, [f"{g} queries" for g in groups], fontsize=8)
        ax.set(ylim=(0, 1), title=f"top-{data.settings['k']} influential examples that {label}")
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
    data = InfluenceAnalysis.load(run)
    if data is None:
        return None
    st = data.settings
    steps = list(data.steps)
    text = [f"EK-FAC influence (George et al. 2018; Grosse et al. 2023): {st['fisher']} Fisher, damping "
            f"{st['damping']} ({st['damping_mode']}), {st['loss']} loss, on every linear map; factors fitted on all "
            f"training examples at step{'s' if len(steps) > 1 else ''} {', '.join(steps)}"
            + (f" (the first checkpoint after the model fit its training set at step {data.fit_step}, and the "
               "last)" if len(steps) > 1 else "")
            + f". Queries: up to {st['n_queries']} corrupted training examples (with the label the model memorized) "
            f"and held-out examples (true label). For each, the top {st['k']} training examples by influence. "
            f"Base rates: {data.base_rates['frac_corrupted']:.1%} of training examples are corrupted; a random "
            f"example shares a given label with probability {data.base_rates['frac_same_answer']:.1%}."]
    rows = []
    for step, row in data.steps.items():
        for g, r in row["groups"].items():
            rows.append([step, fixed(row["accuracy"].get("test")), g, r["n_queries"], fixed(r["frac_corrupted"]),
                         fixed(r["frac_same_answer"]), fixed(r["frac_same_true_answer"])])
        auc = row["self_influence"]["auroc_corrupted"]
        if auc is not None:
            text.append(f"Step {step}: self-influence separates corrupted from clean training examples with "
                        f"AUROC {auc:.3f}" + (" (memorized examples are their own strongest support)." if auc >= 0.9
                                              else "."))
    tables = [Table(["step", "test acc.", "queries", "n", "top-k corrupted", "top-k same label",
                     "top-k same true answer"], rows,
                    "Composition of each query's most influential training examples, averaged over queries.")]
    last = data.steps[steps[-1]]
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
            parts.append(f"a held-out query's top {st['k']} share its answer {fixed(r['frac_same_answer'], 2)} of the "
                         f"time (base rate {data.base_rates['frac_same_answer']:.2f})")
        else:
            parts.append(f"a memorized corrupted example's top {st['k']} are {fixed(r['frac_corrupted'], 2)} corrupted "
                         f"(base rate {data.base_rates['frac_corrupted']:.2f})")
    auc = last["self_influence"]["auroc_corrupted"]
    if auc is not None:
        parts.append(f"self-influence separates corrupted from clean examples with AUROC {auc:.3f}")
    return Section("Influential training examples", text="\n\n".join(text), figures=figs, tables=tables,
                   headline=f"at step {steps[-1]}, " + "; ".join(parts) + ".",
                   numbers={step: {"groups": {g: {k: v for k, v in r.items() if k != "example"}
                                              for g, r in row["groups"].items()},
                                   "auroc_corrupted": row["self_influence"]["auroc_corrupted"]}
                            for step, row in data.steps.items()})
