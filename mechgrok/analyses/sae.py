"""A sparse autoencoder on a run's MLP neurons (``mg.sae``): the analysis ``sae``, its result and its
report section (reconstruction, feature labels, frequency profiles, ablations against random
features, feature counts over training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, dense_mlp_task
from mechgrok.report.text import fixed
from mechgrok.report.figures import line_figure, new_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.run import Run

__all__ = ["SAEAnalysis", "sae_analysis", "sae_config", "sae_section"]


@dataclass(frozen=True)
class SAEAnalysis(Result):
    """An SAE on one checkpoint's MLP neurons and what its features do (``sae_analysis``).

    Attributes:
        step: the checkpoint; hook: the site; settings: ``SAEConfig.to_dict()`` plus ``split``
            (the examples it was trained on); folder: the saved SAE (sae-lens format), relative to
            the run.
        evaluate: ``mg.sae.evaluate`` without ``fire_rate`` (reconstruction per split, accuracy of
            the model, the spliced and the mean-ablated model, loss recovered, dead/dense shares).
        counts, rule: features per label and the labelling rule (``mg.sae.features``).
        features: the 50 most active features' rows (``FeatureStats.table``).
        spectra: feature -> its share of variance per frequency (modular tasks; None otherwise).
        generalizing_freqs: the dominant frequency of each generalizing feature (or None).
        ablation: ``mg.sae.ablation_study`` of the labelled groups against random features.
        over_training: ``mg.sae.over_training`` on earlier checkpoints plus ``sae_steps``.
    """

    name: ClassVar[str] = "sae"
    step: int
    hook: str
    settings: dict[str, Any]
    folder: str
    evaluate: dict[str, Any]
    counts: dict[str, int]
    rule: dict[str, str]
    features: list[dict[str, Any]]
    ablation: dict[str, Any]
    over_training: dict[str, Any]
    spectra: dict[str, list[float]] | None = None
    generalizing_freqs: list[int] | None = None


def sae_config(model, task, hook: str, split: str, *, architecture: str = "topk", d_sae: int | None = None,
               k: int | None = None, steps: int | None = None):
    """The analyses' SAE defaults: ``d_sae = 2 × d_in``, ``k = max(4, d_in // 16)``, about 50 passes
    over the ``split`` activations in batches of 256 (300 to 1,000 steps; 200 passes and up to 3,000
    steps until the demo had to fit ten minutes, with the same picture: docs/reproductions.md)."""
    from mechgrok import sae as saes  # noqa: PLC0415

    d_in = int(saes.activations(model, task, hook).shape[1])
    n_rows = int(task.mask(split).sum())
    return saes.SAEConfig(architecture=architecture, d_sae=d_sae or 2 * d_in, k=k or max(4, d_in // 16),
                          steps=steps or min(1000, max(300, 50 * n_rows // min(256, n_rows))))


def sae_analysis(run: Run, *, hook: str | None = None, architecture: str = "topk", d_sae: int | None = None,
                 k: int | None = None, split: str | None = None, steps: int | None = None, n_random: int = 5,
                 n_training_steps: int = 3, training_sae_steps: int | None = None,
                 progress: bool = True) -> SAEAnalysis:
    """An SAE on the last checkpoint's MLP neurons (``blocks.{L-1}.mlp.hook_post``, answer position)
    by default: evaluation, feature labels, ablations against random features, and SAEs on
    ``n_training_steps`` earlier checkpoints (``training_sae_steps`` steps each).

    Defaults: ``d_sae = 2 × d_mlp``, ``k = max(4, d_mlp // 16)``, about 50 passes over the
    activations in batches of 256 (``steps`` between 300 and 1,000; a third of that for the earlier
    checkpoints' SAEs); trained on the training examples when the task has corrupted labels
    (memorization lives there: on the whole table 80% of the data would carry none, and the SAE
    captured less of it — docs/reproductions.md), on every example otherwise. The SAE is saved in
    sae-lens's format in ``run/analysis/sae/final`` (replaced on a rerun).
    """
    from mechgrok import models, sae as saes  # noqa: PLC0415

    task, step = run.task(), run.steps()[-1]
    model = run.load_model(step)
    hook = hook or models.mlp_hook(models.n_layers(model) - 1)
    loss = run.config["train"].get("loss", "cross_entropy")
    split = split or ("train" if bool(task.train_corrupted.any()) else "all")
    config = sae_config(model, task, hook, split, architecture=architecture, d_sae=d_sae, k=k, steps=steps)
    training_sae_steps = training_sae_steps or max(100, config.steps // 3)
    folder = run.path / "analysis" / "sae" / "final"
    sae = saes.train(model, task, hook, config, split=split, out=folder, overwrite=True, progress=progress)
    ev = saes.evaluate(model, sae, task, loss=loss)
    stats = saes.features(model, sae, task)
    groups = {name: stats.indices(name) for name in ("memorizing", "generalizing")}
    study = saes.ablation_study(model, sae, task, groups, alive=stats.alive, n_random=n_random, loss=loss)
    earlier = [s for s in saes.pick_steps(run.steps(), n_training_steps + 1) if s != step]
    over = saes.over_training(run, hook, earlier, loss=loss, progress=progress, split=split,
                              config=config.replace(steps=training_sae_steps))
    top = stats.table(k=8)
    return SAEAnalysis(
        step=step, hook=hook, settings=config.to_dict() | {"split": split}, folder=str(folder.relative_to(run.path)),
        evaluate={k_: v for k_, v in ev.items() if k_ != "fire_rate"}, counts=stats.counts(), rule=stats.rule,
        features=stats.table(k=50),
        spectra={str(r["feature"]): stats.spectra[r["feature"]].tolist() for r in top}
        if stats.spectra is not None else None,
        generalizing_freqs=[int(stats.dominant_freq[f]) for f in groups["generalizing"]]
        if stats.dominant_freq is not None else None,
        ablation=study, over_training={"sae_steps": training_sae_steps, **over})


@analysis(SAEAnalysis, applies=dense_mlp_task)
def _sae(run: Run, progress: bool) -> SAEAnalysis:
    return sae_analysis(run, progress=progress)


_SPLITS = {"train_clean": "clean train", "train_corrupted": "corrupted (vs corrupted label)",
           "train_corrupted_true": "corrupted (vs true label)", "test": "test"}


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
    data = SAEAnalysis.load(run)
    if data is None:
        return None
    ev, st, counts = data.evaluate, data.settings, data.counts
    by = ev["by_split"]
    splits = _present(ev["original"])
    text = [f"A **{st['architecture']}** SAE (sae-lens; {st['d_sae']} latents"
            + (f", k = {st['k']}" if st["architecture"] in ("topk", "batchtopk") else "")
            + f", {st['steps']} steps, seed {st['seed']}) on `{data.hook}`"
            + (f" at position {ev['position']}" if ev.get("position") is not None else "")
            + f" of the step-{data.step} checkpoint, trained on the activations of "
            + ("every example of the task" if st.get("split", "all") == "all" else f"the {st['split']} examples")
            + " "
            f"and evaluated as saved and reloaded (`{data.folder}`, loadable with `sae_lens.SAE.load_from_disk`).",
            f"Explained variance {fixed(by['test']['explained_variance'])} on held-out examples "
            f"({fixed(by['all']['explained_variance'])} on all), L0 {fixed(by['all']['l0'], 1)}, "
            f"dead latents {ev['dead_fraction']:.0%}, dense (> 50% of examples) {ev['dense_fraction']:.0%}. "
            "Loss recovered when the reconstruction replaces the activation (1 = nothing lost, 0 = no better "
            "than the mean activation): " + ", ".join(f"{_SPLITS[s]} {fixed(ev['loss_recovered'].get(s))}" for s in splits)
            + "." + (" Above 1: the spliced model's loss is *lower* than the model's own on that split (the SAE "
                     "drops something the model does there)." if any((v or 0) > 1.05 for v in ev["loss_recovered"].values())
                     else ""),
            f"Labels: **{counts['memorizing']} memorizing**, **{counts['generalizing']} generalizing**, "
            f"{counts['other']} other ({counts['dead']} of them dead). Memorizing: {data.rule['memorizing']}. "
            f"Generalizing: {data.rule['generalizing']}."]
    acc_rows = [["model", "—", *[fixed(ev["original"][s]["acc"]) for s in splits]],
                ["SAE spliced in", "—", *[fixed(ev["spliced"][s]["acc"]) for s in splits]],
                ["mean activation", "—", *[fixed(ev["mean_ablated"][s]["acc"]) for s in splits]]]
    ab = data.ablation
    for g, r in ab["groups"].items():
        if not r["n"]:
            continue
        acc_rows.append([f"{g} features ablated", r["n"], *[fixed(r["ablated"][s]["acc"]) for s in splits]])
        acc_rows.append([f"random features ablated ({ab['n_random']} draws)", r["n"],
                         *[f"{fixed(r['random']['acc_mean'].get(s))} ± {fixed(r['random']['acc_std'].get(s))}"
                           for s in splits]])
    tables = [Table(["model", "features", *[_SPLITS[s] for s in splits]], acc_rows,
                    f"Accuracy per split. Random features are drawn from the {ab['pool']} live ones.")]
    feats = data.features[:12]
    tables.append(Table(["feature", "label", "fires on train", "fires on test", "corrupted share", "push (logits)",
                         "answer η²", "frequency (share)"],
                        [[r["feature"], r["label"], fixed(r["fire_train"]), fixed(r["fire_test"]), fixed(r["corrupted_share"]),
                          fixed(r["corrupted_push"], 4), fixed(r["answer_share"]),
                          "—" if r["dominant_freq"] is None else f"{r['dominant_freq']} ({fixed(r['freq_fraction'], 2)})"]
                         for r in feats], "The most active features (by total activation)."))
    labels = {r["feature"]: r["label"] for r in data.features}
    figs = []
    if data.spectra:
        figs.append(Figure.from_mpl(_spectra_figure(data.spectra, labels),
                                    "Frequency profiles of the most active features: share of each feature's "
                                    "non-constant variance per frequency (over the (a, b) grid or over the answer, "
                                    "whichever view concentrates it more).", name="sae-spectra"))
    if any(r["n"] for r in ab["groups"].values()):
        figs.append(Figure.from_mpl(_ablation_figure(ab, splits), "Accuracy after ablating each labelled group, "
                                    "beside the same number of random live features (mean ± std).", name="sae-ablation"))
    ot = data.over_training
    if ot["steps"]:
        steps = np.array(ot["steps"] + [data.step], dtype=float)
        series = {f"{k} features": v + [counts[k]] for k, v in ot["counts"].items() if k in ("memorizing", "generalizing")}
        figs.append(Figure.from_mpl(line_figure(steps + 1, series, ylabel="features",
                                                title="Labelled SAE features over training"),
                                    f"One SAE per checkpoint ({ot['sae_steps']} training steps each for the earlier "
                                    "ones), same settings.", name="sae-over-training"))
        tables.append(Table(["step", "test accuracy", "explained variance (test)", "L0", "dead",
                             "memorizing", "generalizing"],
                            [[s, fixed(a), fixed(e), fixed(l0, 1), f"{d:.0%}", m, g] for s, a, e, l0, d, m, g in zip(
                                ot["steps"], ot["test_acc"], ot["explained_variance"], ot["l0"], ot["dead_fraction"],
                                ot["counts"]["memorizing"], ot["counts"]["generalizing"])],
                            "SAEs on earlier checkpoints."))
    headline = (f"explained variance {fixed(by['test']['explained_variance'])} on held-out examples at L0 "
                f"{fixed(by['all']['l0'], 1)}; {counts['generalizing']} generalizing and {counts['memorizing']} memorizing "
                "features")
    for g, split in (("generalizing", "test"), ("memorizing", "train_corrupted")):
        r = ab["groups"].get(g)
        if r and r["n"] and split in splits:
            headline += (f"; ablating the {g} ones: {_SPLITS[split]} accuracy {fixed(ev['original'][split]['acc'])} → "
                         f"{fixed(r['ablated'][split]['acc'])} (as many random features: "
                         f"{fixed(r['random']['acc_mean'].get(split))})")
    return Section("SAE features", text="\n\n".join(text), figures=figs, tables=tables, headline=headline + ".",
                   numbers={"explained_variance_test": by["test"]["explained_variance"], "l0": by["all"]["l0"],
                            "dead_fraction": ev["dead_fraction"], "counts": counts,
                            "loss_recovered": ev["loss_recovered"]})
