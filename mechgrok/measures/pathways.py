"""Expert pathways of a mixture-of-experts transformer and how they change over training (Li, Fan and Zhou
2025, "Where to find Grokking in LLM Pretraining? Monitor Memorization-to-Generalization without Test",
arXiv 2506.21551).

In an MoE model every block's router sends each token to its top-``k`` experts. The paper calls the
experts an example visits, layer after layer, its **pathway**, and watches two properties of the
pathways of *training* examples over the checkpoints of OLMoE's pretraining. Its claim: while test
accuracy still rises after the training loss has converged, pathways go from random and
instance-specific to structured and shared between examples, and a single example's pathway gets
smoother from layer to layer. Both metrics need only training data and one forward pass, so they
monitor generalization "without test". Here, for an example ``x`` and the MoE blocks ``l = 1..L``:

- **pathway** ``s(x)``: the selected experts as one integer sequence, layer-major: for each layer, for
  each chosen position ``t``, the ``k`` expert indices of ``(l, t)`` in ascending order
  (length ``L · T · k``);
- **pathway distance** ``D = mean_{(i, j)} ED(s(x_i), s(x_j))``, the Levenshtein edit distance
  (insertions, deletions and substitutions of one expert index, each costing 1) averaged over pairs of
  training examples: lower means more shared pathways;
- **pathway consistency** ``C(x) = 1/(L-1) Σ_{l<L} cos(e_l(x), e_{l+1}(x))``, where ``e_l(x)`` is the
  example's *weighted expert embedding* at layer ``l``, averaged over its chosen positions:
  ``embedding="output"`` (default) the MoE block's output ``Σ_{e ∈ top-k} w_e E_e(h_t)`` (hook
  ``blocks.l.hook_mlp_out``), ``embedding="router"`` ``Σ_{e ∈ top-k} w_e g_e`` with ``g_e`` the
  router's row for expert ``e`` (``W_gate``). Both live in the residual stream, so consecutive layers
  are comparable. Higher means a smoother, less complex pathway (the paper's "pathway complexity"
  falls as this rises). ``w_e`` are the routing weights the block used (its softmax, renormalised over
  the top-k when ``cfg.norm_topk_prob``).

- ``expert_pathways(model, data)``: ``ExpertPathways`` (indices and weights ``[N, L, T, k]``, the two
  embeddings ``[N, L, d_model]``) from one forward pass.
- ``pathway_edit_distance(a, b)``: the edit distance of two sequences (or of rows of two batches).
- ``pathway_distance(pathways, pairs)``, ``pathway_consistency(pathways)``: the two metrics.
- ``pathways_over_training(run)``: both (consistency with both embeddings) on every checkpoint, on a
  fixed seeded sample of training examples and pairs, with two controls (``usage_entropy``,
  ``edit_distance_shuffled``: Limits), train/test accuracy from ``history.jsonl`` and the Pearson and Spearman
  correlation of each metric with test accuracy over the checkpoints (``PathwaysOverTraining``).

What this follows and where it departs (I read the paper's abstract and figure caption, "pathway
similarity between samples is measured by edit distance on their sequences of expert choices across
layers; pathway consistency quantifies the smoothness of expert transitions between subsequent layers
for the same sample by cosine similarity of their weighted expert embeddings", not its code, which is
not public):

- the order of the ``k`` experts inside a layer is taken ascending (a set), and experts are integer
  symbols rather than a comma-separated string of digits (so expert 12 is one symbol, not two);
- which vector "weighted expert embedding" means is not fixed by that text: mechgrok offers the MoE
  output (default) and the router rows, and ``pathways_over_training`` reports both; the aggregation
  over a sample's tokens is a mean;
- pairs are drawn uniformly from the sampled training examples (with replacement), or among examples
  with the same answer (``same_answer``, mechgrok's addition: for a modular task, examples the
  generalizing algorithm treats alike); the paper averages over its training samples;
- the paper correlates the metrics with benchmark accuracy after instruction tuning; here test
  accuracy is the run's own held-out split, read from its history (never used to compute the metrics).

Limits:

- Only transformer-lens MoE blocks (``mg.models.transformer(task, num_experts=E,
  experts_per_token=k)``, or converted Mixtral-style checkpoints); a dense model is refused.
- The edit distance falls whenever routing concentrates on fewer experts, for whatever reason (a
  collapsed router sends everything to one expert and every distance is 0): read it beside
  ``usage_entropy`` (how evenly experts are used) and ``edit_distance_shuffled`` (the same pairs
  after each (layer, position) slot's expert choices are shuffled across the examples: what the
  experts' usage alone gives, with no example-specific structure), which ``pathways_over_training``
  reports too (mechgrok's controls, not the paper's).
- Consistency needs at least two MoE layers (NaN with one). Positions are compared as they are: a
  pathway over all positions of a modular-arithmetic example includes the operand tokens, whose
  first-layer routing depends only on the token itself.
- Correlations over a handful of checkpoints are descriptive (no test of significance); a metric
  that moves monotonically with training time correlates with any monotone accuracy curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._config import check_int
from mechgrok._stats import average_ranks
from mechgrok._threads import torch_threads
from mechgrok.models import HookedTransformer
from mechgrok.run import Run
from mechgrok.tasks import SequenceTask, Task

__all__ = ["ExpertPathways", "expert_pathways", "moe_layers", "pathway_edit_distance", "pathway_distance",
           "pathway_consistency", "usage_entropy", "PathwaysOverTraining", "pathways_over_training",
           "PATHWAY_METRICS", "EMBEDDINGS", "PATHWAYS_FORMAT"]

PATHWAYS_FORMAT = "mechgrok.pathways/1"
#: The weighted expert embeddings ``pathway_consistency`` can compare across layers.
EMBEDDINGS = ("output", "router")
#: The per-checkpoint metrics of ``PathwaysOverTraining`` (each correlated with test accuracy).
PATHWAY_METRICS = ("edit_distance", "edit_distance_same_answer", "edit_distance_shuffled", "consistency",
                   "consistency_router", "usage_entropy")
_HOW = "build one with mg.models.transformer(task, num_experts=4, experts_per_token=1, ...)"


# ---------------------------------------------------------------------------- the pathways of examples


def moe_layers(model: nn.Module, owner: str = "expert_pathways") -> tuple[int, ...]:
    """The blocks of ``model`` whose MLP is a transformer-lens mixture of experts; a ``TypeError``
    saying how to build an MoE model when there are none."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"{owner}: expert pathways need a mixture-of-experts HookedTransformer, got a "
                        f"{type(model).__name__} (no router, no experts); {_HOW}")
    layers = tuple(i for i, b in enumerate(model.blocks) if all(
        hasattr(getattr(b, "mlp", None), a) for a in ("hook_expert_indices", "hook_expert_weights", "W_gate")))
    if not layers:
        kind = "no MLPs (attn_only)" if model.cfg.attn_only else "dense MLPs"
        raise TypeError(f"{owner}: this HookedTransformer has {kind}, no mixture-of-experts layer, so its examples "
                        f"have no expert pathways; {_HOW}")
    return layers


@dataclass(frozen=True)
class ExpertPathways:
    """The experts each example visits (``expert_pathways``).

    Attributes:
        indices: ``[N, L, T, k]`` int64, the ``k`` selected experts of each MoE layer and chosen
            position, in the router's order (highest weight first).
        weights: ``[N, L, T, k]``, their routing weights as the block used them.
        output: ``[N, L, d_model]``, the MoE block's output ``Σ_e w_e E_e(h_t)`` averaged over the
            chosen positions (the ``"output"`` embedding).
        router: ``[N, L, d_model]``, ``Σ_e w_e g_e`` (``g_e``: the router's row of expert ``e``)
            averaged over the chosen positions (the ``"router"`` embedding).
        layers: the MoE blocks (``L`` of them); positions: the ``T`` positions read.
        num_experts: experts per layer (``E``).
    """

    indices: Int[Tensor, "N L T k"]
    weights: Float[Tensor, "N L T k"]
    output: Float[Tensor, "N L d_model"]
    router: Float[Tensor, "N L d_model"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    num_experts: int

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    def sequences(self) -> Int[Tensor, "N length"]:
        """Each example's pathway ``s(x)``: layer-major, then position, the ``k`` experts ascending;
        ``length = L · T · k``."""
        return self.indices.sort(dim=-1).values.reshape(self.n, -1)  # [N, L, T, k] -> [N, L*T*k]


def _positions(position: Any, n_ctx: int, owner: str) -> tuple[int, ...]:
    if position == "all":
        return tuple(range(n_ctx))
    if position == "last":
        return (n_ctx - 1,)
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"{owner}: position must be 'all', 'last' or an integer position, got {position!r}")
    if not -n_ctx <= position < n_ctx:
        raise ValueError(f"{owner}: position {position} is outside the {n_ctx} positions of the inputs")
    return (position % n_ctx,)


def _inputs(model: HookedTransformer, data: Any, split: str, owner: str) -> Tensor:
    if isinstance(data, (Task, SequenceTask)):
        if not isinstance(split, str):
            raise TypeError(f"{owner}: split must be a split name such as 'train', got {split!r}")
        models.check_compatible(model, data)
        mask = data.mask(split)  # refuses an unknown name, listing the valid ones
        if not bool(mask.any()):
            raise ValueError(f"{owner}: split {split!r} of {data.name!r} has no examples; choose another split")
        return data.inputs[mask]
    if isinstance(data, Tensor):
        if data.ndim != 2 or data.is_floating_point() or data.dtype == torch.bool:
            raise ValueError(f"{owner}: inputs must be token ids [N, n_ctx] (integers), got {data.dtype} of shape "
                             f"{tuple(data.shape)}")
        if not len(data):
            raise ValueError(f"{owner}: inputs hold no examples")
        if data.shape[1] > model.cfg.n_ctx or int(data.min()) < 0 or int(data.max()) >= model.cfg.d_vocab:
            raise ValueError(f"{owner}: inputs must hold ids in [0, {model.cfg.d_vocab}) and at most "
                             f"{model.cfg.n_ctx} positions, got shape {tuple(data.shape)} and ids in "
                             f"[{int(data.min())}, {int(data.max())}]")
        return data
    raise TypeError(f"{owner}: data must be a Task, a SequenceTask or token ids [N, n_ctx], got {type(data).__name__}")


@torch.no_grad()
def expert_pathways(model: nn.Module, data: Task | SequenceTask | Int[Tensor, "N n_ctx"], *, split: str = "train",
                    position: str | int = "all", batch_size: int = 1024) -> ExpertPathways:
    """The experts ``data``'s examples visit in every MoE layer, from one forward pass (no gradient).

    Args:
        model: a mixture-of-experts ``HookedTransformer`` (``moe_layers``); left unchanged (evaluated
            in eval mode, its mode restored).
        data: a ``Task`` or ``SequenceTask`` (its ``split`` is read), or token ids ``[N, n_ctx]``.
        split: the examples of a task (default ``"train"``: the paper's metrics use training data only).
        position: ``"all"`` (default: a sample's pathway covers all its tokens), ``"last"`` (the answer
            position of a one-answer task) or one integer position.
        batch_size: examples per forward pass.

    Returns:
        ``ExpertPathways`` with ``N`` examples, ``L`` MoE layers, ``T`` positions and ``k =
        experts_per_token``. Cost: one forward pass over the examples plus a ``[N·T, k] × [k, d_model]``
        product per layer for the router embedding.

    >>> import mechgrok as mg
    >>> task = mg.tasks.modular_arithmetic(p=5, train_frac=0.6, seed=0)
    >>> moe = mg.models.transformer(task, n_layers=2, d_model=8, n_heads=2, d_mlp=8, num_experts=3,
    ...                             experts_per_token=2)
    >>> pw = expert_pathways(moe, task)
    >>> tuple(pw.indices.shape), tuple(pw.sequences().shape)  # [N, L, T, k], [N, L*T*k]
    ((15, 2, 3, 2), (15, 12))
    """
    owner = "expert_pathways"
    layers = moe_layers(model, owner)
    x = _inputs(model, data, split, owner)
    positions = _positions(position, x.shape[1], owner)
    batch_size = check_int(batch_size, "batch_size", low=1, owner=owner)
    cfg = model.cfg
    k, E = int(cfg.experts_per_token), int(cfg.num_experts)
    pos = torch.tensor(positions)
    seen: dict[str, Tensor] = {}

    def keep(t: Tensor, hook) -> None:
        seen[hook.name] = t.detach()

    hooks = [(f"blocks.{l}.{h}", keep) for l in layers for h in ("mlp.hook_expert_indices", "mlp.hook_expert_weights",
                                                                  "hook_mlp_out")]
    out: dict[str, list[Tensor]] = {"indices": [], "weights": [], "output": [], "router": []}
    device = models.device_of(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)  # [b, n_ctx]
            b, n_ctx = xb.shape
            seen.clear()
            model.run_with_hooks(xb, fwd_hooks=hooks)
            per = {key: [] for key in out}
            for l in layers:
                idx = seen[f"blocks.{l}.mlp.hook_expert_indices"].reshape(b, n_ctx, k)[:, pos]  # [b, T, k]
                probs = seen[f"blocks.{l}.mlp.hook_expert_weights"].reshape(b, n_ctx, E)[:, pos]  # [b, T, E]
                w = probs.gather(-1, idx)  # [b, T, k], the weights of the selected experts
                if getattr(cfg, "norm_topk_prob", False):
                    w = w / w.sum(-1, keepdim=True)
                gate = model.blocks[l].mlp.W_gate.weight  # [E, d_model]
                router = torch.einsum("btk,btkd->bd", w.to(gate.dtype), gate[idx]) / len(positions)  # [b, d_model]
                per["indices"].append(idx.long().cpu())
                per["weights"].append(w.float().cpu())
                per["output"].append(seen[f"blocks.{l}.hook_mlp_out"][:, pos].mean(1).float().cpu())  # [b, d_model]
                per["router"].append(router.float().cpu())
            for key in out:
                out[key].append(torch.stack(per[key], dim=1))  # [b, L, ...]
    finally:
        model.train(was_training)
    return ExpertPathways(indices=torch.cat(out["indices"]), weights=torch.cat(out["weights"]),
                          output=torch.cat(out["output"]), router=torch.cat(out["router"]), layers=layers,
                          positions=positions, num_experts=E)


# ---------------------------------------------------------------------------- the two metrics


def _as_int_array(a: Any, name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"pathway_edit_distance: {name} must hold integer expert indices, got {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"pathway_edit_distance: {name} must be one sequence [n] or a batch [P, n], got shape "
                         f"{arr.shape}")
    return arr.astype(np.int64, copy=False)


def pathway_edit_distance(a: Sequence[int] | Int[Tensor, "... n"], b: Sequence[int] | Int[Tensor, "... m"]
                          ) -> int | Int[Tensor, " P"]:
    """Levenshtein edit distance between two pathways: the fewest insertions, deletions and
    substitutions of one symbol (an expert index) that turn ``a`` into ``b``.

    Args:
        a, b: two sequences of integers (lists, arrays or 1-D tensors), or two batches ``[P, n]`` and
            ``[P, m]`` whose rows are compared pairwise.

    Returns:
        An ``int`` for two sequences; an int64 tensor ``[P]`` for two batches. Cost ``O(P · n · m)``
        (the dynamic programme, vectorised over the ``P`` pairs and along each row).

    >>> pathway_edit_distance([0, 1, 2], [0, 2]), pathway_edit_distance([3, 1, 3], [1, 3, 1])
    (1, 2)
    """
    x, y = _as_int_array(a, "a"), _as_int_array(b, "b")
    single = x.ndim == 1
    if x.ndim != y.ndim:
        raise ValueError(f"pathway_edit_distance: a and b must both be sequences or both batches, got shapes "
                         f"{x.shape} and {y.shape}")
    if single:
        x, y = x[None], y[None]
    if len(x) != len(y):
        raise ValueError(f"pathway_edit_distance: the batches hold {len(x)} and {len(y)} pathways; pair them row by "
                         "row")
    P, n, m = len(x), x.shape[1], y.shape[1]
    cols = np.arange(m + 1)  # [m+1]
    prev = np.broadcast_to(cols, (P, m + 1)).copy()  # D[0, j] = j
    for i in range(1, n + 1):
        sub = prev[:, :-1] + (x[:, i - 1:i] != y)  # [P, m]: D[i-1, j-1] + cost of substituting
        best = np.minimum(sub, prev[:, 1:] + 1)  # [P, m]: or delete x[i-1]
        row = np.concatenate([np.full((P, 1), i), best], axis=1)  # [P, m+1], D[i, 0] = i
        # insertions: D[i, j] = min_{j' <= j} row[j'] + (j - j'), a running minimum of row - j
        prev = np.minimum.accumulate(row - cols, axis=1) + cols
    d = prev[:, m]
    return int(d[0]) if single else torch.from_numpy(d.astype(np.int64))


def _sequences(pathways: ExpertPathways | Tensor) -> Tensor:
    if isinstance(pathways, ExpertPathways):
        return pathways.sequences()
    if isinstance(pathways, Tensor) and pathways.ndim == 2 and not pathways.is_floating_point():
        return pathways
    raise TypeError(f"pathways must be an ExpertPathways or integer sequences [N, length], got "
                    f"{type(pathways).__name__}")


def pathway_distance(pathways: ExpertPathways | Int[Tensor, "N length"], pairs: Int[Tensor, "P 2"]) -> float:
    """Mean edit distance ``ED(s(x_i), s(x_j))`` over the index ``pairs`` (the paper's pathway
    similarity between samples; lower = more shared pathways). NaN for no pairs.

    Args:
        pathways: ``ExpertPathways`` or pathway sequences ``[N, length]``.
        pairs: ``[P, 2]`` indices into the ``N`` examples.
    """
    seqs = _sequences(pathways)
    if not isinstance(pairs, Tensor) or pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.is_floating_point() or (
            len(pairs) and (int(pairs.min()) < 0 or int(pairs.max()) >= len(seqs))):
        raise ValueError(f"pathway_distance: pairs must be integer indices [P, 2] into the {len(seqs)} pathways")
    if not len(pairs):
        return float("nan")
    d = pathway_edit_distance(seqs[pairs[:, 0]], seqs[pairs[:, 1]])  # [P]
    return float(d.double().mean())


def pathway_consistency(pathways: ExpertPathways, *, embedding: str = "output") -> Float[Tensor, " N"]:
    """Per-example pathway consistency ``C(x) = 1/(L-1) Σ_l cos(e_l(x), e_{l+1}(x))`` of the weighted
    expert embeddings of consecutive MoE layers (module docstring; higher = smoother pathway).

    Args:
        pathways: from ``expert_pathways``.
        embedding: ``"output"`` (the MoE block's output, default) or ``"router"`` (``Σ w_e g_e``).

    Returns:
        ``[N]`` float64 in [−1, 1]; NaN for every example when there is only one MoE layer, and for
        an example whose embedding is exactly zero at some layer.
    """
    if not isinstance(pathways, ExpertPathways):
        raise TypeError(f"pathway_consistency: pathways must be an ExpertPathways (expert_pathways(model, data)), got "
                        f"{type(pathways).__name__}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"pathway_consistency: embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    e = getattr(pathways, embedding).double()  # [N, L, d_model]
    if e.shape[1] < 2:
        return torch.full((e.shape[0],), float("nan"), dtype=torch.float64)
    a, b = e[:, :-1], e[:, 1:]  # [N, L-1, d_model] each
    norms = a.norm(dim=-1) * b.norm(dim=-1)  # [N, L-1]
    cos = (a * b).sum(-1) / norms  # [N, L-1]; 0/0 is NaN
    return cos.mean(1)


def usage_entropy(pathways: ExpertPathways) -> float:
    """How evenly the experts are used: the entropy of each layer's expert-selection frequencies
    (over examples, positions and the ``k`` slots) divided by ``log E``, averaged over layers. 1:
    every expert equally often; 0: one expert takes everything (a collapsed router)."""
    E = pathways.num_experts
    if E < 2:
        return float("nan")
    vals = []
    for l in range(pathways.indices.shape[1]):
        counts = torch.bincount(pathways.indices[:, l].reshape(-1), minlength=E).double()  # [E]
        p = counts / counts.sum()
        vals.append(float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(E))
    return float(np.mean(vals))


# ---------------------------------------------------------------------------- over training


def _correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Pearson and Spearman correlation of ``x`` and ``y`` over their finite pairs (None when fewer
    than 3 pairs or either side is constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]

    def r(u, v):
        if len(u) < 3 or np.ptp(u) == 0 or np.ptp(v) == 0:
            return None
        return float(np.corrcoef(u, v)[0, 1])

    return {"pearson": r(x, y), "spearman": r(average_ranks(x), average_ranks(y)), "n": int(len(x))}


@dataclass(frozen=True)
class PathwaysOverTraining:
    """Pathway metrics of training examples on the checkpoints of a run (``pathways_over_training``).

    Attributes:
        run: the run folder; split: the examples measured (training ones unless asked otherwise).
        position: the ``position`` argument; positions: the positions read.
        n_examples, n_pairs, n_pairs_same_answer: examples, random pairs and same-answer pairs (the
            same on every checkpoint; ``0`` same-answer pairs for a language-model run).
        seed: seeds the examples and pairs.
        layers, num_experts, experts_per_token, pathway_length: the model's MoE layers, ``E``, ``k``,
            and ``L · T · k``.
        steps: checkpoint steps, ascending.
        edit_distance: mean pathway edit distance over the random pairs, per step.
        edit_distance_same_answer: the same over pairs with the same training label (NaN when none).
        edit_distance_shuffled: the same random pairs after every (layer, position) slot's expert
            choices were permuted across the examples (one seeded permutation per slot, the same on
            every checkpoint): the distance the experts' usage alone would give.
        consistency: mean pathway consistency over the examples, per step (the ``"output"`` embedding).
        consistency_router: the same with the ``"router"`` embedding.
        usage_entropy: normalised entropy of expert use, per step (``usage_entropy``).
        train_acc, test_acc: from ``history.jsonl`` at the same steps (NaN where not logged).
        correlations: ``{metric: {"pearson", "spearman", "n"}}``, each metric against ``test_acc``
            over the steps (None where undefined).
    """

    run: str
    split: str
    position: str | int
    positions: tuple[int, ...]
    n_examples: int
    n_pairs: int
    n_pairs_same_answer: int
    seed: int
    layers: tuple[int, ...]
    num_experts: int
    experts_per_token: int
    pathway_length: int
    steps: tuple[int, ...]
    edit_distance: tuple[float, ...]
    edit_distance_same_answer: tuple[float, ...]
    edit_distance_shuffled: tuple[float, ...]
    consistency: tuple[float, ...]
    consistency_router: tuple[float, ...]
    usage_entropy: tuple[float, ...]
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    correlations: dict[str, dict[str, float | None]]
    format: str = field(default=PATHWAYS_FORMAT + "/over_training")

    _SERIES = (*PATHWAY_METRICS, "train_acc", "test_acc")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``None``)."""
        def f(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        out = {k: getattr(self, k) for k in ("format", "run", "split", "position", "n_examples",
                                              "n_pairs", "n_pairs_same_answer", "seed", "num_experts",
                                              "experts_per_token", "pathway_length")}
        out |= {"positions": list(self.positions), "layers": list(self.layers), "steps": list(self.steps)}
        out |= {k: [f(v) for v in getattr(self, k)] for k in self._SERIES}
        out["correlations"] = {m: dict(c) for m, c in self.correlations.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PathwaysOverTraining:
        """The result ``to_dict`` wrote."""
        if d.get("format") != PATHWAYS_FORMAT + "/over_training":
            raise ValueError(f"not a pathways-over-training result: format {d.get('format')!r}, expected "
                             f"{PATHWAYS_FORMAT + '/over_training'!r}")

        def f(v):
            return float("nan") if v is None else float(v)
        return cls(run=d["run"], split=d["split"], position=d["position"], positions=tuple(d["positions"]),
                   n_examples=int(d["n_examples"]), n_pairs=int(d["n_pairs"]),
                   n_pairs_same_answer=int(d["n_pairs_same_answer"]), seed=int(d["seed"]), layers=tuple(d["layers"]),
                   num_experts=int(d["num_experts"]), experts_per_token=int(d["experts_per_token"]),
                   pathway_length=int(d["pathway_length"]), steps=tuple(int(s) for s in d["steps"]),
                   **{k: tuple(f(v) for v in d[k]) for k in cls._SERIES},
                   correlations={m: dict(c) for m, c in d["correlations"].items()})


def _random_pairs(n: int, n_pairs: int, g: torch.Generator) -> Tensor:
    i = torch.randint(n, (n_pairs,), generator=g)
    j = (i + torch.randint(1, n, (n_pairs,), generator=g)) % n  # j != i
    return torch.stack([i, j], 1)  # [n_pairs, 2]


def _same_answer_pairs(labels: Tensor, n_pairs: int, g: torch.Generator) -> Tensor:
    """Up to ``n_pairs`` pairs ``i < j`` with ``labels[i] == labels[j]`` (all of them when fewer)."""
    groups = [(labels == v).nonzero().squeeze(1) for v in labels.unique()]
    every = [torch.combinations(ix, 2) for ix in groups if len(ix) > 1]
    if not every:
        return torch.zeros(0, 2, dtype=torch.long)
    pairs = torch.cat(every)  # [M, 2]
    return pairs if len(pairs) <= n_pairs else pairs[torch.randperm(len(pairs), generator=g)[:n_pairs]]


def _shuffled(seqs: Tensor, perms: Tensor, k: int) -> Tensor:
    """``seqs [N, S·k]`` with slot ``s``'s ``k`` experts taken from example ``perms[s, i]`` for row ``i``."""
    n = len(seqs)
    slots = seqs.reshape(n, -1, k)  # [N, S, k]
    return slots[perms.T, torch.arange(slots.shape[1])].reshape(n, -1)  # row i, slot s <- slots[perms[s, i], s]


def _history_at(history: list[dict[str, Any]], steps: Sequence[int], key: str) -> tuple[float, ...]:
    rows = {int(r["step"]): r.get(key) for r in history if "step" in r}
    return tuple(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")
                 for v in (rows.get(s) for s in steps))


def pathways_over_training(run: Run | str, steps: Iterable[int] | None = None, *, split: str = "train",
                           position: str | int = "all", n_examples: int = 512, n_pairs: int = 2000,
                           seed: int = 0, progress: bool = True,
                           threads: int | None = 1) -> PathwaysOverTraining:
    """Pathway distance and consistency of training examples on the checkpoints of ``run``, and their
    correlation with test accuracy over training (Li et al. 2025; module docstring).

    Args:
        run: a ``Run`` (or folder) whose model is a mixture-of-experts transformer.
        steps: checkpoint steps (default: all).
        split: the examples of the metrics (default ``"train"``: the paper's "without test"; any other
            split is allowed, e.g. to compare).
        position: ``"all"``, ``"last"`` or an integer position (``expert_pathways``).
        n_examples: examples of ``split`` (a seeded random subset when it is larger; the same ones on
            every checkpoint).
        n_pairs: random pairs for ``edit_distance`` and at most as many same-answer pairs (drawn once).
        seed: seeds the subset and the pairs.
        progress: a tqdm bar over checkpoints; threads: torch threads meanwhile (restored afterwards).

    Returns:
        ``PathwaysOverTraining``. Per checkpoint: one model load, one forward pass over the
        ``n_examples`` examples, and ``3 · n_pairs`` edit distances of length ``L · T · k``. Test data
        are never read: accuracies come from ``history.jsonl``.
    """
    owner = "pathways_over_training"
    run = run if isinstance(run, Run) else Run(run)
    wanted = run.select_steps(steps, owner=owner)
    n_examples = check_int(n_examples, "n_examples", low=2, owner=owner)
    n_pairs = check_int(n_pairs, "n_pairs", low=1, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    first = run.load_model(wanted[0])
    layers = moe_layers(first, owner)  # refuses a dense model before any work
    task = run.task()
    mask = task.mask(split)
    if int(mask.sum()) < 2:
        raise ValueError(f"{owner}: split {split!r} of {run.path} has {int(mask.sum())} examples; need at least 2")
    g = torch.Generator().manual_seed(seed)
    idx = mask.nonzero().squeeze(1)  # [n_split]
    if len(idx) > n_examples:
        idx = idx[torch.randperm(len(idx), generator=g)[:n_examples]].sort().values
    x = task.inputs[idx]  # [n, n_ctx]
    pairs = _random_pairs(len(idx), n_pairs, g)
    same = (_same_answer_pairs(task.labels[idx], n_pairs, g) if isinstance(task, Task)
            else torch.zeros(0, 2, dtype=torch.long))
    positions = _positions(position, x.shape[1], owner)
    top_k = int(first.cfg.experts_per_token)
    perms = torch.stack([torch.randperm(len(idx), generator=g) for _ in range(len(layers) * len(positions))])  # [S, n]
    cols: dict[str, list[float]] = {k: [] for k in PATHWAY_METRICS}
    with torch_threads(threads):
        for step in tqdm(wanted, desc=f"pathways {run.name}", unit="ckpt", disable=not progress):
            model = first if step == wanted[0] else run.load_model(step)
            pw = expert_pathways(model, x, position=position)
            seqs = pw.sequences()
            cols["edit_distance"].append(pathway_distance(seqs, pairs))
            cols["edit_distance_same_answer"].append(pathway_distance(seqs, same))
            shuffled = _shuffled(seqs, perms, top_k)
            cols["edit_distance_shuffled"].append(float(pathway_edit_distance(seqs[pairs[:, 0]],
                                                                              shuffled[pairs[:, 1]]).double().mean()))
            cols["consistency"].append(float(pathway_consistency(pw).nanmean()))
            cols["consistency_router"].append(float(pathway_consistency(pw, embedding="router").nanmean()))
            cols["usage_entropy"].append(usage_entropy(pw))
    hist = run.history()
    train_acc, test_acc = _history_at(hist, wanted, "train_acc"), _history_at(hist, wanted, "test_acc")
    return PathwaysOverTraining(
        run=str(run.path), split=split, position=position, positions=positions,
        n_examples=len(idx), n_pairs=len(pairs), n_pairs_same_answer=len(same), seed=seed, layers=layers,
        num_experts=int(first.cfg.num_experts), experts_per_token=top_k,
        pathway_length=len(layers) * len(positions) * top_k, steps=tuple(wanted),
        **{k: tuple(v) for k, v in cols.items()}, train_acc=train_acc, test_acc=test_acc,
        correlations={m: _correlations(cols[m], test_acc) for m in PATHWAY_METRICS})
