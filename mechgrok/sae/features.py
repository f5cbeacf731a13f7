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

An SAE of every position (``position="all"``) has one row of ``acts`` per token (row ``n * pos + t``,
``FeatureStats.positions = pos``): fire rates, mean activations and the corrupted share count
tokens (a split's tokens are those of its examples), the corrupted push sums the attribution
over all positions of an example (the total first-order effect on the answer logits), and the
answer-related statistics (η², frequency profile) read the answer (last) position. On a plain
token tensor (no Task) there are no splits, answers or labels: only ``fire_rate["all"]``,
``mean_act["all"]`` and the top examples mean anything, and every feature is labelled ``other``.
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
from mechgrok.capture import capture, editing
from mechgrok.models import device_of
from mechgrok.measures import frequency_fractions, frequency_power, task_grid
from mechgrok.sae.train import ALL, _at, encode, logits_of, site, site_activations
from mechgrok.tasks import Task

__all__ = ["FeatureStats", "features", "LABELS"]

LABELS = ("memorizing", "generalizing", "other")
_SPLITS = ("train", "test", "train_clean", "train_corrupted")


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """What ``features`` found; tensors are indexed by feature (``[d_sae]``) unless noted."""

    acts: Float[Tensor, "rows d_sae"]  # every feature on every example (every token: rows = N * positions)
    fire_rate: dict[str, Tensor]  # split -> [d_sae] fraction of the split's rows it fires on
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
    positions: int | None = None  # tokens per example when acts has one row per token (an all-positions SAE)

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
        """Row indices of ``acts`` (examples; tokens ``n * positions + t`` for an all-positions SAE,
        see ``locate``) of the ``k`` rows feature ``feature`` fires on most."""
        feature = check_int(feature, "feature", low=0, high=self.acts.shape[1] - 1)
        k = check_int(k, "k", low=1)
        return torch.argsort(self.acts[:, feature], descending=True, stable=True)[:k]

    def locate(self, rows: Tensor) -> Int[Tensor, "k 2"]:
        """``(example, position)`` of each row of ``acts`` (position -1 when rows are examples)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.positions is None:
            return torch.stack([rows, torch.full_like(rows, -1)], -1)
        return torch.stack([rows // self.positions, rows % self.positions], -1)

    def table(self, k: int | None = None) -> list[dict[str, Any]]:
        """One JSON-ready row per alive feature, strongest total activity first (the first ``k``)."""
        order = sorted(self.alive.tolist(), key=lambda f: -float(self.acts[:, f].sum()))[:k]

        def num(t: Tensor | None, f: int) -> float | None:
            v = None if t is None else float(t[f])
            return v if v is not None and math.isfinite(v) else None

        return [{"feature": f, "label": self.labels[f],
                 **{f"fire_{s}": num(self.fire_rate[s], f) for s in self.fire_rate},
                 "corrupted_share": num(self.corrupted_share, f), "corrupted_push": num(self.corrupted_push, f),
                 "answer_share": num(self.answer_share, f),
                 "dominant_freq": None if self.dominant_freq is None else int(self.dominant_freq[f]),
                 "freq_fraction": num(self.freq_fraction, f), "top_examples": self.top_examples(f, 5).tolist(),
                 **({} if self.positions is None else {"top_tokens": self.locate(self.top_examples(f, 5)).tolist()})}
                for f in order]


def _site_gradient(model: nn.Module, inputs: Tensor, hook: str, position, metric: Callable[[Tensor], Tensor]
                   ) -> tuple[Tensor, Tensor]:
    """The activations at an SAE's site and the gradient of ``metric(logits)`` (a sum of per-example
    terms over the answer-position logits ``[n, d_out]``) with respect to them: ``[n, d]`` each,
    or ``[n, pos, d]`` for an SAE of every position. Works on any module path (``capture.editing``)."""
    keep: dict[str, Tensor] = {}

    def leaf(act: Tensor) -> Tensor:  # make the site a leaf so its gradient can be read
        act = act.detach().requires_grad_(True)
        keep["x"] = act
        return act

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), editing(model, hook, leaf):
            out = logits_of(model(inputs.to(device_of(model))))
            (grad,) = torch.autograd.grad(metric(out[:, -1] if out.ndim == 3 else out), keep["x"])
    finally:
        model.train(was_training)
    x, g = keep["x"].detach(), grad
    if x.ndim == 3 and position != ALL:
        x, g = x[:, position], g[:, position]
    return x, g


def _push(model: nn.Module, sae, task: Task, hook: str, position) -> Tensor:
    """Per-feature attribution to logit(ỹ) − logit(y) on corrupted training examples, ``[d_sae]``
    (summed over positions for an SAE of every position)."""
    c = task.train_corrupted
    if not bool(c.any()):
        return torch.zeros(sae.cfg.d_sae)
    wrong, right = task.labels[c, None], task.true_labels[c, None]
    x, g = _site_gradient(model, task.inputs[c], hook, position, lambda logits: (
        logits.gather(1, wrong.to(logits.device)) - logits.gather(1, right.to(logits.device))).sum())
    with torch.no_grad():
        a = encode(sae, x.reshape(-1, x.shape[-1]).float()).reshape(*x.shape[:-1], -1)  # [n, (pos,) d_sae]
        contrib = a * (g.float() @ sae.W_dec.detach().to(g.device).T)  # [n, (pos,) d_sae]
        return (contrib.sum(1) if contrib.ndim == 3 else contrib).mean(0).cpu()  # [d_sae]


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


def _frequencies(model: nn.Module, sae, task: Task, hook: str, position, answer_means: Tensor,
                 backend: str | None):
    """(dominant frequency, share, spectra) per feature from the better of the grid and the answer
    views (at the answer position for an SAE of every position); None when the task is not a
    single modular operation."""
    if len(task.task_names) != 1 or "op" not in (task.config or {}):  # not a single modular operation
        return None
    try:
        grid = task_grid(task)
    except ValueError:
        return None
    act = capture(model, grid.inputs, [hook], backend=backend, progress=False)[hook]
    x = _at(act, -1 if position in (None, ALL) else position, hook)[0].float()
    with torch.no_grad():
        on_grid = frequency_fractions(encode(sae, x).double().reshape(grid.p, grid.p, -1))  # over [p, p, d_sae]
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
def features(model: nn.Module, sae, data: Task | Tensor, *, threshold: float = 0.5,
             backend: str | None = None) -> FeatureStats:
    """Statistics and a memorizing / generalizing / other label for every feature of ``sae``.

    Args:
        model: any ``nn.Module`` with the SAE's hook (gradients flow through it for the push).
        data: a ``Task`` (everything in the module docstring) or an input tensor ``[N, ...]``
            (fire rates, mean activations and top examples only; every label ``other``).
        threshold: the share η² or a single frequency must reach for ``generalizing``.
        backend: how activations are captured (``mechgrok.capture``; None: the default).
    """
    threshold = check_float(threshold, "threshold", low=0.0, high=1.0, owner="sae.features (a share)")
    hook, position = site(sae)
    x = site_activations(model, data, hook, position, backend=backend)  # [N, d] or [N, pos, d]
    n_pos = int(x.shape[1]) if x.ndim == 3 else None
    acts = encode(sae, x.reshape(-1, x.shape[-1])).cpu()  # [rows, d_sae]; rows = N * n_pos for every position
    d_sae = acts.shape[1]

    def rows(mask: Tensor) -> Tensor:  # an example mask [N] as a row mask [rows]
        return mask if n_pos is None else mask.repeat_interleave(n_pos)

    if not isinstance(data, Task):
        nan = torch.full((d_sae,), math.nan)
        return FeatureStats(acts=acts, fire_rate={"all": (acts > 0).float().mean(0)}, mean_act={"all": acts.mean(0)},
                            corrupted_share=nan, corrupted_push=torch.zeros(d_sae), base_rate=0.0,
                            answer_share=nan.clone(), dominant_freq=None, freq_fraction=None, spectra=None,
                            labels=["other"] * d_sae, positions=n_pos,
                            rule={"note": "no Task: without splits, answers or corrupted labels every feature is "
                                          "'other'; pass a Task for labels", "threshold": threshold})
    task = data
    fire, mean = {}, {}
    for s in _SPLITS:
        m = rows(task.mask(s))
        fire[s] = (acts[m] > 0).float().mean(0) if bool(m.any()) else torch.full((d_sae,), math.nan)
        mean[s] = acts[m].mean(0) if bool(m.any()) else torch.full((d_sae,), math.nan)
    train, corr = rows(task.mask("train")), rows(task.mask("train_corrupted"))
    base = float(task.mask("train_corrupted").sum()) / max(1, int(task.mask("train").sum()))
    total = acts[train].sum(0)
    share = torch.where(total > 0, acts[corr].sum(0) / total.clamp_min(1e-30), torch.tensor(math.nan))
    push = _push(model, sae, task, hook, position)
    answer_acts = acts if n_pos is None else acts.reshape(-1, n_pos, d_sae)[:, -1]  # [N, d_sae] at the answer
    means, eta = _answer_means(answer_acts, task.true_labels)
    freqs = _frequencies(model, sae, task, hook, position, means, backend)
    labels = []
    for f in range(d_sae):
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
                        spectra=None if freqs is None else freqs[2], labels=labels, rule=rule, positions=n_pos)
