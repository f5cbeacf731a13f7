"""Progress measures over a run's checkpoints (Nanda et al. 2023; ``mg.measures.progress``): the
analysis ``progress``, its result and its report section with the phase boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, dense_mlp_task
from mechgrok.report.figures import line_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, Run, first_step

__all__ = ["ProgressAnalysis", "phase_boundaries", "progress_section"]


@dataclass(frozen=True)
class ProgressAnalysis(Result):
    """``mg.measures.progress`` of a run: one list per measure (``PROGRESS_COLUMNS``, one entry per
    checkpoint in ``columns["step"]``; None where undefined), the key frequencies used and how they
    were chosen (``key_frequencies``), and ``meta`` (run, task, operation, p, loss, notes). Stored
    flat, as ``mg.measures.progress`` returns it."""

    name: ClassVar[str] = "progress"
    columns: dict[str, list]
    key_frequencies: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.columns, "key_frequencies": self.key_frequencies, "meta": self.meta}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "") -> ProgressAnalysis:
        if not isinstance(data, dict) or not isinstance(data.get("step"), list):
            raise ValueError(f"{source or 'analysis/progress.json'} is not a progress table (no 'step' list); rebuild "
                             "it with `mechgrok analyze RUN --only progress`")
        cols = {k: v for k, v in data.items() if isinstance(v, list)}
        return cls(cols, data.get("key_frequencies") or {}, data.get("meta") or {})

    def column(self, name: str) -> np.ndarray:
        """Measure ``name`` over the checkpoints as float64 (None -> NaN)."""
        return _arr(self.columns[name])


def _applies(run: Run) -> str | None:
    kind = run.task().config.get("kind")
    if kind not in ("modular_arithmetic", "multi_task"):
        return f"the Fourier measures need modular arithmetic; this run trains on {kind!r}"
    return dense_mlp_task(run)  # the neuron measures read blocks.L.mlp.hook_post


@analysis(ProgressAnalysis, applies=_applies)
def _progress(run: Run, progress: bool) -> ProgressAnalysis:
    from mechgrok import measures  # noqa: PLC0415

    names = run.task().task_names  # a multi-task run: the measures of its first operation
    return ProgressAnalysis.from_json(measures.progress(run, progress=progress,
                                                        task_name=names[0] if len(names) > 1 else None))


def _arr(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _first_below(steps: np.ndarray, y: np.ndarray, level: float, after: int = 0) -> int | None:
    ok = np.nonzero((y < level) & (steps >= after))[0]
    return int(steps[ok[0]]) if len(ok) else None


def phase_boundaries(prog: ProgressAnalysis, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase boundaries read off the progress measures (Nanda et al. 2023's three phases).

    - memorization ends at the first logged step with train accuracy 100%;
    - circuit formation shows as restricted loss falling: the first checkpoint after memorization
      with restricted loss below 1 nat, compared with the first where test loss is below 1 nat;
    - excluded loss peaks during circuit formation (its argmax after memorization);
    - cleanup ends at the first logged step with test accuracy >= 95%.
    Resolution: the checkpoint cadence (restricted/excluded) and ``eval_every`` (accuracies).
    """
    steps = np.array(prog.columns["step"], dtype=np.int64)
    memorized = first_step(history, "train_acc", MEMORIZED_ACC)
    out: dict[str, Any] = {"memorized": memorized,
                           "generalized": first_step(history, "test_acc", GENERALIZED_ACC)}
    after = memorized or 0
    test = prog.column("test_loss")
    out["test_loss_below_1"] = _first_below(steps, test, 1.0, after)
    if any(v is not None for v in prog.columns.get("restricted_loss", [])):
        restricted, excluded = prog.column("restricted_loss"), prog.column("excluded_loss")
        out["restricted_loss_below_1"] = _first_below(steps, restricted, 1.0, after)
        late = steps >= after
        out["excluded_loss_peak"] = int(steps[late][np.nanargmax(excluded[late])]) if late.any() else None
    return out


@section(order=30, title="Progress measures", analysis="progress")
def progress_section(run: Run) -> Section | None:
    """Report section: the progress measures over checkpoints (``analysis/progress.json``)."""
    prog = ProgressAnalysis.load(run)
    if prog is None:
        return None
    history = run.history()
    steps = prog.column("step")
    x = steps + 1
    bounds = phase_boundaries(prog, history)
    phases = {"memorized": (bounds["memorized"] or 0) + 1 if bounds["memorized"] is not None else None,
              "generalized": bounds["generalized"] + 1 if bounds["generalized"] is not None else None}
    key = prog.key_frequencies
    losses = {k.replace("_", " "): prog.column(k) for k in ("train_loss", "test_loss", "restricted_loss",
                                                               "excluded_loss") if k in prog.columns}
    figs = [Figure.from_mpl(line_figure(x, losses, ylabel="loss", title="Losses on every checkpoint", logy=True,
                                        phases=phases),
                            "Train and test loss with Nanda et al.'s restricted loss (logits restricted to the key "
                            "frequencies, all pairs) and excluded loss (key frequencies removed, training pairs).",
                            name="progress-losses")]
    shares = {k.replace("_", " "): prog.column(k) for k in ("gini_embedding", "gini_unembedding", "mean_neuron_ipr",
                                                               "frac_neurons_explained", "key_embedding_share")
              if k in prog.columns}
    figs.append(Figure.from_mpl(line_figure(x, shares, ylabel="value in [0, 1]", title="Fourier sparsity",
                                            ylim=(0, 1.02), phases=phases),
                                "Gini coefficient of the Fourier norms of the embedding and of the neuron-to-logit "
                                "map, mean activation IPR of the neurons, share of neurons explained >= 50% by one "
                                "frequency, and share of embedding power in the key frequencies.",
                                name="progress-sparsity"))
    stability = {label: prog.column(k) for k, label in (("softmax_collapse", "softmax collapse (float32)"),
                                                          ("softmax_collapse_float64", "softmax collapse (float64)"),
                                                          ("nlm_alignment", "NLM alignment cos(−∇L, θ)"))
                 if k in prog.columns}
    if len(stability) > 1:  # tables written before the float64 and NLM columns had only the first
        figs.append(Figure.from_mpl(line_figure(x, stability, ylabel="value", title="Numerical stability",
                                                ylim=(-1.02, 1.02), phases=phases),
                                    "Prieto et al. 2025: share of training examples whose softmax gives the label "
                                    "probability exactly 1 (their loss and gradient vanish), and the cosine between "
                                    "the descent direction and the weights (1: the gradient only scales the logits "
                                    "up, naïve loss minimization).", name="progress-stability"))
    meta = prog.meta
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
    for note in meta.get("notes", []):
        text.append(f"Note: {note}")
    rows = [[k.replace("_", " "), "—" if v is None else v] for k, v in bounds.items()]
    return Section("Progress measures", text="\n\n".join(text), figures=figs,
                   tables=[Table(["phase boundary", "step"], rows, "How each boundary is defined: "
                                 "mechgrok.analyses.progress.phase_boundaries.")],
                   numbers={"phase_boundaries": bounds, "key_frequencies": key.get("freqs")},
                   headline=(f"on the {meta['operation']} examples, " if of else "")
                   + (f"restricted loss fell below 1 nat at step **{r1}**, {order} test loss (step {t1}); "
                             if r1 is not None and t1 is not None else "")
                   + (f"key frequencies {key.get('freqs')}." if key.get("freqs") else
                      "no key frequencies (no frequency dominates enough neurons; see the note)."))


