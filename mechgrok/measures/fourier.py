"""Fourier analysis on Z_p: the real orthonormal basis, power per frequency, and IPR.

References:
    Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability" (the
    Fourier basis of Z_p and key frequencies).
    Doshi et al. 2023, "To grok or not to grok: disentangling generalization and memorization on
    corrupted algorithmic datasets" (the inverse participation ratio of a neuron's weights).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["fourier_basis", "basis_labels", "frequency_power", "ipr", "n_frequencies"]


def n_frequencies(p: int) -> int:
    """Number of distinct frequencies of Z_p, the constant included: ``p // 2 + 1``."""
    return p // 2 + 1


def fourier_basis(p: int, dtype: torch.dtype = torch.float64) -> Float[Tensor, "p p"]:
    """Orthonormal real Fourier basis of functions on Z_p, one basis vector per row.

    Rows: the constant ``1/√p``, then ``cos(2πka/p)``, ``sin(2πka/p)`` for ``k = 1 .. (p-1)//2``
    (normalised), then for even ``p`` the alternating ``cos(πa)``. ``basis_labels(p)`` names the rows.

    >>> B = fourier_basis(7)
    >>> bool(torch.allclose(B @ B.T, torch.eye(7, dtype=B.dtype)))
    True
    """
    a = torch.arange(p, dtype=dtype)
    rows = [torch.ones(p, dtype=dtype)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * a / p), torch.sin(2 * math.pi * k * a / p)]
    if p % 2 == 0:
        rows.append(torch.cos(math.pi * a))
    basis = torch.stack(rows)  # [p, p]
    return basis / basis.norm(dim=1, keepdim=True)


def basis_labels(p: int) -> list[str]:
    """Row names of ``fourier_basis(p)``: ``const, cos 1, sin 1, ...``."""
    labels = ["const"]
    for k in range(1, (p - 1) // 2 + 1):
        labels += [f"cos {k}", f"sin {k}"]
    if p % 2 == 0:
        labels.append(f"cos {p // 2}")
    return labels


def frequency_power(x: Float[Tensor, "... p"], dim: int = -1) -> Float[Tensor, "... n_freq"]:
    """Squared norm of ``x`` carried by each frequency ``k = 0 .. p//2`` along ``dim``.

    Sums the squared coefficients of ``cos k`` and ``sin k`` in the orthonormal basis, so the
    result sums to ``‖x‖²`` along the new last axis (Parseval).
    """
    x = x.movedim(dim, -1).to(torch.float64)
    p = x.shape[-1]
    coeffs = x @ fourier_basis(p).T  # [..., p] in basis order
    power = coeffs**2
    out = torch.zeros(*x.shape[:-1], n_frequencies(p), dtype=torch.float64)
    out[..., 0] = power[..., 0]
    for k in range(1, (p - 1) // 2 + 1):
        out[..., k] = power[..., 2 * k - 1] + power[..., 2 * k]
    if p % 2 == 0:
        out[..., p // 2] = power[..., -1]
    return out


def ipr(v: Float[Tensor, "... p"], dim: int = -1, r: int = 2, exclude_constant: bool = False,
        eps: float = 1e-30) -> Float[Tensor, "..."]:
    """Inverse participation ratio of ``v``'s discrete Fourier transform (Doshi et al. 2023).

    ``IPR(v) = Σ_k (|ṽ_k| / ‖ṽ‖₂)^(2r)`` with ``ṽ = rfft(v)`` (frequencies ``k = 0 .. p//2``) and
    ``r = 2`` by default. A pure sinusoid has IPR 1; a one-hot spike, whose power is spread evenly,
    has IPR ``1 / (p//2 + 1)``, one over the number of Fourier bins. Periodic ("generalizing")
    neurons score near 1, memorizing ones near 0.

    Args:
        v: values over residues along ``dim``.
        exclude_constant: drop the ``k = 0`` bin first. Use it for activations, whose mean (always
            positive after a ReLU) would otherwise dominate; Doshi et al. score weights with it kept.

    Limits: it measures concentration in frequency, not which frequency; a vector that is zero
    everywhere gets 0.
    """
    f = torch.fft.rfft(v.movedim(dim, -1).to(torch.float64), dim=-1).abs()  # [..., p//2 + 1]
    if exclude_constant:
        f = f[..., 1:]
    norm = torch.linalg.vector_norm(f, dim=-1, keepdim=True)
    return ((f / (norm + eps)) ** (2 * r)).sum(-1)
