"""Local complexity of a ReLU network's spline partition (Humayun, Balestriero and Baraniuk 2024, "Deep
Networks Always Grok and Here is Why", ICML 2024).

A ReLU network is a continuous piecewise-affine function of its input: every neuron's pre-activation
``z = w·h + b`` is zero on a hyperplane (of the input, for the first layer; of the layer's own input
``h`` for later ones) and the hyperplanes cut the input space into linear regions. The **local
complexity** (LC) of a point ``x`` counts the neurons whose hyperplane passes through a small
neighbourhood of ``x``, a measure of how many region boundaries lie near it:

- the neighbourhood is a cross-polytope of radius ``r``: ``V(x) = {x ± r v_k : k = 1..P}`` for ``P``
  orthonormal directions ``v_k`` (a random frame per point, or one given frame);
- the ``2P`` vertices go through the network; a neuron ``i`` of ReLU layer ``l`` counts when its
  pre-activation takes both signs among the vertices, ``max_v z_{l,i}(v) > 0 > min_v z_{l,i}(v)``;
- ``LC_l(x) = #{i : neuron i of layer l counts}`` and ``LC(x) = Σ_l LC_l(x)``.

For the first layer this is exact: an affine function takes both signs on a convex polytope iff it
does on its vertices, so ``LC_1(x)`` is the number of first-layer hyperplanes that cut the interior of
``conv V(x)``. Between the ball of radius ``r/√P`` (inscribed) and of radius ``r`` (circumscribed),
whether a hyperplane counts depends on the frame. A point on a hyperplane always counts it (unless the
hyperplane's normal is orthogonal to every ``v_k``); as ``r → 0`` a point off every hyperplane has
``LC = 0``.

- ``local_complexity(model, points, radius)``: ``LocalComplexity``, counts ``[n_points, n_layers]``.
- ``boundary_points(model, points)``: points on the decision boundary (``BoundaryPoints``).
- ``local_complexity_over_training(run, radius=...)``: mean LC at training points, test points and
  boundary points on every checkpoint, beside train/test accuracy (``LocalComplexityOverTraining``).

The paper's claim: late in training, around grokking, the linear regions migrate away from the
training data (LC at training and test points falls) and concentrate around the decision boundary.

Limits:

- Only ReLU MLPs on a continuous input: ``HookedMLP`` with ``act="relu"`` (its input is the one-hot
  view ``Task.onehot()``, ``[N, 2p]``) or an ``nn.Sequential`` of ``Linear`` / ``ReLU`` (and
  ``Flatten`` / ``Identity`` / ``Dropout``, identity in eval mode). A transformer (attention's
  softmax, token embedding of a discrete input), x² or GELU networks have no such partition and are
  refused; nothing here works in a transformer's embedding space.
- For layers after the first, the vertices' images are not the image of the polytope (which bends at
  the first layer's hyperplanes); counting sign changes among the vertices' pre-activations is the
  paper's approximation: it can miss a hyperplane that cuts the bent image between vertices.
- LC depends on ``r`` and ``P``: compare values only at the same ``(radius, n_directions)``. With one-hot
  inputs two examples that differ in one operand lie ``√2`` apart; inputs between them are off the
  data manifold, which is what "near the decision boundary" probes.
- A frame of ``P < d_in`` directions probes a random ``P``-dimensional slice; the count is a random
  variable (seeded) whose mean over points is what the paper plots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._config import check_float, check_int
from mechgrok._threads import torch_threads
from mechgrok.measures.relu import _check_frame, _check_points, _ReluNet, relu_layers
from mechgrok.run import Run
from mechgrok.tasks import SequenceTask

__all__ = ["LocalComplexity", "local_complexity", "BoundaryPoints", "boundary_points",
           "LocalComplexityOverTraining", "local_complexity_over_training", "relu_layers", "LC_FORMAT",
           "LC_SETS", "DEFAULT_DIRECTIONS"]

LC_FORMAT = "mechgrok.local_complexity/1"
#: The point sets ``local_complexity_over_training`` measures.
LC_SETS = ("train", "test", "boundary")
#: ``n_directions`` when none is given: ``min(d_in, DEFAULT_DIRECTIONS)`` (mechgrok's choice).
DEFAULT_DIRECTIONS = 25


# ---------------------------------------------------------------------------- local complexity


@dataclass(frozen=True)
class LocalComplexity:
    """Per-point, per-layer local complexity (``local_complexity``).

    Attributes:
        counts: ``[n_points, n_layers]`` int64, the neurons of each ReLU layer whose pre-activation
            changes sign among the point's ``2P`` neighbourhood vertices.
        layers: the ReLU layers' names (``"blocks.0.mlp.hook_pre"`` for a ``HookedMLP``; module paths
            of the ``nn.ReLU`` modules for an ``nn.Sequential``).
        widths: neurons per layer (the most each column can count).
        radius: ``r``; n_directions: ``P``; seed: the frames' seed (``None``: one given frame).
    """

    counts: Int[Tensor, "n_points n_layers"]
    layers: tuple[str, ...]
    widths: tuple[int, ...]
    radius: float
    n_directions: int
    seed: int | None

    @property
    def total(self) -> Int[Tensor, " n_points"]:
        """``LC(x) = Σ_l LC_l(x)`` per point."""
        return self.counts.sum(1)

    def mean(self) -> float:
        """Mean total LC over the points (NaN for no points)."""
        return float(self.total.double().mean()) if len(self.counts) else float("nan")

    def mean_per_layer(self) -> tuple[float, ...]:
        """Mean LC of each layer over the points (NaN for no points)."""
        if not len(self.counts):
            return tuple(float("nan") for _ in self.layers)
        return tuple(float(v) for v in self.counts.double().mean(0))

    def to_dict(self) -> dict[str, Any]:
        return {"format": LC_FORMAT, "counts": self.counts.tolist(), "layers": list(self.layers),
                "widths": list(self.widths), "radius": self.radius, "n_directions": self.n_directions,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LocalComplexity:
        if d.get("format") != LC_FORMAT:
            raise ValueError(f"not a local-complexity result: format {d.get('format')!r}, expected {LC_FORMAT!r}")
        counts = torch.tensor(d["counts"], dtype=torch.int64).reshape(-1, len(d["layers"]))
        return cls(counts, tuple(d["layers"]), tuple(d["widths"]), float(d["radius"]), int(d["n_directions"]),
                   d["seed"])


def _frames(n: int, d: int, P: int, g: torch.Generator) -> Float[Tensor, "n P d"]:
    """``n`` random orthonormal frames of ``P`` directions in ``R^d`` (QR of Gaussians, float64)."""
    gauss = torch.empty(n, d, P, dtype=torch.float64)
    for i in range(n):  # one draw per point: the frames do not depend on batch_size
        gauss[i] = torch.randn(d, P, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(gauss).Q  # [n, d, P], orthonormal columns
    return q.transpose(1, 2)  # [n, P, d]


@torch.no_grad()
def _counts(net: _ReluNet, x: Tensor, frames: Tensor, radius: float) -> Tensor:
    """``[b, n_layers]`` counts for points ``x [b, d]`` and frames ``[b, P, d]`` (or ``[P, d]``, shared)."""
    b, P = len(x), frames.shape[-2]
    frames = frames.expand(b, P, x.shape[1]).to(x.device, x.dtype)  # [b, P, d]
    offsets = torch.cat([frames, -frames], dim=1) * radius  # [b, 2P, d]: the cross-polytope's vertices - x
    verts = (x[:, None, :] + offsets).reshape(b * 2 * P, -1)  # [b*2P, d]
    pres, _ = net.run(verts)
    cols = []
    for pre in pres:
        pre = pre.reshape(b, 2 * P, -1)  # [b, 2P, width]
        cols.append(((pre > 0).any(1) & (pre < 0).any(1)).sum(-1))  # [b]
    return torch.stack(cols, dim=1).cpu()  # [b, n_layers]


def local_complexity(model: nn.Module, points: Float[Tensor, "n_points d_in"], radius: float, *,
                     n_directions: int | None = None, directions: Float[Tensor, "P d_in"] | None = None,
                     seed: int = 0, batch_size: int = 256, progress: bool = False) -> LocalComplexity:
    """Local complexity of ``points`` (Humayun et al. 2024; the definition is in the module docstring).

    Args:
        model: a ReLU MLP: ``HookedMLP`` with ``act="relu"``, or an ``nn.Sequential`` of ``Linear`` /
            ``ReLU`` (evaluated as it is: put it in eval mode if it has ``Dropout``). Left unchanged.
        points: ``[n_points, d_in]`` float inputs (for a ``HookedMLP``: rows of ``task.onehot()`` or any
            point of ``R^{2p}``).
        radius: ``r > 0``, the distance of each vertex from its point.
        n_directions: ``P``, directions per frame, ``1 <= P <= d_in`` (default
            ``min(d_in, DEFAULT_DIRECTIONS)``); a fresh random orthonormal frame per point.
        directions: instead, one orthonormal frame ``[P, d_in]`` for every point (e.g. the axes).
        seed: seeds the random frames (a local generator); point ``i`` gets the same frame for the same
            seed whatever ``batch_size``.
        batch_size: points per forward pass (``batch_size * 2P`` vertices at once).
        progress: a tqdm bar over batches.

    Returns:
        ``LocalComplexity`` with counts ``[n_points, n_layers]``. Cost: one forward pass over
        ``2P`` vertices per point (``2P`` times a forward over the points) plus a QR per point.

    >>> lin = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.eye(2)); _ = lin.bias.zero_()  # hyperplanes x = 0 and y = 0
    >>> lc = local_complexity(nn.Sequential(lin, nn.ReLU()), torch.tensor([[0.0, 1.0], [1.0, 1.0]]), 0.1)
    >>> lc.counts.tolist()  # the first point lies on x = 0; the second is 1 away from both
    [[1], [0]]
    """
    owner = "local_complexity"
    net = relu_layers(model, owner)
    x = _check_points(points, net, owner)
    radius = check_float(radius, "radius", low=0, low_open=True, owner=owner)
    batch_size = check_int(batch_size, "batch_size", low=1, owner=owner)
    if directions is not None:
        if n_directions is not None:
            raise ValueError(f"{owner}: pass n_directions (random frames) or directions (one given frame), not both")
        frame = _check_frame(directions, net.d_in, owner)
        P, seed = frame.shape[0], None
    else:
        P = min(net.d_in, DEFAULT_DIRECTIONS) if n_directions is None else check_int(
            n_directions, "n_directions", low=1, high=net.d_in, owner=owner)
        seed = check_int(seed, "seed", low=0, owner=owner)
        g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(x), batch_size), desc="local complexity", unit="batch", disable=not progress):
            xb = x[start:start + batch_size]  # [b, d]
            fb = frame if directions is not None else _frames(len(xb), net.d_in, P, g)
            out.append(_counts(net, xb, fb, radius))
    finally:
        model.train(was_training)
    counts = torch.cat(out) if out else torch.zeros(0, len(net.layers), dtype=torch.int64)
    return LocalComplexity(counts.to(torch.int64), net.layers, net.widths, radius, P, seed)


# ---------------------------------------------------------------------------- decision-boundary points


@dataclass(frozen=True)
class BoundaryPoints:
    """Points on the decision boundary (``boundary_points``).

    Attributes:
        points: ``[m, d_in]``, one per pair whose ends are predicted differently (``m <= n``).
        pairs: ``[m, 2]`` indices ``(i, j)`` into the given points.
        t: ``[m]``, where on the segment ``x_i + t (x_j - x_i)`` each lies.
        margin: ``[m]``, ``z_c - max_{k≠c} z_k`` there (``c``: the class predicted at ``x_i``); ``≈ 0``.
    """

    points: Float[Tensor, "m d_in"]
    pairs: Int[Tensor, "m 2"]
    t: Float[Tensor, " m"]
    margin: Float[Tensor, " m"]


def _margin(logits: Tensor, c: Tensor) -> Tensor:
    own = logits.gather(1, c[:, None]).squeeze(1)  # [m]
    other = logits.scatter(1, c[:, None], float("-inf")).max(1).values  # [m]
    return own - other


@torch.no_grad()
def boundary_points(model: nn.Module, points: Float[Tensor, "n_points d_in"], *, n: int = 256,
                    pairs: Int[Tensor, "k 2"] | None = None, seed: int = 0, bisections: int = 30) -> BoundaryPoints:
    """Points on the decision boundary between pairs of ``points`` predicted as different classes.

    For a pair ``(x_i, x_j)`` with predicted classes ``c_i ≠ c_j``, the margin
    ``f(t) = z_{c_i} - max_{k≠c_i} z_k`` at ``x_i + t (x_j - x_i)`` is continuous, ``≥ 0`` at ``t = 0``
    and ``< 0`` at ``t = 1``; bisection finds a ``t`` with ``f(t) ≈ 0``: a point where the prediction
    leaves ``c_i`` (not necessarily the first such point on the segment). mechgrok's definition of
    "near the decision boundary" for Humayun et al.'s claim (the paper shows 2-D slices instead).

    Args:
        model: a ReLU MLP (``relu_layers``); points: ``[n_points, d_in]`` float inputs.
        n: candidate pairs, drawn uniformly (``i ≠ j``) with ``seed``; only pairs whose ends are
            predicted differently give a point, so fewer than ``n`` may come back (none for a model
            that predicts one class everywhere). Ignored when ``pairs`` is given.
        pairs: ``[k, 2]`` index pairs to use instead (e.g. the same pairs on every checkpoint).
        bisections: halvings of ``[0, 1]`` (``t`` to within ``2^-bisections``).
    """
    owner = "boundary_points"
    net = relu_layers(model, owner)
    x = _check_points(points, net, owner)
    bisections = check_int(bisections, "bisections", low=1, high=60, owner=owner)
    if pairs is None:
        n = check_int(n, "n", low=1, owner=owner)
        if len(x) < 2:
            raise ValueError(f"{owner}: need at least 2 points to form pairs, got {len(x)}")
        pairs = _draw_pairs(len(x), n, check_int(seed, "seed", low=0, owner=owner))
    elif not isinstance(pairs, Tensor) or pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.is_floating_point() \
            or (len(pairs) and (int(pairs.min()) < 0 or int(pairs.max()) >= len(x))):
        raise ValueError(f"{owner}: pairs must be an integer tensor [k, 2] of indices into the {len(x)} points")
    was_training = model.training
    model.eval()
    try:
        pred = net.run(x)[1].argmax(-1).cpu()  # [n_points]
        pairs = pairs[pred[pairs[:, 0]] != pred[pairs[:, 1]]].long()  # [m, 2]
        a, b = x[pairs[:, 0].to(x.device)], x[pairs[:, 1].to(x.device)]  # [m, d] each
        c = pred[pairs[:, 0]].to(x.device)  # [m]
        lo = torch.zeros(len(pairs), 1, dtype=x.dtype, device=x.device)  # [m, 1]: f(lo) >= 0
        hi = torch.ones_like(lo)  # f(hi) < 0
        for _ in range(bisections):
            mid = (lo + hi) / 2
            inside = _margin(net.run(a + mid * (b - a))[1], c)[:, None] >= 0  # [m, 1]
            lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
        t = (lo + hi) / 2
        on = a + t * (b - a)  # [m, d]
        margin = _margin(net.run(on)[1], c)
    finally:
        model.train(was_training)
    return BoundaryPoints(on, pairs, t.squeeze(1).cpu(), margin.cpu())


def _draw_pairs(n_points: int, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(n_points, (n,), generator=g)
    j = (i + torch.randint(1, n_points, (n,), generator=g)) % n_points  # j != i
    return torch.stack([i, j], 1)  # [n, 2]


# ---------------------------------------------------------------------------- over training


@dataclass(frozen=True)
class LocalComplexityOverTraining:
    """Local complexity at training, test and decision-boundary points on the checkpoints of a run.

    Attributes:
        run: the run folder; steps: checkpoint steps, ascending.
        radius, n_directions, seed: the neighbourhoods' settings (the same frames on every checkpoint
            for the training and test points).
        layers: the ReLU layers' names; widths: their sizes.
        n_points: ``{set: (count per step)}`` for ``LC_SETS`` (the boundary count varies: pairs predicted
            alike give no point).
        mean: ``{set: (mean total LC per step)}``; NaN where a set has no points.
        std: ``{set: (standard deviation of the total LC over the points, per step)}``.
        per_layer: ``{set: ((mean LC of each layer) per step)}``, shape ``[n_steps][n_layers]``.
        train_acc, test_acc: accuracies per step (test: against the true labels).
    """

    run: str
    steps: tuple[int, ...]
    radius: float
    n_directions: int
    seed: int
    layers: tuple[str, ...]
    widths: tuple[int, ...]
    n_points: dict[str, tuple[int, ...]]
    mean: dict[str, tuple[float, ...]]
    std: dict[str, tuple[float, ...]]
    per_layer: dict[str, tuple[tuple[float, ...], ...]]
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    format: str = field(default=LC_FORMAT + "/over_training")

    def columns(self) -> dict[str, list]:
        """Progress-measure columns, one value per step: ``step``, ``lc_train``, ``lc_test``,
        ``lc_boundary`` (mean total LC; NaN where a set is empty), ``train_acc``, ``test_acc``."""
        return {"step": list(self.steps), **{f"lc_{s}": list(self.mean[s]) for s in LC_SETS},
                "train_acc": list(self.train_acc), "test_acc": list(self.test_acc)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``None``)."""
        def f(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"format": self.format, "run": self.run, "steps": list(self.steps), "radius": self.radius,
                "n_directions": self.n_directions, "seed": self.seed, "layers": list(self.layers),
                "widths": list(self.widths), "n_points": {s: list(v) for s, v in self.n_points.items()},
                "mean": {s: [f(x) for x in v] for s, v in self.mean.items()},
                "std": {s: [f(x) for x in v] for s, v in self.std.items()},
                "per_layer": {s: [[f(x) for x in row] for row in v] for s, v in self.per_layer.items()},
                "train_acc": [f(x) for x in self.train_acc], "test_acc": [f(x) for x in self.test_acc]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LocalComplexityOverTraining:
        if d.get("format") != LC_FORMAT + "/over_training":
            raise ValueError(f"not a local-complexity-over-training result: format {d.get('format')!r}, expected "
                             f"{LC_FORMAT + '/over_training'!r}")

        def f(v):
            return float("nan") if v is None else float(v)
        return cls(run=d["run"], steps=tuple(d["steps"]), radius=float(d["radius"]),
                   n_directions=int(d["n_directions"]), seed=int(d["seed"]), layers=tuple(d["layers"]),
                   widths=tuple(d["widths"]), n_points={s: tuple(v) for s, v in d["n_points"].items()},
                   mean={s: tuple(f(x) for x in v) for s, v in d["mean"].items()},
                   std={s: tuple(f(x) for x in v) for s, v in d["std"].items()},
                   per_layer={s: tuple(tuple(f(x) for x in row) for row in v) for s, v in d["per_layer"].items()},
                   train_acc=tuple(f(x) for x in d["train_acc"]), test_acc=tuple(f(x) for x in d["test_acc"]))


def _subset(mask: Tensor, n: int, g: torch.Generator) -> Tensor:
    idx = mask.nonzero().squeeze(1)  # [k]
    return idx[torch.randperm(len(idx), generator=g)[:n]].sort().values if len(idx) > n else idx


def local_complexity_over_training(run: Run | str, steps: Iterable[int] | None = None, *, radius: float,
                                   n_directions: int | None = None, n_points: int = 256, n_boundary: int = 256,
                                   seed: int = 0, progress: bool = True, threads: int | None = 1
                                   ) -> LocalComplexityOverTraining:
    """``local_complexity`` at training, test and decision-boundary points on the checkpoints of ``run``.

    Args:
        run: a ``Run`` (or folder) of a ReLU ``HookedMLP`` (``mg.models.mlp(task, act="relu")``).
        steps: checkpoint steps (default: all).
        radius, n_directions: the neighbourhood (``local_complexity``).
        n_points: training and test points each (a seeded random subset when a split is larger; the
            same points and frames on every checkpoint).
        n_boundary: candidate pairs for ``boundary_points``, drawn once from all examples (train ∪
            test) and reused on every checkpoint; the boundary points move with the model.
        seed: seeds the subsets, the pairs and the frames.
        progress: a tqdm bar over checkpoints; threads: torch threads meanwhile (restored afterwards).

    Returns:
        ``LocalComplexityOverTraining``. Per checkpoint: one model load, one forward over every example
        (accuracies, predictions), ``bisections + 2`` forwards over the pairs, and
        ``local_complexity`` on ``2 n_points + m`` points (``2P`` vertices each).
    """
    owner = "local_complexity_over_training"
    run = run if isinstance(run, Run) else Run(run)
    wanted = run.select_steps(steps, owner=owner)
    n_points = check_int(n_points, "n_points", low=1, owner=owner)
    n_boundary = check_int(n_boundary, "n_boundary", low=1, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    task = run.task()
    if isinstance(task, SequenceTask):
        raise TypeError(f"{owner}: {run.path} trains a SequenceTask; local complexity needs a ReLU MLP on a Task")
    relu_layers(run.load_model(wanted[0]), owner)  # refuses a transformer or a non-ReLU MLP before any work
    onehot = task.onehot()  # [N, 2p]
    g = torch.Generator().manual_seed(seed)
    idx = {"train": _subset(task.train, n_points, g), "test": _subset(task.test, n_points, g)}
    pairs = _draw_pairs(len(task.inputs), n_boundary, seed + 1)
    set_seed = {"train": seed, "test": seed + 1, "boundary": seed + 2}
    cols: dict[str, dict[str, list]] = {k: {s: [] for s in LC_SETS} for k in ("n", "mean", "std", "layer")}
    acc: dict[str, list[float]] = {"train": [], "test": []}
    meta = None
    with torch_threads(threads):
        for step in tqdm(wanted, desc=f"local complexity {run.name}", unit="ckpt", disable=not progress):
            model = run.load_model(step)
            model.eval()
            with torch.no_grad():
                logits = models.final_logits(model, task.inputs.to(models.device_of(model))).cpu()  # [N, d_out]
            for split, labels in (("train", task.labels), ("test", task.true_labels)):
                m = task.mask(split)
                acc[split].append(float((logits[m].argmax(-1) == labels[m]).double().mean()) if bool(m.any())
                                  else float("nan"))
            sets = {"train": onehot[idx["train"]], "test": onehot[idx["test"]],
                    "boundary": boundary_points(model, onehot, pairs=pairs).points}
            for s in LC_SETS:
                lc = local_complexity(model, sets[s], radius, n_directions=n_directions, seed=set_seed[s])
                meta = lc
                total = lc.total.double()
                cols["n"][s].append(len(total))
                cols["mean"][s].append(lc.mean())
                cols["std"][s].append(float(total.std(correction=0)) if len(total) else float("nan"))
                cols["layer"][s].append(lc.mean_per_layer())
    return LocalComplexityOverTraining(
        run=str(run.path), steps=tuple(wanted), radius=meta.radius, n_directions=meta.n_directions, seed=seed,
        layers=meta.layers, widths=meta.widths, n_points={s: tuple(v) for s, v in cols["n"].items()},
        mean={s: tuple(v) for s, v in cols["mean"].items()}, std={s: tuple(v) for s, v in cols["std"].items()},
        per_layer={s: tuple(v) for s, v in cols["layer"].items()}, train_acc=tuple(acc["train"]),
        test_acc=tuple(acc["test"]))
