"""Lazy versus rich training over a run (Kumar, Bordelon, Gershman and Pehlevan 2024,
``mg.measures.ntk``): the analysis ``lazy_rich``, its result and its report section.

The analysis measures, on at most ``LAZY_RICH_CHECKPOINTS`` checkpoints spaced evenly in log(step + 1),
the centred alignment of the empirical NTK with the labels on class-balanced training and test subsets,
the kernel's distance from its initial value and the relative weight change ``‖θ − θ₀‖ / ‖θ₀‖``.

Cost and cut-offs (CPU): a kernel on ``n`` examples costs ``n·k`` per-example backward passes and
``n²·k·P`` multiply-adds (``P`` trainable parameters, ``k`` outputs). The analysis keeps ``k·P`` at most
``LAZY_RICH_BUDGET`` (1e6): every output when ``d_out·P`` fits, else ``k = LAZY_RICH_BUDGET // P`` random
output projections (recorded in the result and said in the section); a model with more than
``LAZY_RICH_BUDGET / LAZY_RICH_MIN_OUTPUTS`` = 250,000 trainable parameters is skipped with that reason
(call ``mg.measures.lazy_rich_over_training`` yourself, with ``outputs=`` and fewer examples). About
1 s per checkpoint for the ``test`` preset's transformer on one quiet core (2–2.5 s on a loaded one;
benchmarks/repro_lazy_rich.py), so about 12–30 s for the analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mechgrok.analyses._base import Result, analysis, moe_experts, one_answer_task
from mechgrok.report.figures import line_figure
from mechgrok.report.sections import Figure, Section, Table, section
from mechgrok.report.text import fixed, sig
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, Run, first_step

__all__ = ["LazyRichAnalysis", "lazy_rich_analysis", "lazy_rich_section", "lazy_rich_applies", "log_spaced_steps",
           "LAZY_RICH_BUDGET", "LAZY_RICH_MIN_OUTPUTS", "LAZY_RICH_CHECKPOINTS", "LAZY_RICH_EXAMPLES"]

#: Outputs × trainable parameters the analysis differentiates per example (every output when it fits).
LAZY_RICH_BUDGET = 1_000_000
#: Fewest random output projections the analysis accepts; fewer would mean a model too large to measure.
LAZY_RICH_MIN_OUTPUTS = 4
#: Most checkpoints measured (log-spaced in step + 1, always the first and the last).
LAZY_RICH_CHECKPOINTS = 12
#: Examples per subset (training, test): 12 classes × 8 examples.
LAZY_RICH_EXAMPLES = 96


@dataclass(frozen=True)
class LazyRichAnalysis(Result):
    """``lazy_rich_over_training`` of a run.

    Attributes:
        over_training: ``LazyRichOverTraining.to_dict()`` (steps, alignments, kernel distance and norm,
            weight movement in total and per layer, accuracies and losses from the history).
        n_parameters: trainable parameters of the model.
        d_out: its outputs.
    """

    name: ClassVar[str] = "lazy_rich"
    over_training: dict[str, Any]
    n_parameters: int
    d_out: int

    def result(self):
        """The ``LazyRichOverTraining`` it holds."""
        from mechgrok.measures.ntk import LazyRichOverTraining  # noqa: PLC0415

        return LazyRichOverTraining.from_dict(self.over_training)


def _size(run: Run) -> tuple[int, int]:
    """``(trainable parameters, outputs)`` of the run's model."""
    from mechgrok import models  # noqa: PLC0415

    model = models.build(run.config["model"])
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    task = run.task()
    return n_params, int(task.d_vocab_out)


def lazy_rich_applies(run: Run) -> str | None:
    """``applies``: a one-answer task and a model small enough for the kernel on a CPU (module docstring)."""
    if (reason := one_answer_task(run)) is not None:
        return reason
    if experts := moe_experts(run):
        return (f"this run's model routes each token to some of its {experts} experts, a data-dependent choice that "
                "torch.func cannot differentiate per example (the kernel needs it); its analysis is 'moe_pathways'")
    n_params, _ = _size(run)
    if n_params * LAZY_RICH_MIN_OUTPUTS > LAZY_RICH_BUDGET:
        return (f"the empirical NTK needs per-example gradients of all {n_params:,} trainable parameters, above the "
                f"analysis' cut-off of {LAZY_RICH_BUDGET // LAZY_RICH_MIN_OUTPUTS:,} on a CPU; call "
                "mg.measures.lazy_rich_over_training(run, outputs=4, n_examples=64) yourself")
    return None


def log_spaced_steps(steps: list[int], k: int) -> list[int]:
    """At most ``k`` of ``steps`` (ascending): the first, and those nearest to ``k − 1`` points evenly
    spaced in ``log(step + 1)`` from the second step to the last (each point takes a step of its own)."""
    if len(steps) <= k:
        return list(steps)
    logs = np.log1p(np.asarray(steps, dtype=float))
    picked = [0]  # the first step, then targets evenly spaced in log(step + 1) from the second to the last
    for t in np.linspace(logs[1], logs[-1], max(k - 1, 1)):  # each takes the nearest step not yet taken
        picked.append(next(int(i) for i in np.argsort(np.abs(logs - t), kind="stable") if int(i) not in picked))
    return [steps[i] for i in sorted(picked)]


def lazy_rich_analysis(run: Run, *, n_examples: int = LAZY_RICH_EXAMPLES, max_checkpoints: int = LAZY_RICH_CHECKPOINTS,
                       seed: int = 0, progress: bool = True) -> LazyRichAnalysis:
    """``lazy_rich_over_training`` on at most ``max_checkpoints`` log-spaced checkpoints of ``run``, with
    every output when ``d_out × P ≤ LAZY_RICH_BUDGET`` and random output projections otherwise."""
    from mechgrok.measures.ntk import lazy_rich_over_training  # noqa: PLC0415

    n_params, d_out = _size(run)
    outputs = None if d_out * n_params <= LAZY_RICH_BUDGET else max(LAZY_RICH_MIN_OUTPUTS, LAZY_RICH_BUDGET // n_params)
    res = lazy_rich_over_training(run, log_spaced_steps(run.steps(), max_checkpoints), n_examples=n_examples,
                                  outputs=outputs, seed=seed, progress=progress)
    return LazyRichAnalysis(over_training=res.to_dict(), n_parameters=n_params, d_out=d_out)


@analysis(LazyRichAnalysis, applies=lazy_rich_applies)
def _lazy_rich(run: Run, progress: bool) -> LazyRichAnalysis:
    return lazy_rich_analysis(run, progress=progress)


def _series(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _index_at(steps: np.ndarray, step: int | None) -> int | None:
    """The first measured step at or after ``step``."""
    if step is None or not (later := np.nonzero(steps >= step)[0]).size:
        return None
    return int(later[0])


@section(order=38, title="Lazy and rich training", analysis="lazy_rich")
def lazy_rich_section(run: Run) -> Section | None:
    """Report section: NTK alignment and movement over training (``analysis/lazy_rich.json``); where the
    analysis does not apply, the "Analyses not shown" section says why."""
    data = LazyRichAnalysis.load(run)
    if data is None:
        return None
    d = data.over_training
    steps = np.array(d["steps"], dtype=float)
    hist = run.history()
    mem, gen = first_step(hist, "train_acc", MEMORIZED_ACC), first_step(hist, "test_acc", GENERALIZED_ACC)
    phases = {"memorized": None if mem is None else mem + 1, "generalized": None if gen is None else gen + 1}
    align = {"alignment, training examples": _series(d["alignment_train"]),
             "alignment, test examples": _series(d["alignment_test"]),
             "kernel distance from step 0 (centred)": _series(d["kernel_distance_centered"]),
             "kernel distance from step 0 (uncentred)": _series(d["kernel_distance"])}
    moves = {"all parameters": _series(d["weight_movement"]),
             **{name: _series(v) for name, v in d["movement_per_layer"].items()}}
    alpha, centred = d["output_scale"], d["center_output"]
    predictor = (f"α·(f(x; θ) − f(x; θ₀)) with α = {alpha:g}" if centred else
                 f"α·f(x; θ) with α = {alpha:g}" if alpha != 1 else "f(x; θ)")
    how = ("every output" if d["outputs"] is None else
           f"{d['outputs']} random ±1/√k combinations of the {data.d_out} outputs (an unbiased estimate: the model's "
           f"{data.n_parameters:,} parameters × {data.d_out} outputs exceed the analysis' budget)")
    figs = [Figure.from_mpl(line_figure(steps + 1, align, ylabel="alignment / distance", title="Empirical NTK",
                                        phases=phases),
                            "Centred kernel-target alignment ⟨HKH, HYYᵀH⟩ / (‖HKH‖ ‖HYYᵀH‖) of the empirical NTK with "
                            "the one-hot labels, and the kernel distance 1 − ⟨K, K₀⟩ / (‖K‖ ‖K₀‖) from initialization "
                            "(training subset; centred: of HKH and HK₀H), per checkpoint. The uncentred forms are "
                            "dominated by the kernel's constant block on modular arithmetic (docs/methods.md).",
                            name="lazy-rich-kernel"),
            Figure.from_mpl(line_figure(steps + 1, moves, ylabel="‖θ − θ₀‖ / ‖θ₀‖", title="Weight movement",
                                        phases=phases, logy=True),
                            "Relative change of the weights from initialization, in total and per layer.",
                            name="lazy-rich-movement")]
    marks = {"initialization": 0, "memorized": _index_at(steps, mem), "generalized": _index_at(steps, gen),
             "last": len(steps) - 1}
    at = {"memorized": mem, "generalized": gen}

    def name(label: str, i: int) -> str:
        exact = at.get(label) is None or int(steps[i]) == at[label]
        return f"{int(steps[i])} ({label})" if exact else f"{int(steps[i])} ({label} at {at[label]})"

    rows = [[name(label, i), fixed(d["test_acc"][i], 2), fixed(d["alignment_train"][i], 3),
             fixed(d["alignment_test"][i], 3), fixed(d["kernel_distance_centered"][i], 3),
             sig(d["weight_movement"][i], 3)]
            for label, i in marks.items() if i is not None]
    a0, a1 = d["alignment_test"][0], d["alignment_test"][-1]
    m_mem = d["weight_movement"][marks["memorized"]] if marks["memorized"] is not None else None
    headline = (f"test-set NTK alignment {fixed(a0, 3)} → {fixed(a1, 3)}, centred kernel distance from init "
                f"{fixed(d['kernel_distance_centered'][-1], 3)}, weights moved {sig(d['weight_movement'][-1], 3)} of "
                f"their "
                f"initial norm" + (f" ({sig(m_mem, 3)} by memorization)" if m_mem is not None else "") + ".")
    text = (f"Lazy versus rich training (Kumar, Bordelon, Gershman and Pehlevan 2024, \"Grokking as the transition "
            f"from lazy to rich training dynamics\"): the run trains the predictor {predictor}; its empirical NTK "
            "`K_ij = α² Σ_c ∇θ f_c(x_i)·∇θ f_c(x_j)` (`mg.measures.empirical_ntk`, from "
            f"{how}) is computed on {len(d['train_rows'])} training and {len(d['test_rows'])} test examples "
            "(class-balanced, the same on every checkpoint). Lazy training fits the training set while the "
            "weights and the kernel barely move (kernel distance near 0, alignment near its initial value); the "
            "paper's claim is that grokking is the later move to feature learning, in which the kernel turns "
            "towards the labels. Alignment and distance do not depend on α; loss and accuracy are the trained "
            "predictor's, from the history. Under AdamW, α and the learning rate both set how fast the weights "
            "move (docs/methods.md).")
    table = Table(["step", "test acc.", "alignment (train)", "alignment (test)", "kernel distance (centred)",
                   "‖θ − θ₀‖ / ‖θ₀‖"], rows,
                  "At initialization, when the run memorized and generalized (the first measured checkpoint at or "
                  "after), and at the last checkpoint.")
    return Section("Lazy and rich training", text=text, figures=figs, tables=[table], headline=headline,
                   numbers={"alignment_test_init": _num(a0), "alignment_test_final": _num(a1),
                            "kernel_distance_final": _num(d["kernel_distance"][-1]),
                            "kernel_distance_centered_final": _num(d["kernel_distance_centered"][-1]),
                            "weight_movement_final": _num(d["weight_movement"][-1]),
                            "output_scale": alpha, "center_output": centred, "outputs": d["outputs"]})


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)
