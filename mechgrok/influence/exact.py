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
loss; only usable where ``H + D`` is positive definite).
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok.influence._index import as_index
from mechgrok.influence.factors import DAMPING_MODES
from mechgrok.influence.grads import LOSSES, fisher_noise, output_grads
from mechgrok.influence.maps import LinearMap, linear_maps, select_maps
from mechgrok.tasks import Task

__all__ = ["per_example_gradients", "exact_curvature", "exact_influence", "CURVATURES"]

CURVATURES = ("empirical", "true", "ggn", "hessian")


def _final(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[:, -1] if out.ndim == 3 else out


def _maps(model: nn.Module, modules, per_head: bool) -> list[LinearMap]:
    return select_maps(linear_maps(model, per_head), modules)


def per_example_gradients(model: nn.Module, task: Task, idx, dlogits: Float[Tensor, "n s C"] | None = None, *,
                          maps: list[LinearMap], labels: str = "labels", loss: str = "cross_entropy"
                          ) -> Float[Tensor, "n s P"]:
    """Per-example (and per-sample) gradients by autograd on the parameters, flattened in the order of
    ``maps`` with each map's ``G`` ``[d_out, d_in (+1)]`` row-major; float64.

    ``dlogits`` ``[n, s, C]`` gives ``dℓ/dlogits`` per example and sample (sampled labels, GGN
    directions); by default the per-example ``loss`` gradient with the examples' ``labels``.
    """
    idx = as_index(idx, task, "idx")
    params = dict(model.named_parameters())
    names = sorted({p for m in maps for p in m.param_names()})
    device = next(model.parameters()).device
    if dlogits is None:
        with torch.no_grad():
            logits = _final(model, task.inputs[idx].to(device))
        dlogits = output_grads(logits, getattr(task, labels)[idx].to(device), loss)[0][:, None]  # [n, 1, C]
    rows = []
    for j, i in enumerate(idx.tolist()):
        with torch.enable_grad():
            logits = _final(model, task.inputs[i:i + 1].to(device))  # [1, C]
            per_sample = []
            for s in range(dlogits.shape[1]):
                grads = torch.autograd.grad(logits, [params[n] for n in names],
                                            grad_outputs=dlogits[j, s][None].to(logits.dtype),
                                            retain_graph=s < dlogits.shape[1] - 1, allow_unused=True)
                gd = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}
                per_sample.append(torch.cat([m.to_G(gd).flatten() for m in maps]))
        rows.append(torch.stack(per_sample))
    return torch.stack(rows)  # [n, s, P]


def _curvature_directions(model, task, fit, fisher, n_samples, seed, loss) -> tuple[Tensor, Tensor]:
    """``dℓ/dlogits`` directions ``[n, K, C]`` and their weights ``[n, K]`` whose weighted gradient outer
    products average to the requested Fisher."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = _final(model, task.inputs[fit].to(device))
    C = logits.shape[-1]
    n = fit.numel()
    if fisher == "empirical":
        d = output_grads(logits, task.labels[fit].to(device), loss)  # [1, n, C]
        return d.transpose(0, 1), torch.ones(n, 1, dtype=torch.float64, device=device)
    if fisher == "true":
        d = output_grads(logits, None, loss, fisher_noise(n, n_samples, C, loss, seed))  # [s, n, C]
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

    params = dict(model.named_parameters())
    names = sorted({p for m in maps for p in m.param_names()})
    sizes = [params[n].numel() for n in names]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    # where each G entry lives in the flat parameter vector
    where = {n: torch.arange(int(offsets[k]), int(offsets[k + 1]), dtype=torch.float64).view(params[n].shape)
             for k, n in enumerate(names)}
    pos = torch.cat([m.to_G(where).flatten() for m in maps]).long()
    flat0 = torch.cat([params[n].detach().flatten() for n in names]).double()
    x, y = task.inputs[fit], task.labels[fit]
    dtype = next(iter(params.values())).dtype

    def mean_loss(flat):
        chunks = dict(zip(names, [c.view(params[n].shape).to(dtype) for c, n in zip(flat.split(sizes), names)]))
        out = functional_call(model, chunks, (x,))
        z = (out[:, -1] if out.ndim == 3 else out).double()
        if loss == "cross_entropy":
            return nn.functional.cross_entropy(z, y)
        return ((z - nn.functional.one_hot(y, z.shape[-1]).double()) ** 2).mean(-1).mean()

    with warnings.catch_warnings():  # torch.func's first use scripts helpers with the deprecated torch.jit
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        H = hessian(mean_loss)(flat0)
    return H[pos][:, pos]


def exact_curvature(model: nn.Module, task: Task, fit_idx, *, modules="all", per_head: bool = False,
                    fisher: str = "empirical", n_samples: int = 1, seed: int = 0, loss: str = "cross_entropy"
                    ) -> tuple[Float[Tensor, "P P"], list[LinearMap]]:
    """The full ``[P, P]`` curvature (see the module docstring) over the maps' parameters, float64,
    and the maps in the order of its rows."""
    if fisher not in CURVATURES:
        raise ValueError(f"fisher must be one of {CURVATURES}, got {fisher!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    n_samples = check_int(n_samples, "n_samples", low=1, owner="exact_curvature")
    seed = check_int(seed, "seed", low=0, owner="exact_curvature")
    maps = _maps(model, modules, per_head)
    fit = as_index(fit_idx, task, "fit_idx")
    if fisher == "hessian":
        return _hessian(model, task, fit, maps, loss), maps
    d, w = _curvature_directions(model, task, fit, fisher, n_samples, seed, loss)
    G = per_example_gradients(model, task, fit, d, maps=maps, loss=loss)  # [n, K, P]
    Gw = G * w[..., None].sqrt()
    flat = Gw.reshape(-1, G.shape[-1])
    return flat.T @ flat / fit.numel(), maps


def exact_influence(model: nn.Module, task: Task, query_idx, train_idx, *, fit_idx=None, modules="all",
                    per_head: bool = False, fisher: str = "empirical", damping: float | dict[str, float] = 0.1,
                    damping_mode: str = "relative", n_samples: int = 1, seed: int = 0,
                    loss: str = "cross_entropy", query_labels: str = "labels") -> Float[Tensor, "q t"]:
    """Influence ``g_qᵀ (F + D)⁻¹ g_z`` with the exact curvature, float64 ``[n_query, n_train]``.

    Args:
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
    fit = as_index(train_idx if fit_idx is None else fit_idx, task, "fit_idx")
    F, maps = exact_curvature(model, task, fit, modules=modules, per_head=per_head, fisher=fisher,
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
    Gq = per_example_gradients(model, task, query_idx, maps=maps, labels=query_labels, loss=loss)[:, 0]
    Gt = per_example_gradients(model, task, train_idx, maps=maps, loss=loss)[:, 0]
    return Gq @ torch.cholesky_solve(Gt.T, L)
