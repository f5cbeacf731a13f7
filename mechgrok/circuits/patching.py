"""Activation and edge patching on transformer-lens hook points: the engine under every method.

A ``Patcher`` runs the model on a clean batch while replacing chosen parts of the computation by
their values on a corrupted batch (resample ablation), by their mean over the clean batch (mean
ablation) or by zero (zero ablation):

- **node ablation**: a node's output (a head's ``attn.hook_z`` slice, an MLP's
  ``hook_mlp_out``, a neuron's ``mlp.hook_post`` entry, the ``input`` embedding) takes its
  corrupted value, so every edge leaving it is ablated;
- **edge ablation**: a receiver ``r`` (a head's q/k/v input, an MLP's input, the logits' input)
  sees ``x_r − Σ_s (1 − mask_rs) (out_s − out_s^corr)``: the residual stream it reads, with the
  contribution of each masked-out source ``s`` swapped for its corrupted value. Masks are floats,
  so gradients with respect to them (or to ``x_r``) are available for EAP.

All edges ablated reproduces the corrupted run's logits; none ablated the clean run's (tested).
Models are HookedMLPs or HookedTransformers of any pre-norm config (LayerNorm / RMSNorm / none,
learned, rotary or shortformer positions, parallel attention, gated MLPs, biases, attention-only):
receivers are hooked before their LayerNorm, so the norm is recomputed on the patched stream.
Grouped-query attention is patched with its key/value heads expanded to one per query head
(transformer-lens' ``ungroup_grouped_query_attention``: the same forward), so ``a1.h0.k`` and
``a1.h1.k`` are separate receivers even when the two heads share ``W_K``. Biases (``b_O``, ``b_out``)
are constants, the same on every run, so they belong to no edge. Forwards return the full logits
``[batch, pos, vocab]`` (a HookedMLP's ``[batch, 1, d_out]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok import models
from mechgrok.circuits.graph import Graph
from mechgrok.components import Component, parse

__all__ = ["Patcher", "CORRUPTIONS", "source_hook", "receiver_hook", "logits_of"]

patchable = models.patchable

CORRUPTIONS = ("resample", "mean", "zero")


def _merged(name: str, role: str) -> Component:
    """``name`` parsed (``mechgrok.components``), refusing what is not a node / receiver of a
    graph without positions."""
    c = parse(name)
    if c.position is not None:
        raise ValueError(f"{name!r}: patching per position is not supported yet; use names without '@'")
    if role == "source" and (c.kind == "logits" or c.port is not None):
        raise ValueError(f"{name!r} writes nothing: a source is 'input', a head, an MLP or a neuron")
    if role == "receiver" and (c.kind == "input" or (c.kind == "head" and c.port is None)):
        raise ValueError(f"{name!r} reads nothing: a receiver is a head's input 'a{{l}}.h{{h}}.q' / '.k' / '.v', "
                         "an MLP 'm{l}' (or a HookedMLP's neuron) or 'logits'")
    return c


def source_hook(model: nn.Module, node: str) -> tuple[str, int | None]:
    """The hook whose output is ``node``'s output, and the index along its last head/neuron axis.

    A head's output is read and patched at ``attn.hook_z`` (its attention-weighted values
    ``z_h``, ``[batch, pos, d_head]``): it writes ``z_h W_O[h]`` to the residual stream, linear in
    ``z_h``, so replacing ``z_h`` replaces that write exactly, without transformer-lens's
    ``hook_result`` (which materialises ``[batch, pos, heads, d_head, d_model]``). ``Patcher.to_resid``
    maps a head's ``z`` values to the residual stream where an edge needs them."""
    mlp = isinstance(model, models.HookedMLP)
    c = _merged(node, "source")
    if c.kind == "input":
        return ("hook_in" if mlp else "blocks.0.hook_resid_pre"), None
    if c.kind == "head":
        return f"blocks.{c.layer}.attn.hook_z", c.index
    if c.kind == "neuron":
        return f"blocks.{c.layer}.mlp.hook_post", c.index
    return ("hook_out" if mlp else f"blocks.{c.layer}.hook_mlp_out"), None


def receiver_hook(model: nn.Module, receiver: str) -> tuple[str, int | None]:
    """The hook whose output is what ``receiver`` reads, and its head index (q/k/v inputs)."""
    c = _merged(receiver, "receiver")
    if c.kind == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    if c.kind == "head":
        return f"blocks.{c.layer}.hook_{c.port}_input", c.index
    return f"blocks.{c.layer}.hook_mlp_in", None


def logits_of(model: nn.Module, x: Tensor, **kwargs) -> Float[Tensor, "batch pos vocab"]:
    """``model(x)`` as full logits ``[batch, pos, vocab]`` (a HookedMLP's ``[batch, d_out]`` gets a
    position axis of 1)."""
    out = model(x, **kwargs)
    return out[:, None] if out.ndim == 2 else out


@contextlib.contextmanager
def frozen(model: nn.Module):
    """``model``'s parameters without gradients while in the block (then as before, ``.grad``
    cleared): backward computes activation gradients only, none for weights nobody reads."""
    params = list(model.parameters())
    req = [q.requires_grad for q in params]
    try:
        for q in params:
            q.requires_grad_(False)
        yield model
    finally:
        for q, r in zip(params, req):
            q.requires_grad_(r)
            q.grad = None


def _take(act: Tensor, idx: int | None) -> Tensor:
    return act if idx is None else act[..., idx, :] if act.ndim == 4 else act[..., idx]


class Patcher:
    """Clean and corrupted activations of every source node of ``graph``, and patched forwards.

    Args:
        model: HookedTransformer or HookedMLP (its patching flags are switched on while in use).
        graph: from ``mechgrok.circuits.graph``.
        clean: clean inputs ``[batch, ...]``.
        corrupted: counterfactual inputs of the same shape (resample ablation), or None for
            ``corruption="mean"`` / ``"zero"``.
        corruption: ``"resample"``, ``"mean"`` (the clean batch's mean of each output, per
            position) or ``"zero"``.
    """

    def __init__(self, model: nn.Module, graph: Graph, clean: Tensor, corrupted: Tensor | None = None,
                 corruption: str = "resample"):
        if corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
        if not isinstance(model, (models.HookedTransformer, models.HookedMLP)):
            raise TypeError(f"patching needs a HookedTransformer or HookedMLP, got {type(model).__name__}")
        models.check_inputs(model, clean, "clean")
        if corruption == "resample":
            if corrupted is None:
                raise ValueError("resample ablation needs a corrupted batch; or use corruption='mean' or 'zero'")
            models.check_inputs(model, corrupted, "corrupted")
            if corrupted.shape != clean.shape:
                raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} inputs differ in shape")
        if graph.positions:
            raise ValueError("patching per position is not supported yet; build the graph with positions=False")
        self.model, self.graph, self.clean, self.corrupted, self.corruption = model, graph, clean, corrupted, corruption
        self.sources = [n for n in graph.nodes if n != "logits"]
        self._hooks = {n: source_hook(model, n) for n in self.sources}
        self._W_O = {}  # head -> W_O[h] [d_head, d_model]: what its z values write to the stream
        for n in self.sources:
            c = parse(n)
            if c.kind == "head":
                self._W_O[n] = model.blocks[c.layer].attn.W_O[c.index].detach()
        with torch.no_grad(), patchable(model, split_heads=False):  # sources only: no head input is split
            if corruption == "resample":  # one forward over both batches
                both = self._record(torch.cat([clean, corrupted]), keep_resid=True)
                n = clean.shape[0]
                self.clean_out = {k: v[:n] for k, v in both.items()}
                self.corr_out = {k: v[n:] for k, v in both.items()}
                self.clean_resid = [r[:n] for r in getattr(self, "clean_resid", [])]
            else:
                self.clean_out = self._record(clean, keep_resid=True)
            if corruption == "mean":
                self.corr_out = {n: v.mean(0, keepdim=True).expand_as(v) for n, v in self.clean_out.items()}
            elif corruption == "zero":
                self.corr_out = {n: torch.zeros_like(v) for n, v in self.clean_out.items()}
        self.receivers: dict[str, list[str]] = {}
        for e in graph.edges:
            self.receivers.setdefault(e.receiver, []).append(e.src)

    def _record(self, x: Tensor, keep_resid: bool = False) -> dict[str, Tensor]:
        """Every source node's output on ``x`` (and, with ``keep_resid``, each layer's input
        residual stream in ``self.clean_resid``, for runs that start at a later layer)."""
        out: dict[str, Tensor] = {}
        names = {h for h, _ in self._hooks.values()}
        transformer = isinstance(self.model, models.HookedTransformer)
        if keep_resid and transformer:
            names |= {f"blocks.{layer}.hook_resid_pre" for layer in range(self.model.cfg.n_layers)}
        _, cache = self.model.run_with_cache(x, names_filter=lambda n: n in names)
        for node, (hook, idx) in self._hooks.items():
            out[node] = _take(cache[hook], idx).detach()
        if keep_resid and transformer:
            self.clean_resid = [cache[f"blocks.{layer}.hook_resid_pre"].detach()
                                for layer in range(self.model.cfg.n_layers)]
        return out

    # ------------------------------------------------------------------------------ forwards
    def run(self, *, ablate_nodes: Iterable[str] = (), masks: Mapping[str, Tensor] | None = None,
            interpolate: float | None = None, retain: Iterable[str] = (),
            x: Tensor | None = None, start_layer: int = 0,
            split_heads: bool = True) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Tensor]]:
        """One patched forward on the clean batch.

        Args:
            ablate_nodes: nodes whose output takes its corrupted value.
            masks: receiver -> ``[n_sources]`` float mask over ``self.receivers[receiver]`` (1 keeps
                the edge, 0 ablates it); receivers not given keep every edge.
            interpolate: ``α``: the ``input`` node's output becomes ``corr + α (clean − corr)``
                (EAP-IG, Hanna et al. 2024).
            retain: receivers, or ``"src:<hook name>"`` for a source hook, whose tensors are
                returned with ``retain_grad()`` set, for gradient-based attribution.
            x: inputs (default: the clean batch).
            start_layer: run from this layer's clean input residual stream (transformers, clean
                inputs only). Valid when nothing before the layer is patched: sources before it
                keep their clean outputs. ACDC uses it, as auto-circuit does.
            split_heads: give each head its own q/k/v input (``models.patchable``); False runs the
                cheaper shared-input forward, allowed only when no receiver is masked or retained.

        Returns:
            The logits ``[batch, pos, vocab]`` and the retained tensors.
        """
        ablate = set(ablate_nodes)
        unknown = ablate - set(self.sources)
        if unknown:
            raise ValueError(f"unknown nodes {sorted(unknown)[:5]}")
        # receivers whose mask keeps every edge change nothing: leave their hooks out
        masks = {r: m for r, m in (masks or {}).items() if bool((m != 1).any())}
        retain = set(retain)
        if not split_heads and (masks or retain & set(self.receivers)):
            raise ValueError("masked or retained receivers need split_heads=True")
        kept: dict[str, Tensor] = {}
        current: dict[str, Tensor] = {}
        fwd: list[tuple[str, Callable]] = []

        by_hook: dict[str, list[str]] = {}
        for node in self.sources:
            by_hook.setdefault(self._hooks[node][0], []).append(node)
        for hook, nodes in by_hook.items():
            fwd.append((hook, self._source_fn(nodes, ablate, interpolate, current, retain, kept)))
        recv_by_hook: dict[str, list[str]] = {}
        for r in set(masks) | {r for r in retain if r in self.receivers}:
            if r not in self.receivers:
                raise ValueError(f"unknown receiver {r!r}")
            recv_by_hook.setdefault(receiver_hook(self.model, r)[0], []).append(r)
        deltas: dict[str, Tensor] = {}  # out_s − out_s^corr, computed once per source per forward
        for hook, recvs in recv_by_hook.items():
            fwd.append((hook, self._receiver_fn(recvs, masks, current, deltas, retain, kept)))
        if start_layer:
            if (x is not None or interpolate is not None or not isinstance(self.model, models.HookedTransformer)
                    or self.model.cfg.positional_embedding_type == "shortformer"):
                raise ValueError("start_layer needs a transformer (not shortformer positions) on the clean batch "
                                 "without interpolation")
            for node in self.sources:
                if self.graph.layer[node] < start_layer:
                    current[node] = self.clean_out[node]
            with patchable(self.model, split_heads), self.model.hooks(fwd_hooks=fwd):
                logits = logits_of(self.model, self.clean_resid[start_layer], start_at_layer=start_layer)
            return logits, kept
        with patchable(self.model, split_heads), self.model.hooks(fwd_hooks=fwd):
            logits = logits_of(self.model, self.clean if x is None else x)
        return logits, kept

    def receiver_grads(self, metric: Callable[[Tensor], Tensor],
                       interpolate: float | None = None) -> dict[str, Tensor]:
        """``∂m/∂x_r`` at every receiver hook of an unpatched forward (clean, or with the input
        interpolated as in ``run``): ``{hook: [batch, pos, heads, d_model]}`` for the q/k/v inputs
        (``blocks.{l}.hook_q_input``, ...), ``[batch, pos, d_model]`` for ``hook_mlp_in`` and the
        logits' ``hook_resid_post``. Equal to the gradients ``run(retain=receivers)`` leaves on the
        split-input forward, without running it: head ``h``'s q input ``x`` enters the model only
        through ``q_h = norm(x) W_Q[h] + b_Q[h]``, so ``∂m/∂x = J_norm(x)ᵀ W_Q[h] ∂m/∂q_h``, with
        ``∂m/∂q_h`` read at ``attn.hook_q`` of the shared-input forward and the norm's
        vector-Jacobian product taken on the layer's ``hook_resid_pre`` (the same for every head).
        Keys and values are ungrouped under grouped-query attention, one per query head.
        ``metric``: full logits ``[batch, pos, vocab] -> scalar``. Weights get no gradient."""
        if not isinstance(self.model, models.HookedTransformer):
            raise TypeError("receiver_grads needs a HookedTransformer (a HookedMLP's edges are its nodes')")
        model, L = self.model, self.model.cfg.n_layers
        kept: dict[str, Tensor] = {}
        resid: dict[int, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> Tensor:
            act.retain_grad()
            kept[hook.name] = act
            return act

        def keep_resid(layer: int) -> Callable:
            def fn(act: Tensor, hook: Any) -> Tensor:
                resid[layer] = act.detach()
                return act
            return fn

        def leaf(act: Tensor, hook: Any) -> Tensor:  # the graph's one grad leaf: the input embedding
            return act if act.requires_grad else act.detach().requires_grad_(True)

        current: dict[str, Tensor] = {}
        fwd: list[tuple[str, Callable]] = [("blocks.0.hook_resid_pre",
                                            self._source_fn(["input"], set(), interpolate, current, set(), {})),
                                           ("blocks.0.hook_resid_pre", leaf)]
        for layer in range(L):
            fwd.append((f"blocks.{layer}.hook_resid_pre", keep_resid(layer)))
            fwd += [(f"blocks.{layer}.attn.hook_{c}", keep) for c in "qkv"]
            if not model.cfg.attn_only:
                fwd.append((f"blocks.{layer}.hook_mlp_in", keep))
        fwd.append((f"blocks.{L - 1}.hook_resid_post", keep))
        with frozen(model), torch.enable_grad():
            with patchable(model, split_heads=False), model.hooks(fwd_hooks=fwd):
                logits = logits_of(model, self.clean)
            value = metric(logits)
            if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
                raise ValueError("the metric must return a scalar tensor that depends on the logits")
            value.reshape(()).backward()
            out: dict[str, Tensor] = {}
            for layer in range(L):
                block = model.blocks[layer]
                x = resid[layer]  # [batch, pos, d_model]
                for c in "qkv":
                    g = kept[f"blocks.{layer}.attn.hook_{c}"].grad  # [batch, pos, heads, d_head]
                    W = getattr(block.attn, f"W_{c.upper()}").detach()  # [heads, d_model, d_head] (ungrouped)
                    u = torch.einsum("bphe,hde->bphd", g, W)  # ∂m/∂(normalised input of each head)
                    x4 = x[:, :, None, :].expand(-1, -1, u.shape[2], -1).clone().requires_grad_(True)
                    out[f"blocks.{layer}.hook_{c}_input"], = torch.autograd.grad(block.ln1(x4), x4, u)
                if not model.cfg.attn_only:
                    out[f"blocks.{layer}.hook_mlp_in"] = kept[f"blocks.{layer}.hook_mlp_in"].grad
            out[f"blocks.{L - 1}.hook_resid_post"] = kept[f"blocks.{L - 1}.hook_resid_post"].grad
        return {k: v.detach() for k, v in out.items()}

    def _source_fn(self, nodes: list[str], ablate: set[str], interpolate: float | None,
                   current: dict[str, Tensor], retain: set[str], kept: dict[str, Tensor]) -> Callable:
        def fn(act: Tensor, hook: Any) -> Tensor:
            for node in nodes:
                _, idx = self._hooks[node]
                replace = None
                if node in ablate:
                    replace = self.corr_out[node]
                elif node == "input" and interpolate is not None:
                    replace = self.corr_out[node] + interpolate * (self.clean_out[node] - self.corr_out[node])
                if replace is not None:
                    if idx is None:  # a fresh tensor; in a gradient pass it must join the graph
                        act = replace.clone().requires_grad_(torch.is_grad_enabled())
                    else:
                        act = act.clone()
                        if act.ndim == 4:
                            act[..., idx, :] = replace
                        else:
                            act[..., idx] = replace
            if f"src:{hook.name}" in retain and torch.is_grad_enabled():
                if not act.requires_grad:  # e.g. a HookedMLP's one-hot input: make it a leaf
                    act = act.detach().requires_grad_(True)
                act.retain_grad()
                kept[f"src:{hook.name}"] = act
            for node in nodes:
                current[node] = _take(act, self._hooks[node][1])
            return act

        return fn

    def _receiver_fn(self, recvs: list[str], masks: Mapping[str, Tensor], current: dict[str, Tensor],
                     deltas: dict[str, Tensor], retain: set[str], kept: dict[str, Tensor]) -> Callable:
        def fn(act: Tensor, hook: Any) -> Tensor:
            if not any(r in masks for r in recvs):  # only retaining: the activation stays as it is
                for r in recvs:
                    if act.requires_grad:
                        act.retain_grad()
                        kept[r] = act
                return act
            parts = {}
            for r in recvs:
                _, idx = receiver_hook(self.model, r)
                x = _take(act, idx)
                if r in masks:
                    srcs = self.receivers[r]
                    for s in srcs:
                        if s not in deltas:
                            deltas[s] = self.to_resid(s, current[s] - self.corr_out[s])
                    off = (1 - masks[r]).to(act.dtype)
                    x = x - torch.einsum("s,s...->...", off, torch.stack([deltas[s] for s in srcs]))
                parts[r] = (idx, x)
            if len(parts) == 1 and next(iter(parts.values()))[0] is None:
                (r, (_, act)), = parts.items()
            else:
                cols = list(act.unbind(-2)) if act.ndim == 4 else None
                for r, (idx, x) in parts.items():
                    cols[idx] = x
                act = torch.stack(cols, dim=-2)
            for r in recvs:
                if r in retain and act.requires_grad:
                    act.retain_grad()
                    kept[r] = act
            return act

        return fn

    def to_resid(self, node: str, value: Tensor) -> Tensor:
        """``value`` of ``node``'s source hook (``[batch, pos, d_head]`` for a head) as what it writes
        to the residual stream (``[batch, pos, d_model]``); other nodes' values already are."""
        w = self._W_O.get(node)
        return value if w is None else value @ w  # [batch, pos, d_head] @ [d_head, d_model]

    def hook_of(self, node: str) -> tuple[str, int | None]:
        """The source hook of ``node`` and its index there."""
        return self._hooks[node]

    def all_masks(self, value: float = 1.0) -> dict[str, Tensor]:
        return {r: torch.full((len(s),), float(value)) for r, s in self.receivers.items()}
