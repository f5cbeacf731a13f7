"""Grokking tickets: magnitude-pruning masks of a generalized model, retrained from the initial weights.

Paper: G. Minegishi, Y. Iwasawa, Y. Matsuo, *Grokking Tickets: Lottery Tickets Accelerate Grokking*
(arXiv:2310.19470; v3: *Bridging Lottery Ticket and Grokking: Understanding Grokking from Inner
Structure of Networks*); code github.com/gouki510/Grokking-Tickets. After Frankle & Carbin 2019.

For a run with initial weights ``θ₀`` and a checkpoint ``θ_T`` (by default the last, which must have
generalized), the **grokking ticket** at sparsity ``s`` is the network ``m ⊙ θ₀`` trained with the
mask ``m`` held fixed (``mg.train(..., masks=m)``: pruned weights stay exactly 0), where

    m = 1[ |θ_T| ranks among the (1 − s)·N largest magnitudes ]

over the ``N`` weights of the pruned parameters: ``⌊s·N⌋`` weights with the smallest ``|θ_T|`` are
pruned, over all of them at once (``scope="global"``, the paper's default) or ``⌊s·N_i⌋`` in each
parameter (``scope="layer"``). Ties are broken by position (earlier parameter in
``model.named_parameters()`` order, then row-major index, is pruned first), so the count is exact.
Pruned by default (``default_params``): every weight matrix, i.e. every trainable parameter whose name
ends in ``W_…`` (``embed.W_E``, ``blocks.*.attn.W_Q/W_K/W_V/W_O``, ``blocks.*.mlp.W_in/W_out``,
``unembed.W_U``; the hooked MLP's ``W_in``/``W_out``; MoE experts' and router's ``W_….weight``), not
biases, LayerNorm weights or the positional embedding, as in the paper's code (its models have
neither biases nor positional embeddings).

Controls (``ticket(kind=...)``):

- ``"random"``: a random mask with the same number of weights kept in every parameter (``random_mask``);
- ``"dense"``: the initial weights unmasked; with ``match_norm="l1"`` / ``"l2"`` the pruned parameters
  of ``θ₀`` are rescaled by ``r = ‖m ⊙ θ₀‖_p / ‖θ₀‖_p`` (p = 1 or 2, over all pruned parameters
  together), so the dense start has the ticket's L1 or L2 norm (``norm_ratio``) — the paper's control
  that the speed-up is not weight norm alone;
- masks taken at the memorization or transition checkpoint: ``ticket(run, s, step=...)``.

**Grokking delay** (``grokking_delay``): ``generalized − memorized``, the first logged steps with
test accuracy ≥ ``GENERALIZED_ACC`` (0.95) and train accuracy ≥ ``MEMORIZED_ACC`` (1), the shared
thresholds of ``mechgrok.run``. The paper compares test-accuracy curves and the epochs to generalize;
the sweep reports both the generalization step and the delay.

Sparsity here is the fraction *pruned* (0.7: 30% of the weights kept). The paper's ``config_pruning.py``
calls the fraction *kept* ``sparsity`` (its default 0.4 prunes 60%).

Limits: one-shot magnitude pruning only (no iterative pruning, no SNIP/GraSP/SynFlow, no edge-popup);
a ticket retrains with the source run's ``TrainConfig`` unless another is given, for the same number
of steps, so "never generalized" means "not within that budget". The weights of a dense control's
unpruned parameters (biases, positions) are not rescaled.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok._io import child_path
from mechgrok._training import check_masks
from mechgrok.run import GENERALIZED_ACC, MEMORIZED_ACC, Run, first_step
from mechgrok.train import TrainConfig, train

__all__ = ["magnitude_mask", "magnitude_masks", "random_mask", "norm_ratio", "default_params", "mask_overlap",
           "ticket", "ticket_source", "grokking_delay", "GrokkingDelay", "ticket_sweep", "TicketSweep", "TicketPoint",
           "KINDS", "SCOPES", "MATCH_NORMS", "SWEEP_KINDS"]

log = logging.getLogger(__name__)

KINDS = ("ticket", "random", "dense")
SCOPES = ("global", "layer")
MATCH_NORMS = ("l1", "l2")
#: what ``ticket_sweep`` trains: ``ticket``, ``random`` (per sparsity), ``dense`` (once: the unmasked
#: initial weights), ``dense_l1`` / ``dense_l2`` (per sparsity: dense with the ticket's L1 / L2 norm).
SWEEP_KINDS = ("ticket", "random", "dense", "dense_l1", "dense_l2")
_WEIGHT = re.compile(r"^_?W_")  # weight matrices: W_E, W_Q, ..., and TL's grouped-query _W_K / _W_V


# ---------------------------------------------------------------------------- masks


def _is_weight_matrix(name: str) -> bool:
    parts = name.split(".")
    last = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]  # MoE experts: W_in.weight
    return bool(_WEIGHT.match(last)) and last != "W_pos"


def default_params(model: nn.Module) -> list[str]:
    """The parameters pruned by default: trainable weight matrices (last name part ``W_…``, or
    ``W_….weight`` as in TL's MoE experts and router), not biases, LayerNorm or the positional
    embedding ``W_pos``; in ``model.named_parameters()`` order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and _is_weight_matrix(n)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no trainable weight matrix (a parameter named W_...); "
                         "pass params=[names] to say which parameters to prune")
    return names


def _params(model: nn.Module, params: Sequence[str] | None) -> list[str]:
    """``params`` checked against ``model`` and put in ``named_parameters()`` order (default: ``default_params``)."""
    if params is None:
        return default_params(model)
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise TypeError(f"params must be a list of parameter names, got {params!r}")
    named = dict(model.named_parameters())
    for n in params:
        if n not in named:
            near = difflib.get_close_matches(str(n), list(named), n=3)
            raise ValueError(f"params: {n!r} is not a parameter of this model"
                             + (f"; did you mean {near}?" if near else f" (it has {list(named)[:8]}...)"))
        if not named[n].requires_grad:
            raise ValueError(f"params: {n!r} is frozen (requires_grad=False); prune only trained parameters")
    if len(set(params)) != len(params) or not params:
        raise ValueError(f"params must name each parameter once and at least one, got {list(params)}")
    return [n for n in named if n in set(params)]


def _sparsity(s: Any, name: str = "sparsity") -> float:
    return check_float(s, name, low=0.0, high=1.0, high_open=True, owner="tickets")


def _n_pruned(sparsity: float, n: int) -> int:
    """``⌊s·n⌋``, with a little slack so that float rounding (0.29 × 100 = 28.999…) does not lose one."""
    return min(n, math.floor(sparsity * n + 1e-6))


def _scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} ('global': one magnitude threshold over all pruned "
                         f"parameters, the paper's default; 'layer': the same fraction in each), got {scope!r}")
    return scope


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsities: Sequence[float], *, params: Sequence[str] | None = None,
                    scope: str = "global") -> list[dict[str, Tensor]]:
    """``magnitude_mask`` at each of ``sparsities``, from one sort of the magnitudes (what the
    ``tickets`` analysis computes on every checkpoint)."""
    names, scope = _params(model, params), _scope(scope)
    sparsities = [_sparsity(s) for s in sparsities]
    named = dict(model.named_parameters())
    flat = [named[n].detach().reshape(-1).abs().cpu() for n in names]  # [N_i] each
    sizes = [len(f) for f in flat]
    groups = [list(range(len(names)))] if scope == "global" else [[i] for i in range(len(names))]
    keep = [[torch.ones(sz, dtype=torch.bool) for sz in sizes] for _ in sparsities]
    for group in groups:
        scores = torch.cat([flat[i].double() for i in group])  # [N] in parameter order, row-major
        order = torch.sort(scores, stable=True).indices  # ascending; ties: earlier position first
        offsets = [0]
        for i in group:
            offsets.append(offsets[-1] + sizes[i])
        for k, s in enumerate(sparsities):
            kept = torch.ones(len(scores), dtype=torch.bool)
            kept[order[: _n_pruned(s, len(scores))]] = False
            for j, i in enumerate(group):
                keep[k][i] = kept[offsets[j]:offsets[j + 1]]
    return [{n: keep[k][i].reshape(named[n].shape).clone() for i, n in enumerate(names)}
            for k in range(len(sparsities))]


def magnitude_mask(model: nn.Module, sparsity: float, *, params: Sequence[str] | None = None,
                   scope: str = "global") -> dict[str, Tensor]:
    """The magnitude-pruning mask of ``model`` at ``sparsity`` (the fraction of weights pruned).

    Args:
        model: any module (typically a run's generalized checkpoint).
        sparsity: in ``[0, 1)``: ``⌊s·N⌋`` weights with the smallest ``|w|`` are pruned.
        params: parameter names to prune (default ``default_params``: the weight matrices).
        scope: ``"global"`` (one threshold over all of ``params``; Minegishi et al.'s default) or
            ``"layer"`` (``⌊s·N_i⌋`` in each parameter).

    Returns:
        ``{name: bool tensor of the parameter's shape}`` on the CPU, True = kept. Ties are broken by
        position: the earlier (parameter order, then row-major index) is pruned first.

    >>> from torch import nn
    >>> lin = nn.Linear(2, 2, bias=False)
    >>> _ = lin.weight.data.copy_(torch.tensor([[0.1, -3.0], [2.0, -0.5]]))
    >>> magnitude_mask(lin, 0.5, params=["weight"])["weight"].tolist()
    [[False, True], [True, False]]
    """
    return magnitude_masks(model, [sparsity], params=params, scope=scope)[0]


def random_mask(model: nn.Module, like: dict[str, Tensor], *, seed: int = 0) -> dict[str, Tensor]:
    """A uniformly random mask keeping, in every parameter of ``like``, as many weights as ``like`` does.

    The paper's random-pruning control at the same sparsity (here the per-parameter counts match too,
    so only *which* weights are kept differs). Drawn with a local generator seeded by ``seed``, one
    permutation per parameter in ``model.named_parameters()`` order.
    """
    like = check_masks(model, like)
    seed = check_int(seed, "seed", low=0, high=2**63 - 1, owner="random_mask")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, _ in model.named_parameters():
        if name not in like:
            continue
        m = like[name]
        kept = torch.zeros(m.numel(), dtype=torch.bool)
        kept[torch.randperm(m.numel(), generator=g)[: int(m.sum())]] = True
        out[name] = kept.reshape(m.shape)
    return out


@torch.no_grad()
def norm_ratio(model: nn.Module, mask: dict[str, Tensor], norm: str) -> float:
    """``r = ‖m ⊙ θ‖_p / ‖θ‖_p`` over the parameters of ``mask`` taken together (p = 1 for ``"l1"``,
    2 for ``"l2"``), in float64: the factor that gives ``r·θ`` the norm of the masked ``θ``."""
    if norm not in MATCH_NORMS:
        raise ValueError(f"norm must be one of {MATCH_NORMS}, got {norm!r}")
    mask = check_masks(model, mask)
    named = dict(model.named_parameters())
    p = 1 if norm == "l1" else 2
    full = sum(float((named[n].detach().double().abs() ** p).sum()) for n in mask)
    kept = sum(float(((named[n].detach().double() * m.to(named[n].device)).abs() ** p).sum()) for n, m in mask.items())
    if full == 0:
        raise ValueError("the masked parameters are all 0, so no rescaling can match a norm")
    return (kept / full) ** (1 / p)


def mask_overlap(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    """Overlap of two masks over the same parameters (kept weights as sets): ``jaccard`` |A∩B|/|A∪B|
    and ``kept_of_b`` |A∩B|/|B| (the share of ``b``'s kept weights that ``a`` keeps too)."""
    if set(a) != set(b):
        raise ValueError(f"the masks cover different parameters: {sorted(set(a) ^ set(b))}")
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    nb = sum(int(b[n].sum()) for n in b)
    return {"jaccard": inter / union if union else 1.0, "kept_of_b": inter / nb if nb else 1.0}


# ---------------------------------------------------------------------------- the delay


@dataclass(frozen=True)
class GrokkingDelay:
    """When a run memorized and generalized (first logged steps over the shared thresholds).

    Attributes:
        memorized: first step with train accuracy ≥ ``MEMORIZED_ACC`` (None: never).
        generalized: first step with test accuracy ≥ ``GENERALIZED_ACC`` (None: never).
        delay: ``generalized − memorized`` (None when either is None; negative when test accuracy
            passed 0.95 before every training example was fitted).
        last_step: the last logged step (the budget a None refers to).
    """

    memorized: int | None
    generalized: int | None
    delay: int | None
    last_step: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"memorized": self.memorized, "generalized": self.generalized, "delay": self.delay,
                "last_step": self.last_step}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrokkingDelay:
        return cls(d["memorized"], d["generalized"], d["delay"], d.get("last_step"))


def grokking_delay(run: Run | str | Path | list[dict[str, Any]]) -> GrokkingDelay:
    """``GrokkingDelay`` of a run (or of its ``history()`` rows).

    >>> h = [{"step": 0, "train_acc": 0.1, "test_acc": 0.0}, {"step": 100, "train_acc": 1.0, "test_acc": 0.3},
    ...      {"step": 900, "train_acc": 1.0, "test_acc": 0.96}]
    >>> grokking_delay(h)
    GrokkingDelay(memorized=100, generalized=900, delay=800, last_step=900)
    """
    hist = run if isinstance(run, list) else _as_run(run).history()
    mem, gen = first_step(hist, "train_acc", MEMORIZED_ACC), first_step(hist, "test_acc", GENERALIZED_ACC)
    return GrokkingDelay(mem, gen, None if mem is None or gen is None else gen - mem,
                         int(hist[-1]["step"]) if hist else None)


def _as_run(run: Run | str | Path) -> Run:
    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return Run(run)
    raise TypeError(f"run must be a mg.Run or a run folder path, got {type(run).__name__}")


# ---------------------------------------------------------------------------- one ticket


def _steps_text(steps: list[int]) -> str:
    """``steps`` for a message: all of them, or the first six and the last three."""
    if len(steps) <= 12:
        return str(steps)
    return f"[{', '.join(map(str, steps[:6]))}, ..., {', '.join(map(str, steps[-3:]))}]"


def _source_step(run: Run, step: int | None) -> int:
    """``step`` checked against the run's checkpoints; by default the last, which must be generalized."""
    steps = run.steps()
    if len(steps) < 2:
        raise ValueError(f"{run.path} has checkpoints {steps}; a ticket needs the initial weights (step 0) and a "
                         "trained checkpoint to take the mask from")
    if step is not None:
        step = check_int(step, "step", low=0, owner="ticket")
        if step not in steps:
            raise ValueError(f"{run.path} has no checkpoint at step {step}; available: {_steps_text(steps)}")
        return step
    last = steps[-1]
    acc = {r["step"]: r.get("test_acc") for r in run.history()}.get(last)
    if not isinstance(acc, (int, float)) or not acc >= GENERALIZED_ACC:
        raise ValueError(f"{run.path}'s last checkpoint (step {last}) has test accuracy {acc}, below "
                         f"{GENERALIZED_ACC} (GENERALIZED_ACC), so it is no generalized solution to take a grokking "
                         f"ticket from: train the run longer, or pass step= (one of {_steps_text(steps)}) to take the "
                         "mask at another checkpoint on purpose (e.g. the memorization control)")
    return last


def ticket(run: Run | str | Path, sparsity: float, *, step: int | None = None, kind: str = "ticket",
           match_norm: str | None = None, scope: str = "global", params: Sequence[str] | None = None,
           out: str | Path | None = None, config: TrainConfig | None = None, seed: int = 0,
           progress: bool = True) -> Run:
    """Train a grokking ticket of ``run`` (or one of its controls) and return the new run.

    Args:
        run: the source run (its step-0 checkpoint is ``θ₀``).
        sparsity: fraction of weights pruned, in ``[0, 1)`` (for ``kind="dense"`` it only sets the
            norm to match).
        step: checkpoint the mask is taken from (default: the last, which must have test accuracy
            ≥ 0.95; pass the memorization or transition step for the paper's controls).
        kind: ``"ticket"`` (``m ⊙ θ₀``), ``"random"`` (a ``random_mask`` like ``m``, seeded by ``seed``)
            or ``"dense"`` (``θ₀`` unmasked).
        match_norm: only with ``kind="dense"``: ``"l1"`` / ``"l2"`` rescale the pruned parameters of
            ``θ₀`` by ``norm_ratio`` so the start has the ticket's norm; None leaves ``θ₀`` as it is.
        scope, params: as in ``magnitude_mask``.
        out: the new run folder (None: a temporary one). An existing folder with the same config and
            masks resumes; one with other settings is refused by ``mg.train`` (nothing is overwritten).
        config: training settings (default: the source run's ``TrainConfig``).
        seed: the random mask's seed (``kind="random"``).
        progress: show the training progress bar.

    Returns:
        The trained ``Run``. Its ``config.json["masks"]["meta"]`` records ``source_run`` (absolute
        path), ``source_run_relative`` (from the new folder), ``source_step``, ``sparsity``, ``kind``,
        ``scope``, ``match_norm``, ``norm_scale``, ``seed`` and the source's memorization and
        generalization steps. A dense run trains with an all-ones mask (which changes nothing,
        bitwise) so that it carries the same record.
    """
    run = _as_run(run)
    sparsity = _sparsity(sparsity)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if match_norm is not None and (kind != "dense" or match_norm not in MATCH_NORMS):
        raise ValueError(f"match_norm={match_norm!r}: it must be one of {MATCH_NORMS} and is only for kind='dense' "
                         f"(a dense start with the ticket's L1 or L2 norm); got kind={kind!r}")
    scope = _scope(scope)
    seed = check_int(seed, "seed", low=0, high=2**63 - 1, owner="ticket")
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or None (the source run's), got {type(config).__name__}")
    src_step = _source_step(run, step)
    cfg = TrainConfig.from_dict(run.config["train"]) if config is None else config
    task = run.task()
    init = run.load_model(0)
    mask = magnitude_mask(run.load_model(src_step), sparsity, params=params, scope=scope)
    scale = None
    if kind == "random":
        mask = random_mask(init, mask, seed=seed)
    elif kind == "dense":
        if match_norm is not None:
            scale = norm_ratio(init, mask, match_norm)
            named = dict(init.named_parameters())
            with torch.no_grad():
                for n in mask:
                    named[n].mul_(scale)
        mask = {n: torch.ones_like(m) for n, m in mask.items()}
    src = grokking_delay(run)
    meta = {"method": "mechgrok.tickets", "source_run": str(run.path.resolve()), "source_step": src_step,
            "sparsity": None if kind == "dense" and match_norm is None else sparsity, "kind": kind, "scope": scope,
            "match_norm": match_norm, "norm_scale": scale,
            "seed": seed if kind == "random" else None, "source_memorized": src.memorized,
            "source_generalized": src.generalized}
    if out is not None:
        meta["source_run_relative"] = os.path.relpath(run.path.resolve(), Path(out).resolve())
    return train(init, task, cfg, out=out, progress=progress, masks=mask, masks_meta=meta)


def ticket_source(run: Run) -> Run | None:
    """The source run of a ticket run (``ticket``'s record), or None when it is not one or its folder
    cannot be read from here (tried relative to the ticket's folder first, then the absolute path)."""
    meta = (run.config.get("masks") or {}).get("meta") or {}
    for cand in (meta.get("source_run_relative"), meta.get("source_run")):
        if not isinstance(cand, str):
            continue
        path = (run.path / cand) if not os.path.isabs(cand) else Path(cand)
        try:
            return Run(path.resolve())
        except (FileNotFoundError, OSError, ValueError):
            continue
    return None


# ---------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class TicketPoint:
    """One trained condition of a ``ticket_sweep``.

    Attributes:
        kind: one of ``SWEEP_KINDS``.
        sparsity: fraction pruned (None for ``dense``, which has no mask).
        mask_step: checkpoint of the source the mask came from (None for ``dense``).
        seed: the random mask's seed (None unless ``random``).
        run: the run folder, relative to the sweep folder (``"<source>"`` for a dense row read off the
            source run itself).
        memorized, generalized, delay: its ``GrokkingDelay``.
        final_test_acc, max_test_acc: test accuracy at the last logged step and its maximum.
    """

    kind: str
    sparsity: float | None
    mask_step: int | None
    seed: int | None
    run: str
    memorized: int | None
    generalized: int | None
    delay: int | None
    final_test_acc: float | None
    max_test_acc: float | None


@dataclass(frozen=True)
class TicketSweep:
    """The result of ``ticket_sweep``: the source, its own delay, and one ``TicketPoint`` per condition."""

    source: str
    source_step: int
    scope: str
    steps: int  # the training budget of every point
    source_delay: GrokkingDelay
    points: tuple[TicketPoint, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_step": self.source_step, "scope": self.scope, "steps": self.steps,
                "source_delay": self.source_delay.to_dict(), "points": [vars(p).copy() for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TicketSweep:
        return cls(d["source"], d["source_step"], d["scope"], d["steps"], GrokkingDelay.from_dict(d["source_delay"]),
                   tuple(TicketPoint(**p) for p in d["points"]))

    def generalized(self, kind: str, sparsity: float | None = None, mask_step: int | None = None) -> list[int | None]:
        """Generalization steps of the points of ``kind`` (at ``sparsity`` / ``mask_step`` when given)."""
        return [p.generalized for p in self.points if p.kind == kind
                and (sparsity is None or p.sparsity == sparsity) and (mask_step is None or p.mask_step == mask_step)]


def _point_name(kind: str, sparsity: float | None, step: int | None, seed: int | None) -> str:
    if kind == "dense":
        return "dense"
    return f"{kind}_s{sparsity:g}_step{step}" + (f"_seed{seed}" if seed is not None else "")


def _summary(kind: str, sparsity: float | None, step: int | None, seed: int | None, folder: Path,
             name: str) -> TicketPoint:
    r = Run(folder)
    d = grokking_delay(r)
    accs = [row["test_acc"] for row in r.history() if isinstance(row.get("test_acc"), (int, float))]
    return TicketPoint(kind, sparsity, step, seed, name, d.memorized, d.generalized, d.delay,
                       accs[-1] if accs else None, max(accs) if accs else None)


def _train_point(source: str, kind: str, sparsity: float, step: int, seed: int, scope: str,
                 params: list[str] | None, config: dict[str, Any] | None, folder: str, name: str) -> TicketPoint:
    """One sweep point (module level, so that spawned workers can run it)."""
    base, norm = (kind[:5], kind[6:]) if kind.startswith("dense_") else (kind, None)
    ticket(source, sparsity, step=step, kind=base, match_norm=norm, scope=scope, params=params, out=folder,
           config=None if config is None else TrainConfig.from_dict(config), seed=seed, progress=False)
    return _summary(kind, None if kind == "dense" else sparsity, None if kind == "dense" else step,
                    seed if kind == "random" else None, Path(folder), name)


def ticket_sweep(run: Run | str | Path, sparsities: Sequence[float], *, kinds: Sequence[str] = SWEEP_KINDS,
                 out: str | Path, seeds: Sequence[int] = (0,), step: int | None = None, scope: str = "global",
                 params: Sequence[str] | None = None, config: TrainConfig | None = None, workers: int = 1,
                 progress: bool = True) -> TicketSweep:
    """Tickets and their controls of ``run`` at every sparsity: one run folder each under ``out``.

    Args:
        run: the source run.
        sparsities: fractions pruned, each in ``[0, 1)``.
        kinds: from ``SWEEP_KINDS``. ``random`` trains once per seed in ``seeds``; ``dense`` once in
            all (with the source's own config it is the source run itself, read back, not retrained).
        out: the sweep folder; points are ``out/ticket_s0.5_step1500``, ``out/random_s0.5_step1500_seed0``,
            ``out/dense_l2_s0.5_step1500``, ``out/dense``. A finished folder is read back; one holding
            other settings is refused by ``mg.train``.
        seeds: random-mask seeds.
        step: the checkpoint masks come from (default: the last, generalized, one).
        scope, params, config: as in ``ticket``.
        workers: processes (spawned, one torch thread each); 1 trains here. A script using
            ``workers > 1`` needs ``if __name__ == "__main__":``.
        progress: a progress bar over the points.

    Returns:
        a ``TicketSweep``; ``.generalized("ticket", 0.5)`` lists generalization steps.
    """
    from tqdm.auto import tqdm

    run = _as_run(run)
    sparsities = [_sparsity(s, "sparsities") for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities is empty; give at least one fraction in [0, 1), e.g. [0.3, 0.5, 0.7]")
    bad = [k for k in kinds if k not in SWEEP_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty list from {SWEEP_KINDS}, got {list(kinds)}")
    seeds = [check_int(s, "seeds", low=0, owner="ticket_sweep") for s in seeds]
    workers = check_int(workers, "workers", low=1, owner="ticket_sweep")
    scope = _scope(scope)
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    src_step = _source_step(run, step)
    own = TrainConfig.from_dict(run.config["train"])
    cfg = own if config is None else config
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} is a run folder; choose another folder for the sweep")
    todo, points = [], {}
    for kind in dict.fromkeys(kinds):
        if kind == "dense" and cfg.to_dict() == own.to_dict():
            points["dense"] = _summary("dense", None, None, None, run.path, "<source>")
            continue
        for s in [sparsities[0]] if kind == "dense" else sparsities:
            for seed in seeds if kind == "random" else [0]:
                name = _point_name(kind, s, src_step, seed if kind == "random" else None)
                if name not in points:
                    points[name] = None
                    todo.append((kind, s, seed, name))
    out.mkdir(parents=True, exist_ok=True)
    args = [(str(run.path), kind, s, src_step, seed, scope, None if params is None else list(params),
             None if config is None else config.to_dict(), str(child_path(out, name, what="sweep point")), name)
            for kind, s, seed, name in todo]
    bar = tqdm(total=len(args), desc=f"tickets of {run.name}", disable=not progress, unit="run")
    if workers == 1 or len(args) <= 1:
        for a in args:
            points[a[-1]] = _train_point(*a)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train_point, *a): a[-1] for a in args}
            try:
                for fut in as_completed(futures):
                    points[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    bar.close()
    return TicketSweep(str(run.path), src_step, scope, cfg.steps, grokking_delay(run), tuple(points.values()))
