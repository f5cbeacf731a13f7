"""Key frequencies: which Fourier frequencies of Z_p a model's embedding and neurons use.

Nanda et al. 2023 ("Progress measures for grokking via mechanistic interpretability", §4-5) find
that a grokked modular-addition transformer embeds each operand with a few *key frequencies* k
(``cos(2πka/p)``, ``sin(2πka/p)``) and that its MLP neurons are each well explained by one of them
(activations that are functions of ``cos/sin k`` in ``a``, in ``b`` and their products). These
functions measure both and pick the key set with an explicit, recorded rule.

Limits: the analysis is per frequency of ``Z_p`` and assumes the operands are tokens ``0 .. p-1``;
it says nothing about operations whose algorithm is not Fourier-based (``mul`` and ``div`` use a
discrete-log Fourier basis that these functions do not build).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechgrok.measures.fourier import fourier_basis, frequency_power, n_frequencies
from mechgrok.measures.grid import grid_forward, task_grid
from mechgrok.models import HookedMLP, HookedTransformer, mlp_hook
from mechgrok.tasks import Task

__all__ = ["NeuronFrequencies", "KeyFrequencies", "embedding_frequency_norms", "neuron_frequencies",
           "frequency_fractions", "neuron_ipr", "key_frequencies", "key_frequencies_from",
           "basis_frequencies", "NEURON_THRESHOLD", "NEURON_MIN_SHARE", "EMBEDDING_FACTOR"]

NEURON_THRESHOLD = 0.5  # a neuron is "well explained" when one frequency explains >= this fraction
NEURON_MIN_SHARE = 0.05  # a key frequency is dominant in >= this share of the well-explained neurons
EMBEDDING_FACTOR = 2.0  # a key frequency carries >= this many times the uniform share of power


def basis_frequencies(p: int) -> Int[Tensor, " p"]:
    """The frequency of each row of ``fourier_basis(p)``: ``[0, 1, 1, 2, 2, ...]`` (``p//2`` last for even p)."""
    pairs = [k for k in range(1, (p - 1) // 2 + 1) for _ in (0, 1)]  # cos k, sin k
    return torch.tensor([0] + pairs + ([p // 2] if p % 2 == 0 else []))


def _embedding_rows(model: nn.Module, p: int) -> list[Float[Tensor, "p d"]]:
    if isinstance(model, HookedTransformer):
        return [model.W_E[:p]]  # [p, d_model]: operand tokens are 0 .. p-1
    if isinstance(model, HookedMLP):
        w = model.blocks[0].mlp.W_in  # [2p, width]
        return [w[:p], w[model.p:model.p + p]]  # rows read for a, rows read for b
    raise TypeError(f"expected a HookedTransformer or HookedMLP, got {type(model).__name__}")


@torch.no_grad()
def embedding_frequency_norms(model: nn.Module, task: Task, task_name: str | int | None = None
                              ) -> Float[Tensor, " n_freq"]:
    """Power (squared norm) of the operand embedding carried by each frequency ``k = 0 .. p//2``.

    Transformer: the Fourier transform of ``W_E[:p]`` (``[p, d_model]``) along the token axis,
    summed over ``d_model``. HookedMLP: the same for the input rows read for ``a`` (``W_in[:p]``) and
    for ``b`` (``W_in[p:2p]``), added. Sums to ``‖W_E[:p]‖²`` (Parseval); ``k = 0`` is the constant.
    Nanda et al. 2023 (Fig. 3) plot the square root of this.
    """
    p = task_grid(task, task_name).p
    return sum(frequency_power(w.detach(), dim=0).sum(0) for w in _embedding_rows(model, p))  # [n_freq]


# ---------------------------------------------------------------------------- neurons


@dataclass(frozen=True, eq=False)
class NeuronFrequencies:
    """Per-neuron frequency analysis (see ``frequency_fractions``).

    Attributes:
        dominant: ``[d_mlp]`` the frequency that explains most of each neuron (0 for a neuron with
            no non-constant variance, a "dead" one).
        fraction: ``[d_mlp]`` the share of the neuron's non-constant variance it explains.
        fractions: ``[d_mlp, p//2 + 1]`` the share explained by every frequency (column 0 is 0: the
            constant is not counted as a frequency here).
    """

    dominant: Int[Tensor, " d_mlp"]
    fraction: Float[Tensor, " d_mlp"]
    fractions: Float[Tensor, "d_mlp n_freq"]


def frequency_fractions(acts: Float[Tensor, "p p d_mlp"]) -> NeuronFrequencies:
    """Share of each neuron's non-constant variance over the ``(a, b)`` grid explained by each frequency.

    The 2-D Fourier coefficients ``F = B @ act @ Bᵀ`` (``B = fourier_basis(p)``, per neuron) split a
    neuron's activation into terms ``f_i(a) g_j(b)``. Frequency ``k`` explains the terms whose
    ``a``-frequency is ``k`` and ``b``-frequency is 0 or ``k``, or the reverse (cos/sin k in ``a``
    alone, in ``b`` alone, and products of k-terms in ``a`` with k-terms in ``b``), as in Nanda et al.
    2023 §5.2. Cross terms between two different nonzero frequencies count for none, so the shares
    of one neuron sum to at most 1.
    """
    p = acts.shape[0]
    if acts.shape[1] != p:
        raise ValueError(f"activations must be [p, p, d_mlp] over the (a, b) grid, got {tuple(acts.shape)}")
    B = fourier_basis(p)  # [p, p], rows = basis functions
    F = torch.einsum("ia,abn,jb->nij", B, acts.detach().double(), B)  # [d_mlp, p, p] coefficients
    power = (F**2).reshape(F.shape[0], p * p)  # [d_mlp, p*p]
    total = power.sum(1) - power[:, 0]  # [d_mlp] non-constant variance (times p²)
    fa, fb = basis_frequencies(p)[:, None], basis_frequencies(p)[None, :]  # [p, 1], [1, p]
    # cell (i, j) counts for frequency max(fa, fb) when fa == fb or one of them is 0; else none
    owner = torch.where((fa == fb) | (fa == 0) | (fb == 0), torch.maximum(fa, fb), 0)  # [p, p]
    assign = torch.nn.functional.one_hot(owner.reshape(-1), n_frequencies(p)).double()  # [p*p, n_freq]
    assign[:, 0] = 0  # the constant (0, 0) is not a frequency
    fractions = power @ assign  # [d_mlp, n_freq]
    alive = total > 1e-12 * float(total.max()) if total.numel() else total > 0  # [d_mlp], not dead
    fractions = torch.where(alive[:, None], fractions / total.clamp_min(1e-300)[:, None], 0.0)
    fraction, dominant = fractions.max(dim=1)
    dominant = torch.where(alive, dominant, 0)
    return NeuronFrequencies(dominant=dominant, fraction=fraction, fractions=fractions)


def neuron_frequencies(model: nn.Module, task: Task, layer: int = 0, task_name: str | int | None = None
                       ) -> NeuronFrequencies:
    """Frequency analysis of the neurons at ``blocks.{layer}.mlp.hook_post`` over the full grid.

    One forward pass of the ``p²`` pairs (the answer position for a transformer), reshaped to
    ``[p, p, d_mlp]``, then ``frequency_fractions``. Nanda et al. 2023 report that after grokking
    most neurons are explained to > 85% by a single key frequency.
    """
    hook = mlp_hook(layer)
    _, acts = grid_forward(model, task_grid(task, task_name), [hook])
    return frequency_fractions(acts[hook])


def neuron_ipr(acts: Float[Tensor, "p p d_mlp"]) -> Float[Tensor, " d_mlp"]:
    """Activation-based IPR of each neuron: ``ipr`` (Doshi et al. 2023, constant excluded) of its
    activation along ``a`` averaged over ``b``, and along ``b`` averaged over ``a``, then the mean of
    the two. Near 1 for a periodic neuron, near 0 for one whose power is spread over frequencies.
    (Doshi et al. score the weights of a one-hot MLP; this is the analogue for any model.)

    Equal to ``fourier.ipr`` (tested) but computed with matrix products, several times faster than
    an FFT of prime length: ``|rfft_k|²`` is ``p/2`` times the power of frequency ``k`` in the
    orthonormal basis, ``p`` times for ``k = p/2``.
    """
    p = acts.shape[0]
    to_freq = torch.nn.functional.one_hot(basis_frequencies(p), n_frequencies(p)).double()  # [p, n_freq]
    if p % 2 == 0:
        to_freq[-1] *= 2.0  # the Nyquist bin of rfft holds twice its orthonormal power
    B = fourier_basis(p)  # [p, p]
    out = []
    for dim in (0, 1):
        coeffs = acts.detach().double().movedim(dim, -1) @ B.T  # [p, d_mlp, p] basis coefficients
        f2 = ((coeffs**2) @ to_freq)[..., 1:]  # [p, d_mlp, p//2]: |rfft_k|² up to a factor p/2
        total = f2.sum(-1)
        out.append(torch.where(total > 0, (f2**2).sum(-1) / total.clamp_min(1e-300) ** 2, 0.0).mean(0))
    return 0.5 * (out[0] + out[1])  # [d_mlp]


# ---------------------------------------------------------------------------- key frequencies


@dataclass(frozen=True)
class KeyFrequencies:
    """Key frequencies and the rule that chose them.

    Attributes:
        freqs: the key frequencies (each in ``1 .. p//2``), most important first.
        scores: one per frequency: its share of the non-constant embedding power (``source =
            "embedding"``) or the number of well-explained neurons it dominates (``"neurons"``).
        source: ``"embedding"`` or ``"neurons"``.
        rule: the selection rule in words, with its thresholds.
        p: the modulus.
    """

    freqs: tuple[int, ...]
    scores: tuple[float, ...]
    source: str
    rule: str
    p: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["freqs"], d["scores"] = list(self.freqs), list(self.scores)
        return d


def key_frequencies_from(*, p: int, embedding_power: Tensor | None = None,
                         neurons: NeuronFrequencies | None = None, k: int | None = None,
                         threshold: float | None = None, min_share: float = NEURON_MIN_SHARE) -> KeyFrequencies:
    """The selection rules of ``key_frequencies`` applied to precomputed measures (give exactly one)."""
    if (embedding_power is None) == (neurons is None):
        raise ValueError("pass exactly one of embedding_power= or neurons=")
    if k is not None and k < 1:
        raise ValueError(f"k must be a positive number of frequencies, got {k}")
    if embedding_power is not None:
        power = embedding_power.double()[1:]  # drop the constant: [p//2]
        share = power / power.sum().clamp_min(1e-300)
        order = torch.argsort(share, descending=True, stable=True)
        if k is not None:
            chosen, rule = order[:k], f"top {k} frequencies by share of the non-constant embedding power"
        else:
            thr = EMBEDDING_FACTOR / len(share) if threshold is None else threshold
            chosen = order[share[order] >= thr]
            rule = (f"share of the non-constant embedding power >= {thr:.4g}"
                    + (f" ({EMBEDDING_FACTOR:g}x the uniform share 1/{len(share)})" if threshold is None else ""))
        return KeyFrequencies(tuple(int(i) + 1 for i in chosen), tuple(float(share[i]) for i in chosen),
                              "embedding", rule, p)
    thr = NEURON_THRESHOLD if threshold is None else threshold
    good = neurons.fraction >= thr  # [d_mlp]
    counts = torch.bincount(neurons.dominant[good], minlength=n_frequencies(p))[1:]  # [p//2]
    order = torch.argsort(counts, descending=True, stable=True)
    n_good = int(good.sum())
    if k is not None:
        chosen = order[:k][counts[order[:k]] > 0]
        rule = f"top {k} dominant frequencies of the neurons explained >= {thr:g} by one frequency"
    else:
        need = max(1, math.ceil(min_share * n_good))
        chosen = order[counts[order] >= need] if n_good else order[:0]
        rule = (f"dominant frequency of >= {min_share:g} of the neurons explained >= {thr:g} by one "
                f"frequency (here >= {need} of {n_good} of {len(good)} neurons)")
    return KeyFrequencies(tuple(int(i) + 1 for i in chosen), tuple(float(counts[i]) for i in chosen),
                          "neurons", rule, p)


def key_frequencies(model: nn.Module, task: Task, source: str = "neurons", k: int | None = None,
                    threshold: float | None = None, layer: int = 0, task_name: str | int | None = None,
                    min_share: float = NEURON_MIN_SHARE) -> KeyFrequencies:
    """The frequencies a model uses (Nanda et al. 2023, §5: "key frequencies").

    Rules (recorded in the result's ``rule``):

    - ``source="embedding"``: a frequency is key when its share of the non-constant power of the
      operand embedding (``embedding_frequency_norms`` without ``k = 0``) is at least ``threshold``,
      by default ``EMBEDDING_FACTOR / (p//2)`` — twice the share of a spread-out embedding; at
      initialisation no frequency reaches it. With ``k``: the ``k`` largest shares.
    - ``source="neurons"``: neurons explained to at least ``threshold`` (default ``NEURON_THRESHOLD``
      = 0.5) by a single frequency are "well explained"; a frequency is key when it is the dominant
      frequency of at least ``min_share`` (default 5%) of them. With ``k``: the ``k`` most common.

    Frequencies are sorted by score, largest first. The result may be empty (an untrained model).

    Limits: thresholds are heuristics; a frequency shared by very few neurons can matter and be
    dropped. Nanda et al. read the key set off the final checkpoint and keep it fixed over training.
    """
    grid = task_grid(task, task_name)
    if source == "embedding":
        return key_frequencies_from(p=grid.p, embedding_power=embedding_frequency_norms(model, task, task_name),
                                    k=k, threshold=threshold)
    if source == "neurons":
        return key_frequencies_from(p=grid.p, neurons=neuron_frequencies(model, task, layer, task_name), k=k,
                                    threshold=threshold, min_share=min_share)
    raise ValueError(f"source must be 'neurons' or 'embedding', got {source!r}")
