"""Which MLP neurons hold a memorized sequence: the localization methods of Chang et al. 2024 ("Do
Localization Methods Actually Localize Memorized Data in LLMs? A Tale of Two Benchmarks", NAACL
2024) and mechgrok's, on a ``SequenceTask``.

The unit is an MLP neuron ``(layer, n)``: entry ``n`` of ``blocks.{layer}.mlp.hook_post``, over
all layers. ``localize`` scores each neuron (higher: more responsible for the *target* sequences)
with one of ``METHODS``, each documented at its function: Chang et al.'s five (activations,
integrated gradients, zero-out, slimming, hard concrete), mechgrok's direct-logit memorization
score, the target's EK-FAC self-influence split over neurons (``ekfac``), and the decoder weights
of target-selective features of an SAE per layer (``sae``). The *target loss* is the mean over the
target sequences of each one's mean next-token cross-entropy over its target tokens
(``task.loss_mask``), as ``sequence_loss`` computes it.

Chang et al.'s INJ and DEL benchmarks of these scores, and ``delete``, are in
``mechgrok.memorization.benchmarks``.

Limits: MLP neurons only (no heads, no single weights). Every method but ``activations``,
``memorization_score`` and ``sae`` reads the target alone, so a neuron the target shares with all text scores
high too (Chang et al.'s finding: localized neurons are not specific to one sequence). ``zero_out``
costs a forward per neuron (small models only). The mask methods run a fixed number of steps with
no early stopping; their scores depend on ``lam`` and ``steps``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._config import check_float, check_int
from mechgrok._threads import torch_threads
from mechgrok.losses import IGNORE, token_nll
from mechgrok.memorization.extraction import _check
from mechgrok.tasks.sequence import SequenceTask

__all__ = ["Localization", "localize", "METHODS"]

_L, _R = -0.1, 1.1  # Hard Concrete stretch interval (Louizos et al. 2018)
_SAE_BATCH = 256  # activation rows per training step of the ``sae`` method's SAEs


@dataclass(frozen=True)
class Localization:
    """Neuron scores of one localization method (``localize``).

    Attributes:
        method: the method's name (``METHODS``).
        scores: ``[n_layers, d_mlp]`` float64; higher = more responsible for the target sequences.
        target_rows: the task rows localized ``[n]``.
        reference_rows: the rows contrasted against ``[m]`` (``activations``, ``memorization_score``,
            ``sae``), ``None`` for the methods that read the target alone.
        options: the method's settings (``lam``, ``steps``, ...), for provenance.
    """

    method: str
    scores: Float[Tensor, "n_layers d_mlp"]
    target_rows: Int[Tensor, " n"]
    reference_rows: Int[Tensor, " m"] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = torch.as_tensor(self.scores).detach().cpu().double()
        if s.ndim != 2 or not bool(torch.isfinite(s).all()):
            raise ValueError(f"Localization.scores must be a finite [n_layers, d_mlp] tensor, got shape "
                             f"{tuple(s.shape)}" + (" with NaN or inf entries" if s.ndim == 2 else ""))
        object.__setattr__(self, "scores", s)
        object.__setattr__(self, "target_rows", torch.as_tensor(self.target_rows).long().cpu())
        object.__setattr__(self, "options", dict(self.options))

    @property
    def n_neurons(self) -> int:
        return int(self.scores.numel())

    def top(self, k: int | float) -> list[tuple[int, int]]:
        """The ``(layer, neuron)`` pairs of the highest scores, best first, ties to the lower
        ``(layer, neuron)``. ``k``: an int count (``1``: one neuron) or a float fraction in (0, 1]
        of all neurons (``1.0``: all), rounded, at least one."""
        n = _count(k, self.n_neurons, "Localization.top")
        order = torch.sort(-self.scores.flatten(), stable=True).indices[:n]  # stable: ties by flat index
        d = self.scores.shape[1]
        return [(int(i) // d, int(i) % d) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scores": self.scores.tolist(), "target_rows": self.target_rows.tolist(),
                "reference_rows": None if self.reference_rows is None else self.reference_rows.tolist(),
                "options": self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Localization:
        ref = d.get("reference_rows")
        return cls(d["method"], torch.tensor(d["scores"], dtype=torch.float64), torch.tensor(d["target_rows"]),
                   None if ref is None else torch.tensor(ref, dtype=torch.long), d.get("options", {}))


def _count(k: Any, n: int, owner: str) -> int:
    """``k`` as a number of neurons out of ``n``: an int in [1, n] or a fraction in (0, 1]."""
    if isinstance(k, float):
        f = check_float(k, "k", low=0.0, high=1.0, low_open=True,
                        owner=f"{owner} (a fraction of the {n} neurons; pass an int for a count)")
        return max(1, round(f * n))
    return check_int(k, "k", low=1, high=n, owner=f"{owner} (a count of the {n} neurons, or a float fraction)")


# ---------------------------------------------------------------------------- rows and forwards
def _rows(task: SequenceTask, spec: Any, what: str, owner: str) -> Tensor:
    """A group name or 1-D row indices as sorted distinct rows that carry a target, or a clear error."""
    if isinstance(spec, str):
        if spec not in task.groups and spec != "all":
            raise ValueError(f"{owner}: {what} group {spec!r} is not in task {task.name!r}; choose one of "
                             f"{sorted(task.groups) + ['all']}, or pass a 1-D tensor of row indices")
        rows = task.mask(spec).nonzero().flatten()
    else:
        t = torch.as_tensor(spec)
        if t.numel() and (t.ndim != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{owner}: {what} must be a group name or a 1-D tensor of row indices, got dtype "
                            f"{t.dtype}, shape {tuple(t.shape)} (for a boolean mask m pass m.nonzero().flatten())")
        rows = t.long().flatten()
        if bad := [r for r in rows.tolist() if not 0 <= r < task.n]:
            raise ValueError(f"{owner}: {what} rows {bad[:10]} do not exist; task {task.name!r} has rows [0, {task.n})")
        if len(set(rows.tolist())) < len(rows):
            raise ValueError(f"{owner}: {what} lists rows more than once; pass each row once")
        rows = rows.sort().values
    if len(rows) == 0:
        raise ValueError(f"{owner}: {what} is empty (no sequences); give a non-empty group or rows")
    if bad := rows[~task.loss_mask[rows].any(1)].tolist():
        raise ValueError(f"{owner}: {what} rows {bad[:10]} have no target token (targets all IGNORE), so there is "
                         "no loss to localize; leave them out")
    return rows


def _others(task: SequenceTask, rows: Tensor) -> Tensor:
    """The ``"train"`` rows not in ``rows`` (the default reference)."""
    m = task.train.clone()
    m[rows] = False
    return m.nonzero().flatten()


def _batches(rows: Tensor, size: int) -> list[Tensor]:
    return [rows[i:i + size] for i in range(0, len(rows), max(1, size))]


def _xy(model: nn.Module, task: SequenceTask, rows: Tensor) -> tuple[Tensor, Tensor]:
    return task.inputs[rows].to(models.device_of(model)), task.targets[rows].to(models.device_of(model))  # [b, T]


def _seq_nll(model: nn.Module, x: Tensor, y: Tensor, fwd: list | None = None) -> Float[Tensor, " b"]:
    """Per-sequence mean target-token NLL (float64) of a forward with the hooks ``fwd``."""
    with model.hooks(fwd_hooks=fwd or []):
        nll = token_nll(model(x), y)  # [b, T], 0 where IGNORE
    return nll.sum(-1) / (y != IGNORE).sum(-1)


def _post_acts(model: nn.Module, x: Tensor, extra: tuple[str, ...] = ()) -> dict[str, Tensor]:
    names = {models.mlp_hook(l) for l in range(models.n_layers(model))} | set(extra)
    return model.run_with_cache(x, names_filter=lambda n: n in names)[1]  # hook -> [b, T, ...]


def _token_mean(model, task, rows, batch_size, progress, f, extra=()) -> Float[Tensor, "n_layers d_mlp"]:
    """``f(layer, cache, y) [b, T, d_mlp]`` averaged over each sequence's target positions (those that
    predict a target), then over the sequences ``rows``; float64."""
    out = torch.zeros(models.n_layers(model), model.cfg.d_mlp, dtype=torch.float64)
    for b in tqdm(_batches(rows, batch_size), disable=not progress, desc="localize"):
        x, y = _xy(model, task, b)
        cache, m = _post_acts(model, x, extra), (y != IGNORE).double()  # m: [b, T]
        for l in range(len(out)):
            out[l] += ((f(l, cache, y).double() * m[..., None]).sum(1) / m.sum(1)[:, None]).sum(0).cpu()
    return out / len(rows)


# ---------------------------------------------------------------------------- the methods
def _activations(model, task, target, reference, batch_size, steps, seed, progress, *, weight_norm):
    """ACTIVATIONS (Chang et al. 2024; activation magnitude as in Geva et al. 2022, "Transformer
    Feed-Forward Layers Build Predictions by Promoting Concepts in the Vocabulary Space"): the mean
    of ``|act|`` over each target sequence's target-token positions (those that predict a target),
    averaged over sequences, minus the same over the reference sequences; times ``||W_out[n]||``
    with ``weight_norm=True`` (as Chang et al.'s code weighs it)."""
    def mean_abs(rows: Tensor) -> Tensor:
        return _token_mean(model, task, rows, batch_size, progress, lambda l, cache, y: cache[models.mlp_hook(l)].abs())

    s = mean_abs(target) - mean_abs(reference)
    if weight_norm:
        s *= torch.stack([model.blocks[l].mlp.W_out.detach().double().norm(dim=1).cpu() for l in range(len(s))])
    return s


def _zero_out(model, task, target, reference, batch_size, steps, seed, progress):
    """ZERO-OUT (Chang et al. 2024): the increase of the target loss when that neuron alone is set
    to 0 at ``hook_post``. Exact; ``n_layers * d_mlp`` masked forwards, batched: a forward stacks
    copies of the target sequences, each copy with another neuron zeroed."""
    n_layers, d = models.n_layers(model), model.cfg.d_mlp
    loss = torch.zeros(n_layers, d, dtype=torch.float64)
    base = 0.0
    for b in tqdm(_batches(target, batch_size), disable=not progress, desc="zero_out"):
        x, y = _xy(model, task, b)
        base += float(_seq_nll(model, x, y).sum())
        c = max(1, batch_size // len(b))  # neurons per forward
        for l in range(n_layers):
            for lo in range(0, d, c):
                idx = torch.arange(lo, min(lo + c, d))
                keep = torch.ones(len(idx), d, device=x.device)  # [c, d]: copy j zeroes neuron idx[j]
                keep[torch.arange(len(idx)), idx] = 0

                def hook(act, hook, keep=keep):  # [c*b, T, d], copy-major
                    return (act.view(len(keep), -1, *act.shape[1:]) * keep[:, None, None].to(act.dtype)).view(act.shape)

                nll = _seq_nll(model, x.repeat(len(idx), 1), y.repeat(len(idx), 1), [(models.mlp_hook(l), hook)])
                loss[l, idx] += nll.view(len(idx), len(b)).sum(1).cpu()
    return (loss - base) / len(target)


def _integrated_gradients(model, task, target, reference, batch_size, steps, seed, progress, *, ig_steps):
    """INTEGRATED GRADIENTS, knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained
    Transformers"; Sundararajan et al. 2017). Per layer, its whole ``hook_post`` (every neuron, every
    position) is scaled by ``alpha`` from 0 to 1 (other layers compute as they do); the objective is
    a sequence's summed target-token log-likelihood ``ll``. A neuron's attribution is
    ``sum_t act[t, n] * mean_k d ll / d act[t, n] at (alpha_k act)``, midpoint Riemann sum
    ``alpha_k = (k - 1/2) / ig_steps``, averaged over target sequences. Positive: the neuron raises
    the target's likelihood (removing it raises the loss). Over a layer the attributions sum, up to
    the Riemann error, to ``ll(model) - ll(layer zeroed)``. (Dai et al. attribute the probability of
    one answer token; this attributes the log-likelihood of all target tokens.)"""
    m, n_layers = ig_steps, models.n_layers(model)
    score = torch.zeros(n_layers, model.cfg.d_mlp, dtype=torch.float64)
    for b in tqdm(_batches(target, max(1, batch_size // m)), disable=not progress, desc="integrated_gradients"):
        x, y = _xy(model, task, b)
        cache = _post_acts(model, x)
        for l in range(n_layers):
            a = cache[models.mlp_hook(l)]  # [b, T, d]
            alpha = (torch.arange(m, device=a.device, dtype=a.dtype) + 0.5) / m  # [m]
            scaled = (alpha[:, None, None, None] * a[None]).reshape(m * len(b), *a.shape[1:]).requires_grad_(True)
            with torch.enable_grad(), model.hooks(fwd_hooks=[(models.mlp_hook(l), lambda act, hook: scaled)]):
                ll = -token_nll(model(x.repeat(m, 1)), y.repeat(m, 1)).sum()
                (g,) = torch.autograd.grad(ll, scaled)  # [m*b, T, d]; no parameter's .grad is touched
            g = g.double().view(m, len(b), *a.shape[1:]).mean(0)  # [b, T, d]
            score[l] += (a.double() * g).sum((0, 1)).cpu()
    return score / len(target)


def _train_gates(model, task, target, batch_size, steps, progress, params, gates_of, penalty, lr, after=None):
    """Adam on ``params`` minimizing the target loss with ``gates_of()`` ``[n_layers, d_mlp]``
    multiplying each layer's ``hook_post``, plus ``penalty()``; gradients by ``autograd.grad``, so
    no parameter's ``.grad`` is touched."""
    opt = torch.optim.Adam([params], lr=lr)
    for _ in tqdm(range(steps), disable=not progress, desc="masks"):
        with torch.enable_grad():
            gates = gates_of()
            hooks = [(models.mlp_hook(l), lambda act, hook, g=gates[l]: act * g.to(act.dtype))
                     for l in range(len(gates))]
            grad = torch.autograd.grad(penalty(), params)[0]
            for b in _batches(target, batch_size):
                x, y = _xy(model, task, b)
                nll = _seq_nll(model, x, y, hooks).sum() / len(target)
                grad = grad + torch.autograd.grad(nll, params, retain_graph=True)[0]
        params.grad = grad
        opt.step()
        if after is not None:
            after(params)


def _slimming(model, task, target, reference, batch_size, steps, seed, progress, *, lam, lr):
    """SLIMMING (Chang et al. 2024, after Liu et al. 2017, "Learning Efficient Convolutional Networks
    through Network Slimming"): a real mask ``m`` per neuron, starting at 1, multiplies ``hook_post``
    and is trained with Adam to minimize ``target loss(m) + lam * mean(|m|)`` (the L1 norm divided by
    the number of neurons, as in Chang et al.'s code), projected onto [0, 1] after every step. The
    target keeps what it needs, so the score is ``m``: the neurons the sparsity could not shut."""
    mask = torch.ones(models.n_layers(model), model.cfg.d_mlp, device=models.device_of(model), requires_grad=True)
    _train_gates(model, task, target, batch_size, steps, progress, mask, lambda: mask, lambda: lam * mask.abs().mean(),
                 lr, after=lambda p: p.data.clamp_(0.0, 1.0))
    return mask.detach().double().cpu()


def _hard_concrete(model, task, target, reference, batch_size, steps, seed, progress, *, lam, lr, beta, init):
    """HARD CONCRETE (Chang et al. 2024; gates of Louizos et al. 2018, "Learning Sparse Neural
    Networks through L0 Regularization"): a gate per neuron multiplies ``hook_post``,
    ``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * 1.2 - 0.1, 0, 1)``, ``u ~ U(0, 1)``
    drawn per neuron and step (a generator seeded by ``seed``). ``log_alpha`` starts where the
    deterministic gate ``clamp(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)`` is ``init`` (Chang et al.:
    0.5) and is trained with Adam to minimize ``target loss(z) + lam * mean P(z != 0)`` (the expected
    L0 norm per neuron), ``P(z != 0) = sigmoid(log_alpha - beta * log(0.1 / 1.1))``, the score."""
    p = (init - _L) / (_R - _L)
    device = models.device_of(model)
    log_alpha = torch.full((models.n_layers(model), model.cfg.d_mlp), math.log(p / (1 - p)), device=device,
                           requires_grad=True)
    g = torch.Generator().manual_seed(seed)

    def gates() -> Tensor:  # noise drawn on the CPU: the same on every device
        u = torch.rand(log_alpha.shape, generator=g).clamp(1e-4, 1 - 1e-4).to(device)
        return (torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / beta) * (_R - _L) + _L).clamp(0.0, 1.0)

    def open_prob() -> Tensor:
        return torch.sigmoid(log_alpha - beta * math.log(-_L / _R))

    _train_gates(model, task, target, batch_size, steps, progress, log_alpha, gates,
                 lambda: lam * open_prob().mean(), lr)
    return open_prob().detach().double().cpu()


def _memorization_score(model, task, target, reference, batch_size, steps, seed, progress):
    """Direct-logit memorization score (mechgrok's; the sequence version of
    ``mg.neurons.memorization_score``): the neuron's direct push on the correct next-token logit,
    ``act[t, n] * (W_out[n] @ W_U)[y_t]``, averaged over a sequence's target tokens and over
    sequences, target minus reference. A final LayerNorm is passed with that position's scale
    frozen: ``W_out[n]`` is centred (LN, not RMS), times ``ln_final.w``, and divided by
    ``ln_final.hook_scale`` at ``t``. Direct path only (nothing through later layers)."""
    norm, maps = model.cfg.normalization_type, []  # [d_mlp, d_vocab_out] per layer
    for l in range(models.n_layers(model)):
        W = model.blocks[l].mlp.W_out.detach()  # [d_mlp, d_model]
        if norm in ("LN", "LNPre"):
            W = W - W.mean(-1, keepdim=True)
        if norm is not None and getattr(model.ln_final, "w", None) is not None:
            W = W * model.ln_final.w.detach()
        maps.append((W @ model.W_U.detach()).double())
    scale_hook = ("ln_final.hook_scale",) if norm is not None else ()

    def push(l: int, cache: dict[str, Tensor], y: Tensor) -> Tensor:  # [b, T, d_mlp]
        scale = cache[scale_hook[0]].double() if scale_hook else 1.0  # [b, T, 1]
        return cache[models.mlp_hook(l)].double() * maps[l].T[y.clamp(min=0)] / scale

    def mean_push(rows: Tensor) -> Tensor:
        return _token_mean(model, task, rows, batch_size, progress, push, scale_hook)

    return mean_push(target) - mean_push(reference)


def _ekfac(model, task, target, reference, batch_size, steps, seed, progress, *, damping):
    """EK-FAC INFLUENCE (Grosse et al. 2023's factors; mechgrok's split over neurons): the target
    sequences' self-influence ``g_zᵀ (F + λI)⁻¹ g_z`` (``g_z`` the gradient of a sequence's summed
    next-token loss), with the EK-FAC factors fitted on the task's training rows, split over the
    MLP neurons: neuron ``n`` of layer ``l`` gets the terms of its own weights, row ``n`` of
    ``W_in`` (with ``b_in[n]``) and column ``n`` of ``W_out``, ``Σ (P ∘ G)`` over those entries
    with ``P = (F + λI)⁻¹ G``; averaged over target sequences. Over a layer the scores and the
    ``W_out`` bias terms sum to the two maps' share of the self-influence. High: the target's own
    gradient runs through the neuron's weights, preconditioned by how little the rest of the
    training data constrains them. A sequence already fitted to near-zero loss has a small gradient
    everywhere, so this finds the neurons of sequences still being learned better than those of
    memorized ones (INJ recall 0.17-0.5 on the tiny test models, against 0.83-1 for zero-out)."""
    from mechgrok.influence import EKFAC  # noqa: PLC0415 (influence is heavy; only this method needs it)

    ek = EKFAC(model, task.sequences("all"), modules=[f"blocks.{l}.mlp.{w}" for l in range(models.n_layers(model))
                                                      for w in ("W_in", "W_out")],
               damping=damping, batch_size=batch_size, progress=progress, threads=None)
    ek.fit(task.train.nonzero().flatten())
    d = model.cfg.d_mlp
    score = torch.zeros(models.n_layers(model), d, dtype=torch.float64)
    for b in _batches(target, batch_size):
        G = ek.gradients(b)
        P = ek.precondition(G)
        for l in range(len(score)):
            w_in, w_out = f"blocks.{l}.mlp.W_in", f"blocks.{l}.mlp.W_out"
            score[l] += (P[w_in] * G[w_in]).sum((0, 2)).cpu()  # [d]: row n (its input weights and bias)
            score[l] += (P[w_out] * G[w_out])[:, :, :d].sum((0, 1)).cpu()  # [d]: column n (output weights)
    return score / len(target)


def _masked_post(model, task, rows, batch_size) -> list[Float[Tensor, "positions d_mlp"]]:
    """Each layer's ``hook_post`` at the target-predicting positions of ``rows`` (``task.loss_mask``),
    ``[positions, d_mlp]`` float32 on the CPU, positions in row-major order."""
    out: list[list[Tensor]] = [[] for _ in range(models.n_layers(model))]
    for b in _batches(rows, batch_size):
        x, y = _xy(model, task, b)
        cache, keep = _post_acts(model, x), y != IGNORE  # keep: [b, T]
        for l, parts in enumerate(out):
            parts.append(cache[models.mlp_hook(l)][keep].float().cpu())  # [b_positions, d_mlp]
    return [torch.cat(parts) for parts in out]


class _TopK(NamedTuple):
    """A fitted TopK SAE on raw activations: ``z = TopK_k(ReLU((x / scale - b_dec) W_enc + b_enc))``,
    ``x ≈ scale * (z W_dec + b_dec)``, rows of ``W_dec`` of unit norm."""
    W_enc: Tensor  # [d, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d]
    b_dec: Tensor  # [d]
    scale: float  # RMS of the training activations' entries
    k: int

    def encode(self, x: Float[Tensor, "rows d"]) -> Float[Tensor, "rows d_sae"]:
        pre = (x / self.scale - self.b_dec) @ self.W_enc + self.b_enc  # [rows, d_sae]
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())


def _fit_topk(target: Float[Tensor, "p_t d"], reference: Float[Tensor, "p_r d"], d_sae: int, k: int, steps: int,
              share: float, lr: float, g: torch.Generator, progress: bool, desc: str) -> _TopK:
    """Adam on the mean squared reconstruction error of a TopK SAE (Gao et al. 2024: decoder rows
    renormalised to unit norm after every step, ``W_enc`` initialised to ``W_decᵀ``, ``b_dec`` to the
    data mean; no AuxK loss). Each step's ``_SAE_BATCH`` rows are drawn with replacement, a
    ``share`` of them from the target positions and the rest from the reference positions."""
    n_t = round(share * _SAE_BATCH)
    pools = [(target, n_t), (reference, _SAE_BATCH - n_t)]
    scale = math.sqrt(max(sum(n / _SAE_BATCH * float(x.pow(2).mean()) for x, n in pools if n), 1e-24))  # the RMS
    d = target.shape[1]
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    mean = sum(n / _SAE_BATCH * x.mean(0) for x, n in pools if n) / scale  # [d]: the batches' expected mean
    params = [W_dec.T.clone(), torch.zeros(d_sae), W_dec, mean.clone()]  # W_enc, b_enc, W_dec, b_dec
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in tqdm(range(steps), disable=not progress, desc=desc):
        x = torch.cat([x[torch.randint(len(x), (n,), generator=g)] for x, n in pools if n]) / scale  # [B, d]
        with torch.enable_grad():
            z = _TopK(*params, 1.0, k).encode(x)  # [B, d_sae]
            loss = (z @ params[2] + params[3] - x).pow(2).sum(-1).mean()
            grads = torch.autograd.grad(loss, params)
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        with torch.no_grad():
            params[2] /= params[2].norm(dim=1, keepdim=True).clamp(min=1e-12)
    return _TopK(*(p.detach() for p in params), scale, k)


def _sae(model, task, target, reference, batch_size, steps, seed, progress, *, expansion, k, sae_steps,
         target_share, lr, per_layer):
    """SAE FEATURES (mechgrok's; the firing-rate selectivity of ``mg.memorization.planted_features``
    turned into neuron scores). Per layer, a TopK SAE (Gao et al. 2024, "Scaling and evaluating
    sparse autoencoders") with ``expansion * d_mlp`` features, ``k`` active, is trained in memory
    (``_fit_topk``, ``sae_steps`` Adam steps, seeded by ``seed``) on ``hook_post`` at the
    target-predicting positions of the target and the reference sequences, ``target_share`` of each
    batch from the target. Feature ``f``'s selectivity is ``s_f = rate_f(target) - rate_f(reference)``,
    its firing rates (``z_f > 0``) over those positions; ``a_f`` is its mean activation over the
    target positions (0 where it does not fire), in the units of the raw activations. Neuron ``n``
    scores ``Σ_f max(s_f, 0) a_f |W_dec[f, n]|``: the part of the target's reconstruction that the
    target-selective features carry, spread over neurons by the decoder. ``per_layer=True`` divides
    each layer's scores by their sum (a neuron's share of its layer's selective reconstruction), so
    that every layer weighs the same: the raw scores favour the layer whose features are the more
    target-selective (on the ``lm`` preset, layer 1 over layer 0, so INJ finds only the injected
    neurons of layer 1; see docs/methods.md for the numbers). The SAE sees the target
    on ``target_share`` of its inputs, far more than its share of the data, so that features can
    specialise on it (with ``target_share=0`` it is trained on the reference alone, and a target
    the model does not encode apart from other text gets no selective features). Limits: the
    score reads co-activation, not causal effect (a neuron a selective feature writes to scores
    even if the target's loss does not depend on it); it depends on the SAE's seed and size; with
    few steps some features stay dead (no AuxK loss), which only removes capacity. The SAEs are
    plain torch, trained on the CPU and never saved (``mg.sae.train`` writes a folder even with
    ``out=None``); the activations of every target-predicting position of target and reference are
    held in memory, float32 (about 310 MB for the ``lm`` preset: 150,700 positions x 256 neurons
    x 2 layers)."""
    d = model.cfg.d_mlp
    d_sae = expansion * d
    if k > d_sae:
        raise ValueError(f"localize(method='sae'): k={k} is more than the {d_sae} features (expansion {expansion} x "
                         f"d_mlp {d}); lower k or raise expansion")
    acts_t, acts_r = _masked_post(model, task, target, batch_size), _masked_post(model, task, reference, batch_size)
    g = torch.Generator().manual_seed(seed)
    score = torch.zeros(models.n_layers(model), d, dtype=torch.float64)
    for l in range(len(score)):
        sae = _fit_topk(acts_t[l], acts_r[l], d_sae, k, sae_steps, target_share, lr, g, progress, f"sae layer {l}")
        z_t = sae.encode(acts_t[l]).double()  # [P_t, d_sae]
        fired_r = sum((sae.encode(c) > 0).double().sum(0) for c in acts_r[l].split(4096))  # [d_sae]
        selectivity = (z_t > 0).double().mean(0) - fired_r / len(acts_r[l])  # [d_sae]
        weight = selectivity.clamp(min=0) * z_t.mean(0) * sae.scale  # [d_sae], in the raw activations' units
        score[l] = weight @ sae.W_dec.double().abs()  # [d]
        if per_layer and score[l].sum() > 0:
            score[l] /= score[l].sum()  # the neuron's share of its layer's selective reconstruction
    return score


class _Method(NamedTuple):
    fn: Callable[..., Tensor]
    options: dict[str, Any]  # its settings and their defaults
    reference: bool  # contrasts with reference sequences
    trains: bool  # optimises masks for ``steps``
    seeded: bool = False  # draws random numbers from ``seed`` (recorded in the options)


METHODS: dict[str, _Method] = {
    "activations": _Method(_activations, {"weight_norm": False}, True, False),
    "integrated_gradients": _Method(_integrated_gradients, {"ig_steps": 16}, False, False),
    "zero_out": _Method(_zero_out, {}, False, False),
    "slimming": _Method(_slimming, {"lam": 30.0, "lr": 0.1}, False, True),
    "hard_concrete": _Method(_hard_concrete, {"lam": 30.0, "lr": 0.1, "beta": 2 / 3, "init": 0.5}, False, True, True),
    "memorization_score": _Method(_memorization_score, {}, True, False),
    "ekfac": _Method(_ekfac, {"damping": 0.1}, False, False),
    "sae": _Method(_sae, {"expansion": 2, "k": 8, "sae_steps": 300, "target_share": 0.5, "lr": 3e-3,
                          "per_layer": False}, True, False, True),
}
"""Localization methods: name -> function, settings (defaults), reads a reference, trains masks, is seeded."""

_CHECKS: dict[str, tuple[Callable, dict]] = {
    "ig_steps": (check_int, dict(low=1)), "lam": (check_float, dict(low=0.0)),
    "lr": (check_float, dict(low=0.0, low_open=True)), "beta": (check_float, dict(low=0.0, low_open=True)),
    "init": (check_float, dict(low=0.0, high=1.0, low_open=True, high_open=True)),
    "damping": (check_float, dict(low=0.0, low_open=True)),
    "expansion": (check_int, dict(low=1)), "k": (check_int, dict(low=1)), "sae_steps": (check_int, dict(low=1)),
    "target_share": (check_float, dict(low=0.0, high=1.0)),
}


def _check_model(model: nn.Module, task: SequenceTask | None, owner: str) -> None:
    if task is not None:
        _check(model, task, owner)
    elif not isinstance(model, models.HookedTransformer):
        raise TypeError(f"{owner} needs a HookedTransformer, got {type(model).__name__}")
    if not models.has_mlp(model):
        raise ValueError(f"{owner}: this model is {models.mlp_kind(model)}, so it has no layer of MLP neurons "
                         "(blocks.L.mlp.hook_post) to localize or drop; build it with dense MLPs "
                         "(mg.models.transformer(..., attn_only=False, num_experts=None))")


def localize(model: nn.Module, task: SequenceTask, target: str | Tensor, method: str, *,
             reference: str | Tensor | None = None, batch_size: int = 256, steps: int | None = None, seed: int = 0,
             threads: int | None = 1, progress: bool = False, **options: Any) -> Localization:
    """Score every MLP neuron for how much the ``target`` sequences depend on it (module docstring).

    Args:
        model: a HookedTransformer with MLPs whose vocabulary and context fit ``task``; run in eval
            mode with temporary hooks and left as it was (weights, mode and ``.grad`` unchanged).
        task: a ``SequenceTask``.
        target: a group of ``task`` (``"planted_r10"``) or a 1-D tensor of its row indices.
        method: one of ``METHODS`` (documented at its function: ``_zero_out``, ...).
        reference: the sequences whose behaviour should be kept (group or rows), read by
            ``activations``, ``memorization_score`` and ``sae`` only (the others refuse it); default:
            the ``"train"`` rows not in ``target``.
        batch_size: sequences (or sequence copies) per forward.
        steps: optimisation steps of ``slimming`` / ``hard_concrete`` (default 200); others refuse it.
        seed: seeds the gate noise of ``hard_concrete`` and the SAEs of ``sae`` (a local generator).
        threads: torch threads meanwhile (restored afterwards; None leaves them).
        progress: show progress bars.
        **options: the method's settings, ``METHODS[method].options`` with their defaults:
            ``weight_norm``; ``ig_steps``; ``lam`` and ``lr`` of the mask methods (30 and 0.1,
            chosen on tiny ``lm_corpus`` models: tune ``lam`` for another model); ``beta``, ``init``;
            ``damping``; ``sae``'s ``expansion`` (2), ``k`` (8), ``sae_steps`` (300), ``target_share``
            (0.5), its Adam ``lr`` (3e-3) and ``per_layer`` (False).

    Returns:
        A ``Localization`` with ``scores [n_layers, d_mlp]`` (float64).
    """
    owner = f"localize(method={method!r})"
    if method not in METHODS:
        raise ValueError(f"unknown localization method {method!r}; choose one of {list(METHODS)}")
    fn, defaults, uses_reference, trains, seeded = METHODS[method]
    if unknown := sorted(set(options) - set(defaults)):
        raise TypeError(f"{owner}: unknown options {unknown}; it takes {list(defaults) or 'none'}")
    for name, value in options.items():
        if name in ("weight_norm", "per_layer") and not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
        if name in _CHECKS:
            options[name] = _CHECKS[name][0](value, name, owner=owner, **_CHECKS[name][1])
    options = {**defaults, **options}
    _check_model(model, task, "localize")
    batch_size = check_int(batch_size, "batch_size", low=1, owner=owner)
    seed = check_int(seed, "seed", low=0, owner=owner)
    if steps is not None and not trains:
        raise ValueError(f"{owner}: steps is for the mask methods (slimming, hard_concrete); leave it out")
    steps = check_int(200 if steps is None else steps, "steps", low=1, owner=owner)
    target_rows = _rows(task, target, "target", owner)
    if reference is not None and not uses_reference:
        raise ValueError(f"{owner}: this method reads the target alone and would ignore reference=; leave it out "
                         f"({', '.join(m for m, e in METHODS.items() if e.reference)} contrast with a reference)")
    ref_rows = None
    if uses_reference:
        ref_rows = _rows(task, _others(task, target_rows) if reference is None else reference,
                         "reference" + (" (default: the train rows not in target)" if reference is None else ""), owner)
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), torch.no_grad():  # the gradient methods turn it on where they need it
            scores = fn(model, task, target_rows, ref_rows, batch_size, steps, seed, progress, **options)
    finally:
        model.train(was_training)
    return Localization(method=method, scores=scores, target_rows=target_rows, reference_rows=ref_rows,
                        options={**options, **({"steps": steps} if trains else {}),
                                 **({"seed": seed} if trains or seeded else {})})
