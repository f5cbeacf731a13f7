"""K-FAC factors, their eigendecomposition and the EK-FAC eigenvalue correction (pure tensor maths).

For one linear map with per-token inputs ``a`` (a ones column appended when there is a bias) and
output gradients ``g`` (George et al. 2018, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis"; Grosse et al. 2023, "Studying Large Language Model Generalization
with Influence Functions"):

    A = E_tokens[a aᵀ]   [d_in, d_in]          S = E_tokens[g gᵀ]   [d_out, d_out]
    A = Q_A Λ_A Q_Aᵀ,  S = Q_S Λ_S Q_Sᵀ       (float64 ``eigh``)
    Λ = E_examples[(Q_Sᵀ G Q_A)²]   [d_out, d_in]    with G = Σ_t g_t a_tᵀ per example
    (F + λ)⁻¹ v  ≈  Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ

``Λ`` is the diagonal of the block Fisher ``F = E[vec(G) vec(G)ᵀ]`` expressed in the Kronecker
eigenbasis ``Q_A ⊗ Q_S``, the Frobenius-optimal diagonal there, so EK-FAC approximates ``F`` at least
as well as K-FAC's ``Λ_A ⊗ Λ_S`` (George et al. 2018, §3). A one-hot input (``W_E``) has a diagonal
``A``: only its diagonal is accumulated and ``Q_A`` is the identity.

Everything here is float64 and works on sums, so that the sums of several processes can be added
before normalising (see :mod:`mechgrok.influence.distributed`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["covariance_sums", "eigenbasis", "rotate", "rotated_gradients", "rotated_square_sum", "rotated_square_dot", "unrotate", "precondition", "damping_values",
           "DAMPING_MODES"]

DAMPING_MODES = ("relative", "relative_global", "absolute")


def covariance_sums(a: Float[Tensor, "b T i"] | None, g: Float[Tensor, "b T o"] | None, onehot: bool = False
                    ) -> tuple[Tensor | None, Tensor | None]:
    """``(Σ a aᵀ, Σ g gᵀ)`` over examples and positions (``Σ a²``, the diagonal, for one-hot inputs);
    either argument may be None to skip its sum."""
    A = S = None
    if a is not None:
        a2 = a.reshape(-1, a.shape[-1])  # [b*T, i]
        A = (a2 * a2).sum(0) if onehot else a2.T @ a2  # [i] or [i, i]
    if g is not None:
        g2 = g.reshape(-1, g.shape[-1])  # [b*T, o]
        S = g2.T @ g2  # [o, o]
    return A, S


def eigenbasis(A: Tensor, S: Float[Tensor, "o o"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Q_A, eig_A, Q_S, eig_S)`` of the normalised factors, in float64. ``A`` given as a vector is
    diagonal: ``Q_A`` is the identity and ``eig_A`` its diagonal."""
    if A.ndim == 1:
        QA, eigA = torch.eye(A.shape[0], dtype=torch.float64, device=A.device), A.double().clone()
    else:
        A = 0.5 * (A + A.T)  # exact symmetry for eigh
        eigA, QA = torch.linalg.eigh(A.double())
    S = 0.5 * (S + S.T)
    eigS, QS = torch.linalg.eigh(S.double())
    return QA.contiguous(), eigA, QS.contiguous(), eigS


def rotate(G: Float[Tensor, "... o i"], QS: Float[Tensor, "o o"], QA: Float[Tensor, "i i"]) -> Tensor:
    """``Q_Sᵀ G Q_A`` (into the Kronecker eigenbasis)."""
    return QS.T @ G @ QA


def rotated_gradients(a: Float[Tensor, "b T i"], g: Float[Tensor, "b T o"], QS: Float[Tensor, "o o"],
                      QA: Float[Tensor, "i i"] | None) -> Float[Tensor, "b o i"]:
    """Per-example ``Q_Sᵀ G Q_A`` with ``G = Σ_t g_t a_tᵀ``, computed as ``Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ``:
    ``T (o² + i² + o i)`` flops per example instead of ``o i (o + i)`` when ``T`` is small.
    ``QA=None`` means the identity (one-hot inputs)."""
    a_rot = a if QA is None else a @ QA  # [b, T, i]
    return torch.einsum("bto,bti->boi", g @ QS, a_rot)


#: positions per example up to which the squared rotated gradients are contracted position pair by
#: position pair (``T²`` small GEMMs) instead of forming ``R = Q_Sᵀ G Q_A`` ``[b, o, i]``: the same
#: sums in another order (float64 agreement ~1e-14), 60× faster at T = 1 and 6× at T = 4 on the
#: doshi-mlp maps (2-core EPYC, 2026-12-01); forming R is faster again from about T = 16.
PAIR_POSITIONS = 8


def _rotated_pairs(a: Float[Tensor, "b T i"], g: Float[Tensor, "b T o"], QS: Tensor, QA: Tensor | None
                   ) -> tuple[Float[Tensor, "b TT o"], Float[Tensor, "b TT i"]]:
    """Products over position pairs ``(t, s)`` of the rotated ``g`` and ``a``: ``R_b ⊙ R_b`` is
    ``Σ_{t,s} (g̃_t ⊙ g̃_s)(ã_t ⊙ ã_s)ᵀ``."""
    gr = g @ QS
    ar = a if QA is None else a @ QA
    b, T, o = gr.shape
    return ((gr[:, :, None, :] * gr[:, None, :, :]).reshape(b, T * T, o),
            (ar[:, :, None, :] * ar[:, None, :, :]).reshape(b, T * T, ar.shape[-1]))


def rotated_square_sum(a: Float[Tensor, "b T i"], g: Float[Tensor, "b T o"], QS: Tensor, QA: Tensor | None
                       ) -> Float[Tensor, "o i"]:
    """``Σ_b R_b ⊙ R_b`` with ``R_b = rotated_gradients(...)[b]`` (the eigenvalue correction's sum)."""
    if a.shape[1] > PAIR_POSITIONS:
        R = rotated_gradients(a, g, QS, QA)
        return (R * R).sum(0)
    gg, aa = _rotated_pairs(a, g, QS, QA)
    return gg.reshape(-1, gg.shape[-1]).T @ aa.reshape(-1, aa.shape[-1])


def rotated_square_dot(a: Float[Tensor, "b T i"], g: Float[Tensor, "b T o"], QS: Tensor, QA: Tensor | None,
                       M: Float[Tensor, "o i"]) -> Float[Tensor, "b"]:
    """``Σ_{o,i} R_b² M`` per example (self-influence with ``M = 1 / (Λ + λ)``)."""
    if a.shape[1] > PAIR_POSITIONS:
        R = rotated_gradients(a, g, QS, QA)
        return (R * R * M).sum((-1, -2))
    gg, aa = _rotated_pairs(a, g, QS, QA)
    return ((gg @ M) * aa).sum((-1, -2))


def unrotate(R: Float[Tensor, "... o i"], QS: Float[Tensor, "o o"], QA: Float[Tensor, "i i"]) -> Tensor:
    """``Q_S R Q_Aᵀ`` (back to parameter coordinates)."""
    return QS @ R @ QA.T


def precondition(G: Float[Tensor, "... o i"], QS: Tensor, QA: Tensor, lam: Float[Tensor, "o i"],
                 damping: float) -> Tensor:
    """The EK-FAC inverse-HVP ``(F + λI)⁻¹ G ≈ Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ``, batched over ``...``."""
    return unrotate(rotate(G, QS, QA) / (lam + damping), QS, QA)


def damping_values(lam: dict[str, Float[Tensor, "o i"]], damping: float, mode: str) -> dict[str, float]:
    """The absolute damping ``λ`` of every map:

    - ``"absolute"``: ``damping`` itself;
    - ``"relative"``: ``damping × mean(Λ_m)`` per map (Grosse et al. 2023 and kronfluence use 0.1);
    - ``"relative_global"``: one ``λ = damping × mean of all Λ`` = ``damping × trace(F)/P``, the mean
      eigenvalue of the whole (block-diagonal) Fisher, for every map.
    """
    if mode == "absolute":
        return {k: float(damping) for k in lam}
    if mode == "relative":
        out = {k: float(damping * v.mean()) for k, v in lam.items()}
    elif mode == "relative_global":
        total = sum(float(v.sum()) for v in lam.values()) / sum(v.numel() for v in lam.values())
        out = {k: float(damping * total) for k in lam}
    else:
        raise ValueError(f"unknown damping_mode {mode!r}; choose one of {DAMPING_MODES}")
    zero = [k for k, v in out.items() if not v > 0]
    if zero:
        raise ValueError(f"relative damping is 0 for {zero} because their corrected eigenvalues are all 0 (the "
                         "gradients vanish on the fit set); use damping_mode='absolute'")
    return out
