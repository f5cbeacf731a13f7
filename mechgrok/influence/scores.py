"""Influence-score contractions, low-rank query batching, and reading the scores.

Pairwise influence of training example ``z`` on query ``q`` (Koh & Liang 2017, "Understanding
Black-box Predictions via Influence Functions"; Grosse et al. 2023) is ``g_qᵀ (F + λI)⁻¹ g_z``:
positive when a gradient step on ``z`` lowers the query's loss. With EK-FAC the query gradients are
preconditioned once (``P_q = (F + λ)⁻¹ g_q``, one ``[d_out, d_in]`` matrix per map) and training
examples stream past in batches, each contracting ``Σ_t (g_tᵀ P_q a_t)`` without forming its full
gradient for more than one batch at a time.

Query batching (Grosse et al. 2023, §3.2): ``P_q`` of each map is replaced by its best rank-``r``
approximation ``L_q R_q`` (SVD), which stores ``r (d_out + d_in)`` numbers per query and map instead of
``d_out d_in``; :func:`ranking_agreement` says how well the rankings survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechgrok._config import check_int
from mechgrok._stats import average_ranks
from mechgrok.influence._index import as_index
from mechgrok.tasks import Task

__all__ = ["low_rank", "pairwise_full", "pairwise_low_rank", "TopInfluences", "top_influences",
           "ranking_agreement"]


def low_rank(P: Float[Tensor, "q o i"], rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors ``(L [q, o, r], R [q, r, i])`` of each query's preconditioned gradient
    (``L R ≈ P`` in Frobenius norm; exact when ``rank >= min(o, i)``)."""
    U, s, Vh = torch.linalg.svd(P, full_matrices=False)  # [q, o, k], [q, k], [q, k, i]
    r = min(rank, s.shape[-1])
    return U[..., :r] * s[:, None, :r], Vh[:, :r]


def pairwise_full(P: Float[Tensor, "q o i"], a: Float[Tensor, "b T i"], g: Float[Tensor, "b T o"]
                  ) -> Float[Tensor, "q b"]:
    """``score[q, b] = Σ_t g_{b,t}ᵀ P_q a_{b,t}`` (one map's contribution).

    With few query-positions (``q·T ≤ 64``) as ``(P_q a_{b,t}) · g_{b,t}`` in one GEMM, otherwise by
    forming the batch's per-example gradients ``[b, o, i]`` once for all queries: the same sums in
    another order, whichever is faster (3× to 50× for one query, about even at q·T = 64, on
    the doshi-mlp maps on a 2-core EPYC, 2026-12-01)."""
    q, o, i = P.shape
    b, T, _ = a.shape
    if q * T <= 64:
        PA = (P.reshape(q * o, i) @ a.reshape(b * T, i).T).reshape(q, o, b * T)  # [q, o, b·T]
        return (PA * g.reshape(b * T, o).T).sum(1).reshape(q, b, T).sum(-1)
    G = torch.einsum("bto,bti->boi", g, a)  # [b, o, i]: one batch of per-example gradients
    return P.reshape(q, -1) @ G.reshape(b, -1).T


def pairwise_low_rank(L: Float[Tensor, "q o r"], R: Float[Tensor, "q r i"], a: Float[Tensor, "b T i"],
                      g: Float[Tensor, "b T o"]) -> Float[Tensor, "q b"]:
    """``score[q, b] = Σ_{t,r} (L_qᵀ g_{b,t})_r (R_q a_{b,t})_r`` (one map, rank-``r`` query)."""
    left = torch.einsum("qor,bto->qbtr", L, g)
    right = torch.einsum("qri,bti->qbtr", R, a)
    return (left * right).sum((-1, -2))


# ---------------------------------------------------------------------------- reading scores


@dataclass(frozen=True)
class TopInfluences:
    """The ``k`` most influential training examples of each query (rows follow the queries).

    Attributes:
        query: ``[n_query]`` task indices of the queries (or ``-1`` when unknown).
        indices: ``[n_query, k]`` task indices of the training examples, most influential first.
        scores: ``[n_query, k]`` their scores.
        corrupted: ``[n_query, k]`` the training example's label is corrupted (``task.train_corrupted``).
        clean: ``[n_query, k]`` the example is a clean training example.
        same_answer: ``[n_query, k]`` the example's training label equals the query's label
            (all False when the queries are unknown).
        same_true_answer: ``[n_query, k]`` the true labels agree.
    """

    query: Tensor
    indices: Tensor
    scores: Tensor
    corrupted: Tensor
    clean: Tensor
    same_answer: Tensor
    same_true_answer: Tensor

    def summary(self) -> dict[str, float]:
        """Fractions over all listed (query, example) pairs: corrupted, clean, same answer."""
        return {"frac_corrupted": float(self.corrupted.double().mean()),
                "frac_clean": float(self.clean.double().mean()),
                "frac_same_answer": float(self.same_answer.double().mean()),
                "frac_same_true_answer": float(self.same_true_answer.double().mean())}

    def to_dict(self) -> dict[str, list]:
        """Plain lists for JSON."""
        return {k: getattr(self, k).tolist() for k in
                ("query", "indices", "scores", "corrupted", "clean", "same_answer", "same_true_answer")}


def top_influences(S: Float[Tensor, "q t"], task: Task, train_idx, k: int = 20, query_idx=None,
                   sign: str = "positive") -> TopInfluences:
    """The ``k`` training examples with the largest (``sign="positive"``), most negative
    (``"negative"``) or largest-magnitude (``"abs"``) scores per query, with their clean/corrupted
    membership and whether they share the query's answer.

    Args:
        S: scores ``[n_query, n_train]`` from :meth:`EKFAC.scores`, or ``[n_query, k]`` from
            :meth:`EKFAC.candidate_scores`.
        task: the task the indices refer to.
        train_idx: the training examples of ``S``'s columns (indices, mask or split name), or
            the ``[n_query, k]`` candidate sets whose scores ``S`` holds.
        k: how many per query (capped at ``n_train``).
        query_idx: the queries of ``S``'s rows; needed for the same-answer flags.
    """
    if sign not in ("positive", "negative", "abs"):
        raise ValueError(f"sign must be 'positive', 'negative' or 'abs', got {sign!r}")
    if not isinstance(task, Task):
        raise TypeError(f"top_influences reads a Task's labels and corruption masks, got {type(task).__name__}; for "
                        "Sequences take S.topk(k, dim=1) (its indices are positions in train_idx)")
    if isinstance(train_idx, Tensor) and train_idx.ndim == 2:  # per-query candidate sets
        if train_idx.shape != S.shape:
            raise ValueError(f"candidate sets of shape {tuple(train_idx.shape)} do not match S {tuple(S.shape)}")
        rows = train_idx.long()
    else:
        t = as_index(train_idx, task, "train_idx")
        if S.ndim != 2 or S.shape[1] != t.numel():
            raise ValueError(f"S has shape {tuple(S.shape)} but train_idx selects {t.numel()} examples; pass the "
                             "train_idx used to compute S")
        rows = t.expand(S.shape[0], -1)
    k = check_int(k, "k", low=1, owner="top_influences")
    key = {"positive": S, "negative": -S, "abs": S.abs()}[sign]
    order = key.topk(min(k, S.shape[1]), dim=1).indices  # [q, k]
    idx = rows.gather(1, order)
    if query_idx is not None:
        q = as_index(query_idx, task, "query_idx")
        if q.numel() != S.shape[0]:
            raise ValueError(f"S has {S.shape[0]} rows but query_idx selects {q.numel()} examples")
        same = task.labels[idx] == task.labels[q][:, None]
        same_true = task.true_labels[idx] == task.true_labels[q][:, None]
    else:
        q = torch.full((S.shape[0],), -1, dtype=torch.long)
        same = same_true = torch.zeros_like(idx, dtype=torch.bool)
    return TopInfluences(query=q, indices=idx, scores=S.gather(1, order), corrupted=task.train_corrupted[idx],
                         clean=task.train_clean[idx], same_answer=same, same_true_answer=same_true)


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks of each row of ``x`` ``[rows, n]`` (ties share their mean rank)."""
    return np.stack([average_ranks(row) for row in x]) if len(x) else np.zeros_like(x, dtype=np.float64)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def ranking_agreement(S_ref: Tensor, S: Tensor, k: int = 10) -> dict[str, float]:
    """How well ``S`` preserves ``S_ref``'s scores and rankings (both ``[n_query, n_train]``).

    Returns:
        ``pearson`` and ``spearman`` over all pairs, ``spearman_per_query`` (the mean over queries of
        the Spearman correlation of each row) and ``top{k}_overlap`` (mean fraction of each query's
        ``k`` largest scores that both share).
    """
    k = check_int(k, "k", low=1, owner="ranking_agreement")
    a, b = S_ref.detach().double().cpu().numpy(), S.detach().double().cpu().numpy()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"ranking_agreement needs non-empty score matrices [n_query, n_train], got shape {a.shape}")
    k = min(k, a.shape[1])
    ra, rb = _rank(a), _rank(b)
    per_query = [_pearson(ra[i], rb[i]) for i in range(a.shape[0])]
    top_a, top_b = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)])
    flat_a, flat_b = _rank(a.reshape(1, -1))[0], _rank(b.reshape(1, -1))[0]
    return {"pearson": _pearson(a.ravel(), b.ravel()), "spearman": _pearson(flat_a, flat_b),
            "spearman_per_query": float(np.mean(per_query)), f"top{k}_overlap": float(overlap)}
