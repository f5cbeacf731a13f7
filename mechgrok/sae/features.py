"""Per-feature statistics of an SAE on a task, and memorizing / generalizing labels.

For feature f with activation a_f(x) ≥ 0 at the SAE's site:

- **fire rate** and **mean activation** per split (train, test, train_clean, train_corrupted).
- **corrupted share** ``Σ_{i ∈ corrupted} a_f(x_i) / Σ_{i ∈ train} a_f(x_i)``: how much of its training
  activity falls on corrupted-label examples (NaN if it never fires on training data). Against the
  base rate c = the corrupted fraction of the training set.
- **corrupted push** ``mean_{i ∈ corrupted} a_f(x_i) · (W_dec[f] · ∇_x (logit_ỹᵢ − logit_yᵢ))``, ỹ the
  corrupted and y the true label: the feature's first-order (attribution-patching) effect on the
  corrupted-minus-true logit difference, in logits. Exact when the site feeds the logits linearly
  (an MLP's hidden layer, the last residual stream).
- **answer share** η²: the fraction of the feature's variance over all examples explained by the
  true answer (between-class over total variance): 1 for a feature that is a function of the
  answer alone, the kind of feature a generalizing algorithm computes; near 0 for one tied to
  individual input pairs.
- **frequency profile** (single-operation modular tasks), two views: over the full (a, b) grid,
  split by 2-D Fourier frequency as in ``mechgrok.measures.frequency_fractions`` (Nanda et al.
  2023 §5.2; suits dense periodic features), and over the answer (the feature's mean activation per
  true answer ``c``, split by 1-D frequency; a sparse feature firing on the residues where
  ``cos(k c + φ)`` is large is periodic here and not on the grid). Each gives the dominant frequency
  and the share of the non-constant variance it explains; ``dominant_freq`` / ``freq_fraction``
  report the view with the larger share.
- **top examples**: the examples it fires on most.

Labels (``rule`` records the thresholds):

- **memorizing**: corrupted share ≥ (1 + c) / 2 (halfway from the base rate to "only corrupted
  examples") and corrupted push > 0 (it moves the output towards the memorized label);
- **generalizing**: not memorizing, it fires on held-out examples at least half as often as on
  training ones (it is not specific to the training set), and its answer share η² ≥ ``threshold``
  (0.5) or a single frequency explains ≥ ``threshold`` of its variance over the grid;
- **other**: everything else, dead latents included.

Tasks without corrupted labels have no memorizing features; the frequency profile needs a single
modular operation (elsewhere only η² decides).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok.capture import capture
from mechgrok.measures import frequency_fractions, frequency_power, task_grid
from mechgrok.sae.train import _at, activations, site
from mechgrok.tasks import Task

__all__ = ["FeatureStats", "features", "LABELS"]

LABELS = ("memorizing", "generalizing", "other")
_SPLITS = ("train", "test", "train_clean", "train_corrupted")


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """What ``features`` found; tensors are indexed by feature (``[d_sae]``) unless noted."""

    acts: Float[Tensor, "N d_sae"]  # activation of every feature on every example of the task
    fire_rate: dict[str, Tensor]  # split -> [d_sae] fraction of the split's examples it fires on
    mean_act: dict[str, Tensor]  # split -> [d_sae]
    corrupted_share: Tensor  # NaN where the feature never fires on training examples
    corrupted_push: Tensor  # logits; 0 without corrupted labels
    base_rate: float  # corrupted fraction of the training set
    answer_share: Tensor  # η² of the activation by true answer
    dominant_freq: Int[Tensor, " d_sae"] | None  # None without a frequency structure
    freq_fraction: Tensor | None
    spectra: Float[Tensor, "d_sae n_freq"] | None  # share of non-constant variance per frequency (same view)
    labels: list[str]
    rule: dict[str, Any] = field(default_factory=dict)

    def indices(self, label: str) -> Int[Tensor, " n"]:
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; choose one of {LABELS}")
        return torch.tensor([i for i, lab in enumerate(self.labels) if lab == label], dtype=torch.long)

    @property
    def memorizing(self) -> Tensor:
        return self.indices("memorizing")

    @property
    def generalizing(self) -> Tensor:
        return self.indices("generalizing")

    @property
    def alive(self) -> Tensor:
        """Features that fire on at least one example."""
        return torch.nonzero(self.acts.amax(0) > 0).flatten()

    def counts(self) -> dict[str, int]:
        return {label: self.labels.count(label) for label in LABELS} | {"dead": int(len(self.labels) - len(self.alive))}

    def top_examples(self, feature: int, k: int = 10) -> Tensor:
        """Indices (into the task's examples) of the ``k`` examples feature ``feature`` fires on most."""
        feature = check_int(feature, "feature", low=0, high=self.acts.shape[1] - 1)
        k = check_int(k, "k", low=1)
        return torch.argsort(self.acts[:, feature], descending=True, stable=True)[:k]

    def table(self, k: int | None = None) -> list[dict[str, Any]]:
        """One JSON-ready row per alive feature, strongest total activity first (the first ``k``)."""
        order = sorted(self.alive.tolist(), key=lambda f: -float(self.acts[:, f].sum()))[:k]

        def num(t: Tensor | None, f: int) -> float | None:
            v = None if t is None else float(t[f])
            return v if v is not None and math.isfinite(v) else None

        return [{"feature": f, "label": self.labels[f],
                 **{f"fire_{s}": num(self.fire_rate[s], f) for s in _SPLITS},
                 "corrupted_share": num(self.corrupted_share, f), "corrupted_push": num(self.corrupted_push, f),
                 "answer_share": num(self.answer_share, f),
                 "dominant_freq": None if self.dominant_freq is None else int(self.dominant_freq[f]),
                 "freq_fraction": num(self.freq_fraction, f), "top_examples": self.top_examples(f, 5).tolist()}
                for f in order]


def _site_gradient(model: nn.Module, inputs: Tensor, hook: str, position: int | None,
                   metric: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The activations ``[n, d]`` at an SAE's site and the gradient of ``metric(logits)`` (a sum of
    per-example terms over the answer-position logits ``[n, d_out]``) with respect to them."""
    keep: dict[str, Tensor] = {}

    def leaf(act: Tensor, hook) -> Tensor:  # make the site a leaf so its gradient can be read
        act = act.detach().requires_grad_(True)
        keep["x"] = act
        return act

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model.run_with_hooks(inputs, fwd_hooks=[(hook, leaf)])
            (grad,) = torch.autograd.grad(metric(out[:, -1] if out.ndim == 3 else out), keep["x"])
    finally:
        model.train(was_training)
    x, g = keep["x"].detach(), grad
    if x.ndim == 3:
        x, g = x[:, position], g[:, position]
    return x, g


def _push(model: nn.Module, sae, task: Task, hook: str, position: int | None) -> Tensor:
    """Per-feature attribution to logit(ỹ) − logit(y) on corrupted training examples, ``[d_sae]``."""
    c = task.train_corrupted
    if not bool(c.any()):
        return torch.zeros(sae.cfg.d_sae)
    x, g = _site_gradient(model, task.inputs[c], hook, position, lambda logits: (
        logits.gather(1, task.labels[c, None]) - logits.gather(1, task.true_labels[c, None])).sum())
    with torch.no_grad():
        a = sae.encode(x.float())  # [n_corr, d_sae]
        return (a * (g.float() @ sae.W_dec.T)).mean(0)  # [d_sae]


def _answer_means(acts: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Mean activation per answer ``[n_answers, d_sae]`` and η² (between-answer / total variance) ``[d_sae]``."""
    oh = torch.nn.functional.one_hot(answers).double()  # [N, n_answers]
    count = oh.sum(0)  # [n_answers]
    a = acts.double()
    means = (oh.T @ a) / count.clamp_min(1)[:, None]
    centred = means - a.mean(0)
    total = ((a - a.mean(0)) ** 2).sum(0)
    between = (count[:, None] * centred**2).sum(0)
    eta = torch.where(total > 0, between / total.clamp_min(1e-300), torch.zeros_like(total))
    return means, eta.clamp(0, 1).float()


def _frequencies(model: nn.Module, sae, task: Task, hook: str, position: int | None, answer_means: Tensor):
    """(dominant frequency, share, spectra) per feature from the better of the grid and the answer
    views; None when the task is not a single modular operation."""
    if len(task.task_names) != 1 or "op" not in (task.config or {}):  # not a single modular operation
        return None
    try:
        grid = task_grid(task)
    except ValueError:
        return None
    act = capture(model, grid.inputs, [hook], progress=False)[hook]
    x = _at(act, -1 if position is None else position, hook)[0].float()
    with torch.no_grad():
        on_grid = frequency_fractions(sae.encode(x).double().reshape(grid.p, grid.p, -1))  # over [p, p, d_sae]
    if answer_means.shape[0] != grid.p:
        return on_grid.dominant, on_grid.fraction.float(), on_grid.fractions.float()
    power = frequency_power(answer_means.T)  # [d_sae, n_freq]
    power[:, 0] = 0  # the constant is not a frequency
    spectra = power / power.sum(1, keepdim=True).clamp_min(1e-300)
    share, k = spectra.max(1)
    use_grid = on_grid.fraction >= share
    return (torch.where(use_grid, on_grid.dominant, k), torch.where(use_grid, on_grid.fraction, share).float(),
            torch.where(use_grid[:, None], on_grid.fractions, spectra).float())


@torch.no_grad()
def features(model: nn.Module, sae, task: Task, *, threshold: float = 0.5) -> FeatureStats:
    """Statistics and a memorizing / generalizing / other label for every feature of ``sae`` on ``task``."""
    threshold = check_float(threshold, "threshold", low=0.0, high=1.0, owner="sae.features (a share)")
    hook, position = site(sae)
    x = activations(model, task, hook, -1 if position is None else position)
    acts = sae.encode(x)  # [N, d_sae]
    fire, mean = {}, {}
    for s in _SPLITS:
        m = task.mask(s)
        fire[s] = (acts[m] > 0).float().mean(0) if bool(m.any()) else torch.full((acts.shape[1],), math.nan)
        mean[s] = acts[m].mean(0) if bool(m.any()) else torch.full((acts.shape[1],), math.nan)
    train, corr = task.mask("train"), task.mask("train_corrupted")
    base = float(corr.sum()) / max(1, int(train.sum()))
    total = acts[train].sum(0)
    share = torch.where(total > 0, acts[corr].sum(0) / total.clamp_min(1e-30), torch.tensor(math.nan))
    push = _push(model, sae, task, hook, position)
    means, eta = _answer_means(acts, task.true_labels)
    freqs = _frequencies(model, sae, task, hook, position, means)
    labels = []
    for f in range(acts.shape[1]):
        memorizing = base > 0 and bool(share[f] >= (1 + base) / 2) and bool(push[f] > 0)
        held_out = bool(fire["test"][f] >= 0.5 * fire["train"][f]) and bool(fire["test"][f] > 0)
        structured = bool(eta[f] >= threshold) or (freqs is not None and bool(freqs[1][f] >= threshold))
        labels.append("memorizing" if memorizing else "generalizing" if structured and held_out else "other")
    rule = {"memorizing": f"corrupted share ≥ (1 + {base:.3f}) / 2 = {(1 + base) / 2:.3f} and corrupted push > 0",
            "generalizing": f"not memorizing, test fire rate ≥ 0.5 × train fire rate (> 0), and answer share η² ≥ "
                            f"{threshold}" + (f" or dominant-frequency share on the grid ≥ {threshold}" if freqs else ""),
            "base_rate": base, "threshold": threshold}
    return FeatureStats(acts=acts, fire_rate=fire, mean_act=mean, corrupted_share=share, corrupted_push=push,
                        base_rate=base, answer_share=eta, dominant_freq=None if freqs is None else freqs[0],
                        freq_fraction=None if freqs is None else freqs[1],
                        spectra=None if freqs is None else freqs[2], labels=labels, rule=rule)
