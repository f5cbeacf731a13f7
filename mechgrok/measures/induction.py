"""Induction-head scores of a transformer (Olsson et al. 2022, "In-context Learning and Induction
Heads"), the measure Hernandez et al. 2022 ("Scaling Laws and Interpretability of Learning from
Repeated Data") track against the share of repeated data.

On ``n`` random sequences ``[BOS,] s, s`` (a segment ``s`` of ``L`` tokens shown twice):

- **prefix matching** of head ``(l, h)``: its mean attention, from each position ``t`` of the
  second copy, to the position right after the earlier occurrence of the token at ``t`` (the token
  an induction head copies next). 1 = a perfect induction pattern; about ``1 / t`` for a head that
  attends uniformly.
- **copying** of head ``(l, h)``: ``Σ Re λ / Σ |λ|`` over the eigenvalues ``λ`` of its OV circuit
  from token to logit, ``W_E W_V W_O W_U`` restricted to the content tokens (positive eigenvalues:
  the head raises the logit of the token it attends to). Computed on the ``d_head × d_head`` matrix
  ``(W_O W_U)(W_E W_V)``, which has the same nonzero eigenvalues. Layer norms are left out (as in
  Olsson et al.), so it reads the weights only.
- **in-context gain**: the mean loss on the first copy minus that on the second copy, in nats
  (Olsson et al.'s "in-context learning score" in small): large when the model uses the repeat.
  A model never trained on unpredictable tokens (an ``lm_corpus`` whose loss mask skips the
  first segment) can be confidently wrong on the first copy, which inflates the gain: read
  ``loss_second`` and ``acc_second`` (the share of second-copy tokens predicted right) then.

``InductionScores.strength`` is the largest prefix-matching score of any head in a layer above
the first (an induction head needs a previous-token head before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok._config import check_int
from mechgrok._threads import torch_threads
from mechgrok.models import HookedTransformer, device_of

__all__ = ["InductionScores", "induction_scores", "repeated_sequences"]


@dataclass(frozen=True)
class InductionScores:
    """Per-head induction scores (module docstring).

    Attributes:
        prefix_matching: ``[n_layers, n_heads]``.
        copying: ``[n_layers, n_heads]`` (NaN for a head whose OV circuit is zero).
        loss_first, loss_second: mean next-token loss (nats) on the first and the second copy.
        acc_second: share of the second copy's tokens (after its first) whose argmax is right.
        segment: the segment length ``L``.
    """

    prefix_matching: Float[Tensor, "n_layers n_heads"]
    copying: Float[Tensor, "n_layers n_heads"]
    loss_first: float
    loss_second: float
    acc_second: float
    segment: int

    @property
    def in_context_gain(self) -> float:
        return self.loss_first - self.loss_second

    @property
    def strength(self) -> float:
        """The largest prefix-matching score of a head above layer 0 (of any head in a 1-layer model)."""
        pm = self.prefix_matching[1:] if len(self.prefix_matching) > 1 else self.prefix_matching
        return float(pm.max())

    def best_head(self) -> tuple[int, int]:
        """``(layer, head)`` of that head."""
        pm = self.prefix_matching[1:] if len(self.prefix_matching) > 1 else self.prefix_matching
        i = int(pm.argmax())
        return i // pm.shape[1] + (1 if len(self.prefix_matching) > 1 else 0), i % pm.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {"prefix_matching": self.prefix_matching.tolist(), "copying": self.copying.tolist(),
                "loss_first": self.loss_first, "loss_second": self.loss_second, "acc_second": self.acc_second,
                "in_context_gain": self.in_context_gain,
                "strength": self.strength, "best_head": list(self.best_head()), "segment": self.segment}


def repeated_sequences(n: int, segment: int, vocab: int, bos: int | None, seed: int = 0) -> Tensor:
    """``[n, (1 if bos else 0) + 2 * segment]`` token ids: ``[BOS,] s, s`` with ``s`` of ``segment``
    distinct tokens drawn from ``[0, vocab)`` (distinct, so each token's earlier occurrence is unique)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.argsort(torch.rand(n, vocab, generator=g), dim=1)[:, :segment]  # [n, L]
    x = torch.cat([seg, seg], dim=1)
    return x if bos is None else torch.cat([torch.full((n, 1), bos), x], dim=1)


@torch.no_grad()
def induction_scores(model: nn.Module, *, segment: int | None = None, vocab: int | None = None,
                     bos: int | None = None, n: int = 64, seed: int = 0, threads: int | None = 1) -> InductionScores:
    """Prefix-matching and copying scores of every head, and the in-context gain (module docstring).

    Args:
        model: a HookedTransformer.
        segment: tokens per copy ``L`` (default: as many as fit, ``(n_ctx - has BOS) // 2``, at most
            ``vocab``).
        vocab: content tokens are drawn from ``[0, vocab)`` (default ``d_vocab``, less one when
            ``bos`` is the last id, as in ``mg.tasks.lm_corpus``).
        bos: a token to put first (``task.d_vocab - 1`` for ``lm_corpus``), or None.
        n: sequences.
        seed: seeds the sequences.
        threads: torch threads meanwhile.
    """
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"induction_scores reads attention patterns of a HookedTransformer, got {type(model).__name__}")
    cfg = model.cfg
    if bos is not None:
        bos = check_int(bos, "bos", low=0, high=cfg.d_vocab - 1, owner="induction_scores")
    default_vocab = cfg.d_vocab - 1 if bos == cfg.d_vocab - 1 else cfg.d_vocab
    vocab = check_int(default_vocab if vocab is None else vocab, "vocab", low=2, high=cfg.d_vocab,
                      owner="induction_scores")
    room = (cfg.n_ctx - (bos is not None)) // 2
    segment = check_int(min(room, vocab) if segment is None else segment, "segment", low=2, high=min(room, vocab),
                        owner="induction_scores (tokens per copy: 2 copies and the BOS fit in n_ctx, distinct tokens)")
    n = check_int(n, "n", low=1, owner="induction_scores")
    x = repeated_sequences(n, segment, vocab, bos, seed).to(device_of(model))  # [n, T]
    off = int(bos is not None)
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads):
            logits, cache = model.run_with_cache(x, names_filter=lambda name: name.endswith("hook_pattern"))
    finally:
        model.train(was_training)
    q = torch.arange(off + segment, off + 2 * segment)  # second-copy positions
    k = q - segment + 1  # the position after the earlier occurrence of the token at q
    pm = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][:, :, q, k].double().mean(dim=(0, 2))
                      for layer in range(cfg.n_layers)]).cpu()  # [n_layers, n_heads]
    nll = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)  # [n, T-1]
    first = nll[:, off:off + segment - 1].mean()  # targets inside the first copy (after its first token)
    second = nll[:, off + segment:].mean()  # targets inside the second copy (after its first token)
    right = logits[:, off + segment:-1].argmax(-1) == x[:, off + segment + 1:]  # [n, L - 1]
    return InductionScores(prefix_matching=pm, copying=_copying(model, vocab), loss_first=float(first),
                           loss_second=float(second), acc_second=float(right.double().mean()), segment=segment)


def _copying(model: HookedTransformer, vocab: int) -> Tensor:
    W_E, W_U = model.W_E[:vocab].double(), model.W_U[:, :vocab].double()  # [V, d], [d, V]
    out = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        attn = model.blocks[layer].attn
        W_V = attn.W_V if attn.W_V.shape[0] == model.cfg.n_heads else \
            attn.W_V.repeat_interleave(model.cfg.n_heads // attn.W_V.shape[0], dim=0)  # grouped-query: one per head
        for h in range(model.cfg.n_heads):
            small = (attn.W_O[h].double() @ W_U) @ (W_E @ W_V[h].double())  # [d_head, d_head]
            lam = torch.linalg.eigvals(small)
            total = float(lam.abs().sum())
            if total > 0:
                out[layer, h] = float(lam.real.sum()) / total
    return out.cpu()
