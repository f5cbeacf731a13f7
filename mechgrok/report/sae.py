"""Report section for ``analysis/sae.json``: SAE reconstruction, feature labels, frequency profiles,
ablations against random features, and feature counts over training."""

from __future__ import annotations

from typing import Any

import numpy as np

from mechgrok.report.figures import line_figure, new_figure
from mechgrok.report.sections import Figure, Section, Table, read_analysis, section
from mechgrok.run import Run

__all__ = ["sae_section"]

_SPLITS = {"train_clean": "clean train", "train_corrupted": "corrupted (vs corrupted label)",
           "train_corrupted_true": "corrupted (vs true label)", "test": "test"}


def _f(v: Any, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _present(ev: dict[str, Any]) -> list[str]:
    """The accuracy splits that have examples."""
    return [s for s in _SPLITS if s in ev and np.isfinite(_num(ev[s]["acc"]))]


def _num(v: Any) -> float:
    return np.nan if v is None else float(v)


def _spectra_figure(spectra: dict[str, list[float]], labels: dict[int, str]):
    n = len(spectra)
    fig, axes = new_figure(n, width=min(2.0 * n + 0.6, 16), height=2.2)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.2, top=0.8, wspace=0.35)
    for ax, (f, shares) in zip(axes, spectra.items()):
        colour = {"generalizing": "tab:green", "memorizing": "tab:red"}.get(labels.get(int(f), ""), "0.5")
        ax.bar(np.arange(len(shares)), shares, color=colour)
        ax.set_title(f"feature {f}\n({labels.get(int(f), '?')})", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("frequency", fontsize=7)
    return fig


def _ablation_figure(ablation: dict[str, Any], splits: list[str]):
    groups = [g for g, r in ablation["groups"].items() if r["n"]]
    fig, (ax,) = new_figure(width=8.4, height=3.2)
    fig.subplots_adjust(bottom=0.16, right=0.72)
    width = 0.8 / max(1, 2 * len(groups) + 1)
    x = np.arange(len(splits))
    ax.bar(x, [ablation["none"][s]["acc"] for s in splits], width, color="0.3", label="model")
    for i, g in enumerate(groups):
        r = ablation["groups"][g]
        ax.bar(x + (2 * i + 1) * width, [r["ablated"][s]["acc"] for s in splits], width, color=f"C{i}",
               label=f"{g} ablated ({r['n']})")
        ax.bar(x + (2 * i + 2) * width, [_num(r["random"]["acc_mean"].get(s)) for s in splits], width,
               yerr=[_num(r["random"]["acc_std"].get(s)) for s in splits], color=f"C{i}", alpha=0.35,
               label=f"{r['n']} random ablated")
    ax.set_xticks(x + width * len(groups), [_SPLITS[s] for s in splits], fontsize=7, rotation=10)
    ax.set(ylabel="accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


@section(order=70, title="SAE features", analysis="sae")
def sae_section(run: Run) -> Section | None:
    """Report section: SAE reconstruction, feature labels and ablations (``analysis/sae.json``)."""
    data = read_analysis(run, "sae")
    if data is None:
        return None
    ev, st, counts = data["evaluate"], data["settings"], data["counts"]
    by = ev["by_split"]
    splits = _present(ev["original"])
    text = [f"A **{st['architecture']}** SAE (sae-lens; {st['d_sae']} latents"
            + (f", k = {st['k']}" if st["architecture"] in ("topk", "batchtopk") else "")
            + f", {st['steps']} steps, seed {st['seed']}) on `{data['hook']}`"
            + (f" at position {ev['position']}" if ev.get("position") is not None else "")
            + f" of the step-{data['step']} checkpoint, trained on the activations of "
            + ("every example of the task" if st.get("split", "all") == "all" else f"the {st['split']} examples")
            + " "
            f"and evaluated as saved and reloaded (`{data['folder']}`, loadable with `sae_lens.SAE.load_from_disk`).",
            f"Explained variance {_f(by['test']['explained_variance'])} on held-out examples "
            f"({_f(by['all']['explained_variance'])} on all), L0 {_f(by['all']['l0'], 1)}, "
            f"dead latents {ev['dead_fraction']:.0%}, dense (> 50% of examples) {ev['dense_fraction']:.0%}. "
            "Loss recovered when the reconstruction replaces the activation (1 = nothing lost, 0 = no better "
            "than the mean activation): " + ", ".join(f"{_SPLITS[s]} {_f(ev['loss_recovered'].get(s))}" for s in splits)
            + "." + (" Above 1: the spliced model's loss is *lower* than the model's own on that split (the SAE "
                     "drops something the model does there)." if any((v or 0) > 1.05 for v in ev["loss_recovered"].values())
                     else ""),
            f"Labels: **{counts['memorizing']} memorizing**, **{counts['generalizing']} generalizing**, "
            f"{counts['other']} other ({counts['dead']} of them dead). Memorizing: {data['rule']['memorizing']}. "
            f"Generalizing: {data['rule']['generalizing']}."]
    acc_rows = [["model", "—", *[_f(ev["original"][s]["acc"]) for s in splits]],
                ["SAE spliced in", "—", *[_f(ev["spliced"][s]["acc"]) for s in splits]],
                ["mean activation", "—", *[_f(ev["mean_ablated"][s]["acc"]) for s in splits]]]
    ab = data["ablation"]
    for g, r in ab["groups"].items():
        if not r["n"]:
            continue
        acc_rows.append([f"{g} features ablated", r["n"], *[_f(r["ablated"][s]["acc"]) for s in splits]])
        acc_rows.append([f"random features ablated ({ab['n_random']} draws)", r["n"],
                         *[f"{_f(r['random']['acc_mean'].get(s))} ± {_f(r['random']['acc_std'].get(s))}"
                           for s in splits]])
    tables = [Table(["model", "features", *[_SPLITS[s] for s in splits]], acc_rows,
                    f"Accuracy per split. Random features are drawn from the {ab['pool']} live ones.")]
    feats = data["features"][:12]
    tables.append(Table(["feature", "label", "fires on train", "fires on test", "corrupted share", "push (logits)",
                         "answer η²", "frequency (share)"],
                        [[r["feature"], r["label"], _f(r["fire_train"]), _f(r["fire_test"]), _f(r["corrupted_share"]),
                          _f(r["corrupted_push"], 4), _f(r["answer_share"]),
                          "—" if r["dominant_freq"] is None else f"{r['dominant_freq']} ({_f(r['freq_fraction'], 2)})"]
                         for r in feats], "The most active features (by total activation)."))
    labels = {r["feature"]: r["label"] for r in data["features"]}
    figs = []
    if data.get("spectra"):
        figs.append(Figure.from_mpl(_spectra_figure(data["spectra"], labels),
                                    "Frequency profiles of the most active features: share of each feature's "
                                    "non-constant variance per frequency (over the (a, b) grid or over the answer, "
                                    "whichever view concentrates it more).", name="sae-spectra"))
    if any(r["n"] for r in ab["groups"].values()):
        figs.append(Figure.from_mpl(_ablation_figure(ab, splits), "Accuracy after ablating each labelled group, "
                                    "beside the same number of random live features (mean ± std).", name="sae-ablation"))
    ot = data["over_training"]
    if ot["steps"]:
        steps = np.array(ot["steps"] + [data["step"]], dtype=float)
        series = {f"{k} features": v + [counts[k]] for k, v in ot["counts"].items() if k in ("memorizing", "generalizing")}
        figs.append(Figure.from_mpl(line_figure(steps + 1, series, ylabel="features",
                                                title="Labelled SAE features over training"),
                                    f"One SAE per checkpoint ({ot['sae_steps']} training steps each for the earlier "
                                    "ones), same settings.", name="sae-over-training"))
        tables.append(Table(["step", "test accuracy", "explained variance (test)", "L0", "dead",
                             "memorizing", "generalizing"],
                            [[s, _f(a), _f(e), _f(l0, 1), f"{d:.0%}", m, g] for s, a, e, l0, d, m, g in zip(
                                ot["steps"], ot["test_acc"], ot["explained_variance"], ot["l0"], ot["dead_fraction"],
                                ot["counts"]["memorizing"], ot["counts"]["generalizing"])],
                            "SAEs on earlier checkpoints."))
    headline = (f"explained variance {_f(by['test']['explained_variance'])} on held-out examples at L0 "
                f"{_f(by['all']['l0'], 1)}; {counts['generalizing']} generalizing and {counts['memorizing']} memorizing "
                "features")
    for g, split in (("generalizing", "test"), ("memorizing", "train_corrupted")):
        r = ab["groups"].get(g)
        if r and r["n"] and split in splits:
            headline += (f"; ablating the {g} ones: {_SPLITS[split]} accuracy {_f(ev['original'][split]['acc'])} → "
                         f"{_f(r['ablated'][split]['acc'])} (as many random features: "
                         f"{_f(r['random']['acc_mean'].get(split))})")
    return Section("SAE features", text="\n\n".join(text), figures=figs, tables=tables, headline=headline + ".",
                   numbers={"explained_variance_test": by["test"]["explained_variance"], "l0": by["all"]["l0"],
                            "dead_fraction": ev["dead_fraction"], "counts": counts,
                            "loss_recovered": ev["loss_recovered"]})
