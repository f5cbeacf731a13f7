"""Per-token inputs ``a`` and output gradients ``g`` of every linear map, from one forward pass.

Forward hooks record each map's input and output; the output gradients come from one
``torch.autograd.grad`` call per label sample, with ``grad_outputs`` set to ``dℓ/dlogits`` of the
per-example loss (so a batch gives per-example quantities: the loss is a sum over examples and no
example's loss depends on another's logits). The caller's model is not modified: hooks are removed
on exit and no ``.grad`` is written.

The loss is read at the answer (last) position of a transformer, or at the output of an MLP, for a
Task; at every position that predicts a next token for :class:`~mechgrok.influence.Sequences`
(summed, weighted by the loss mask; see :mod:`mechgrok.influence.data`):

- ``cross_entropy``: ``ℓ = -log softmax(z)_y``; ``dℓ/dz = softmax(z) - onehot(y)`` (per position).
- ``mse``: ``ℓ = mean_c (z_c - onehot(y)_c)²`` (Doshi et al.'s loss, per example; Tasks only);
  ``dℓ/dz = (2/C)(z - onehot(y))``.

For the *true* Fisher the target is sampled from the model's predictive distribution: a class
``y ~ softmax(z)`` for cross-entropy (one per target position of a sequence), ``t ~ N(z, (C/2) I)``
for MSE (the Gaussian whose negative log-likelihood is ``ℓ`` up to a constant). The random numbers
are drawn up front for every fit example with a seeded ``torch.Generator`` (:func:`fisher_noise`), so
the samples do not depend on the batch size or on how examples are sharded over processes.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechgrok.influence.data import read_logits
from mechgrok.influence.maps import LinearMap

__all__ = ["LOSSES", "fisher_noise", "output_grads", "map_inputs_and_grads", "per_example_G"]

LOSSES = ("cross_entropy", "mse")


def fisher_noise(n: int, n_samples: int, d_out: int, loss: str, seed: int, positions: int | None = None) -> Tensor:
    """Random numbers for the true Fisher's sampled targets: ``[n, n_samples]`` uniforms
    (cross-entropy; ``[n, n_samples, positions]`` for per-token losses) or ``[n, n_samples, d_out]``
    standard normals (MSE), float64, from a local generator seeded with ``seed``; row ``i`` belongs
    to the ``i``-th fit example."""
    g = torch.Generator().manual_seed(int(seed))
    if loss == "cross_entropy":
        shape = (n, n_samples) if positions is None else (n, n_samples, positions)
        return torch.rand(*shape, generator=g, dtype=torch.float64)
    if positions is not None:
        raise ValueError("the mse loss is per example; a per-token (Sequences) loss is cross_entropy")
    return torch.randn(n, n_samples, d_out, generator=g, dtype=torch.float64)


def output_grads(logits: Float[Tensor, "b *P C"], labels: Int[Tensor, "b *P"] | None, loss: str,
                 noise: Tensor | None = None, mask: Tensor | None = None) -> Float[Tensor, "s b *P C"]:
    """``dℓ/dlogits`` of each example's loss, float64, one slice per label sample.

    Args:
        logits: ``[b, C]`` at the answer position, or ``[b, P, C]`` at the ``P`` target positions of
            a per-token loss (cross-entropy only).
        labels: data labels ``[b]`` / ``[b, P]`` (empirical Fisher, scores), used when ``noise`` is None.
        loss: ``"cross_entropy"`` or ``"mse"``.
        noise: rows of :func:`fisher_noise` for these examples (``[b, s]``, ``[b, s, P]`` or
            ``[b, s, C]`` for MSE); targets are then sampled from the model.
        mask: ``[b, P]`` weights of the target positions (a loss mask), or None.

    Returns:
        ``[n_samples, b, C]`` or ``[n_samples, b, P, C]`` (``n_samples = 1`` for data labels).
    """
    z = logits.detach().double()
    C = z.shape[-1]
    if loss == "cross_entropy":
        p = torch.softmax(z, dim=-1)  # [b, (P,) C]
        if noise is None:
            y = labels.to(z.device)[None]  # [1, b, (P)]
        else:
            u = noise.to(z.device).movedim(1, 0).contiguous()  # [s, b, (P)]
            cdf = p.cumsum(-1)  # [b, (P,) C]
            y = torch.searchsorted(cdf.expand(u.shape[0], *cdf.shape).contiguous(), u[..., None]).squeeze(-1)
            y = y.clamp(max=C - 1)  # [s, b, (P)]
        d = p[None] - nn.functional.one_hot(y, C).double()  # [s, b, (P,) C]
        return d if mask is None else d * mask.to(d)[None, ..., None]
    if loss == "mse":
        if z.ndim != 2:
            raise ValueError("the mse loss is per example ([b, C] logits); a per-token loss is cross_entropy")
        if noise is None:
            return ((2.0 / C) * (z - nn.functional.one_hot(labels.to(z.device), C).double()))[None]
        return -(2.0 / C) ** 0.5 * noise.to(z.device).permute(1, 0, 2)  # [s, b, C]
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


class _Recorder:
    """Forward hooks that keep the outputs (and ``nn.Linear`` inputs) the maps need."""

    def __init__(self, model: nn.Module, maps: list[LinearMap]):
        self.model, self.maps = model, maps
        self.out: dict[str, Tensor] = {}
        self.inp: dict[str, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> _Recorder:
        modules = dict(self.model.named_modules())
        want_out = {m.out_ref for m in self.maps} | {m.in_ref[1] for m in self.maps if m.in_ref[0] == "output"}
        want_in = {m.in_ref[1] for m in self.maps if m.in_ref[0] == "input"}
        for ref in sorted(want_out | want_in):

            def hook(_mod, args, output, ref=ref):
                if ref in want_in:
                    self.inp[ref] = args[0].detach()
                if ref in want_out:
                    self.out[ref] = output

            self.handles.append(modules[ref].register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _map_input(m: LinearMap, rec: _Recorder, inputs: Tensor) -> Float[Tensor, "b T d_in"]:
    kind = m.in_ref[0]
    if kind == "tokens":
        a = nn.functional.one_hot(inputs, m.d_in)  # [b, pos, V]
    elif kind == "positions":
        pos = torch.arange(inputs.shape[1], device=inputs.device)
        a = nn.functional.one_hot(pos, m.d_in).expand(inputs.shape[0], -1, -1)  # [b, pos, n_ctx]
    else:
        x = rec.inp[m.in_ref[1]] if kind == "input" else rec.out[m.in_ref[1]].detach()
        a = _as_tokens(x, m.in_head, heads=m.layout == "o")  # W_O reads hook_z [b, pos, H, dh]
    return a.double()


def _as_tokens(x: Tensor, head: int | None, heads: bool) -> Tensor:
    """A recorded tensor as ``[b, T, features]``: ``[b, d]`` gets ``T = 1``; ``[b, ..., d]`` flattens the
    middle dims into ``T``; a transformer-lens per-head tensor (``heads=True``, ``[b, pos, H, dh]``)
    gives one head or all heads flattened head-major (``[b, pos, H*dh]``)."""
    if x.ndim == 2:
        return x[:, None]
    if heads:
        return x[:, :, head] if head is not None else x.flatten(2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def map_inputs_and_grads(model: nn.Module, maps: list[LinearMap], inputs: Int[Tensor, "b n_ctx"],
                         dlogits_fn, per_token: bool = False) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """One forward pass and one backward per label sample.

    Args:
        model: the model; ``model(inputs)`` gives ``[b, C]`` or ``[b, pos, C]`` logits (or an object
            holding them, see :func:`~mechgrok.influence.data.unwrap_logits`).
        maps: the linear maps to read.
        inputs: token ids ``[b, n_ctx]``.
        dlogits_fn: ``logits -> dℓ/dlogits [s, *logits.shape]`` (see :func:`output_grads`); the logits
            are ``[b, C]`` at the last position, or ``[b, n_ctx - 1, C]`` with ``per_token``.
        per_token: the loss is read at every position that predicts a next token (Sequences).

    Returns:
        ``(a, gs)``: ``a[name]`` is ``[b, T, d_in (+1)]`` float64 (a ones column when the map has a
        bias), ``gs[s][name]`` is ``[b, T, d_out]`` float64 for sample ``s``; ``T`` counts the
        positions kept for that map (``1`` for ``positions="last"``).
    """
    with torch.enable_grad(), _Recorder(model, maps) as rec:
        logits = read_logits(model(inputs), per_token, inputs if per_token else None)  # [b, (T-1,) C]
        dl = dlogits_fn(logits)  # [s, b, (T-1,) C]
        missing = sorted({m.out_ref for m in maps} - set(rec.out))
        if missing:
            raise ValueError(f"{missing} were not called in the forward pass, so EK-FAC cannot read their maps; "
                             "leave them out with modules=[...]")
        refs = sorted({m.out_ref for m in maps})
        outs = [rec.out[r] for r in refs]
        for r, o in zip(refs, outs):
            if not o.requires_grad:
                raise RuntimeError(f"the output of {r!r} does not require grad; EK-FAC needs the parameters "
                                   "upstream of every fitted map to have requires_grad=True")
        b = inputs.shape[0]
        for r in sorted(set(rec.out) | set(rec.inp)):
            t = rec.inp.get(r, rec.out.get(r))
            if t.shape[0] != b:
                raise ValueError(f"{r!r} saw a tensor of shape {tuple(t.shape)} whose first dimension is not the "
                                 f"batch ({b}); EK-FAC needs every fitted map to act per example (expand shared "
                                 "inputs over the batch, or leave this map out with modules=[...])")
        a = {}
        for m in maps:
            x = _map_input(m, rec, inputs)
            if m.positions == "last":
                x = x[:, -1:]
            if m.bias:
                x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
            a[m.name] = x
        gs = []
        for s in range(dl.shape[0]):
            grads = torch.autograd.grad(logits, outs, grad_outputs=dl[s].to(logits.dtype),
                                        retain_graph=s < dl.shape[0] - 1, allow_unused=True)
            by_ref = {r: (g if g is not None else torch.zeros_like(o)) for r, g, o in zip(refs, grads, outs)}
            g_s = {}
            for m in maps:
                g = _as_tokens(by_ref[m.out_ref], m.out_head, heads=m.layout == "qkv").double()  # hook_q/k/v
                g_s[m.name] = g[:, -1:] if m.positions == "last" else g
            gs.append(g_s)
    return a, gs


def per_example_G(a: Float[Tensor, "b T i"], g: Float[Tensor, "b T o"]) -> Float[Tensor, "b o i"]:
    """The per-example gradient of a linear map, ``G = Σ_t g_t a_tᵀ``."""
    return torch.einsum("bto,bti->boi", g, a)
