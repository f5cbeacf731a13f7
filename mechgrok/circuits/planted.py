"""A hand-wired induction circuit: a ground truth for circuit discovery.

``induction_model`` builds a 2-layer attention-only ``HookedTransformer`` (no LayerNorm, no biases)
whose weights are set by hand. The residual stream has four orthogonal subspaces, ``tok`` (one-hot
token, written by ``W_E``), ``pos`` (one-hot position, ``W_pos``), ``prev`` (the previous token,
written by ``a0.h0``) and ``out`` (the answer, written by ``a1.h0``, the only subspace ``W_U`` reads);
with ``seed`` not None the whole stream is turned by a random orthogonal matrix, which changes no
output but means no method can rely on axis-aligned weights.

- ``a0.h0`` (previous-token head): ``W_Q`` reads position ``i``, ``W_K`` position ``j``, the score is
  ``S`` when ``j = i − 1`` and 0 otherwise (position 0 attends to itself); ``W_V``/``W_O`` copy the
  attended token from ``tok`` into ``prev``.
- ``a1.h0`` (induction head): ``W_Q`` reads the current token from ``tok``, ``W_K`` the previous token
  from ``prev``, so position ``i`` attends to ``j`` when ``token[j − 1] = token[i]``; ``W_V``/``W_O``
  copy ``token[j]`` into ``out``, and ``W_U`` turns ``out`` into logits.
- every other head has all-zero weights.

True edges (``planted_edges``, derived from the weights: an edge is wired when what its source writes
overlaps what its receiver reads, ``‖W_write W_read‖ > 0``, and its destination is live and feeds a
wired edge itself)::

    input->a0.h0.v   a0.h0->a1.h0.k   input->a1.h0.q   input->a1.h0.v   a1.h0->logits

The previous-token head's ``input->a0.h0.q`` and ``input->a0.h0.k`` are wired too, but they carry
only positions, and resample ablation keeps positions (clean and corrupted inputs have the same
length, so the ``input`` node's clean-minus-corrupted difference is ``W_E[clean] − W_E[corrupted]``,
which ``a0.h0``'s ``W_Q``/``W_K`` do not read). Patching either edge changes nothing, exactly, so
no patching method can detect them, and an honest ground truth under resample (or mean) ablation
leaves them out; ``planted_edges(model, positional=True)`` returns all 7 wired edges (the set zero
ablation could see). ``induction_data`` makes the other five edges matter on every example: the
corrupted sequence has a different final token (the query of ``a1.h0``), a different token after the
cue (its value) and different tokens everywhere else (what ``a0.h0`` copies into ``prev``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from mechgrok._config import check_float, check_int
from mechgrok.circuits.graph import graph
from mechgrok.models import HookedTransformer, HookedTransformerConfig

__all__ = ["induction_model", "induction_data", "induction_answers", "planted_edges", "BOS"]

BOS = 0  # token at position 0, never used elsewhere


def induction_model(d_vocab: int = 16, n_ctx: int = 8, seed: int | None = 0, n_heads: int = 2,
                    qk_scale: float = 30.0, logit_scale: float = 10.0) -> tuple[HookedTransformer, frozenset[str]]:
    """The hand-wired induction model (see the module docstring) and its true edges.

    Args:
        d_vocab: vocabulary (token ``BOS`` = 0 is reserved for position 0); ``d_vocab_out`` is the same.
        n_ctx: context length.
        seed: seeds the random rotation of the residual stream; None keeps the axis-aligned basis.
        n_heads: heads per layer (≥ 2); only ``a0.h0`` and ``a1.h0`` are non-zero.
        qk_scale: attention score of a match (others score 0), so attention is nearly hard.
        logit_scale: logit of the copied token (others get ~0).

    Returns:
        ``(model, planted_edges(model))``.
    """
    owner = "induction_model"
    n_heads = check_int(n_heads, "n_heads", low=2, owner=owner)
    n_ctx = check_int(n_ctx, "n_ctx", low=4, owner=owner)
    d_vocab = check_int(d_vocab, "d_vocab", low=n_ctx, owner=f"{owner} (distinct tokens per sequence: d_vocab >= n_ctx)")
    if seed is not None:
        seed = check_int(seed, "seed", low=0, owner=owner)
    qk_scale, logit_scale = (check_float(v, k, low=0.0, low_open=True, owner=owner)
                             for k, v in (("qk_scale", qk_scale), ("logit_scale", logit_scale)))
    V, T = d_vocab, n_ctx
    tok, pos, prev, out = 0, V, V + T, 2 * V + T  # subspace offsets
    d_model, d_head = 3 * V + T, max(V, T)
    cfg = HookedTransformerConfig(n_layers=2, n_heads=n_heads, d_model=d_model, d_head=d_head, attn_only=True,
                                  normalization_type=None, positional_embedding_type="standard", d_vocab=V,
                                  d_vocab_out=V, n_ctx=T, act_fn="relu", device="cpu")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        torch.manual_seed(0)
        model = HookedTransformer(cfg)
    s = qk_scale * d_head ** 0.5  # undo transformer-lens' 1/sqrt(d_head)
    eye_v, eye_t = torch.eye(V), torch.eye(T)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, tok:tok + V] = eye_v
        model.W_pos[:, pos:pos + T] = eye_t
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        a0.W_Q[0, pos:pos + T, :T] = s * eye_t  # query: own position i
        a0.W_K[0, pos:pos + T - 1, 1:T] = eye_t[:T - 1, :T - 1]  # key: position j as slot j + 1
        a0.W_V[0, tok:tok + V, :V] = eye_v
        a0.W_O[0, :V, prev:prev + V] = eye_v  # token of the attended position -> prev
        a1.W_Q[0, tok:tok + V, :V] = s * eye_v  # query: current token
        a1.W_K[0, prev:prev + V, :V] = eye_v  # key: previous token
        a1.W_V[0, tok:tok + V, :V] = eye_v
        a1.W_O[0, :V, out:out + V] = eye_v
        model.W_U[out:out + V, :] = logit_scale * eye_v
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            R, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=torch.float64))
            R = R.float()
            model.W_E.copy_(model.W_E @ R)
            model.W_pos.copy_(model.W_pos @ R)
            model.W_U.copy_(R.T @ model.W_U)
            for blk in model.blocks:
                for w in (blk.attn.W_Q, blk.attn.W_K, blk.attn.W_V):
                    w.copy_(R.T @ w)
                blk.attn.W_O.copy_(blk.attn.W_O @ R)
    model.eval()
    return model, planted_edges(model)


def planted_edges(model: HookedTransformer, positional: bool = False, rtol: float = 1e-4) -> frozenset[str]:
    """Edges of ``graph(model, "edge")`` the weights wire up (see the module docstring).

    ``positional=False`` counts only what ``input`` writes through ``W_E`` (what resample ablation
    changes); ``True`` adds ``W_pos``. Norms below ``rtol`` times the largest count as zero.
    """
    g = graph(model, "edge")
    W = {}
    for layer, blk in enumerate(model.blocks):
        for h in range(model.cfg.n_heads):
            W[f"a{layer}.h{h}"] = {k: getattr(blk.attn, f"W_{k}")[h].detach() for k in "QKVO"}
    write = {"input": torch.cat([model.W_E, model.W_pos]) if positional else model.W_E}
    write.update({n: w["O"] for n, w in W.items()})
    read = {"logits": model.W_U.detach()}
    for n, w in W.items():
        read.update({f"{n}.q": w["Q"], f"{n}.k": w["K"], f"{n}.v": w["V"]})
    strength = {e.name: float(torch.linalg.matrix_norm(write[e.src].detach() @ read[e.receiver])) for e in g.edges}
    tol = rtol * max(strength.values())

    def head_ok(e) -> bool:  # a head's output varies with q/k only if it attends and moves something
        if e.dst == "logits":
            return True
        w = W[e.dst]
        moves = float(torch.linalg.matrix_norm(w["V"] @ w["O"])) > tol
        attends = min(float(torch.linalg.matrix_norm(w["Q"])), float(torch.linalg.matrix_norm(w["K"]))) > tol
        return moves and (attends or e.receiver.endswith(".v"))

    live, kept = {"logits"}, set()
    for e in reversed(g.edges):  # receivers from the logits back, so dst is settled before src
        if e.dst in live and strength[e.name] > tol and head_ok(e):
            kept.add(e.name)
            live.add(e.src)
    return frozenset(kept)


def induction_answers(tokens: Tensor) -> Tensor:
    """The induction answer of each sequence: the token after the earlier occurrence of the last token."""
    hit = tokens[:, :-2] == tokens[:, -1:]  # [batch, n_ctx - 2]
    if not bool(hit.any(-1).all()):
        raise ValueError("some sequence's last token does not occur earlier")
    return tokens.gather(1, hit.float().argmax(-1, keepdim=True) + 1).squeeze(1)


def _sequences(n: int, V: int, T: int, g: torch.Generator) -> Tensor:
    """``BOS``, ``T − 2`` distinct tokens, then a copy of one of them (not the last)."""
    body = torch.stack([torch.randperm(V - 1, generator=g)[:T - 2] + 1 for _ in range(n)])
    p = torch.randint(0, T - 3, (n, 1), generator=g)  # the cue's index in body; the answer is body[p + 1]
    return torch.cat([torch.full((n, 1), BOS), body, body.gather(1, p)], dim=1)


def induction_data(model: HookedTransformer, n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Clean and corrupted induction batches for ``model`` and the clean answers.

    Clean: ``BOS``, ``n_ctx − 2`` distinct random tokens, then a repeat of one of them (not the last
    one); the answer is the token that followed it. Corrupted: an independent sequence of the same
    form whose last token and answer both differ from the clean ones, so the cue points elsewhere.
    Use ``logit_diff(labels, induction_answers(corrupted))`` as the metric.

    Returns:
        ``clean [n, n_ctx]``, ``corrupted [n, n_ctx]``, ``labels [n]`` (= ``induction_answers(clean)``).
    """
    n = check_int(n, "n", low=1, owner="induction_data")
    V, T = model.cfg.d_vocab, model.cfg.n_ctx
    if T < 4 or V < T:
        raise ValueError(f"induction_data needs n_ctx >= 4 and d_vocab >= n_ctx, got n_ctx={T}, d_vocab={V} "
                         "(build the model with induction_model)")
    g = torch.Generator().manual_seed(check_int(seed, "seed", low=0, owner="induction_data"))
    clean = _sequences(n, V, T, g)
    corrupted = _sequences(n, V, T, g)
    labels = induction_answers(clean)
    while True:
        bad = (corrupted[:, -1] == clean[:, -1]) | (induction_answers(corrupted) == labels)
        if not bool(bad.any()):
            return clean, corrupted, labels
        corrupted[bad] = _sequences(int(bad.sum()), V, T, g)
