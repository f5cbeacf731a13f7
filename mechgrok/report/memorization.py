"""Report sections of language-model runs (a ``SequenceTask``): training per group of sequences,
and the memorized sequences (``analysis/memorization.json``, ``mechgrok analyze --only memorization``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mechgrok.report.figures import line_figure
from mechgrok.report.sections import Figure, Section, Table, is_sequence_run, read_analysis, section, series
from mechgrok.run import Run

__all__ = ["lm_training", "memorized_sequences"]

_METHOD_NOTES = {"extractable": "share of the continuation greedy decoding reproduces from the k-token prefix",
                 "loss": "the reference's mean loss minus the sequence's (nats)",
                 "self_influence": "EK-FAC g_zᵀ(F + λI)⁻¹g_z; it falls once a sequence is fitted"}


def _f(v: Any, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


@section(order=20, title="Training (language model)")
def lm_training(run: Run) -> Section | None:
    """Report section: next-token loss and exact match per group of a language-model run."""
    hist = run.history()
    if not hist or not is_sequence_run(run):
        return None
    groups = list(run.task().groups)
    x = series(hist, "step") + 1
    last = hist[-1]
    figs = [Figure.from_mpl(line_figure(x, {g: series(hist, f"{g}_loss") for g in groups}, ylabel="loss (nats/token)",
                                        logy=True, title="Next-token loss per group"),
                            "Mean loss per target token of each group of sequences over training (log–log).",
                            "lm-loss"),
            Figure.from_mpl(line_figure(x, {g: series(hist, f"{g}_exact") for g in groups}, ylabel="share",
                                        ylim=(-0.02, 1.02), title="Sequences with every target right"),
                            "Share of each group's sequences whose every target token is predicted right under "
                            "teacher forcing (`exact`).", "lm-exact")]
    rows = [[g, _f(last.get(f"{g}_loss")), _f(last.get(f"{g}_acc")), _f(last.get(f"{g}_exact"))] for g in groups]
    headline = (f"after {last['step']} steps: held-out structured loss {_f(last.get('test_loss'))} nats/token, "
                f"token accuracy {_f(last.get('test_acc'))}")
    return Section("Training (language model)", text="Next-token training over each sequence's target tokens; "
                   "rows repeated R times per epoch are in groups `planted_r{R}`.", figures=figs,
                   tables=[Table(["group", "loss", "token accuracy", "exact"], rows, f"At step {last['step']}.")],
                   numbers={"final": {k: v for k, v in last.items() if k != "step"}, "final_step": last["step"]},
                   headline=headline)


@section(order=45, title="Memorized sequences", analysis="memorization")
def memorized_sequences(run: Run) -> Section | None:
    """Report section: memorization scores, AUROCs, agreement, extractability and induction
    (``analysis/memorization.json``)."""
    data = read_analysis(run, "memorization")
    if data is None:
        return None
    k, methods = data["k"], list(data["auroc"])
    by = data["by_repeats"]
    rows = [[r["group"], r["repeats"], r["n"], *(_f(r.get(m)) for m in methods)] for r in by]
    auroc_rows = [[m, *(_f(v) for v in data["auroc"][m].values())] for m in methods]
    planted = list(next(iter(data["auroc"].values())).keys())
    agree_rows = [[a, *(_f(data["agreement"][a][b], 2) for b in methods)] for a in methods]
    rates = data["extractable_rate"]
    ks = sorted(rates, key=int)
    groups = [g for g in (data["reference"], *planted, "test") if g in rates[ks[0]]]
    rate_rows = [[g, *(_f(rates[kk].get(g)) for kk in ks)] for g in groups]
    ind = data["induction"]
    reps = [r["repeats"] for r in by]
    fig = line_figure(np.array([max(r, 0.5) for r in reps], dtype=float),
                      {f"extractable at k={k}": [r.get("extractable") for r in by]}, xlabel="repeats per epoch "
                      "(held-out at 0.5)", ylabel="mean match", ylim=(-0.02, 1.02), title="Extraction vs repetition")
    high = planted[-1] if planted else None
    headline = (f"k={k} extractability: {', '.join(f'{g} {_f(rates[str(k)].get(g), 2)}' for g in groups)}; AUROC of "
                f"{high} vs never-seen: " + ", ".join(f"{m} {_f(data['auroc'][m].get(high), 2)}" for m in methods)
                if high else "no planted groups")
    text = (f"Per-sequence memorization scores (higher = more memorized; {'; '.join(f'`{m}`: {_METHOD_NOTES[m]}' for m in methods if m in _METHOD_NOTES)}). "
            f"The reference `{data['reference']}` holds sequences of the planted kind the model never trained on. "
            f"Induction: best head prefix-matching {_f(ind['strength'], 2)} (layer {ind['best_head'][0]}, head "
            f"{ind['best_head'][1]}), in-context gain {_f(ind['in_context_gain'], 2)} nats.")
    tables, figures = [], []
    if (dele := data.get("deletion")) is not None:
        fr = dele["fractions"]
        tables.append(Table(["method", *(f"{100 * f:g}% dropped" for f in fr)],
                            [[m, *(f"{_f(p['target_extractable'], 2)} ({p['reference_loss_change']:+.3f})" for p in c)]
                             for m, c in dele["curves"].items()],
                            f"DEL (Chang et al. 2024): share of `{dele['group']}` still k={k} extractable after dropping "
                            f"each method's top neurons (before: {_f(dele['before'], 2)}), and in brackets the change "
                            "of the other training sequences' loss (nats)."))
        figures.append(Figure.from_mpl(line_figure(np.array(fr) * 100, {m: [p["target_extractable"] for p in c]
                                                                        for m, c in dele["curves"].items()},
                                                   xlabel="% of MLP neurons dropped", ylabel="still extractable",
                                                   ylim=(-0.02, 1.02), title="Deletion by localization method"),
                                       f"DEL curves on `{dele['group']}`.", "lm-deletion"))
    return Section("Memorized sequences", text=text, figures=[Figure.from_mpl(fig, "Mean extraction match by "
                                                                              "repetition count.", "lm-extraction"),
                                                               *figures],
                   tables=[Table(["group", "repeats", "n", *methods], rows, "Mean score per group."),
                           Table(["method", *planted], auroc_rows, "AUROC of each planted group against the "
                                                                   "reference (1 = perfect separation, 0.5 = chance)."),
                           Table(["", *methods], agree_rows, "Spearman correlation of the scores over the planted and "
                                                             "reference sequences."),
                           Table(["group", *(f"k={kk}" for kk in ks)], rate_rows, "k-extractable share per group."),
                           *tables],
                   numbers={"auroc": data["auroc"], "extractable_rate": rates, "induction_strength": ind["strength"]},
                   headline=headline)
