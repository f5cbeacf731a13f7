"""Train a sparse autoencoder with sae-lens on activations captured from a model.

sae-lens is the engine: its ``TrainingSAE`` classes and ``SAETrainer`` do the optimisation; this
module feeds the trainer from ``mechgrok.capture`` (in memory) or a capture folder on disk, seeds
it, keeps wandb off, records a training log, and saves the result in sae-lens's own format
(``cfg.json`` + ``sae_weights.safetensors``, inference form) so ``sae_lens.SAE.load_from_disk``
loads it directly. ``train`` returns the SAE *as saved and reloaded*: every metric downstream is
computed on the form another user would load (BatchTopK, for one, becomes a JumpReLU SAE with one
threshold when saved; see ``ARCHITECTURES``).

Any model: ``data`` is a mechgrok ``Task`` (its ``inputs``; splits and labels for the analyses) or a
plain input tensor ``[N, ...]`` (token ids ``[N, T]`` for a language model), and ``hook`` a
transformer-lens hook name or the path of any submodule (``"transformer.h.0"`` of a Hugging Face
GPT-2), captured with ``backend`` (``mechgrok.capture``; default: transformer-lens for a
``HookedRootModule``, torch hooks otherwise). The *site* of an SAE is its hook and a position:
one position of a ``[N, pos, d]`` hook (``position=-1``, the answer position, by default), none
for an ``[N, d]`` hook, or every position (``position="all"``: each token is a training vector,
``[N, pos, d] -> [N * pos, d]``, row ``n * pos + t``). ``evaluate``, ``features`` and the
interventions read the site from the SAE's metadata (``site``).

Architectures (Bricken et al. 2023; Gao et al. 2024; Bussmann et al. 2024; Rajamanoharan et al. 2024):

- ``standard``: ReLU encoder, L1 penalty on activations weighted by decoder norms (``l1``).
- ``topk``: keep the ``k`` largest pre-activations (AuxK loss on dead latents).
- ``batchtopk``: the ``k × batch`` largest over a batch; saved as JumpReLU with the learned threshold.
- ``jumprelu``: per-latent thresholds trained with a straight-through estimator and an L0 penalty (``l0``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechgrok._config import check_float, check_int
from mechgrok._config import from_dict as config_from_dict
from mechgrok._io import atomic_dir, atomic_write_text
from mechgrok.capture import capture, load_cache
from mechgrok.models import device_of
from mechgrok.tasks import Task

__all__ = ["ARCHITECTURES", "SAEConfig", "train", "load", "activations", "site", "encode", "reconstruct", "SAE_FILES",
           "ALL"]

#: architecture -> (training SAE class, its config class) names in sae_lens, and the form it loads as.
ARCHITECTURES = {
    "standard": ("StandardTrainingSAE", "StandardTrainingSAEConfig", "StandardSAE"),
    "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig", "TopKSAE"),
    "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig", "JumpReLUSAE"),
    "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", "JumpReLUSAE"),
}
#: Files sae-lens writes for an inference SAE; ``training_log.json`` is mechgrok's addition.
SAE_FILES = ("cfg.json", "sae_weights.safetensors")
SPLITS = ("all", "train", "test")
#: The ``position`` of an SAE trained on every position of a ``[N, pos, d]`` hook.
ALL = "all"
Position = int | str | None  # an int, None (a position-free [N, d] hook) or ALL


def site(sae) -> tuple[str, Position]:
    """``(hook, position)`` an SAE trained by ``train`` reads (from its saved metadata); position
    is an int, ``None`` (an ``[N, d]`` hook) or ``"all"`` (every position)."""
    meta = sae.cfg.metadata
    hook = getattr(meta, "hook_name", None)
    if not hook:
        raise ValueError("this SAE has no hook_name in its metadata; train it with mechgrok.sae.train, or set "
                         "sae.cfg.metadata.hook_name (and mechgrok_position) to the activation it reads")
    return hook, getattr(meta, "mechgrok_position", None)


def encode(sae, x: Float[Tensor, "rows d"]) -> Float[Tensor, "rows d_sae"]:
    """``sae.encode(x)`` computed on the SAE's device, returned on ``x``'s."""
    return sae.encode(x.to(sae.device)).to(x.device)


def reconstruct(sae, x: Float[Tensor, "rows d"]) -> Float[Tensor, "rows d"]:
    """``decode(encode(x))`` on the SAE's device, returned on ``x``'s device in ``x``'s dtype."""
    return sae.decode(sae.encode(x.to(sae.device))).to(x.device, x.dtype)


def activations(model: nn.Module, data: Task | Tensor, hook: str, position: Position = -1, *,
                backend: str | None = None, progress: bool = False) -> Float[Tensor, "rows d"]:
    """The activations at ``hook`` for every example of ``data``, ``[rows, d]`` float32 (on the CPU).

    Args:
        model: any ``nn.Module`` (``hook`` a hook name or module path, see ``mechgrok.capture``).
        data: a ``Task`` (its ``inputs``) or an input tensor ``[N, ...]`` (token ids ``[N, T]``).
        position: one position of a ``[N, pos, d]`` hook (default -1: the answer position; rows
            ``= N``); ``"all"``: every position (rows ``= N * pos``, row ``n * pos + t``); ``None``
            keeps ``[N, d]`` hooks as they are and refuses positional ones.
        backend: the capture backend (None: transformer-lens for a ``HookedRootModule``, else torch).
    """
    act = capture(model, inputs_of(data), [hook], backend=backend, progress=progress)[hook]
    x = _at(act, check_position(position), hook)[0]
    return x.reshape(-1, x.shape[-1]).float()  # [N * pos, d] for every position


def site_activations(model: nn.Module, data: Task | Tensor, hook: str, position: Position, *,
                     backend: str | None = None) -> Float[Tensor, "N ... d"]:
    """The activations an SAE of site ``(hook, position)`` reads, float32 on the CPU: ``[N, d]`` for
    one position (``None``: the hook's own ``[N, d]``, or position -1 of a positional hook) and
    ``[N, pos, d]`` for every position, so a Task's split masks ``[N]`` still index them."""
    act = capture(model, inputs_of(data), [hook], backend=backend, progress=False)[hook]
    return _at(act, -1 if position is None else position, hook)[0].float()


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor itself, a Hugging Face output's ``.logits``, or a
    tuple's element 0."""
    if isinstance(output, Tensor):
        return output
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the model's output ({type(output).__name__}); the model must return "
                    "a tensor, a tuple starting with one, or an object with .logits")


def inputs_of(data: Task | Tensor) -> Tensor:
    """The model inputs ``[N, ...]`` of a ``Task`` or of a plain input tensor."""
    if isinstance(data, Task):
        return data.inputs
    if isinstance(data, Tensor):
        return data
    raise TypeError(f"data must be a mechgrok Task or an input tensor [N, ...] (token ids [N, T]), got "
                    f"{type(data).__name__}")


def check_position(position: Position) -> Position:
    """``position`` if it is an int, None or ``"all"``; a clear error otherwise."""
    if position is None or position == ALL:
        return position
    if isinstance(position, str):
        raise ValueError(f"position must be an integer, None or {ALL!r} (every position), got {position!r}")
    return check_int(position, "position")


def _at(act: Tensor, position: Position, hook: str) -> tuple[Tensor, Position]:
    """The activations at the site, ``[N, d]`` (or ``[N, pos, d]`` for ``"all"``), and the position
    they were read at (None for a position-free hook)."""
    if act.ndim == 2:
        return act, None
    if act.ndim == 3 and position == ALL:
        return act, ALL
    if act.ndim == 3 and position is not None:
        position = check_int(position, "position")
        if not -act.shape[1] <= position < act.shape[1]:
            raise ValueError(f"position {position} is outside the {act.shape[1]} positions of {hook!r}")
        return act[:, position], position
    raise ValueError(f"{hook!r} gives activations of shape {tuple(act.shape)}; SAEs here read [N, d] "
                     f"(pass position=... for a [N, pos, d] hook, e.g. -1 for the answer position or {ALL!r} "
                     "for every position)")


def _batches(x: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled minibatches of exactly ``batch_size`` rows (the trainer's statistics assume it)."""
    while True:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield torch.as_tensor(x[order[i:i + batch_size]], dtype=torch.float32)


@contextmanager
def _quiet_progress(show: bool):
    """Silence the tqdm bars sae-lens's trainer builds inside ``fit()`` (training, norm estimate)
    unless ``show``."""
    from functools import partial

    from sae_lens.training import activation_scaler, sae_trainer

    bars = {m: m.tqdm for m in (sae_trainer, activation_scaler)}
    if not show:
        for m, bar in bars.items():
            m.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        for m, bar in bars.items():
            m.tqdm = bar


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """How to train an SAE with sae-lens's trainer. The defaults (l1 1.0, l0 0.1) gave L0 21 / 13 at
    explained variance 0.989 / 0.995 on the demo model's MLP neurons (512 latents, 1,500 steps)."""

    architecture: str = "topk"  # standard | topk | batchtopk | jumprelu
    d_sae: int = 512  # number of latents
    k: float = 16  # active latents per example (topk; batchtopk: on average over a batch)
    l1: float = 1.0  # L1 coefficient (standard)
    l0: float = 0.1  # L0 coefficient (jumprelu)
    steps: int = 3000  # Adam steps (sae-lens clips gradients at norm 1)
    batch_size: int | None = None  # rows per step; None = min(256, number of activations)
    lr: float = 3e-3  # learning rate, constant after the warm-up
    warmup: int = 100  # linear warm-up steps
    seed: int = 0  # the SAE's initialisation and the batch order (a local generator)
    options: dict[str, Any] = field(default_factory=dict)  # any other sae-lens training-config field

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"SAEConfig: {msg}")

        if self.architecture not in ARCHITECTURES:
            bad(f"unknown architecture {self.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
        for name in ("d_sae", "steps"):
            try:
                check_int(getattr(self, name), name, low=1)
            except (TypeError, ValueError):
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        own, put = "SAEConfig", lambda name, value: object.__setattr__(self, name, value)  # frozen
        put("lr", check_float(self.lr, "lr", low=0.0, low_open=True, owner=own))  # a numpy value becomes a
        put("l1", check_float(self.l1, "l1", low=0.0, owner=own))  # Python number, so to_dict stays JSON
        put("l0", check_float(self.l0, "l0", low=0.0, owner=own))
        for name in ("d_sae", "steps", "warmup", "seed"):
            put(name, check_int(getattr(self, name), name, low=0, owner=own))
        k = check_float(self.k, "k", low=0.0, low_open=True, owner=own)
        if self.architecture in ("topk", "batchtopk") and not k <= self.d_sae:
            bad(f"k={self.k} must be in (0, d_sae={self.d_sae}] for {self.architecture}")
        if self.architecture == "topk" and not k.is_integer():
            bad(f"k={self.k} must be a whole number for topk (each example keeps exactly k latents); "
                "batchtopk takes a fractional average k")
        if self.batch_size is not None:
            put("batch_size", check_int(self.batch_size, "batch_size (None: min(256, number of activations))", low=1,
                                        owner=own))
        if not isinstance(self.options, dict):
            bad(f"options must be a dict of sae-lens config fields, got {type(self.options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        return config_from_dict(cls, d, " (other sae-lens fields go in options)")

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with ``changes``; names that are not fields go into ``options`` (sae-lens fields)."""
        known = {f.name for f in fields(self)}
        extra = {k: v for k, v in changes.items() if k not in known}
        base = {k: v for k, v in changes.items() if k in known}
        return SAEConfig.from_dict({**self.to_dict(), **base, "options": {**self.options, **base.get("options", {}),
                                                                         **extra}})


def train(model: nn.Module | None = None, data: Task | Tensor | None = None, hook: str | None = None,
          config: SAEConfig | None = None, *, acts: Tensor | str | Path | None = None, position: Position = -1,
          backend: str | None = None, split: str = "all",
          out: str | Path | None = None, overwrite: bool = False, progress: bool = True, log_every: int = 100,
          **overrides: Any):
    """Train an SAE on the activations at ``hook`` and return it as saved and reloaded by sae-lens.

    Args:
        model, data: capture the activations at ``hook`` of ``model`` (any ``nn.Module``) on
            ``data``: a ``Task`` (its ``inputs``) or an input tensor ``[N, ...]`` such as token
            ids ``[N, T]``. ``split`` picks a Task's examples (``"all"``: the whole table, the
            domain the model computes on; ``"train"`` / ``"test"``; a tensor has only ``"all"``).
            Or give ``acts`` instead: a tensor ``[N, d]`` / ``[N, pos, d]`` or a folder written by
            ``mechgrok.capture(..., out=)`` (read lazily, memory-mapped), with ``hook`` naming the
            array in it.
        hook: a transformer-lens hook name (``"blocks.1.hook_resid_post"``) or a module path
            (``"transformer.h.0"``); a tuple output is read at its element 0.
        config: the training settings (``SAEConfig``; default ``SAEConfig()``).
        position: which position of a ``[N, pos, d]`` hook becomes a training vector: an int
            (default -1, the answer position: one vector per example), or ``"all"``: every
            position (``[N, pos, d] -> [N * pos, d]``, the usual choice for a language model's
            residual stream). Ignored for an ``[N, d]`` hook. Saved as ``mechgrok_position``.
        backend: how to capture (``mechgrok.capture``): None picks transformer-lens for a
            ``HookedRootModule`` and torch hooks for any other module; or ``"torch"`` / ``"nnsight"``.
        **overrides: ``SAEConfig`` fields to change (``d_sae=1024, k=32``); any other name is a
            field of sae-lens's training config (e.g. ``aux_loss_coefficient``) and goes into
            ``config.options``. Activations are scaled to a mean norm of √d_in while training
            (sae-lens's ``expected_average_only_in``), so ``l1`` / ``l0`` carry over between sites;
            the scale is folded into the saved weights, so the SAE reads raw activations.
        out: folder for the SAE (sae-lens format plus ``training_log.json``); refused if it holds
            another SAE unless ``overwrite``. ``None``: a temporary folder.
        progress: sae-lens's progress bar.
        log_every: steps between entries of the training log.

    Returns:
        a ``sae_lens.SAE`` (inference form) with ``cfg.metadata.hook_name = hook`` and
        ``mechgrok_*`` fields (position, split, architecture, seed, steps, folder, config), on the
        model's device (it is trained there; CPU when trained from ``acts``).
    """
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    if hook is None:
        raise ValueError("name the hook the SAE reads, e.g. hook='blocks.0.hook_resid_post' or 'transformer.h.0'")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if config is not None and not isinstance(config, SAEConfig):
        raise TypeError(f"config must be a mechgrok.sae.SAEConfig, got {type(config).__name__}")
    cfg = (config or SAEConfig()).replace(**overrides) if overrides else (config or SAEConfig())
    log_every = check_int(log_every, "log_every", low=1)
    position = check_position(position)
    if "positions" in overrides:  # one spelling everywhere (DESIGN.md §7): position=
        raise TypeError("sae.train has no positions= argument: use position='all' for every position, or an int")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"{out} is a file; an SAE is saved as a folder (cfg.json + weights): choose another path")
    x, position = _source(model, data, hook, acts, position, split, backend)
    batch_size = min(256, len(x)) if cfg.batch_size is None else cfg.batch_size
    if batch_size > len(x):
        raise ValueError(f"batch_size={batch_size} is more than the number of activations ({len(x)}); "
                         "lower it or train on more examples")
    architecture, d_sae, k, steps, lr, seed = cfg.architecture, cfg.d_sae, cfg.k, cfg.steps, cfg.lr, cfg.seed
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="mechgrok-sae-"))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another folder or pass overwrite=True")
    device = str(device_of(model)) if model is not None and acts is None else "cpu"

    train_cls, cfg_cls, _ = (getattr(sae_lens, name) for name in ARCHITECTURES[architecture])
    options = {"standard": {"l1_coefficient": cfg.l1}, "topk": {"k": int(k)},
               "batchtopk": {"k": float(k), "topk_threshold_lr": 0.05},
               "jumprelu": {"l0_coefficient": cfg.l0}}[architecture] | cfg.options
    meta = {"hook_name": hook, "model_name": f"mechgrok:{data.name}" if isinstance(data, Task) else "mechgrok",
            "mechgrok_position": position, "mechgrok_split": split,
            "mechgrok_architecture": architecture, "mechgrok_seed": seed, "mechgrok_steps": steps,
            "mechgrok_batch_size": batch_size, "mechgrok_lr": lr, "mechgrok_n_activations": int(x.shape[0]),
            "mechgrok_config": cfg.to_dict()}
    try:
        sae_cfg = cfg_cls(d_in=int(x.shape[1]), d_sae=d_sae, normalize_activations="expected_average_only_in",
                          metadata=SAEMetadata(**meta), **options)
    except TypeError as e:
        raise ValueError(f"bad option for a {architecture} SAE: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = train_cls(sae_cfg)  # initialised on the CPU from the seed, so every device starts the same
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
        lr_warm_up_steps=min(cfg.warmup, steps - 1), dead_feature_window=max(1, min(1000, steps // 5)),
        feature_sampling_window=steps + 1, n_batches_for_norm_estimate=max(1, min(100, len(x) // batch_size)),
        device=device, logger=LoggingConfig(log_to_wandb=False))
    trainer = _recording_trainer(trainer_cfg, sae, _batches(x, batch_size, torch.Generator().manual_seed(seed)),
                                 log_every)
    with _quiet_progress(progress):
        trainer.fit()
    with atomic_dir(out) as tmp:
        sae.save_inference_model(str(tmp))
        atomic_write_text(tmp / "training_log.json", json.dumps(trainer.log, indent=1))
    loaded = load(out, device=device)
    loaded.cfg.metadata.mechgrok_folder = str(out)
    return loaded


def _source(model, data, hook, acts, position, split, backend) -> tuple[Tensor, Position]:
    """The training activations ``[rows, d]`` and the position they come from."""
    if acts is None:
        if model is None or data is None:
            raise ValueError("give model and data (a Task or an input tensor; activations are captured), or acts=")
        acts = capture(model, inputs_of(data), [hook], backend=backend, progress=False)[hook]
    elif isinstance(acts, (str, Path)):
        cache = load_cache(acts)
        if hook not in cache:
            raise ValueError(f"{acts} holds no activations for {hook!r}; it has {sorted(cache)}")
        acts = cache[hook]
    x, position = _at(acts, position, hook)  # [N, d], or [N, pos, d] for every position
    if split != "all":
        if not isinstance(data, Task):
            raise ValueError(f"split={split!r} needs the Task the activations come from (data=task); a tensor has "
                             "only split='all'")
        x = x[data.mask(split)]
    x = x.reshape(-1, x.shape[-1])  # [N * pos, d]: one row per token for every position
    if not x.dtype.is_floating_point or not bool(torch.isfinite(x).all()):
        raise ValueError(f"activations for {hook!r} must be finite floats")
    return x, position


def load(path: str | Path, device: str | torch.device = "cpu"):
    """An SAE saved by ``train`` (or any sae-lens inference SAE folder), through ``SAE.load_from_disk``,
    on ``device``, in eval mode with gradients off."""
    from sae_lens import SAE

    path = Path(path)
    missing = [f for f in SAE_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a saved SAE (missing {missing}); train one with mechgrok.sae.train")
    sae = SAE.load_from_disk(str(path), device=str(device))
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def _recording_trainer(cfg, sae, data: Iterator[Tensor], log_every: int):
    """A ``sae_lens.SAETrainer`` that keeps its own step metrics (explained variance, L0, losses,
    dead latents) in ``.log`` every ``log_every`` steps and at the last one: without wandb the
    trainer reports none."""
    from sae_lens import SAETrainer

    last = cfg.total_training_samples // cfg.train_batch_size_samples - 1

    class Recording(SAETrainer):
        log: list[dict[str, Any]] = []

        def step(self, batch):
            output = super().step(batch)
            if self.n_training_steps % log_every == 0 or self.n_training_steps == last:
                entry = {"step": self.n_training_steps}
                for key, v in self.build_train_step_log_dict(output, self.n_training_samples).items():
                    v = float(v.item() if isinstance(v, Tensor) else v)
                    entry[key.split("/")[-1]] = v if math.isfinite(v) else None
                self.log.append(entry)
            return output

    trainer = Recording(cfg, sae, data)
    trainer.log = []
    return trainer
