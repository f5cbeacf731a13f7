"""When the grokking ticket forms (Minegishi et al., arXiv:2310.19470; ``mg.tickets``): the analysis
``tickets``, its result and its report section.

No retraining: on every checkpoint the magnitude mask at a few sparsities is compared with the mask
of the last (generalized) checkpoint, the grokking ticket's mask. Where that overlap rises relative
to memorization and generalization says when the ticket's structure appears. Retraining tickets and
their controls is ``mg.tickets.ticket`` / ``ticket_sweep`` (seconds to minutes per run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from mechgrok.analyses._base import Result, analysis, one_answer_task
from mechgrok.report.figures import new_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.report.text import fixed
from mechgrok.run import GENERALIZED_ACC, Run
from mechgrok.tickets import default_params, grokking_delay, magnitude_masks, mask_overlap, ticket_source

__all__ = ["TicketAnalysis", "ticket_analysis", "tickets_section", "TICKET_SPARSITIES", "random_overlap"]

#: The sparsities the analysis compares masks at (fractions pruned).
TICKET_SPARSITIES = (0.3, 0.5, 0.7)


def random_overlap(sparsity: float) -> dict[str, float]:
    """What two independent uniformly random masks keeping ``d = 1 − s`` of the weights share, in
    expectation: ``kept_of_b`` = d, ``jaccard`` = d² / (2d − d²) = d / (2 − d)."""
    d = 1.0 - sparsity
    return {"kept_of_b": d, "jaccard": d / (2.0 - d) if d > 0 else 0.0}


@dataclass(frozen=True)
class TicketAnalysis(Result):
    """Overlap of each checkpoint's magnitude mask with the last checkpoint's, per sparsity.

    Attributes:
        sparsities: fractions pruned ``[S]``.
        steps: the checkpoints ``[C]``; ``reference_step`` = the last, whose mask is the ticket's.
        reference_test_acc: test accuracy at the reference step (a grokking ticket needs ≥ 0.95).
        scope, params, n_weights: how masks were taken (``mg.tickets.magnitude_mask``) and over how many weights.
        kept_of_final: ``[S][C]`` share of the final mask's kept weights that the checkpoint's mask keeps.
        jaccard: ``[S][C]`` Jaccard index of the checkpoint's and the final mask.
        jaccard_prev: ``[S][C]`` Jaccard index with the previous checkpoint's mask (None at the first).
        memorized, generalized: the run's ``grokking_delay`` steps (None: never).
        ticket: when the run is itself a ticket: its record (kind, sparsity, source, ...), its delay and
            its source's (``source_from``: "folder" when the source run was read, "record" otherwise).
    """

    name: ClassVar[str] = "tickets"
    sparsities: list[float]
    steps: list[int]
    reference_step: int
    reference_test_acc: float | None
    scope: str
    params: list[str]
    n_weights: int
    kept_of_final: list[list[float]]
    jaccard: list[list[float]]
    jaccard_prev: list[list[float | None]]
    memorized: int | None
    generalized: int | None
    ticket: dict[str, Any] | None = None


def _applies(run: Run) -> str | None:
    if (reason := one_answer_task(run)) is not None:
        return reason
    if len(steps := run.steps()) < 2:
        return (f"compares each checkpoint's magnitude mask with the last one's; this run has {len(steps)} "
                "checkpoint(s): train it with checkpoints (checkpoint_every) to see when the ticket forms")
    try:
        default_params(run.load_model(steps[0]))
    except ValueError as e:
        return f"magnitude masks need weight matrices to prune: {e}"
    return None


def _ticket_record(run: Run) -> dict[str, Any] | None:
    """The run's own ticket record with its delay next to its source's, or None for a plain run."""
    info = run.config.get("masks")
    if not info:
        return None
    meta = dict(info.get("meta") or {})
    own = grokking_delay(run)
    rec = {"kind": meta.get("kind"), "sparsity": meta.get("sparsity"), "scope": meta.get("scope"),
           "match_norm": meta.get("match_norm"), "source_run": meta.get("source_run"),
           "source_step": meta.get("source_step"), "kept": info.get("kept"), "total": info.get("total"),
           "memorized": own.memorized, "generalized": own.generalized, "delay": own.delay,
           "from_tickets": meta.get("method") == "mechgrok.tickets"}
    source = ticket_source(run)
    if source is not None:
        try:
            sd = grokking_delay(source)
            rec.update(source_memorized=sd.memorized, source_generalized=sd.generalized, source_delay=sd.delay,
                       source_from="folder")
            return rec
        except (OSError, ValueError):
            pass
    mem, gen = meta.get("source_memorized"), meta.get("source_generalized")
    rec.update(source_memorized=mem, source_generalized=gen,
               source_delay=None if mem is None or gen is None else gen - mem,
               source_from="record" if rec["from_tickets"] else None)
    return rec


def ticket_analysis(run: Run, *, sparsities: tuple[float, ...] = TICKET_SPARSITIES, scope: str = "global",
                    params: list[str] | None = None, progress: bool = True) -> TicketAnalysis:
    """Magnitude masks at ``sparsities`` on every checkpoint of ``run``, against the last checkpoint's.

    Cost per checkpoint: loading it and one stable sort of the ``N`` pruned magnitudes (all
    sparsities come from the same sort), plus set operations on ``N`` booleans; no forward pass.
    """
    steps = run.steps()
    if len(steps) < 2:
        raise ValueError(f"{run.path} has {len(steps)} checkpoint(s); the ticket analysis needs at least two")
    hist = run.history()
    acc = {r["step"]: r.get("test_acc") for r in hist}.get(steps[-1])
    final = magnitude_masks(run.load_model(steps[-1]), sparsities, params=params, scope=scope)
    kept, jac, prev_j = ([[] for _ in sparsities] for _ in range(3))
    prev = None
    for step in tqdm(steps, desc=f"tickets {run.name}", disable=not progress, unit="ckpt"):
        masks = final if step == steps[-1] else magnitude_masks(run.load_model(step), sparsities, params=params,
                                                                scope=scope)
        for i, (m, f) in enumerate(zip(masks, final)):
            o = mask_overlap(m, f)
            kept[i].append(o["kept_of_b"])
            jac[i].append(o["jaccard"])
            prev_j[i].append(None if prev is None else mask_overlap(m, prev[i])["jaccard"])
        prev = masks
    d = grokking_delay(hist)
    return TicketAnalysis(sparsities=[float(s) for s in sparsities], steps=list(steps), reference_step=steps[-1],
                          reference_test_acc=acc, scope=scope, params=sorted(final[0]),
                          n_weights=sum(int(m.numel()) for m in final[0].values()), kept_of_final=kept,
                          jaccard=jac, jaccard_prev=prev_j, memorized=d.memorized, generalized=d.generalized,
                          ticket=_ticket_record(run))


@analysis(TicketAnalysis, applies=_applies)
def _tickets(run: Run, progress: bool) -> TicketAnalysis:
    return ticket_analysis(run, progress=progress)


# ---------------------------------------------------------------------------- report section


def _at(steps: list[int], values: list[float], step: int | None) -> tuple[int | None, float | None]:
    """The first checkpoint at or after ``step`` and its value (None when there is none)."""
    if step is None:
        return None, None
    for s, v in zip(steps, values):
        if s >= step:
            return s, v
    return None, None


def _ticket_text(t: dict[str, Any]) -> str:
    what = t["kind"] if t["kind"] != "dense" else ("dense" + (f", {t['match_norm'].upper()} norm matched"
                                                              if t.get("match_norm") else ""))
    sp = "" if t.get("sparsity") is None else f" at sparsity {t['sparsity']:g}"
    keep = f" ({t['kept']:,} of {t['total']:,} weights kept)" if t.get("kept") is not None else ""
    if not t.get("from_tickets"):
        return (f"This run trained with fixed weight masks{keep}, not recorded by `mg.tickets`, so its source is "
                "unknown.")
    head = (f"This run is a {what} mask{sp} ({t.get('scope')} magnitude pruning){keep}, taken from "
            f"`{t.get('source_run')}` at step {t.get('source_step')}.")
    gen, sgen = t.get("generalized"), t.get("source_generalized")
    own = f"it generalized at step {gen}" if gen is not None else "it did not generalize within its budget"
    if t.get("source_from") is None:
        return f"{head} {own[0].upper()}{own[1:]}; the source's steps are not recorded."
    where = ("read from the source folder" if t["source_from"] == "folder" else
             "from the record in config.json: the source folder is not readable from here")
    src = f"the source at step {sgen}" if sgen is not None else "the source never did"
    trivial = (f" Its pruned weights stay 0, so its masks at sparsities up to {t['sparsity']:g} keep the final mask "
               "throughout (overlap 1 by construction)." if t.get("sparsity") is not None and t["kind"] != "dense"
               else "")
    return (f"{head} {own[0].upper()}{own[1:]}, {src} ({where}; delay {t.get('delay')} vs {t.get('source_delay')} "
            f"steps).{trivial}")


@section(order=85, title="Grokking tickets", analysis="tickets")
def tickets_section(run: Run) -> Section | None:
    """Report section: when the final magnitude mask forms (``analysis/tickets.json``)."""
    data = TicketAnalysis.load(run)
    if data is None:
        return None
    fig, (ax,) = new_figure()
    steps = np.array(data.steps, dtype=float)
    rows, headline, numbers = [], [], {}
    for i, s in enumerate(data.sparsities):
        colour = f"C{i}"
        ax.plot(steps, data.kept_of_final[i], color=colour, linewidth=1.6, label=f"sparsity {s:g}")
        ax.axhline(random_overlap(s)["kept_of_b"], color=colour, linestyle=":", linewidth=1.0)
        (ms, mv), (gs, gv) = (_at(data.steps, data.kept_of_final[i], data.memorized),
                              _at(data.steps, data.kept_of_final[i], data.generalized))
        formed = next((st for st, v in zip(data.steps, data.kept_of_final[i]) if v >= 0.9), None)
        rows.append([f"{s:g}", f"{fixed(mv, 2)} (step {ms})" if ms is not None else "—",
                     f"{fixed(gv, 2)} (step {gs})" if gs is not None else "—", formed,
                     fixed(random_overlap(s)["kept_of_b"], 2), fixed(data.kept_of_final[i][0], 2)])
        numbers[f"s{s:g}"] = {"kept_at_memorized": mv, "kept_at_generalized": gv, "first_step_kept_0.9": formed}
        if mv is not None:
            headline.append(f"sparsity {s:g}: {100 * mv:.0f}% of the final mask at memorization (step {ms}; random "
                            f"{100 * (1 - s):.0f}%)" + (f", {100 * gv:.0f}% at generalization (step {gs})"
                                                         if gv is not None else ""))
    for label, x, colour in (("memorized", data.memorized, "0.35"), ("generalized", data.generalized, "tab:purple")):
        if x is not None:
            ax.axvline(x, color=colour, linestyle="--", linewidth=1.0, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("share of the final mask kept")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", framealpha=0.85, edgecolor="none")
    generalized = data.reference_test_acc is not None and data.reference_test_acc >= GENERALIZED_ACC
    text = ("Grokking tickets (Minegishi et al., arXiv:2310.19470): the magnitude-pruning mask of the generalized "
            "model, applied to the initial weights and retrained, generalizes with a shorter delay than the dense "
            "model (`mg.tickets.ticket`, `ticket_sweep`). Here, without retraining: on every checkpoint the "
            f"{data.scope} magnitude mask over the {data.n_weights:,} weights of the weight matrices is compared with "
            f"the mask of the last checkpoint (step {data.reference_step}): the share of the final mask's kept "
            "weights it keeps too (dotted: two random masks, 1 − sparsity). Where it rises against the memorization "
            "and generalization steps says when the ticket's structure forms.")
    if not generalized:
        text += (f"\n\nThe last checkpoint has test accuracy {fixed(data.reference_test_acc, 3)} "
                 f"(< {GENERALIZED_ACC}): its mask is the mask of a model that did not generalize, not a grokking "
                 "ticket.")
    if data.ticket is not None:
        text += "\n\n" + _ticket_text(data.ticket)
        numbers["ticket"] = data.ticket
    return Section("Grokking tickets", text=text,
                   figures=[Figure.from_mpl(fig, "Share of the last checkpoint's magnitude mask kept by each "
                                                 "checkpoint's mask, per sparsity; dashed: memorized and generalized "
                                                 "steps.", name="tickets-mask-overlap")],
                   tables=[Table(["sparsity", "at memorization", "at generalization", "first step ≥ 0.9", "random",
                                  "at step 0"], rows,
                                 "Share of the final mask kept by the checkpoint at (or first after) memorization and "
                                 "generalization, the first checkpoint keeping 90% of it, two random masks' "
                                 "expectation and the initial weights' own mask.")],
                   headline="; ".join(headline) + "." if headline else "", numbers=numbers)
