"""Memorized sequences of a language-model run (``mg.memorization``): the analysis
``memorization``, its result and its report section (scores by repetition count, AUROCs, the
scores' agreement, extractability per prefix length, induction strength, DEL curves)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, sequence_task
from mechgrok.report.figures import line_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.report.text import sig
from mechgrok.run import Run

if TYPE_CHECKING:
    from mechgrok.tasks import SequenceTask

__all__ = ["MemorizationAnalysis", "memorization_analysis", "memorized_sequences", "DEL_FRACTIONS"]

#: Shares of the MLP neurons the memorization analysis drops (DEL): 0.1%, 0.5%, 1% (Chang et al.), 5%.
DEL_FRACTIONS = (0.001, 0.005, 0.01, 0.05)


@dataclass(frozen=True)
class MemorizationAnalysis(Result):
    """Memorization scores and localization of a language-model run (``memorization_analysis``).

    Attributes:
        k: the prefix length of the extractability score.
        reference: the group of never-seen planted-style sequences the AUROCs contrast with.
        auroc: score method -> planted group -> AUROC against ``reference``.
        agreement: method -> method -> Spearman correlation of the scores.
        by_repeats: one row per group: {"group", "repeats", "n", method -> mean score}.
        extractable_rate: prefix length (a string) -> group -> k-extractable share.
        induction: ``mg.measures.induction_scores(...).to_dict()``.
        deletion: DEL on the most repeated planted group: {"group", "fractions", "curves" (method
            -> ``DeletionPoint.to_dict()`` per fraction), "before"}; None when the model has no
            MLPs or none of the group is extractable.
    """

    name: ClassVar[str] = "memorization"
    k: int
    reference: str
    auroc: dict[str, dict[str, float | None]]
    agreement: dict[str, dict[str, float | None]]
    by_repeats: list[dict[str, Any]]
    extractable_rate: dict[str, dict[str, float]]
    induction: dict[str, Any]
    deletion: dict[str, Any] | None = None


def memorization_analysis(model, task: SequenceTask, *, k: int | None = None, progress: bool = True) -> MemorizationAnalysis:
    """Memorized sequences of a language-model run: the memorization scores
    (``mg.memorization.scores``: AUROC per repetition count, agreement, means by repetition
    count), the k-extractability rate per group at several prefix lengths, and the induction-head
    scores (``mg.measures.induction_scores``, BOS = the corpus' last token id)."""
    from mechgrok import measures, memorization, models  # noqa: PLC0415

    s = memorization.scores(model, task, k=k, progress=progress)
    ks = sorted({2, 4, s.k, task.n_ctx // 2} & set(range(1, task.n_ctx)))
    rates = {str(kk): {g: memorization.extract(model, task, kk, split=g).rate for g in task.groups
                       if bool(task.groups[g].any())} for kk in ks}
    bos = task.d_vocab - 1 if task.config.get("kind") == "lm_corpus" else None
    induction = measures.induction_scores(model, bos=bos).to_dict()
    deletion = None
    planted = s.planted_groups()
    if planted and models.has_mlp(model):  # DEL (Chang et al. 2024) on the most repeated planted group
        group = planted[-1][1]
        before = memorization.extract(model, task, s.k, split=group).rate
        if before > 0:  # nothing to delete when none of the group is extractable
            curves = {}
            for method in memorization.LOCALIZATION_METHODS:
                loc = memorization.localize(model, task, group, method, progress=False)
                curves[method] = [p.to_dict() for p in memorization.deletion_curve(model, task, loc, DEL_FRACTIONS,
                                                                                   k=s.k)]
            deletion = {"group": group, "fractions": list(DEL_FRACTIONS), "curves": curves, "before": before}
    return MemorizationAnalysis(k=s.k, reference=s.reference, auroc=s.auroc_by_group(), agreement=s.agreement(),
                                by_repeats=s.by_repeats(), extractable_rate=rates, induction=induction,
                                deletion=deletion)


@analysis(MemorizationAnalysis, applies=sequence_task)
def _memorization(run: Run, progress: bool) -> MemorizationAnalysis:
    return memorization_analysis(run.load_model(), run.task(), progress=progress)


_METHOD_NOTES = {"extractable": "share of the continuation greedy decoding reproduces from the k-token prefix",
                 "loss": "the reference's mean loss minus the sequence's (nats)",
                 "self_influence": "EK-FAC g_zᵀ(F + λI)⁻¹g_z; it falls once a sequence is fitted"}


@section(order=45, title="Memorized sequences", analysis="memorization")
def memorized_sequences(run: Run) -> Section | None:
    """Report section: memorization scores, AUROCs, agreement, extractability and induction
    (``analysis/memorization.json``)."""
    data = MemorizationAnalysis.load(run)
    if data is None:
        return None
    k, methods = data.k, list(data.auroc)
    by = data.by_repeats
    rows = [[r["group"], r["repeats"], r["n"], *(sig(r.get(m)) for m in methods)] for r in by]
    auroc_rows = [[m, *(sig(v) for v in data.auroc[m].values())] for m in methods]
    planted = list(next(iter(data.auroc.values())).keys())
    agree_rows = [[a, *(sig(data.agreement[a][b], 2) for b in methods)] for a in methods]
    rates = data.extractable_rate
    ks = sorted(rates, key=int)
    groups = [g for g in (data.reference, *planted, "test") if g in rates[ks[0]]]
    rate_rows = [[g, *(sig(rates[kk].get(g)) for kk in ks)] for g in groups]
    ind = data.induction
    reps = [r["repeats"] for r in by]
    fig = line_figure(np.array([max(r, 0.5) for r in reps], dtype=float),
                      {f"extractable at k={k}": [r.get("extractable") for r in by]}, xlabel="repeats per epoch "
                      "(held-out at 0.5)", ylabel="mean match", ylim=(-0.02, 1.02), title="Extraction vs repetition")
    high = planted[-1] if planted else None
    headline = (f"k={k} extractability: {', '.join(f'{g} {sig(rates[str(k)].get(g), 2)}' for g in groups)}; AUROC of "
                f"{high} vs never-seen: " + ", ".join(f"{m} {sig(data.auroc[m].get(high), 2)}" for m in methods)
                if high else "no planted groups")
    text = (f"Per-sequence memorization scores (higher = more memorized; {'; '.join(f'`{m}`: {_METHOD_NOTES[m]}' for m in methods if m in _METHOD_NOTES)}). "
            f"The reference `{data.reference}` holds sequences of the planted kind the model never trained on. "
            f"Induction: best head prefix-matching {sig(ind['strength'], 2)} (layer {ind['best_head'][0]}, head "
            f"{ind['best_head'][1]}), in-context gain {sig(ind['in_context_gain'], 2)} nats.")
    tables, figures = [], []
    if (dele := data.deletion) is not None:
        fr = dele["fractions"]
        tables.append(Table(["method", *(f"{100 * f:g}% dropped" for f in fr)],
                            [[m, *(f"{sig(p['target_extractable'], 2)} ({p['reference_loss_change']:+.3f})" for p in c)]
                             for m, c in dele["curves"].items()],
                            f"DEL (Chang et al. 2024): share of `{dele['group']}` still k={k} extractable after dropping "
                            f"each method's top neurons (before: {sig(dele['before'], 2)}), and in brackets the change "
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
                   numbers={"auroc": data.auroc, "extractable_rate": rates, "induction_strength": ind["strength"]},
                   headline=headline)
