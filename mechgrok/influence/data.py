"""The data EK-FAC reads, and the loss it differentiates: a mechgrok ``Task`` or token ``Sequences``.

Two kinds of example, one per-example loss ``ℓ_n`` each (EK-FAC's gradients are ``dℓ_n/dθ``):

- a :class:`~mechgrok.tasks.Task`: one answer per example, read at the last position,
  ``ℓ_n = CE(z_n, y_n)`` (or Doshi et al.'s MSE) with ``z_n`` the logits at the last position (or the
  model's ``[b, C]`` output) and ``y_n`` the training label. Index arguments are integer indices,
  boolean masks ``[N]`` or split names (``"train"``, ``"test"``, ...).
- :class:`Sequences` (or a plain integer tensor ``[N, T]``, wrapped into one): a language model's
  next-token loss *summed* over positions,

      ℓ_n = Σ_{t=0}^{T-2} m_{n,t} · CE(z_{n,t}, x_{n,t+1})

  with ``z_{n,t}`` the logits at position ``t``, ``x`` the tokens and ``m`` the loss mask (all ones
  by default): the negative log-likelihood of the sequence's target tokens, the per-sequence loss
  whose influence Grosse et al. (2023) study. Index arguments are integer indices or boolean masks
  ``[N]`` (or ``"all"``); split names belong to a Task.

A model's output may be a tensor (``[b, C]`` or ``[b, pos, C]``), a Hugging Face output object
(its ``.logits``), a dict with ``"logits"``, or a tuple / list (its first element):
:func:`read_logits` unwraps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechgrok.tasks import Task

__all__ = ["Sequences", "as_data", "inputs_of", "batch_targets", "check_vocab", "read_logits", "unwrap_logits"]

_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True, eq=False)
class Sequences:
    """Token sequences of a language model, with an optional mask of the tokens that carry loss.

    Attributes:
        tokens: integer token ids ``[N, T]`` (``T >= 2``); position ``t``'s logits predict token ``t+1``.
        loss_mask: which next-token predictions count, bool, either ``[N, T-1]`` (entry ``[n, t]``: the
            prediction *at* position ``t`` of token ``t+1``) or ``[N, T]`` aligned with the tokens
            (entry ``[n, t]``: token ``t`` is a target; the Hugging Face convention of
            ``labels != -100`` and of ``attention_mask`` for right padding; column 0 is dropped, since
            no position predicts the first token). Stored as ``[N, T-1]``; ``None`` means every
            prediction counts.
        name: a label for logs and saved factors.

    Limits: the model sees the tokens alone (no attention mask), and EK-FAC's ``A`` averages over every
    position of every sequence, as kronfluence does: padding tokens enter ``A`` (though, masked out of
    the loss, not ``S``, ``Λ`` or the gradients); prefer unpadded sequences of one length.

    >>> s = Sequences(torch.tensor([[1, 2, 3], [4, 5, 6]]), loss_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    >>> s.loss_mask.tolist()  # token-aligned [N, T] -> [N, T-1]
    [[True, False], [True, True]]
    """

    tokens: Int[Tensor, "N T"]
    loss_mask: Bool[Tensor, "N T1"] | None = None
    name: str = "sequences"

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, Tensor):
            raise TypeError(f"Sequences.tokens must be a torch.Tensor of token ids [N, T], got {type(t).__name__}")
        if t.dtype not in _INT:
            raise TypeError(f"Sequences.tokens must be integer token ids [N, T], got dtype {t.dtype} (embeddings, "
                            "logits or one-hot vectors are not tokens; pass the ids, e.g. tokens.long())")
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
            raise ValueError(f"Sequences.tokens must have shape [N, T] with N >= 1 and T >= 2 (a next-token loss "
                             f"needs two positions), got {tuple(t.shape)}")
        if int(t.min()) < 0:
            raise ValueError(f"Sequences.tokens must be non-negative token ids, got a minimum of {int(t.min())}")
        if not isinstance(self.name, str):
            raise TypeError(f"Sequences.name must be a string, got {type(self.name).__name__}")
        m = self.loss_mask
        if m is None:
            return
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"Sequences.loss_mask must be a bool tensor, got {got} (from Hugging Face labels: "
                            "labels != -100; from an attention mask: attention_mask.bool())")
        N, T = t.shape
        if m.shape == (N, T):
            m = m[:, 1:]
        elif m.shape != (N, T - 1):
            raise ValueError(f"Sequences.loss_mask must have shape [N, T-1] = [{N}, {T - 1}] (one entry per "
                             f"next-token prediction) or [N, T] = [{N}, {T}] (one per token, column 0 dropped), "
                             f"got {tuple(m.shape)}")
        object.__setattr__(self, "loss_mask", m.contiguous())

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_targets(self) -> int:
        """Number of target tokens that carry loss."""
        return int(self.loss_mask.sum()) if self.loss_mask is not None else self.n * (self.n_ctx - 1)

    def __repr__(self) -> str:
        return f"Sequences({self.name!r}, N={self.n}, T={self.n_ctx}, {self.n_targets} target tokens)"


def as_data(data, owner: str = "EKFAC") -> Task | Sequences:
    """``data`` as a Task or Sequences: a Task or Sequences as is, an integer tensor ``[N, T]`` wrapped."""
    if isinstance(data, (Task, Sequences)):
        return data
    if isinstance(data, Tensor):
        return Sequences(data)
    raise TypeError(f"{owner}: data must be a mechgrok Task, a mechgrok.influence.Sequences or integer token ids "
                    f"[N, T] (a torch.Tensor), got {type(data).__name__}")


def check_vocab(model, data: Task | Sequences) -> None:
    """Refuse Sequences whose token ids the model's input embedding cannot look up (where the model
    says its vocabulary: a HookedTransformer's ``cfg.d_vocab``, a Hugging Face model's
    ``get_input_embeddings()``)."""
    if not isinstance(data, Sequences):
        return
    size = None
    cfg = getattr(model, "cfg", None)
    if cfg is not None and isinstance(getattr(cfg, "d_vocab", None), int):
        size = cfg.d_vocab
    elif callable(getattr(model, "get_input_embeddings", None)):
        emb = model.get_input_embeddings()
        size = getattr(emb, "num_embeddings", None)
    top = int(data.tokens.max())
    if size is not None and top >= size:
        raise ValueError(f"Sequences.tokens has ids up to {top}, but the model's input embedding has {size} entries "
                         f"(ids 0..{size - 1}); tokenize with the model's vocabulary")


def inputs_of(data: Task | Sequences) -> Int[Tensor, "N T"]:
    """The model inputs of every example."""
    return data.tokens if isinstance(data, Sequences) else data.inputs


def batch_targets(data: Task | Sequences, idx: Tensor, which: str = "labels"
                  ) -> tuple[Tensor, Tensor | None]:
    """``(targets, mask)`` of the examples ``idx``: a Task's ``which`` labels ``[b]`` and ``None``; a
    Sequences' next tokens ``[b, T-1]`` and its loss mask ``[b, T-1]`` (``None``: all)."""
    if which not in ("labels", "true_labels"):
        raise ValueError(f"labels must be 'labels' or 'true_labels', got {which!r}")
    if isinstance(data, Task):
        return getattr(data, which)[idx], None
    if which != "labels":
        raise ValueError("Sequences have no true_labels: their targets are the next tokens; use labels='labels'")
    return data.tokens[idx, 1:], None if data.loss_mask is None else data.loss_mask[idx]


def unwrap_logits(out) -> Tensor:
    """A model's output as a tensor: a tensor itself, ``out.logits`` (Hugging Face output objects),
    ``out["logits"]``, or the first element of a tuple / list."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned a {type(out).__name__}; EK-FAC needs logits: a tensor, an object "
                        "with .logits (Hugging Face), a dict with 'logits' or a tuple whose first element is them "
                        "(wrap the model in an nn.Module whose forward returns the logits)")
    return logits


def read_logits(out, per_token: bool, tokens: Tensor | None = None) -> Tensor:
    """The logits the loss reads: ``[b, C]`` at the last position (a Task), or ``[b, T-1, C]`` at every
    position that predicts a next token (``per_token``, Sequences; ``tokens`` ``[b, T]`` are checked
    against the vocabulary ``C``)."""
    z = unwrap_logits(out)
    if not per_token:
        return z[:, -1] if z.ndim == 3 else z
    if z.ndim != 3 or (tokens is not None and z.shape[:2] != tokens.shape):
        want = f"[{tokens.shape[0]}, {tokens.shape[1]}, vocab]" if tokens is not None else "[batch, pos, vocab]"
        raise ValueError(f"a per-token (Sequences) loss needs logits at every position {want}, but the model "
                         f"returned shape {tuple(z.shape)}; use a Task for a model with one output per example")
    if tokens is not None and int(tokens[:, 1:].max()) >= z.shape[-1]:
        raise ValueError(f"Sequences.tokens has the id {int(tokens[:, 1:].max())}, outside the model's {z.shape[-1]} "
                         "output classes; tokenize with the model's vocabulary")
    return z[:, :-1]
