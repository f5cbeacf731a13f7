"""Synthetic knowledge tasks of Wang et al. 2024 ("Grokked Transformers are Implicit Reasoners: A
Mechanistic Journey to the Edge of Generalization"), scaled down so a small transformer learns them
on CPU.

Two kinds of implicit reasoning over memorised facts:

- **composition**: atomic facts ``(h, r) -> t`` (every entity has one value for every relation,
  drawn uniformly and seeded) and two-hop queries ``(h, r1, r2) -> f(f(h, r1), r2)``.
- **comparison**: every entity has an integer value per attribute; atomic facts
  ``(e, attr) -> value`` and comparison queries ``(e1, attr, e2) -> "<" | "=" | ">"`` comparing
  ``value(e1, attr)`` with ``value(e2, attr)``.

**Token layout** (``n_ctx = 4``, answer read at the last position, as in every mechgrok task)::

    composition   atomic   [PAD, h,  r,    =] -> t          two-hop  [h,  r1,   r2, =] -> t
    comparison    atomic   [PAD, e,  attr, =] -> value      compare  [e1, attr, e2, =] -> label

Atomic facts are *left*-padded so that in both query types the relation that produces the answer
sits right before ``=`` and its subject right before it (Wang et al. train a causal LM on
``<h><r>`` and ``<h><r1><r2>`` and read the answer after the last relation; the same alignment).
Token ids: the output classes come first, so output class ``i`` is token id ``i``:

    composition   entities [0, N) | relations [N, N+R) | PAD N+R | = N+R+1
    comparison    values [0, V) | labels <,=,> at V, V+1, V+2 | entities [V+3, V+3+N) |
                  attributes next | PAD | =

``d_vocab_out`` is ``N`` (composition) or ``V + 3`` (comparison), and ``p`` is set to
``d_vocab_out`` (there is no modulus; ``p`` only sizes the output space). ``operand_positions`` is
``(0, 2)``: the two content tokens of an inferred query that are not the bridging relation/attribute
(``h, r2`` or ``e1, e2``). **The Fourier, IPR and (a, b)-grid analyses of modular arithmetic do not
apply to these tasks** (there is no group structure), and ``Task.onehot`` refuses them (several
sub-tasks).

**Splits** (``task_names``; ``evaluate(model, task, by_task=True)`` reports each):

- ``"atomic"``: every atomic fact, all in the training split.
- ``"two_hop"`` / ``"comparison"``: in-distribution (ID) inferred queries. Entities are split
  seeded into ID and OOD (``round(ood_frac * n_entities)`` OOD). A composition query is ID when
  its head ``h`` *and* its bridge ``b = f(h, r1)`` are ID entities (both of its atomic facts are ID);
  a comparison query is ID when ``e1`` and ``e2`` are both ID. Exactly
  ``round(inferred_ratio * n_atomic)`` of them are training data (``n_atomic = n_entities *
  n_relations``, all atomic facts), so #inferred_train / #atomic = ``inferred_ratio`` up to rounding
  (Wang et al.'s φ; they count only ID atomic facts, a factor ``1 - ood_frac`` apart). The rest are
  the ID test set. Comparison queries are chosen by unordered pair, both orders together, so the
  count is rounded to an even number and no test query is the mirror image of a training query.
- ``"two_hop_ood"`` / ``"comparison_ood"``: queries whose head and bridge (or both entities) are
  OOD; all in the test split. OOD entities' atomic facts are trained, but never take part in an
  inferred training fact, neither as first nor as second hop.
- Mixed queries (one atomic fact ID, one OOD) are left out of the dataset, as in Wang et al.

Wang et al. split ID/OOD by atomic fact (composition, 5%) or by entity per attribute
(comparison); here one seeded entity split serves both kinds.

>>> t = knowledge("composition", n_entities=20, n_relations=4, inferred_ratio=2.0, ood_frac=0.2, seed=0)
>>> t.task_names, t.n_ctx, t.d_vocab, t.d_vocab_out
(('atomic', 'two_hop', 'two_hop_ood'), 4, 26, 20)
>>> int((t.train & (t.task_ids == 1)).sum()) == round(2.0 * 20 * 4)
True
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool
from torch import Tensor

from mechgrok.tasks.task import Task

__all__ = ["knowledge", "ood_entities", "KINDS", "COMPARISON_LABELS"]

KINDS = ("composition", "comparison")
COMPARISON_LABELS = ("<", "=", ">")  # label token offsets 0, 1, 2 after the value tokens
_MAX_QUERIES = 5_000_000  # refuse datasets that would not fit a CPU experiment


def _check(kind: str, n_entities: int, n_relations: int, inferred_ratio: float, ood_frac: float,
           n_values: int) -> tuple[int, int]:
    """Validate the arguments; return ``(n_ood, n_id)`` entity counts."""
    if kind not in KINDS:
        raise ValueError(f"unknown knowledge kind {kind!r}; choose one of {KINDS}")
    for name, v, low in (("n_entities", n_entities, 3), ("n_relations", n_relations, 1),
                         ("n_values", n_values, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if not 0.0 < ood_frac < 1.0:
        raise ValueError(f"ood_frac must lie in (0, 1), got {ood_frac}")
    if not inferred_ratio >= 0:
        raise ValueError(f"inferred_ratio must be >= 0 (#inferred training facts / #atomic facts), "
                         f"got {inferred_ratio}")
    need = 2 if kind == "comparison" else 1  # comparison needs a pair of distinct OOD entities
    n_ood = int(round(ood_frac * n_entities))
    n_id = n_entities - n_ood
    if n_ood < need or n_id < 2:
        raise ValueError(f"ood_frac={ood_frac} of n_entities={n_entities} gives {n_ood} OOD and {n_id} ID "
                         f"entities; {kind} needs at least {need} OOD and 2 ID entities: change ood_frac "
                         "or raise n_entities")
    n_queries = n_entities * n_relations * (n_relations if kind == "composition" else n_entities)
    if n_queries > _MAX_QUERIES:
        raise ValueError(f"{kind} with n_entities={n_entities}, n_relations={n_relations} has {n_queries:,} "
                         f"inferred queries (limit {_MAX_QUERIES:,}); lower n_entities or n_relations")
    return n_ood, n_id


def _entity_split(n_entities: int, n_ood: int, g: torch.Generator) -> Bool[Tensor, " n_entities"]:
    ood = torch.zeros(n_entities, dtype=torch.bool)
    ood[torch.randperm(n_entities, generator=g)[:n_ood]] = True
    return ood


def _pick_train(pool: Tensor, n_train: int, what: str, fix: str, g: torch.Generator) -> Tensor:
    """A seeded choice of ``n_train`` of the ``pool`` indices, leaving at least one for the ID test."""
    if n_train >= len(pool):
        raise ValueError(f"inferred_ratio asks for {n_train} {what} in training but only {len(pool)} ID "
                         f"{what} exist (at least one must stay in the ID test); {fix}")
    return pool[torch.randperm(len(pool), generator=g)[:n_train]]


def knowledge(kind: str = "composition", n_entities: int = 100, n_relations: int = 8,
              inferred_ratio: float = 3.6, ood_frac: float = 0.2, seed: int = 0,
              n_values: int = 10) -> Task:
    """Atomic facts and inferred (two-hop or comparison) queries, with ID and OOD test sets.

    Args:
        kind: ``"composition"`` or ``"comparison"``.
        n_entities: number of entities ``N`` (>= 3).
        n_relations: relations (composition) or attributes (comparison) ``R``.
        inferred_ratio: #inferred training facts / #atomic facts (Wang et al.'s φ, >= 0;
            0 trains on atomic facts only). Higher φ made grokking faster in Wang et al.
        ood_frac: fraction of entities held out as OOD, in (0, 1).
        seed: seeds facts, the entity split and the training choice (a local generator).
        n_values: values per attribute ``V`` (comparison only; ignored by composition).

    Returns:
        A Task with ``n_ctx = 4``, ``task_names`` ``("atomic", "two_hop", "two_hop_ood")`` or
        ``("atomic", "comparison", "comparison_ood")``, train = all atomic facts plus
        ``round(inferred_ratio * N * R)`` ID inferred queries (see the module docstring for the
        token layout and the exact split rules). Labels are never corrupted.

    Raises:
        ValueError: bad sizes or fractions, or an ``inferred_ratio`` that needs more ID inferred
            queries than exist (the message says the largest ratio that fits).
    """
    n_ood, n_id = _check(kind, n_entities, n_relations, inferred_ratio, ood_frac, n_values)
    g = torch.Generator().manual_seed(seed)
    N, R = n_entities, n_relations
    ood = _entity_split(N, n_ood, g)  # drawn first so ood_entities() can redraw it cheaply
    n_atomic = N * R
    config = {"kind": "knowledge", "knowledge_kind": kind, "n_entities": N, "n_relations": R,
              "inferred_ratio": inferred_ratio, "ood_frac": ood_frac, "seed": seed}
    if kind == "comparison":
        config["n_values"] = n_values
    if kind == "composition":
        n_out, ent0 = N, 0
        table = torch.randint(0, N, (N, R), generator=g)  # [N, R] atomic facts f(h, r) = t
        rel0 = N
    else:
        n_out, ent0 = n_values + 3, n_values + 3
        table = torch.randint(0, n_values, (N, R), generator=g)  # [N, R] value(e, attr)
        rel0 = ent0 + N
    pad, eq = rel0 + R, rel0 + R + 1

    # atomic facts: [PAD, e, r, =] -> table[e, r], for every (e, r)
    e, r = torch.meshgrid(torch.arange(N), torch.arange(R), indexing="ij")
    e, r = e.reshape(-1), r.reshape(-1)  # [N*R]
    atomic_x = torch.stack([torch.full_like(e, pad), ent0 + e, rel0 + r, torch.full_like(e, eq)], 1)
    atomic_y = table[e, r]

    if kind == "composition":
        h, r1, r2 = (t.reshape(-1) for t in torch.meshgrid(torch.arange(N), torch.arange(R), torch.arange(R),
                                                           indexing="ij"))  # [N*R*R]
        bridge = table[h, r1]
        y = table[bridge, r2]
        x = torch.stack([h, rel0 + r1, rel0 + r2, torch.full_like(h, eq)], 1)  # [N*R*R, 4]
        is_id, is_ood = ~ood[h] & ~ood[bridge], ood[h] & ood[bridge]
        n_train = int(round(inferred_ratio * n_atomic))
        pool = is_id.nonzero().squeeze(1)
        fits = math.floor(100 * (len(pool) - 1) / n_atomic) / 100  # largest ratio that fits
        train_idx = _pick_train(pool, n_train, "two-hop queries", f"use inferred_ratio <= {fits:.2f}, "
                                "raise n_relations or lower ood_frac", g)
        names = ("atomic", "two_hop", "two_hop_ood")
    else:
        e1, a, e2 = (t.reshape(-1) for t in torch.meshgrid(torch.arange(N), torch.arange(R), torch.arange(N),
                                                           indexing="ij"))  # [N*R*N]
        keep = e1 != e2
        e1, a, e2 = e1[keep], a[keep], e2[keep]
        v1, v2 = table[e1, a], table[e2, a]
        y = n_values + 1 + torch.sign(v1 - v2)  # < -> V, = -> V+1, > -> V+2
        x = torch.stack([ent0 + e1, rel0 + a, ent0 + e2, torch.full_like(e1, eq)], 1)
        is_id, is_ood = ~ood[e1] & ~ood[e2], ood[e1] & ood[e2]
        n_train = 2 * int(round(inferred_ratio * n_atomic / 2))
        # choose unordered pairs (e1 < e2), then add their mirror images (e2, a, e1)
        pool = (is_id & (e1 < e2)).nonzero().squeeze(1)
        fits = math.floor(100 * 2 * (len(pool) - 1) / n_atomic) / 100
        half = _pick_train(pool, n_train // 2, "comparison pairs", f"use inferred_ratio <= {fits:.2f}, "
                           "raise n_entities or lower ood_frac", g)
        # index of the mirror query: same attribute, entities swapped
        key = (e1 * R + a) * N + e2
        order = torch.argsort(key)
        mirror_key = (e2[half] * R + a[half]) * N + e1[half]
        mirror = order[torch.searchsorted(key[order], mirror_key)]
        train_idx = torch.cat([half, mirror])
        names = ("atomic", "comparison", "comparison_ood")
    if not bool(is_ood.any()):
        raise ValueError(f"no OOD {names[1]} query exists for this draw (ood_frac={ood_frac}, seed={seed}); "
                         "raise ood_frac or n_entities")
    keep = is_id | is_ood  # mixed ID/OOD queries are left out, as in Wang et al.
    inferred_train = torch.zeros(len(y), dtype=torch.bool)
    inferred_train[train_idx] = True

    inputs = torch.cat([atomic_x, x[keep]])  # [n_atomic + n_inferred, 4]
    labels = torch.cat([atomic_y, y[keep]])
    train = torch.cat([torch.ones(n_atomic, dtype=torch.bool), inferred_train[keep]])
    task_ids = torch.cat([torch.zeros(n_atomic, dtype=torch.long), torch.where(is_id[keep], 1, 2)])
    name = f"{kind}_e{N}_r{R}_phi{inferred_ratio:g}"
    return Task(name=name, inputs=inputs, labels=labels, true_labels=labels.clone(), train=train,
                train_corrupted=torch.zeros_like(train), task_ids=task_ids, task_names=names,
                d_vocab=eq + 1, d_vocab_out=n_out, p=n_out, operand_positions=(0, 2), config=config)


def ood_entities(task: Task) -> Bool[Tensor, " n_entities"]:
    """``[n_entities]`` True for the OOD entities of a task built by ``knowledge`` (redrawn from its
    seeded config). Entity ``i`` is token id ``i`` (composition) or ``n_values + 3 + i`` (comparison)."""
    c = task.config
    if c.get("kind") != "knowledge":
        raise ValueError(f"task {task.name!r} was not built by mechgrok.tasks.knowledge (config kind "
                         f"{c.get('kind')!r})")
    n_ood = int(round(c["ood_frac"] * c["n_entities"]))  # as in knowledge()
    return _entity_split(c["n_entities"], n_ood, torch.Generator().manual_seed(c["seed"]))
