"""TF-IDF candidate filtering before influence scoring (Grosse et al. 2023, §3.3 / §5).

Grosse et al. score only a candidate set per query: the training sequences with the highest TF-IDF
similarity to the query, on the grounds that influential sequences tend to share tokens with it.
Here an example is a document whose terms are its input tokens and, with ``answers=True`` (the
default for a Task), its label as a term of its own (a separate vocabulary: answer 5 is not token 5);
a :class:`~mechgrok.influence.Sequences` example is the bag of its tokens. Similarity is the
cosine of TF-IDF vectors::

    tf(t, d) = count of term t in d,   idf(t) = ln((1 + N) / (1 + df(t))) + 1,   v_d = tf·idf / ‖tf·idf‖₂

(the smoothed idf of scikit-learn's ``TfidfVectorizer``; ``N`` and ``df`` over the training
examples). ``EKFAC.candidate_scores`` then scores each query against its own candidates only;
``candidate_recall`` measures how many of a query's true top influences the filter keeps. On
algorithmic tasks, where every example shares tokens with many others, check that recall before
trusting a filtered ranking (docs/reproductions.md has numbers).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechgrok._config import check_int
from mechgrok.influence._index import as_index
from mechgrok.influence.data import Sequences, inputs_of
from mechgrok.tasks import Task

__all__ = ["tfidf_vectors", "tfidf_candidates", "candidate_recall"]


def _answers(task, answers: bool | None) -> bool:
    if answers is None:
        return not isinstance(task, Sequences)
    if answers and isinstance(task, Sequences):
        raise ValueError("Sequences have no answers to count as terms (their targets are their own tokens); "
                         "pass answers=False or leave it None")
    return bool(answers)


def _terms(task: Task | Sequences, idx: Tensor, answers: bool, labels: str) -> Tensor:
    """Term counts ``[len(idx), n_terms]``: input tokens, then (optionally) one term per answer."""
    x = inputs_of(task)
    vocab = int(x.max()) + 1
    n_terms = vocab + (max(int(task.labels.max()), int(task.true_labels.max())) + 1 if answers else 0)
    counts = torch.zeros(idx.numel(), n_terms, dtype=torch.float64)
    counts.scatter_add_(1, x[idx].long(), torch.ones(x[idx].shape, dtype=torch.float64))
    if answers:
        y = getattr(task, labels)[idx]
        counts[torch.arange(idx.numel()), vocab + y] += 1
    return counts


def tfidf_vectors(task: Task | Sequences, idx, train_idx="train", *, answers: bool | None = None,
                  labels: str = "labels") -> Float[Tensor, "n terms"]:
    """L2-normalised TF-IDF vectors of the examples ``idx``, with idf from ``train_idx`` (a Task's
    split name, or indices / a mask for Sequences).

    Args:
        answers: add each example's answer as a term (its ``labels``: ``"labels"``, the training
            labels, corrupted ones included, or ``"true_labels"``); ``None``: for a Task, not for Sequences.
    """
    answers = _answers(task, answers)
    if labels not in ("labels", "true_labels"):
        raise ValueError(f"labels must be 'labels' or 'true_labels', got {labels!r}")
    t = as_index(train_idx, task, "train_idx")
    train_counts = _terms(task, t, answers, labels)
    df = (train_counts > 0).double().sum(0)
    idf = torch.log((1 + t.numel()) / (1 + df)) + 1
    v = _terms(task, as_index(idx, task, "idx"), answers, labels) * idf
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)


def tfidf_candidates(task: Task | Sequences, query_idx, train_idx="train", k: int = 100, *,
                     answers: bool | None = None,
                     query_labels: str = "labels") -> Int[Tensor, "q k"]:
    """The ``k`` training examples most TF-IDF-similar to each query, as task indices ``[n_query, k]``,
    most similar first (ties: lower index first). Documents are bags of terms, so a query that is
    a training example ties with itself and with, e.g., its operands swapped under the same answer.

    Args:
        query_idx, train_idx: indices, masks or split names.
        k: candidates per query (capped at the number of training examples).
        answers: count the answer as a term (queries use ``query_labels``, training examples
            their training labels); ``None``: for a Task, not for Sequences.
    """
    answers = _answers(task, answers)
    try:
        k = check_int(k, "k", low=1)
    except (TypeError, ValueError):
        raise ValueError(f"k must be a positive integer, got {k!r}") from None
    t = as_index(train_idx, task, "train_idx")
    q = as_index(query_idx, task, "query_idx")
    train_v = tfidf_vectors(task, t, t, answers=answers, labels="labels")
    query_v = tfidf_vectors(task, q, t, answers=answers, labels=query_labels)
    sim = query_v @ train_v.T  # [q, n_train]
    # a stable descending sort: equal similarities keep the training order
    order = torch.sort(-sim, dim=1, stable=True).indices[:, : min(k, t.numel())]
    return t[order]


def candidate_recall(S: Float[Tensor, "q t"], train_idx, candidates: Int[Tensor, "q k"], task: Task | Sequences,
                     top: int = 20) -> dict[str, float]:
    """How much of each query's true top-``top`` influences (from full scores ``S``) the candidate
    sets keep, against random candidate sets of the same size (expected recall ``k / n_train``).

    Returns:
        ``{"recall": mean share of the top-``top`` found among the candidates, "random": k / n,
        "k": k, "top": top}``.
    """
    top = check_int(top, "top", low=1, owner="candidate_recall")
    t = as_index(train_idx, task, "train_idx")
    if S.shape != (candidates.shape[0], t.numel()):
        raise ValueError(f"S has shape {tuple(S.shape)}; expected [{candidates.shape[0]}, {t.numel()}] (queries × "
                         "train_idx)")
    best = t[S.topk(min(top, t.numel()), dim=1).indices]  # [q, top] task indices
    found = (best[:, :, None] == candidates[:, None, :]).any(-1).double().mean().item()
    return {"recall": found, "random": candidates.shape[1] / t.numel(), "k": int(candidates.shape[1]),
            "top": int(best.shape[1])}
