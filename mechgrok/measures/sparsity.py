"""Sparsity of a model in the Fourier basis (Gini coefficients) and the size of its weights.

Nanda et al. 2023 ("Progress measures for grokking via mechanistic interpretability", §5.3) track
the Gini coefficient of the Fourier-component norms of the embedding and of the neuron-to-logit map:
both rise sharply during the "cleanup" phase, when weight decay removes the memorizing components.
Prieto et al. 2025 ("Grokking at the edge of numerical stability") relate grokking to the growth of
the weight norm and to softmax collapse (re-exported here from ``mechgrok.losses``).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok.losses import softmax_collapse
from mechgrok.measures.fourier import frequency_power
from mechgrok.measures.grid import task_grid
from mechgrok.measures.keyfreq import embedding_frequency_norms
from mechgrok.models import HookedMLP, HookedTransformer
from mechgrok.tasks import Task

__all__ = ["gini", "fourier_gini", "unembedding_frequency_norms", "weight_norm", "softmax_collapse"]


def gini(x: Float[Tensor, " n"]) -> float:
    """Gini coefficient of a non-negative vector: ``Σ_ij |x_i - x_j| / (2 n Σ_i x_i)``.

    0 when all entries are equal, ``(n - 1) / n`` when a single entry is nonzero; unchanged by
    scaling ``x``. NaN for an all-zero vector (no distribution to measure).

    >>> gini(torch.ones(4)), gini(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    (0.0, 0.75)
    """
    x = torch.as_tensor(x).detach().double().reshape(-1)
    if x.numel() == 0:
        raise ValueError("gini of an empty vector is undefined")
    if bool((x < 0).any()):
        raise ValueError("gini needs non-negative values (pass norms or powers, not signed weights)")
    total = float(x.sum())
    if total == 0:
        return float("nan")
    xs = torch.sort(x).values  # ascending; Σ_ij |x_i - x_j| = 2 Σ_i (2i - n + 1) x_(i)
    n = x.numel()
    i = torch.arange(n, dtype=torch.float64)
    return float(((2 * i - n + 1) * xs).sum() / (n * total))


@torch.no_grad()
def unembedding_frequency_norms(model: nn.Module, task: Task, task_name: str | int | None = None
                                ) -> Float[Tensor, " n_freq"]:
    """Power of the neuron-to-logit map per frequency of the output class ``c``, ``[p//2 + 1]``.

    The map is ``W_out @ W_U`` (``[d_mlp, d_vocab_out]``, last layer) for a transformer and ``W_out``
    for a HookedMLP; its Fourier power along the class axis (classes ``0 .. p-1``) summed over neurons.
    """
    p = task_grid(task, task_name).p
    if isinstance(model, HookedTransformer):
        w = model.blocks[-1].mlp.W_out @ model.W_U  # [d_mlp, d_vocab_out]
    elif isinstance(model, HookedMLP):
        w = model.blocks[0].mlp.W_out  # [width, d_out]
    else:
        raise TypeError(f"expected a HookedTransformer or HookedMLP, got {type(model).__name__}")
    return frequency_power(w[:, :p].detach(), dim=-1).sum(0)  # [n_freq]


def fourier_gini(model: nn.Module, task: Task, task_name: str | int | None = None) -> dict[str, float]:
    """Gini coefficients of the per-frequency norms (Nanda et al. 2023 §5.3).

    Returns ``{"embedding": ..., "unembedding": ...}``: the Gini of ``sqrt`` of
    ``embedding_frequency_norms`` and of ``unembedding_frequency_norms`` over the frequencies
    ``k = 1 .. p//2`` (the constant is left out: a shift of all logits changes nothing and the mean
    embedding carries no operand information). Near 0 when every frequency is used alike, near 1
    when a few key frequencies carry the weights.

    Limits: per frequency, not per basis vector as in Nanda et al.'s code (cos k and sin k are
    pooled), which makes the value independent of the phase of each frequency.
    """
    emb = embedding_frequency_norms(model, task, task_name)[1:].sqrt()
    unemb = unembedding_frequency_norms(model, task, task_name)[1:].sqrt()
    return {"embedding": gini(emb), "unembedding": gini(unemb)}


@torch.no_grad()
def weight_norm(model: nn.Module) -> float:
    """Total L2 norm of all parameters, ``sqrt(Σ w²)`` in float64 (as in ``history.jsonl``)."""
    return math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))
