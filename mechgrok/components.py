"""Component names: the one vocabulary of circuits, overlap, analyses and reports, and their parser.

Names (``mechgrok.circuits.graph`` builds graphs of them):

- nodes: ``input`` (the embedding, or a HookedMLP's one-hot input), ``a{l}.h{h}`` (attention head
  ``h`` of layer ``l``), ``m{l}`` (the MLP of layer ``l``), ``m{l}.n{i}`` (neuron ``i`` of that MLP),
  ``logits``;
- receivers, the inputs of nodes: ``a{l}.h{h}.q``, ``.k``, ``.v`` (a head reads its query, key and
  value separately), ``m{l}``, ``logits`` (and, in a HookedMLP's neuron graph, each neuron
  ``m0.n{i}``);
- any of them may carry a token position: ``a0.h1@2``, ``a1.h0.k@3``, ``input@0``;
- edges: ``"{src}->{receiver}"``, e.g. ``"a0.h1->a1.h0.k"``.

Layers and indices are written in decimal without leading zeros, so a name and its parsed
``Component`` convert into each other exactly (``str(parse(name)) == name``).

>>> parse("a1.h3.k@2")
Component(kind='head', layer=1, index=3, port='k', position=2)
>>> str(parse("m0.n5")), parse("m0.n5").node.name, base("a1.h3.k@2"), node_of("a1.h3.k@2")
('m0.n5', 'm0.n5', 'a1.h3.k', 'a1.h3@2')
>>> parse_edge("a0.h1->a1.h0.k"), layer_of("logits", n_layers=2)
(('a0.h1', 'a1.h0.k'), 2)

Limits: this module knows names only, not any model: whether ``a7.h3`` exists is a question for the
graph of a model (``mechgrok.circuits.graph(model).nodes``).
"""

from __future__ import annotations

import dataclasses
import functools
import re

__all__ = ["Component", "parse", "parse_edge", "base", "node_of", "position_of", "at", "layer_of", "is_head", "is_mlp",
           "is_neuron", "KINDS", "PORTS", "HEAD", "MLP", "NEURON", "FORMS"]

#: Kinds of component: the ends of the residual stream and its three kinds of writer.
KINDS = ("input", "head", "mlp", "neuron", "logits")
#: The inputs of an attention head: query, key and value.
PORTS = ("q", "k", "v")
#: The valid name forms, as error messages list them.
FORMS = ("'input', 'logits', 'a{l}.h{h}' (head), 'm{l}' (MLP), 'm{l}.n{i}' (neuron), "
         "the head inputs 'a{l}.h{h}.q' / '.k' / '.v', each optionally at a position '@{p}' (e.g. 'a1.h3.k@2'); "
         "edges are 'src->receiver' (e.g. 'a0.h1->a1.h0.k')")

_NUM = r"(?:0|[1-9][0-9]*)"  # a decimal number without leading zeros
_AT = rf"(?:@{_NUM})?"
#: Node names of each kind, a position allowed (``a0.h1``, ``a0.h1@2``; not the receiver ``a0.h1.q``).
HEAD = re.compile(rf"\Aa{_NUM}\.h{_NUM}{_AT}\Z")
MLP = re.compile(rf"\Am{_NUM}{_AT}\Z")
NEURON = re.compile(rf"\Am{_NUM}\.n{_NUM}{_AT}\Z")
_NAME = re.compile(rf"""\A(?:
      (?P<end>input|logits)
    | a(?P<al>{_NUM})\.h(?P<h>{_NUM})(?:\.(?P<port>[qkv]))?
    | m(?P<ml>{_NUM})(?:\.n(?P<n>{_NUM}))?
    )(?:@(?P<pos>{_NUM}))?\Z""", re.VERBOSE)


def _check_number(value: object, field: str, kind: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a {kind} component needs an integer {field} >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class Component:
    """One component name, parsed: immutable, hashable, and ``str()`` gives the name back.

    Attributes:
        kind: one of ``KINDS``: "input", "head", "mlp", "neuron", "logits".
        layer: the block (heads, MLPs, neurons); None for input and logits.
        index: the head or neuron number; None otherwise.
        port: "q", "k" or "v" for a head's input (a receiver), else None.
        position: the token position of a per-position name (``@p``), else None.
    """

    kind: str
    layer: int | None = None
    index: int | None = None
    port: str | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}; choose one of {KINDS}")
        if self.kind in ("input", "logits"):
            if (self.layer, self.index, self.port) != (None, None, None):
                raise ValueError(f"{self.kind!r} has no layer, index or port")
        else:
            _check_number(self.layer, "layer", self.kind)
            if self.kind == "mlp":
                if self.index is not None:
                    raise ValueError("an MLP component has no index; a neuron of it is kind 'neuron'")
            else:
                _check_number(self.index, "index", self.kind)
            if self.port is not None and (self.kind != "head" or self.port not in PORTS):
                raise ValueError(f"only heads have ports, one of {PORTS}; got port={self.port!r} on a {self.kind}")
        if self.position is not None:
            _check_number(self.position, "position", self.kind)

    @property
    def name(self) -> str:
        """The component's name, e.g. ``"a1.h3.k@2"``."""
        name = (self.kind if self.kind in ("input", "logits") else f"a{self.layer}.h{self.index}"
                if self.kind == "head" else f"m{self.layer}" if self.kind == "mlp" else f"m{self.layer}.n{self.index}")
        return (name + (f".{self.port}" if self.port else "")
                + (f"@{self.position}" if self.position is not None else ""))

    def __str__(self) -> str:
        return self.name

    @property
    def node(self) -> Component:
        """The node this names or whose input it is: the port dropped (``a1.h0.k@2`` -> ``a1.h0@2``)."""
        return self if self.port is None else dataclasses.replace(self, port=None)

    @property
    def base(self) -> Component:
        """The same component without its position (``a1.h0.k@2`` -> ``a1.h0.k``)."""
        return self if self.position is None else dataclasses.replace(self, position=None)

    def at(self, position: int | None) -> Component:
        """The same component at token ``position`` (None: merged over positions)."""
        return dataclasses.replace(self, position=position)


@functools.lru_cache(maxsize=1 << 16)
def _parse(name: str) -> Component:
    m = _NAME.match(name)
    if m is None:
        hint = " (an edge name: use parse_edge)" if "->" in name else ""
        raise ValueError(f"{name!r} is not a component name{hint}; valid forms: {FORMS}")
    pos = None if m["pos"] is None else int(m["pos"])
    if m["end"]:
        return Component(m["end"], position=pos)
    if m["al"] is not None:
        return Component("head", int(m["al"]), int(m["h"]), m["port"], pos)
    if m["n"] is not None:
        return Component("neuron", int(m["ml"]), int(m["n"]), None, pos)
    return Component("mlp", int(m["ml"]), None, None, pos)


def parse(name: str) -> Component:
    """The ``Component`` a node or receiver name stands for; ValueError naming the valid forms.

    >>> parse("m2.n17"), parse("logits@3").position
    (Component(kind='neuron', layer=2, index=17, port=None, position=None), 3)
    """
    if isinstance(name, Component):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a component name must be a string such as 'a0.h1' or 'm0.n5', got {name!r}")
    return _parse(name)


def parse_edge(name: str) -> tuple[str, str]:
    """``"a0.h1->a1.h0.k@2"`` -> ``("a0.h1", "a1.h0.k@2")``: the edge's source node and receiver.

    The source must be a node that writes (not ``logits``, no q/k/v port), the receiver one that
    reads (not ``input``; a head only through a port), and either both carry a position or neither.
    Whether the edge exists in a model is for its graph to say. ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"an edge name must be a string 'src->receiver' such as 'a0.h1->a1.h0.k', got {name!r}")
    src, sep, receiver = name.partition("->")
    if not sep:
        raise ValueError(f"{name!r} is not an edge name: expected 'src->receiver', e.g. 'a0.h1->a1.h0.k'")
    s, r = parse(src), parse(receiver)
    if s.kind == "logits" or s.port is not None:
        raise ValueError(f"{name!r}: the source of an edge is a node that writes ('input', a head, an MLP or a "
                         f"neuron), not {src!r}")
    if r.kind == "input" or (r.kind == "head" and r.port is None):
        raise ValueError(f"{name!r}: the receiver of an edge is an input ('a{{l}}.h{{h}}.q' / '.k' / '.v', 'm{{l}}', "
                         f"a neuron or 'logits'), not {receiver!r}")
    if (s.position is None) != (r.position is None):
        raise ValueError(f"{name!r}: give a position on both ends of an edge or on neither")
    return src, receiver


def base(name: str) -> str:
    """``name`` without its position: ``"a0.h1@2"`` -> ``"a0.h1"`` (a name without one is returned as is)."""
    return name if parse(name).position is None else _base_name(name)


def node_of(name: str) -> str:
    """The node a receiver is the input of, position kept: ``"a1.h0.k@2"`` -> ``"a1.h0@2"``; a
    node (``m0``, ``logits``, ``m0.n5``) is its own."""
    return name if parse(name).port is None else _node_name(name)


@functools.lru_cache(maxsize=1 << 16)
def _base_name(name: str) -> str:
    return _parse(name).base.name


@functools.lru_cache(maxsize=1 << 16)
def _node_name(name: str) -> str:
    return _parse(name).node.name


def position_of(name: str) -> int | None:
    """The position of a per-position name (``"a0.h1@2"`` -> 2), else None."""
    return parse(name).position


def at(name: str, position: int) -> str:
    """``name`` at token ``position``: ``("a0.h1.q", 2)`` -> ``"a0.h1.q@2"``; ValueError if it has one already."""
    if parse(name).position is not None:
        raise ValueError(f"{name!r} already has a position; give at() a name without '@'")
    _check_number(position, "position", "positioned")
    return f"{name}@{position}"


def layer_of(name: str, n_layers: int) -> int:
    """The layer a graph draws ``name`` at: -1 for ``input``, ``n_layers`` for ``logits``, else its block."""
    c = parse(name)
    return -1 if c.kind == "input" else n_layers if c.kind == "logits" else c.layer


def is_head(name: object) -> bool:
    """Whether ``name`` names a head node (``a0.h1``, ``a0.h1@2``; not its input ``a0.h1.q``). Never raises."""
    return isinstance(name, str) and HEAD.match(name) is not None


def is_mlp(name: object) -> bool:
    """Whether ``name`` names an MLP node (``m0``, ``m0@2``). Never raises."""
    return isinstance(name, str) and MLP.match(name) is not None


def is_neuron(name: object) -> bool:
    """Whether ``name`` names an MLP neuron (``m0.n5``, ``m0.n5@2``). Never raises."""
    return isinstance(name, str) and NEURON.match(name) is not None
