"""Exact influence for small models: the full damped Fisher / Gauss-Newton / Hessian, float64.

The reference EK-FAC is tested against (Koh & Liang 2017, "Understanding Black-box Predictions via
Influence Functions"): per-example gradients come from plain autograd on the parameters (no hooks),
one example at a time, in the same ``G = [d_out, d_in (+1)]`` layout as EK-FAC; then

    F = mean_{examples, samples} vec(G) vec(G)ᵀ        (all maps together: cross-map blocks included)
    score[q, z] = g_qᵀ (F + D)⁻¹ g_z                   (Cholesky solve)

with ``D`` diagonal: one damping per map, absolute, ``damping × trace(F_mm) / P_m`` ("relative",
which equals EK-FAC's ``damping × mean(Λ_m)`` because ``Λ_m`` is the diagonal of ``F_mm`` in a rotated
basis) or ``damping × trace(F) / P`` ("relative_global", the mean eigenvalue of ``F``; equals EK-FAC's
for the same reason). Memory is ``P²`` and time ``P³``: a few thousand parameters at most.

Curvatures: ``"empirical"`` (data labels), ``"true"`` (labels sampled exactly as :class:`EKFAC`
samples them, same seed), ``"ggn"`` (the expectation of the true Fisher over the model's predictive
distribution, i.e. the Gauss-Newton matrix ``Jᵀ H_ℓ J``), ``"hessian"`` (the Hessian of the mean
loss; only usable where ``H + D`` is positive definite). ``"ggn"`` and ``"hessian"`` need a Task.

The data is a Task or :class:`~mechgrok.influence.Sequences` (see :mod:`mechgrok.influence.data`); the
data-label gradients are those of the loss itself, computed by autograd (cross-entropy summed over a
sequence's masked target tokens), independently of EK-FAC's ``dℓ/dlogits``. A map whose weight is
shared with another parameter name (tied embeddings) is refused: autograd on the parameter would
add the other use's gradient, which the map's hooks do not see.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok.influence._index import as_index
from mechgrok.influence.coverage import coverage
from mechgrok.influence.data import Sequences, as_data, batch_targets, inputs_of, read_logits
from mechgrok.influence.factors import DAMPING_MODES
from mechgrok.influence.grads import LOSSES, fisher_noise, output_grads
from mechgrok.influence.maps import LinearMap, linear_maps, select_maps
from mechgrok.tasks import Task

__all__ = ["per_example_gradients", "exact_curvature", "exact_influence", "CURVATURES"]

CURVATURES = ("empirical", "true", "ggn", "hessian")


def _maps(model: nn.Module, modules, per_head: bool, per_token: bool) -> list[LinearMap]:
    known = linear_maps(model, per_head, per_token)
    maps = select_maps(known, modules)
    coverage(model, maps, known, stacklevel=4)  # warns about layers it cannot fit
    return maps


def _params(model: nn.Module, maps: list[LinearMap]) -> dict[str, Tensor]:
    """The maps' parameters by name, refusing weights shared with another name (tied)."""
    alias = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for n, p in alias.items():
        names_of.setdefault(id(p), []).append(n)
    want = sorted({p for m in maps for p in m.param_names()})
    tied = {n: [o for o in names_of[id(alias[n])] if o != n] for n in want if len(names_of[id(alias[n])]) > 1}
    if tied:
        shared = ", ".join(f"{k} is shared with {v}" for k, v in tied.items())
        raise ValueError(f"exact influence differentiates parameters, and {shared} "
                         "(tied weights: the gradient would include the other use, which the map does not see); "
                         "leave these maps out with modules=[...] or untie the weights")
    return {n: alias[n] for n in want}


def _direct_loss(logits: Tensor, y: Tensor, mask: Tensor | None, loss: str) -> Tensor:
    """The summed per-example loss of a batch, straight from its definition (for autograd)."""
    z = logits.double()
    if loss == "mse":
        return ((z - nn.functional.one_hot(y, z.shape[-1]).double()) ** 2).mean(-1).sum()
    ce = nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    return (ce if mask is None else ce * mask.to(ce)).sum()


def per_example_gradients(model: nn.Module, data, idx, dlogits: Float[Tensor, "n s *P C"] | None = None, *,
                          maps: list[LinearMap], labels: str = "labels", loss: str = "cross_entropy"
                          ) -> Float[Tensor, "n s P"]:
    """Per-example (and per-sample) gradients by autograd on the parameters, flattened in the order of
    ``maps`` with each map's ``G`` ``[d_out, d_in (+1)]`` row-major; float64.

    Args:
        data: a Task, :class:`~mechgrok.influence.Sequences` or integer tokens ``[N, T]``.
        dlogits: ``[n, s, C]`` (``[n, s, T-1, C]`` for Sequences) gives ``dℓ/dlogits`` per example and
            sample (sampled labels, GGN directions); by default the gradient of the per-example ``loss``
            itself with the examples' ``labels`` (``s = 1``).
    """
    data = as_data(data, "per_example_gradients")
    per_token = isinstance(data, Sequences)
    idx = as_index(idx, data, "idx")
    params = _params(model, maps)
    names = list(params)
    device = next(model.parameters()).device
    X = inputs_of(data)
    rows = []
    for j, i in enumerate(idx.tolist()):
        with torch.enable_grad():
            x = X[i:i + 1].to(device)
            logits = read_logits(model(x), per_token, x if per_token else None)  # [1, C] / [1, T-1, C]
            if dlogits is None:
                y, mask = batch_targets(data, idx[j:j + 1], labels)
                outs = [(_direct_loss(logits, y.to(device), None if mask is None else mask.to(device), loss), None)]
            else:
                outs = [(logits, dlogits[j, s][None].to(logits.dtype)) for s in range(dlogits.shape[1])]
            per_sample = []
            for s, (out, grad_out) in enumerate(outs):
                grads = torch.autograd.grad(out, [params[n] for n in names], grad_outputs=grad_out,
                                            retain_graph=s < len(outs) - 1, allow_unused=True)
                gd = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}
                per_sample.append(torch.cat([m.to_G(gd).flatten() for m in maps]))
        rows.append(torch.stack(per_sample))
    return torch.stack(rows)  # [n, s, P]


def _curvature_directions(model, data, fit, fisher, n_samples, seed, loss) -> tuple[Tensor, Tensor]:
    """``dℓ/dlogits`` directions ``[n, K, (T-1,) C]`` and their weights ``[n, K]`` whose weighted
    gradient outer products average to the requested Fisher."""
    device = next(model.parameters()).device
    per_token = isinstance(data, Sequences)
    x = inputs_of(data)[fit].to(device)
    with torch.no_grad():
        logits = read_logits(model(x), per_token, x if per_token else None)
    C = logits.shape[-1]
    n = fit.numel()
    y, mask = batch_targets(data, fit, "labels")
    mask = None if mask is None else mask.to(device)
    if fisher == "empirical":
        d = output_grads(logits, y.to(device), loss, None, mask)  # [1, n, (T-1,) C]
        return d.transpose(0, 1), torch.ones(n, 1, dtype=torch.float64, device=device)
    if fisher == "true":
        noise = fisher_noise(n, n_samples, C, loss, seed, data.n_ctx - 1 if per_token else None)
        d = output_grads(logits, None, loss, noise, mask)  # [s, n, (T-1,) C]
        return d.transpose(0, 1), torch.full((n, n_samples), 1.0 / n_samples, dtype=torch.float64, device=device)
    # ggn: every class weighted by its probability (cross-entropy); every output direction (mse)
    if loss == "cross_entropy":
        p = torch.softmax(logits.double(), -1)  # [n, C]
        d = torch.stack([output_grads(logits, torch.full((n,), c, device=device), loss)[0] for c in range(C)],
                        1)  # [n, C (label), C (logit)]
        return d, p
    d = (2.0 / C) ** 0.5 * torch.eye(C, dtype=torch.float64, device=device).expand(n, C, C)
    return d, torch.ones(n, C, dtype=torch.float64, device=device)


def _hessian(model: nn.Module, task: Task, fit: Tensor, maps: list[LinearMap], loss: str) -> Tensor:
    """Hessian of the mean loss over ``fit`` w.r.t. the maps' parameters, in the ``G`` layout."""
    from torch.func import functional_call, hessian

    params = _params(model, maps)
    names = list(params)
    sizes = [params[n].numel() for n in names]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    # where each G entry lives in the flat parameter vector
    where = {n: torch.arange(int(offsets[k]), int(offsets[k + 1]), dtype=torch.float64).view(params[n].shape)
             for k, n in enumerate(names)}
    pos = torch.cat([m.to_G(where).flatten() for m in maps]).long()
    flat0 = torch.cat([params[n].detach().flatten() for n in names]).double()
    device = next(model.parameters()).device
    x, y = task.inputs[fit].to(device), task.labels[fit].to(device)
    dtype = next(iter(params.values())).dtype

    def mean_loss(flat):
        chunks = dict(zip(names, [c.view(params[n].shape).to(dtype) for c, n in zip(flat.split(sizes), names)]))
        z = read_logits(functional_call(model, chunks, (x,)), False).double()
        if loss == "cross_entropy":
            return nn.functional.cross_entropy(z, y)
        return ((z - nn.functional.one_hot(y, z.shape[-1]).double()) ** 2).mean(-1).mean()

    with warnings.catch_warnings():  # torch.func's first use scripts helpers with the deprecated torch.jit
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        H = hessian(mean_loss)(flat0)
    return H[pos][:, pos]


def exact_curvature(model: nn.Module, data, fit_idx, *, modules="all", per_head: bool = False,
                    fisher: str = "empirical", n_samples: int = 1, seed: int = 0, loss: str = "cross_entropy"
                    ) -> tuple[Float[Tensor, "P P"], list[LinearMap]]:
    """The full ``[P, P]`` curvature (see the module docstring) over the maps' parameters, float64,
    and the maps in the order of its rows. ``data``: a Task, Sequences or integer tokens ``[N, T]``."""
    if fisher not in CURVATURES:
        raise ValueError(f"fisher must be one of {CURVATURES}, got {fisher!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    n_samples = check_int(n_samples, "n_samples", low=1, owner="exact_curvature")
    seed = check_int(seed, "seed", low=0, owner="exact_curvature")
    data = as_data(data, "exact_curvature")
    per_token = isinstance(data, Sequences)
    if per_token and (fisher in ("ggn", "hessian") or loss != "cross_entropy"):
        raise NotImplementedError(f"exact_curvature on Sequences supports fisher='empirical' or 'true' with the "
                                  f"cross_entropy loss, got fisher={fisher!r}, loss={loss!r}")
    maps = _maps(model, modules, per_head, per_token)
    fit = as_index(fit_idx, data, "fit_idx")
    if fisher == "hessian":
        return _hessian(model, data, fit, maps, loss), maps
    d, w = _curvature_directions(model, data, fit, fisher, n_samples, seed, loss)
    G = per_example_gradients(model, data, fit, d, maps=maps, loss=loss)  # [n, K, P]
    Gw = G * w[..., None].sqrt()
    flat = Gw.reshape(-1, G.shape[-1])
    return flat.T @ flat / fit.numel(), maps


def exact_influence(model: nn.Module, data, query_idx, train_idx, *, fit_idx=None, modules="all",
                    per_head: bool = False, fisher: str = "empirical", damping: float | dict[str, float] = 0.1,
                    damping_mode: str = "relative", n_samples: int = 1, seed: int = 0,
                    loss: str = "cross_entropy", query_labels: str = "labels") -> Float[Tensor, "q t"]:
    """Influence ``g_qᵀ (F + D)⁻¹ g_z`` with the exact curvature, float64 ``[n_query, n_train]``.

    Args:
        data: a Task, :class:`~mechgrok.influence.Sequences` or integer tokens ``[N, T]``.
        query_idx, train_idx: queries and training examples (indices, masks or split names).
        fit_idx: the examples the curvature averages over (default ``train_idx``; pass the same set
            EKFAC was fitted on, in the same order, to share its sampled labels with ``fisher="true"``).
        modules, per_head, n_samples, seed, loss: as for :class:`EKFAC`.
        fisher: ``"empirical"``, ``"true"``, ``"ggn"`` or ``"hessian"``.
        damping: a number (see ``damping_mode``) or ``{map name: absolute λ}`` such as ``EKFAC.damping_``.
        damping_mode: ``"relative"`` (``damping × trace(F_mm)/P_m`` per map, = EKFAC's per-map λ),
            ``"relative_global"`` (``damping × trace(F)/P``, the mean eigenvalue of ``F``) or ``"absolute"``.
    """
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    if isinstance(damping, dict):  # absolute λ per map, e.g. EKFAC.damping_
        damping = {k: check_float(v, f"damping[{k!r}]", low=0.0, low_open=True) for k, v in damping.items()}
    else:  # NaN / inf / <= 0 would give NaN, zero or indefinite scores
        damping = check_float(damping, "damping", low=0.0, low_open=True, owner="exact_influence")
    data = as_data(data, "exact_influence")
    fit = as_index(train_idx if fit_idx is None else fit_idx, data, "fit_idx")
    F, maps = exact_curvature(model, data, fit, modules=modules, per_head=per_head, fisher=fisher,
                              n_samples=n_samples, seed=seed, loss=loss)
    diag = []
    start = 0
    mean_eig = float(F.diagonal().mean())  # trace(F) / P
    for m in maps:
        block = F[start:start + m.n_params, start:start + m.n_params]
        if isinstance(damping, dict):
            if m.name not in damping:
                raise ValueError(f"damping has no value for map {m.name!r}; give one per map (EKFAC.damping_)")
            lam = float(damping[m.name])
        else:
            lam = {"relative": float(block.diagonal().mean()), "relative_global": mean_eig,
                   "absolute": 1.0}[damping_mode] * float(damping)
        diag.append(torch.full((m.n_params,), lam, dtype=torch.float64, device=F.device))
        start += m.n_params
    Fd = F + torch.diag(torch.cat(diag))
    L, info = torch.linalg.cholesky_ex(Fd)
    if int(info) != 0:
        raise ValueError(f"the damped {fisher} curvature is not positive definite (smallest eigenvalue "
                         f"{float(torch.linalg.eigvalsh(Fd)[0]):.3g}); raise the damping or use a Fisher/GGN")
    Gq = per_example_gradients(model, data, query_idx, maps=maps, labels=query_labels, loss=loss)[:, 0]
    Gt = per_example_gradients(model, data, train_idx, maps=maps, loss=loss)[:, 0]
    return Gq @ torch.cholesky_solve(Gt.T, L)
