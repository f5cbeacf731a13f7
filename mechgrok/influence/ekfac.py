"""EK-FAC influence functions on transformer-lens hook points and ``nn.Linear`` modules.

``EKFAC(model, data, ...).fit(train)`` fits, per linear map (see :mod:`mechgrok.influence.maps`), the
K-FAC factors ``A = E[a aᵀ]`` and ``S = E[g gᵀ]``, their float64 eigenbases, and the eigenvalue
correction ``Λ = E[(Q_Sᵀ G Q_A)²]`` (George et al. 2018, "Fast Approximate Natural Gradient Descent
in a Kronecker-factored Eigenbasis"). ``scores(queries, train)`` then gives the influence
``g_qᵀ (F + λI)⁻¹ g_z`` of every training example on every query (Koh & Liang 2017; Grosse et al.
2023, "Studying Large Language Model Generalization with Influence Functions") with ``F`` the
block-diagonal (one block per map) EK-FAC approximation of the Fisher.

Models and data: a HookedTransformer (any pre-norm config: LayerNorm / RMSNorm, gated MLPs, GQA,
rotary, parallel attention), a HookedMLP, or any ``nn.Module`` with ``nn.Linear`` / ``transformers``
``Conv1D`` layers (Hugging Face output objects are unwrapped); the data is a mechgrok Task (the loss
at the answer position) or :class:`~mechgrok.influence.Sequences` / an integer tensor ``[N, T]`` (the
next-token loss summed over positions, :mod:`mechgrok.influence.data`). What the fit covers is in
``.coverage`` (:mod:`mechgrok.influence.coverage`): it is logged, shown in the ``repr``, saved, and
layers holding a weight matrix EK-FAC cannot fit raise a :class:`~mechgrok.influence.CoverageWarning`.

Limits: the Fisher is block-diagonal across maps (no cross-layer curvature); tokens are treated
as independent in ``A`` and ``S`` (the correction ``Λ`` is refit from whole-example gradients);
parameters outside linear maps (LayerNorm scales, an ``nn.Module``'s embeddings) are ignored (see
``.coverage``); the damping ``λ`` changes rankings a lot, so it is explicit and saved with the factors.

>>> import mechgrok as mg
>>> from mechgrok.influence import EKFAC
>>> task = mg.tasks.modular_arithmetic(p=5, op="add", train_frac=0.6, seed=0)
>>> model = mg.models.mlp(task, width=8)
>>> ek = EKFAC(model, task, fisher="empirical", progress=False).fit("train")
>>> ek.scores("test", "train").shape == (int(task.test.sum()), int(task.train.sum()))
True
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok._config import check_float, check_int
from mechgrok._config import from_dict as config_from_dict
from mechgrok._threads import torch_threads
from mechgrok.influence import distributed as D
from mechgrok.influence._index import as_index
from mechgrok.influence.coverage import Coverage, coverage
from mechgrok.influence.data import Sequences, as_data, batch_targets, check_vocab, inputs_of
from mechgrok.influence.factors import (DAMPING_MODES, covariance_sums, damping_values, eigenbasis, precondition,
                                        rotated_square_dot, rotated_square_sum)
from mechgrok.influence.grads import LOSSES, fisher_noise, map_inputs_and_grads, output_grads, per_example_G
from mechgrok.influence.maps import LinearMap, linear_maps, select_maps
from mechgrok.influence.scores import low_rank as _low_rank
from mechgrok.influence.scores import pairwise_full, pairwise_low_rank
from mechgrok.tasks import Task

__all__ = ["EKFAC", "EKFACConfig"]

log = logging.getLogger(__name__)

FISHERS = ("true", "empirical")


@dataclass(frozen=True, kw_only=True)
class EKFACConfig:
    """What EK-FAC fits; saved with the factors."""

    modules: tuple[str, ...] | str = "all"  # "all" or map names ("blocks.0.mlp.W_in", "fc1", ...)
    fisher: str = "true"  # "true": labels sampled from the model; "empirical": the data labels
    damping: float = 0.1  # λ (absolute) or its multiple of mean(Λ) per map (relative)
    # "relative": λ_m = damping × mean(Λ_m) per map (Grosse et al., kronfluence); "relative_global": one
    # λ = damping × the mean eigenvalue of the whole Fisher; "absolute": λ = damping
    damping_mode: str = "relative"
    n_samples: int = 1  # sampled labels per example for the true Fisher
    seed: int = 0  # seeds the sampled labels (a local torch.Generator)
    # per-example loss: cross_entropy (at the answer position of a Task; summed over the target
    # tokens of Sequences) | mse (Tasks only)
    loss: str = "cross_entropy"
    per_head: bool = False  # one map per attention head (W_Q.h0, ...; b_O is then left out)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"EKFAC: {msg}")

        if not isinstance(self.modules, str):
            if not isinstance(self.modules, (list, tuple)):
                bad(f"modules must be 'all' or a list of map names, got {self.modules!r}")
            object.__setattr__(self, "modules", tuple(self.modules))
        if self.fisher not in FISHERS:
            bad(f"fisher must be one of {FISHERS}, got {self.fisher!r}")
        if self.damping_mode not in DAMPING_MODES:
            bad(f"damping_mode must be one of {DAMPING_MODES}, got {self.damping_mode!r} "
                "('relative' scales damping by each map's mean corrected eigenvalue)")
        try:  # finite: inf would make every score 0, NaN every score NaN
            check_float(self.damping, "damping", low=0.0, low_open=True)
        except (TypeError, ValueError):
            bad(f"damping must be a positive finite number, got {self.damping!r} (0.1 with damping_mode='relative' "
                "is the usual heuristic)")
        try:
            check_int(self.n_samples, "n_samples", low=1)
        except (TypeError, ValueError):
            bad(f"n_samples must be a positive integer, got {self.n_samples!r}")
        check_int(self.seed, "seed", low=0, owner="EKFAC")
        if not isinstance(self.per_head, bool):
            bad(f"per_head must be True or False, got {self.per_head!r}")
        if not isinstance(self.modules, (str, tuple)) or (isinstance(self.modules, tuple) and not all(
                isinstance(m, str) for m in self.modules)):
            bad(f"modules must be 'all' or a list of map names, got {self.modules!r}")
        if self.loss not in LOSSES:
            bad(f"loss must be one of {LOSSES}, got {self.loss!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = self.modules if isinstance(self.modules, str) else list(self.modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EKFACConfig:
        return config_from_dict(cls, d)


class EKFAC:
    """Eigenvalue-corrected K-FAC factors of a model's Fisher, and influence scores from them.

    Args:
        model: a ``HookedTransformer``, ``HookedMLP`` or any ``nn.Module`` with ``nn.Linear`` or
            ``transformers`` ``Conv1D`` layers that maps token ids ``[batch, n_ctx]`` to logits
            ``[batch, C]`` or ``[batch, pos, C]`` (or an object holding them: ``.logits``, a tuple).
            It is not modified (hooks are removed after each pass; no ``.grad`` is written). The
            passes run on the model's device.
        data: a mechgrok Task (the loss at the answer position; index arguments are indices,
            boolean masks or split names of its examples) or :class:`~mechgrok.influence.Sequences`
            / integer token ids ``[N, T]`` (the next-token loss summed over positions, per sequence;
            index arguments are indices or boolean masks).
        modules, fisher, damping, damping_mode, n_samples, seed, loss, per_head: see :class:`EKFACConfig`.
        batch_size: examples per forward pass.
        progress: show tqdm progress bars (rank 0 only).
        distributed: use an initialised ``torch.distributed`` process group (``None``: when there is
            one); see :mod:`mechgrok.influence.distributed`.
        threads: torch threads during the passes (``None``: leave as is; 1 is fastest on 2 cores).

    Attributes:
        maps: the fitted maps (:class:`~mechgrok.influence.LinearMap`).
        coverage: a :class:`~mechgrok.influence.Coverage`: the parameters the maps cover and those
            they do not (logged at INFO when the EKFAC is built).
        data: the Task or Sequences.

    Fitted attributes (set by :meth:`fit` or :meth:`load`), dicts keyed by map name:
        ``A_`` ``[i, i]`` (``[i]`` for one-hot inputs), ``S_`` ``[o, o]``, ``QA_``, ``eigA_``, ``QS_``,
        ``eigS_``, ``lambda_`` ``[o, i]`` (the corrected eigenvalues), ``damping_`` (absolute λ per
        map), ``n_tokens_`` (tokens × samples behind ``A_`` / ``S_``); ``n_examples_`` (examples ×
        samples behind ``lambda_``) and ``fit_idx_`` (the fit examples). ``i = d_in + 1`` with a bias.
    """

    def __init__(self, model: nn.Module, data: Task | Sequences | Tensor, *, modules: str | list[str] = "all",
                 fisher: str = "true", damping: float = 0.1, damping_mode: str = "relative", n_samples: int = 1,
                 seed: int = 0, loss: str = "cross_entropy", per_head: bool = False, batch_size: int = 256,
                 progress: bool = True, distributed: bool | None = None, threads: int | None = 1):
        self.config = EKFACConfig(modules=modules, fisher=fisher, damping=damping, damping_mode=damping_mode,
                                  n_samples=n_samples, seed=seed, loss=loss, per_head=per_head)
        data = as_data(data, "EKFAC")
        self.per_token = isinstance(data, Sequences)
        if self.per_token and loss != "cross_entropy":
            raise ValueError(f"EKFAC: loss={loss!r} is per example; Sequences use the next-token cross_entropy "
                             "(use a Task for Doshi et al.'s MSE)")
        check_vocab(model, data)
        batch_size = check_int(batch_size, "batch_size", low=1, owner="EKFAC")
        self.model, self.data = model, data
        self.batch_size, self.progress, self.distributed, self.threads = batch_size, progress, distributed, threads
        known = linear_maps(model, per_head, self.per_token)
        self.maps: list[LinearMap] = select_maps(known, self.config.modules)
        self.coverage: Coverage = coverage(model, self.maps, known)
        log.info("%s", self.coverage)
        self.device = next(model.parameters()).device
        if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
            warnings.warn(f"EKFAC: this {type(model).__name__} is in training mode with dropout, so every pass sees "
                          "other random masks (the fit's two passes and the scores disagree); call model.eval() "
                          "first", UserWarning, stacklevel=2)

    @property
    def task(self) -> Task:
        """The Task (for code written before Sequences); see :attr:`data`."""
        if not isinstance(self.data, Task):
            raise AttributeError("this EKFAC reads Sequences, not a Task; use .data")
        return self.data

    # ------------------------------------------------------------------ helpers
    @property
    def fitted(self) -> bool:
        return hasattr(self, "lambda_")

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("this EKFAC is not fitted yet: call .fit(train_idx) first, or "
                               "EKFAC.load(folder, model, data) to reuse saved factors")

    def _bar(self, total: int, desc: str, rank: int):
        return tqdm(total=total, desc=desc, disable=not self.progress or rank != 0, leave=False)

    def _passes(self, idx: Tensor, labels: str | None, noise: Tensor | None, desc: str, rank: int):
        """Yield ``(start, a, gs)`` per batch of ``idx`` (see ``map_inputs_and_grads``); ``labels``: which
        targets (``"labels"``, ``"true_labels"``), or ``None`` to sample them from ``noise``."""
        cfg = self.config
        inputs = inputs_of(self.data)
        with self._bar(idx.numel(), desc, rank) as bar:
            for start in range(0, idx.numel(), self.batch_size):
                b = idx[start:start + self.batch_size]
                targets, mask = batch_targets(self.data, b, labels or "labels")
                lab = targets.to(self.device) if labels is not None else None
                mask = mask.to(self.device) if mask is not None else None
                nz = noise[start:start + self.batch_size] if noise is not None else None

                def dl(logits, lab=lab, nz=nz, mask=mask):
                    return output_grads(logits, lab, cfg.loss, nz, mask)

                a, gs = map_inputs_and_grads(self.model, self.maps, inputs[b].to(self.device), dl, self.per_token)
                yield start, a, gs
                bar.update(b.numel())

    # ------------------------------------------------------------------ fit
    def fit(self, train_idx) -> EKFAC:
        """Fit ``A``, ``S``, their eigenbases and the corrected eigenvalues on ``train_idx``.

        Two passes over the examples (George et al. 2018, Alg. 1): the covariances, then the
        eigenvalue correction from per-example gradients in the new eigenbasis. Returns ``self``.
        """
        cfg = self.config
        idx = as_index(train_idx, self.data, "train_idx")
        rank, size = D.world(self.distributed)
        part = D.shard(idx.numel(), rank, size)
        mine = idx[part]
        noise = None
        if cfg.fisher == "true":
            d_out, pos = (0, self.data.n_ctx - 1) if self.per_token else (self.data.d_vocab_out, None)
            noise = fisher_noise(idx.numel(), cfg.n_samples, d_out, cfg.loss, cfg.seed, pos)[part]
        labels = "labels" if cfg.fisher == "empirical" else None
        f64 = dict(dtype=torch.float64, device=self.device)
        with torch_threads(self.threads):
            A_sum = {m.name: torch.zeros((m.shape[1],) if m.onehot else (m.shape[1],) * 2, **f64) for m in self.maps}
            S_sum = {m.name: torch.zeros((m.d_out, m.d_out), **f64) for m in self.maps}
            counts = torch.zeros(len(self.maps), 2, **f64)  # tokens behind A, behind S
            for _, a, gs in self._passes(mine, labels, noise, "EK-FAC covariances", rank):
                for j, m in enumerate(self.maps):
                    A_sum[m.name] += covariance_sums(a[m.name], None, m.onehot)[0]  # same for every sample
                    for g in gs:
                        S_sum[m.name] += covariance_sums(None, g[m.name])[1]
                    T = a[m.name].shape[0] * a[m.name].shape[1]
                    counts[j] += torch.tensor([T, T * len(gs)], **f64)
            D.all_reduce_([*A_sum.values(), *S_sum.values(), counts], size)

            A, S, QA, eigA, QS, eigS = {}, {}, {}, {}, {}, {}
            for j, m in enumerate(self.maps):
                A[m.name], S[m.name] = A_sum[m.name] / counts[j, 0], S_sum[m.name] / counts[j, 1]
                if rank == 0:
                    QA[m.name], eigA[m.name], QS[m.name], eigS[m.name] = eigenbasis(A[m.name], S[m.name])
                else:
                    i, o = m.shape[1], m.d_out
                    QA[m.name], eigA[m.name] = torch.empty((i, i), **f64), torch.empty(i, **f64)
                    QS[m.name], eigS[m.name] = torch.empty((o, o), **f64), torch.empty(o, **f64)
            D.broadcast_([t for d in (QA, eigA, QS, eigS) for t in d.values()], size)

            lam_sum = {m.name: torch.zeros(m.shape, **f64) for m in self.maps}
            n_ex = torch.zeros(1, **f64)
            for _, a, gs in self._passes(mine, labels, noise, "EK-FAC eigenvalue correction", rank):
                for m in self.maps:
                    for g in gs:  # Σ_b R_b², R_b = Q_Sᵀ G_b Q_A
                        lam_sum[m.name] += rotated_square_sum(a[m.name], g[m.name], QS[m.name],
                                                              None if m.onehot else QA[m.name])
                n_ex += a[self.maps[0].name].shape[0] * len(gs)
            D.all_reduce_([*lam_sum.values(), n_ex], size)

        self.A_, self.S_, self.QA_, self.eigA_, self.QS_, self.eigS_ = A, S, QA, eigA, QS, eigS
        self.lambda_ = {k: v / n_ex for k, v in lam_sum.items()}
        self.n_tokens_ = {m.name: [int(counts[j, 0]), int(counts[j, 1])] for j, m in enumerate(self.maps)}
        self.n_examples_ = int(n_ex)
        self.fit_idx_ = idx.cpu()
        self.damping_ = damping_values(self.lambda_, cfg.damping, cfg.damping_mode)
        lo, hi = min(self.damping_.values()), max(self.damping_.values())
        log.info("EK-FAC fitted %d maps on %d examples (%d label samples each); damping %.3g to %.3g "
                 "(per map: .damping_)", len(self.maps), idx.numel(), cfg.n_samples if cfg.fisher == "true" else 1,
                 lo, hi)
        return self

    def with_damping(self, damping: float, damping_mode: str = "relative") -> EKFAC:
        """A copy sharing these factors with another damping (no refit): rankings depend on ``λ``."""
        self._check_fitted()
        new = object.__new__(EKFAC)
        new.__dict__.update(self.__dict__)
        new.config = EKFACConfig.from_dict({**self.config.to_dict(), "damping": damping, "damping_mode": damping_mode})
        new.damping_ = damping_values(self.lambda_, damping, damping_mode)
        return new

    # ------------------------------------------------------------------ gradients
    def gradients(self, idx, labels: str = "labels") -> dict[str, Float[Tensor, "n o i"]]:
        """Per-example gradients ``G`` ``[n, d_out, d_in (+1)]`` of each map, float64, read through the
        hooks with the examples' ``labels`` (``"labels"`` or ``"true_labels"``). For checks and
        small sets: this materialises all of them."""
        idx = as_index(idx, self.data, "idx")
        batch_targets(self.data, idx[:1], labels)  # checks ``labels`` before any pass
        out: dict[str, list[Tensor]] = {m.name: [] for m in self.maps}
        with torch_threads(self.threads):
            for _, a, gs in self._passes(idx, labels, None, "gradients", 0):
                for m in self.maps:
                    out[m.name].append(per_example_G(a[m.name], gs[0][m.name]))
        return {k: torch.cat(v) for k, v in out.items()}

    def precondition(self, G: dict[str, Float[Tensor, "n o i"]]) -> dict[str, Tensor]:
        """``(F + λ)⁻¹ G`` per map with the EK-FAC factors (batched over the leading dim)."""
        self._check_fitted()
        return {k: precondition(v, self.QS_[k], self.QA_[k], self.lambda_[k], self.damping_[k]) for k, v in G.items()}

    # ------------------------------------------------------------------ scores
    def scores(self, query_idx, train_idx=None, *, by_module: bool = False, low_rank: int | None = None,
               query_labels: str = "labels") -> Tensor | dict[str, Tensor]:
        """Pairwise influence ``g_qᵀ (F + λI)⁻¹ g_z``, float64 ``[n_query, n_train]``.

        Query gradients are preconditioned once; training examples stream past in batches (and are
        sharded over processes), so no more than one batch of training gradients exists at a time.

        Args:
            query_idx: the queries (indices, mask or split name).
            train_idx: the training examples (default: the fit examples).
            by_module: return ``{map name: [n_query, n_train]}`` whose values sum to the total
                (per head with ``per_head=True``).
            low_rank: keep a rank-``r`` approximation of each preconditioned query gradient per map
                (query batching, Grosse et al. 2023); ``None`` keeps them whole.
            query_labels: the queries' labels: ``"labels"`` (training labels) or ``"true_labels"``.
        """
        self._check_fitted()
        if low_rank is not None and (isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1):
            raise ValueError(f"low_rank must be a positive integer or None, got {low_rank!r}")
        q = as_index(query_idx, self.data, "query_idx")
        t = self.fit_idx_ if train_idx is None else as_index(train_idx, self.data, "train_idx")
        rank, size = D.world(self.distributed)
        part = D.shard(t.numel(), rank, size)
        with torch_threads(self.threads):
            P = self.precondition(self.gradients(q, labels=query_labels))  # map -> [nq, o, i]
            if low_rank is not None:
                P = {k: _low_rank(v, low_rank) for k, v in P.items()}
            mine = t[part]
            out = {m.name: torch.zeros(q.numel(), mine.numel(), dtype=torch.float64, device=self.device)
                   for m in self.maps}
            for start, a, gs in self._passes(mine, "labels", None, "influence scores", rank):
                cols = slice(start, start + a[self.maps[0].name].shape[0])
                for m in self.maps:
                    Pm, am, gm = P[m.name], a[m.name], gs[0][m.name]
                    out[m.name][:, cols] = pairwise_full(Pm, am, gm) if low_rank is None else \
                        pairwise_low_rank(Pm[0], Pm[1], am, gm)
            out = {k: D.all_gather_columns(v, t.numel(), size) for k, v in out.items()}
        return out if by_module else torch.stack(list(out.values())).sum(0)

    def candidate_scores(self, query_idx, candidates, *, low_rank: int | None = None,
                         query_labels: str = "labels") -> Float[Tensor, "q k"]:
        """Influence of each query on its own candidate training examples only, float64
        ``[n_query, k]``: entry ``[i, j]`` is the score of ``candidates[i, j]`` on query ``i``.

        The candidate sets come from TF-IDF filtering (Grosse et al. 2023;
        ``mechgrok.influence.tfidf_candidates``) or any other ``[n_query, k]`` task indices.
        Training gradients are computed once for the union of the sets, so the cost follows the
        union's size; the values equal the matching columns of :meth:`scores`.
        """
        q = as_index(query_idx, self.data, "query_idx")
        cand = torch.as_tensor(candidates)
        if cand.ndim != 2 or cand.shape[0] != q.numel() or cand.dtype in (torch.bool, torch.float32, torch.float64):
            raise ValueError(f"candidates must be integer task indices [n_query={q.numel()}, k], got shape "
                             f"{tuple(cand.shape)} and dtype {cand.dtype}")
        union, inverse = torch.unique(cand.long(), return_inverse=True)
        S = self.scores(q, union, low_rank=low_rank, query_labels=query_labels)  # [q, |union|]
        return S.gather(1, inverse.to(S.device))

    def self_influence(self, train_idx=None, *, by_module: bool = False) -> Tensor | dict[str, Tensor]:
        """Self-influence ``g_zᵀ (F + λI)⁻¹ g_z`` ``[n_train]`` (≥ 0), float64; a common
        memorization / outlier score (Grosse et al. 2023). ``by_module`` as in :meth:`scores`."""
        self._check_fitted()
        t = self.fit_idx_ if train_idx is None else as_index(train_idx, self.data, "train_idx")
        rank, size = D.world(self.distributed)
        part = D.shard(t.numel(), rank, size)
        mine = t[part]
        with torch_threads(self.threads):
            out = {m.name: torch.zeros(1, mine.numel(), dtype=torch.float64, device=self.device) for m in self.maps}
            for start, a, gs in self._passes(mine, "labels", None, "self-influence", rank):
                for m in self.maps:
                    val = rotated_square_dot(a[m.name], gs[0][m.name], self.QS_[m.name],
                                             None if m.onehot else self.QA_[m.name],
                                             1 / (self.lambda_[m.name] + self.damping_[m.name]))
                    out[m.name][0, start:start + val.shape[0]] = val
            out = {k: D.all_gather_columns(v, t.numel(), size)[0] for k, v in out.items()}
        return out if by_module else torch.stack(list(out.values())).sum(0)

    # ------------------------------------------------------------------ save / load
    def save(self, folder) -> Any:
        """Write ``folder/ekfac.json`` (settings, damping, provenance) and ``folder/factors.safetensors``
        atomically; returns the folder. See :func:`mechgrok.influence.saving.save`."""
        from mechgrok.influence.saving import save

        return save(self, folder)

    @classmethod
    def load(cls, folder, model: nn.Module, data: Task | Sequences | Tensor, **kwargs: Any) -> EKFAC:
        """Rebuild a fitted EKFAC from :meth:`save`'s folder for ``model`` (same maps and shapes; the
        weights may differ, e.g. another checkpoint) and ``data`` (of the kind it was fitted on).
        ``kwargs``: ``batch_size``, ``progress``, ``distributed``, ``threads``."""
        from mechgrok.influence.saving import load

        return load(cls, folder, model, data, **kwargs)

    def __repr__(self) -> str:
        state = f"fitted on {self.fit_idx_.numel()} examples" if self.fitted else "not fitted"
        left = len(self.coverage.not_covered) + len(self.coverage.partial)
        gaps = f"{left} parameter tensors not or partly covered (see .coverage)" if left else "nothing left out"
        cfg = self.config
        return (f"EKFAC({self.coverage.short()}, {gaps}; fisher={cfg.fisher!r}, damping={cfg.damping} "
                f"({cfg.damping_mode}), data {self.data.name!r}, {state})")
