"""The computational graph of a model, as circuit discovery sees it.

Names (shared by attribution, ``Circuit`` and drawing; parsed by ``mechgrok.components``):

- nodes: ``input`` (token + positional embedding, or the one-hot input of a HookedMLP),
  ``a{l}.h{h}`` (attention head ``h`` of layer ``l``), ``m{l}`` (the MLP of layer ``l``),
  ``m{l}.n{i}`` (neuron ``i`` of that MLP, at the neuron level), ``logits``;
- node inputs ("receivers"): ``a{l}.h{h}.q``, ``.k``, ``.v`` (a head reads its query, key and value
  from the residual stream separately), ``m{l}``, ``logits``;
- edges: ``"{src}->{receiver}"``, e.g. ``"a0.h1->a1.h0.k"``. In a transformer every component reads
  the residual stream, so there is an edge from every earlier node to every receiver.

Levels: ``"edge"`` (every edge), ``"node"`` (heads and MLPs; ``input`` and ``logits`` are always
present), ``"neuron"`` (MLP neurons, plus the heads of a transformer). With ``positions=True`` every
node and receiver is split per token position (``a0.h1@2``); attention edges then also connect
positions (``a0.h1@0->a1.h0.k@2``), while an MLP or the logits read only their own position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import nn

from mechgrok import models
from mechgrok.components import PORTS, Component, at, base, is_head, layer_of, parse

__all__ = ["Graph", "Edge", "graph", "LEVELS", "check_supported"]

LEVELS = ("edge", "node", "neuron")


@dataclass(frozen=True)
class Edge:
    src: str  # node name
    dst: str  # node name
    receiver: str  # the input of dst it feeds: dst itself, or dst + ".q" / ".k" / ".v"

    @property
    def name(self) -> str:
        return f"{self.src}->{self.receiver}"


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order, receivers, and edges of one model at one level.

    Attributes:
        level: "edge" | "node" | "neuron".
        nodes: every node, topologically ordered (``input`` first, ``logits`` last).
        layer: node -> layer index (``input`` -1, ``logits`` n_layers); used for drawing.
        edges: every edge (``src`` earlier than ``dst``), receivers in topological order.
        components: what attribution scores and circuits select at this level: edge names, or the
            node names of heads / MLPs / neurons.
        n_layers, n_heads, d_mlp, positions: the model's sizes (``positions`` 0 if merged).
    """

    level: str
    nodes: tuple[str, ...]
    layer: dict[str, int]
    edges: tuple[Edge, ...]
    n_layers: int
    n_heads: int
    d_mlp: int
    positions: int = 0
    kind: str = "transformer"
    meta: dict = field(default_factory=dict)

    @cached_property
    def components(self) -> tuple[str, ...]:
        if self.level == "edge":
            return tuple(e.name for e in self.edges)
        return tuple(n for n in self.nodes if base(n) not in ("input", "logits"))

    @cached_property
    def edge_index(self) -> dict[str, Edge]:
        return {e.name: e for e in self.edges}

    def __len__(self) -> int:
        return len(self.components)


def _transformer_nodes(n_layers: int, n_heads: int, attn_only: bool = False) -> list[tuple[str, int]]:
    nodes = [("input", -1)]
    for layer in range(n_layers):
        nodes += [(Component("head", layer, h).name, layer) for h in range(n_heads)]
        if not attn_only:
            nodes.append((Component("mlp", layer).name, layer))
    return nodes + [("logits", n_layers)]


def _receivers(node: str) -> list[str]:
    """The inputs of ``node``: a head's query, key and value (``a0.h1.q``, ...), else the node itself."""
    c = parse(node)
    return [Component("head", c.layer, c.index, port, c.position).name for port in PORTS] if c.kind == "head" else [node]


def _is_upstream(src: str, dst: str, layer: dict[str, int], heads: frozenset[str], parallel: bool = False) -> bool:
    """``src`` writes to the residual stream before ``dst`` reads it (``heads``: the head nodes;
    ``parallel``: attention and MLP of a layer both read the layer's input, as in GPT-J and GPT-NeoX)."""
    if src == dst or src == "logits" or dst == "input":
        return False
    if src == "input":
        return True
    ls, ld = layer[src], layer[dst]
    if dst == "logits":
        return True
    if dst in heads:  # heads read the stream before their layer's heads and MLP write
        return ls < ld
    return ls < ld or (ls == ld and src in heads and not parallel)  # an MLP reads its own layer's heads


def graph(model: nn.Module, level: str = "edge", positions: bool = False) -> Graph:
    """The computational graph of ``model`` (a HookedTransformer or HookedMLP) at ``level``.

    >>> import mechgrok as mg
    >>> task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5)
    >>> g = graph(mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16))
    >>> len(g.edges), g.edges[0].name
    (13, 'input->a0.h0.q')
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")
    if not isinstance(positions, bool):
        raise TypeError(f"positions must be True or False, got {positions!r}")
    if isinstance(model, models.HookedMLP):
        return _mlp_graph(model, level, positions)
    if not isinstance(model, models.HookedTransformer):
        raise TypeError(f"circuits need a transformer-lens HookedTransformer or a mechgrok HookedMLP, got "
                        f"{type(model).__name__}: convert a Hugging Face model with mg.models.from_pretrained(model) "
                        "(or its checkpoint folder); capture, SAEs, neurons and EK-FAC take any nn.Module")
    cfg = model.cfg
    check_supported(cfg, level)
    nodes = _transformer_nodes(cfg.n_layers, cfg.n_heads, cfg.attn_only)
    layer = dict(nodes)
    heads = frozenset(filter(is_head, layer))
    edges = [Edge(src, dst, r) for dst, _ in nodes for r in _receivers(dst)
             for src, _ in nodes if _is_upstream(src, dst, layer, heads, bool(cfg.parallel_attn_mlp))]
    names = [n for n, _ in nodes]
    if level == "neuron":
        names = [n for n in names if parse(n).kind != "mlp"] + [
            Component("neuron", li, i).name for li in range(cfg.n_layers) for i in range(0 if cfg.attn_only else cfg.d_mlp)]
        names = sorted(names, key=lambda n: (layer_of(n, cfg.n_layers), not is_head(n)))
        layer = {n: layer_of(n, cfg.n_layers) for n in names}
        edges = []  # neuron-level circuits are sets of nodes
    n_pos = int(cfg.n_ctx) if positions else 0
    if positions:
        names, layer, edges = _split_positions(names, layer, edges, n_pos)
    return Graph(level, tuple(names), layer, tuple(edges), cfg.n_layers, cfg.n_heads, 0 if cfg.attn_only else cfg.d_mlp,
                 n_pos)


def check_supported(cfg, level: str = "edge") -> None:
    """Raise a clear error for the transformer-lens configs whose residual stream is not the sum
    of the graph's node outputs (so edge patching would be wrong)."""
    bad = []
    if getattr(cfg, "use_normalization_before_and_after", False):
        bad.append("normalization after attention and MLP (use_normalization_before_and_after, Gemma-2 style)")
    post_norm = getattr(models, "POST_NORM_ARCHITECTURES", ())
    if cfg.original_architecture is not None and cfg.original_architecture in post_norm:
        bad.append(f"post-norm blocks ({cfg.original_architecture})")
    if getattr(cfg, "num_experts", None) and level == "neuron":
        bad.append("mixture-of-experts MLPs at the neuron level (use level='node' or 'edge')")
    if bad:
        raise ValueError("circuits cannot split this model's residual stream into its components: "
                         + "; ".join(bad) + ". Supported: pre-norm blocks with LayerNorm / RMSNorm / none, any MLP, "
                         "biases, learned or rotary positions, parallel attention, grouped-query attention")


def _split_positions(names: list[str], layer: dict[str, int], edges: list[Edge], n_pos: int):
    pnames = [at(n, p) for n in names for p in range(n_pos)]
    players = {at(n, p): layer[n] for n in names for p in range(n_pos)}
    pedges = []
    for e in edges:
        reads_earlier = parse(e.receiver).port in ("k", "v")
        for pd in range(n_pos):
            # attention keys and values read every earlier position; everything else its own
            srcs = range(pd + 1) if reads_earlier else [pd]
            pedges += [Edge(at(e.src, ps), at(e.dst, pd), at(e.receiver, pd)) for ps in srcs]
    return pnames, players, pedges


def _mlp_graph(model: models.HookedMLP, level: str, positions: bool) -> Graph:
    if positions:
        raise ValueError("a HookedMLP has no positions")
    width = model.blocks[0].mlp.W_in.shape[1]
    if level == "neuron":
        names = ["input", *[Component("neuron", 0, i).name for i in range(width)], "logits"]
        layer = {n: (-1 if n == "input" else 1 if n == "logits" else 0) for n in names}
        edges = [Edge("input", n, n) for n in names[1:-1]] + [Edge(n, "logits", "logits") for n in names[1:-1]]
        return Graph("neuron", tuple(names), layer, tuple(edges), 1, 0, width, kind="mlp")
    names = ["input", "m0", "logits"]
    layer = {"input": -1, "m0": 0, "logits": 1}
    edges = (Edge("input", "m0", "m0"), Edge("m0", "logits", "logits"))
    return Graph(level, tuple(names), layer, edges, 1, 0, width, kind="mlp")
