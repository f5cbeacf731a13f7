"""Modular arithmetic tasks (Power et al. 2022, "Grokking"; Nanda et al. 2023) with label corruption
(Doshi et al. 2023, "To grok or not to grok").

Single task: tokens ``[a, b, =]`` with ``=`` the token id ``p``; the answer ``a ∘ b mod p`` is
predicted at the last position. Multi-task: tokens ``[a, op, b, =]`` where ``op`` names the
operation, so one model can learn several operations (needed for circuit overlap across tasks).

Label corruption: a seeded fraction ``corrupt_frac`` of the *training* examples gets a label drawn
uniformly from the ``d_vocab_out - 1`` classes that differ from the true answer. **A corrupted label
never equals the true label**, so ``train_corrupted`` is exactly the set of training examples whose
label is wrong. (Doshi et al. draw uniform labels, which coincide with the truth with probability
1/p; our rule removes that ambiguity at the cost of a 1/p shift in the effective corruption rate.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechgrok.tasks.task import Task

if TYPE_CHECKING:
    from mechgrok.tasks.sequence import SequenceTask

__all__ = ["OPS", "modular_arithmetic", "multi_task", "from_config", "is_prime"]


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (trial division; moduli here are small)."""
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def _div(a: Tensor, b: Tensor, p: int) -> Tensor:
    inv = torch.tensor([pow(int(x), p - 2, p) for x in range(p)])  # Fermat inverse; inv[0] unused
    return (a * inv[b]) % p


# name -> (function of (a, b, p), needs prime p, divisor b must be nonzero, description)
OPS: dict[str, tuple[Callable[[Tensor, Tensor, int], Tensor], bool, bool, str]] = {
    "add": (lambda a, b, p: (a + b) % p, False, False, "a + b mod p"),
    "sub": (lambda a, b, p: (a - b) % p, False, False, "a - b mod p (non-commutative)"),
    "mul": (lambda a, b, p: (a * b) % p, False, False, "a * b mod p"),
    "div": (_div, True, True, "a / b mod p (p prime, b != 0)"),
    "poly": (lambda a, b, p: (a * a + a * b + b * b) % p, False, False, "a^2 + ab + b^2 mod p (polynomial)"),
    "cubic": (lambda a, b, p: (a * a * a + a * b) % p, False, False, "a^3 + ab mod p (polynomial, non-commutative)"),
}


def _check_args(op: str, p: int) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OPS)}")
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}")
    if OPS[op][1] and not is_prime(p):
        raise ValueError(f"op {op!r} needs a prime modulus so every nonzero b has an inverse; "
                         f"p={p} is not prime (try {next(q for q in range(p, 2 * p + 2) if is_prime(q))})")


def _check_fracs(train_frac: float, corrupt_frac: float) -> None:
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must lie in (0, 1), got {train_frac}")
    if not 0.0 <= corrupt_frac < 1.0:
        raise ValueError(f"corrupt_frac must lie in [0, 1), got {corrupt_frac} "
                         "(use 0 for clean labels)")


def _pairs(op: str, p: int) -> tuple[Tensor, Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)  # [p*p], row-major over (a, b)
    if OPS[op][2]:
        keep = b != 0
        a, b = a[keep], b[keep]
    return a, b


def _split_and_corrupt(n: int, d_out: int, labels: Tensor, train_frac: float, corrupt_frac: float,
                       g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded train split and corruption of one group of ``n`` examples."""
    n_train = int(round(train_frac * n))
    if not 0 < n_train < n:
        raise ValueError(f"train_frac={train_frac} leaves an empty split for {n} examples")
    perm = torch.randperm(n, generator=g)
    train = torch.zeros(n, dtype=torch.bool)
    train[perm[:n_train]] = True
    corrupted = torch.zeros(n, dtype=torch.bool)
    n_corrupt = int(round(corrupt_frac * n_train))
    train_idx = perm[:n_train]
    pick = train_idx[torch.randperm(n_train, generator=g)[:n_corrupt]]
    corrupted[pick] = True
    noisy = labels.clone()
    shift = torch.randint(1, d_out, (n_corrupt,), generator=g)  # never 0: label always changes
    noisy[pick] = (labels[pick] + shift) % d_out
    return train, corrupted, noisy


def modular_arithmetic(p: int = 59, op: str = "add", train_frac: float = 0.3, corrupt_frac: float = 0.0,
                       seed: int = 0) -> Task:
    """All pairs ``(a, b)`` of ``Z_p`` (``b != 0`` for division) with answer ``a ∘ b mod p``.

    Args:
        p: modulus; must be prime for ``div``.
        op: one of ``OPS`` (add, sub, mul, div, poly, cubic).
        train_frac: fraction of pairs in the training split, in (0, 1).
        corrupt_frac: fraction of training examples whose label is replaced by a different,
            uniformly drawn class, in [0, 1).
        seed: seeds the split and the corruption (a local generator; nothing global).

    Returns:
        A Task with inputs ``[N, 3]`` = ``[a, b, p]`` (``p`` is the ``=`` token), ``d_vocab = p + 1``,
        ``d_vocab_out = p``.

    >>> t = modular_arithmetic(p=7, op="add", train_frac=0.5, seed=0)
    >>> t.inputs.shape, t.d_vocab, int(t.train.sum())
    (torch.Size([49, 3]), 8, 24)
    """
    _check_args(op, p)
    _check_fracs(train_frac, corrupt_frac)
    g = torch.Generator().manual_seed(seed)
    a, b = _pairs(op, p)
    true = OPS[op][0](a, b, p)
    train, corrupted, labels = _split_and_corrupt(len(a), p, true, train_frac, corrupt_frac, g)
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # [N, 3]
    config = {"kind": "modular_arithmetic", "p": p, "op": op, "train_frac": train_frac,
              "corrupt_frac": corrupt_frac, "seed": seed}
    return Task(name=f"{op}_p{p}", inputs=inputs, labels=labels, true_labels=true, train=train,
                train_corrupted=corrupted, task_ids=torch.zeros_like(a), task_names=(op,),
                d_vocab=p + 1, d_vocab_out=p, p=p, operand_positions=(0, 1), config=config)


def multi_task(specs: Sequence[tuple[str, int] | str], train_frac: float = 0.3, corrupt_frac: float = 0.0,
               seed: int = 0, p: int | None = None) -> Task:
    """Several modular operations in one dataset, told apart by an op token: ``[a, op, b, =]``.

    Args:
        specs: ``[("add", 59), ("sub", 59)]``, or op names with ``p`` given.
        train_frac, corrupt_frac, seed: as in ``modular_arithmetic``, applied per operation.
        p: default modulus for specs given as bare op names.

    Returns:
        A Task with ``task_names`` one per spec (``"add"``, or ``"add_p59"`` when an op appears
        with two moduli), ``task_ids`` indexing them, operands in ``[0, P)`` with ``P`` the largest
        modulus, op tokens ``P + i``, the ``=`` token ``P + len(specs)``; ``d_vocab_out = P``.
    """
    if not specs:
        raise ValueError("multi_task needs at least one (op, p) spec")
    norm: list[tuple[str, int]] = []
    for s in specs:
        if isinstance(s, str):
            if p is None:
                raise ValueError(f"spec {s!r} has no modulus: pass (op, p) tuples or p=...")
            s = (s, p)
        op, q = s
        _check_args(op, q)
        norm.append((op, int(q)))
    if len(set(norm)) != len(norm):
        raise ValueError(f"duplicate specs in {norm}")
    _check_fracs(train_frac, corrupt_frac)
    ops = [op for op, _ in norm]
    names = tuple(op if ops.count(op) == 1 else f"{op}_p{q}" for op, q in norm)
    big = max(q for _, q in norm)
    eq = big + len(norm)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {k: [] for k in ("inputs", "labels", "true", "train", "corr", "ids")}
    for i, (op, q) in enumerate(norm):
        a, b = _pairs(op, q)
        true = OPS[op][0](a, b, q)
        train, corrupted, labels = _split_and_corrupt(len(a), big, true, train_frac, corrupt_frac, g)
        parts["inputs"].append(torch.stack([a, torch.full_like(a, big + i), b, torch.full_like(a, eq)], 1))
        for k, v in zip(("labels", "true", "train", "corr", "ids"),
                        (labels, true, train, corrupted, torch.full_like(a, i))):
            parts[k].append(v)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    config = {"kind": "multi_task", "specs": [list(s) for s in norm], "train_frac": train_frac,
              "corrupt_frac": corrupt_frac, "seed": seed}
    return Task(name="+".join(names), inputs=cat["inputs"], labels=cat["labels"], true_labels=cat["true"],
                train=cat["train"], train_corrupted=cat["corr"], task_ids=cat["ids"], task_names=names,
                d_vocab=eq + 1, d_vocab_out=big, p=big, operand_positions=(0, 2), config=config)


def from_config(config: dict[str, Any]) -> Task | SequenceTask:
    """Rebuild a task from its ``config`` (as stored in ``Task.config`` / ``SequenceTask.config`` and in run
    folders)."""
    kind = config.get("kind")
    kw = {k: v for k, v in config.items() if k != "kind"}
    if kind == "modular_arithmetic":
        return modular_arithmetic(**kw)
    if kind == "multi_task":
        kw["specs"] = [tuple(s) for s in kw["specs"]]
        return multi_task(**kw)
    if kind == "knowledge":
        from mechgrok.tasks.knowledge import knowledge  # noqa: PLC0415 (kept local: dispatch only)

        kw["kind"] = kw.pop("knowledge_kind")
        return knowledge(**kw)
    if kind == "induction":
        from mechgrok.tasks.induction import induction  # noqa: PLC0415 (kept local: dispatch only)

        return induction(**kw)
    if kind == "lm_corpus":
        from mechgrok.tasks.lm import lm_corpus  # noqa: PLC0415 (kept local: dispatch only)

        return lm_corpus(**kw)
    raise ValueError(f"unknown task kind {kind!r}; expected 'modular_arithmetic', 'multi_task', 'knowledge', "
                     "'induction' or 'lm_corpus'")
