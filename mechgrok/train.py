"""Training loop with checkpoints, a history of every evaluation, and exact resume.

``train(model, task, TrainConfig(...), out="runs/x")`` trains ``model`` **in place** and writes a run
folder (see ``mechgrok.run``). Killing it and calling ``train`` again with the same arguments resumes
from the last checkpoint and ends with bitwise the same weights as an uninterrupted run: the
checkpoint holds the parameters, the optimizer state and the state of the training RNG.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import models
from mechgrok._config import from_dict as config_from_dict
from mechgrok._io import atomic_path, atomic_write_text, read_safetensors
from mechgrok._threads import torch_threads
from mechgrok.losses import loss_fn, softmax_collapse
from mechgrok.run import RUN_FORMAT, Run, checkpoint_name
from mechgrok.tasks import Task

__all__ = ["TrainConfig", "train", "evaluate", "metrics_from_logits", "HISTORY_KEYS", "EVAL_SPLITS"]

log = logging.getLogger(__name__)

# evaluate() splits: train_corrupted scores corrupted examples against their (corrupted) training
# label, train_corrupted_true against their true label.
EVAL_SPLITS = ("train", "test", "train_clean", "train_corrupted", "train_corrupted_true")
HISTORY_KEYS = ("step", *(f"{s}_{m}" for s in EVAL_SPLITS for m in ("loss", "acc")),
                "weight_norm", "softmax_collapse", "lr", "elapsed_s")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings. Defaults follow Nanda et al. 2023 (full batch AdamW, wd 1.0)."""

    steps: int = 8000  # number of optimizer updates
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (Nanda et al. 2023)
    warmup: int = 0  # linear warm-up steps from 0 to lr
    batch_size: int | None = None  # None = full batch (all training examples every step)
    loss: str = "cross_entropy"  # cross_entropy | mse (one-hot targets) | stablemax; all in float64
    optimizer: str = "adamw"  # adamw | adamw_orthograd (⊥Grad, Prieto et al. 2025)
    dropout: float = 0.0  # dropout on MLP neurons (blocks.*.mlp.hook_post) during training
    eval_every: int = 100  # steps between evaluations (history.jsonl rows)
    checkpoint_every: int = 1000  # steps between checkpoints (step 0 and the last step always saved)
    seed: int = 0  # seeds minibatch sampling and dropout (a local generator)
    threads: int | None = 1  # torch threads while training (None = leave as is); 1 is fastest on 2 cores

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"TrainConfig: {msg}")

        if not isinstance(self.steps, int) or self.steps < 0:
            bad(f"steps must be a non-negative integer, got {self.steps!r}")
        if not self.lr > 0:
            bad(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup < 0:
            bad(f"warmup must be >= 0, got {self.warmup}")
        if self.batch_size is not None and self.batch_size < 1:
            bad(f"batch_size must be positive or None (full batch), got {self.batch_size}")
        loss_fn(self.loss)  # raises for unknown names
        if self.optimizer not in ("adamw", "adamw_orthograd"):
            bad(f"optimizer must be 'adamw' or 'adamw_orthograd', got {self.optimizer!r}")
        if not 0 <= self.dropout < 1:
            bad(f"dropout must lie in [0, 1), got {self.dropout}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            bad(f"threads must be >= 1 or None, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, loss: str = "cross_entropy", by_task: bool = False) -> dict:
    """Accuracy and loss per split: ``{"train": {"acc", "loss"}, "test": ..., "train_clean": ...,
    "train_corrupted": ... (against the corrupted label), "train_corrupted_true": ... (against the
    true label)}``. Empty splits give NaN. One forward pass over all examples.

    ``by_task=True`` (multi-task data) returns ``{sub-task name: that dict}`` instead.
    """
    models.check_compatible(model, task)
    was_training = model.training
    model.eval()
    try:
        logits = models.final_logits(model, task.inputs)  # [N, d_out]
    finally:
        model.train(was_training)
    if by_task:
        return {name: metrics_from_logits(logits, task, loss, task_id=i) for i, name in enumerate(task.task_names)}
    return metrics_from_logits(logits, task, loss)


def metrics_from_logits(logits: Tensor, task: Task, loss: str = "cross_entropy",
                        task_id: int | None = None) -> dict[str, dict[str, float]]:
    """``evaluate``'s per-split accuracy and loss from final-position logits ``[N, d_out]``
    (only the examples of sub-task ``task_id`` when given)."""
    fn = loss_fn(loss)
    out = {}
    for split in EVAL_SPLITS:
        mask = task.mask("train_corrupted" if split == "train_corrupted_true" else split)
        if task_id is not None:
            mask = mask & (task.task_ids == task_id)
        labels = (task.true_labels if split in ("test", "train_corrupted_true") else task.labels)[mask]
        if not bool(mask.any()):
            out[split] = {"acc": float("nan"), "loss": float("nan")}
            continue
        lg = logits[mask]
        out[split] = {"acc": float((lg.argmax(-1) == labels).double().mean()), "loss": float(fn(lg, labels))}
    return out


def _history_row(step: int, model: nn.Module, task: Task, cfg: TrainConfig, lr: float, elapsed: float) -> dict:
    model.eval()
    with torch.no_grad():
        logits = models.final_logits(model, task.inputs)
        metrics = metrics_from_logits(logits, task, cfg.loss)
        wnorm = math.sqrt(sum(float((p.double() ** 2).sum()) for p in model.parameters()))
        collapse = softmax_collapse(logits[task.train], task.labels[task.train])
    model.train()
    row: dict[str, Any] = {"step": step}
    for split, m in metrics.items():
        for k, v in m.items():
            row[f"{split}_{k}"] = None if math.isnan(v) else v
    row.update(weight_norm=wnorm, softmax_collapse=collapse, lr=lr, elapsed_s=round(elapsed, 3))
    if len(task.task_names) > 1:  # per sub-task accuracies: "add/test_acc", ...
        for i, name in enumerate(task.task_names):
            sub = metrics_from_logits(logits, task, cfg.loss, task_id=i)
            for split in ("train", "test"):
                v = sub[split]["acc"]
                row[f"{name}/{split}_acc"] = None if math.isnan(v) else v
    return row


# ---------------------------------------------------------------------------- optimisation pieces


@torch.no_grad()
def _orthogonalize_grads(params: list[nn.Parameter]) -> None:
    """⊥Grad (Prieto et al. 2025): drop the gradient component parallel to the weights, then rescale
    to the original gradient norm, per parameter tensor."""
    for p in params:
        if p.grad is None:
            continue
        w, g = p.view(-1), p.grad.view(-1)
        g_orth = g - (torch.dot(w, g) / (torch.dot(w, w) + 1e-30)) * w
        p.grad.copy_((g_orth * (g.norm() / (g_orth.norm() + 1e-30))).view_as(p.grad))


def _dropout_hooks(model: nn.Module, rate: float, g: torch.Generator) -> list:
    """Forward hooks applying inverted dropout to every MLP's neurons, drawing masks from ``g``."""
    handles = []
    for layer in range(models.n_layers(model)):
        module = model.get_submodule(models.mlp_hook(layer))

        def hook(_m, _inp, out, keep=1.0 - rate):
            mask = (torch.rand(out.shape, generator=g) < keep).to(out.dtype)
            return out * mask / keep

        handles.append(module.register_forward_hook(hook))
    return handles


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


# ---------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    tensors = models.state_tensors(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for k, v in state.items():
            tensors[f"optim/{names[id(p)]}/{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    tensors["rng/train"] = g.get_state()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    tensors = read_safetensors(path)
    models.load_state(model, {k: v for k, v in tensors.items() if "/" not in k}, source=str(path))
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, name, k = key.split("/")
            opt.state[params[name]][k] = v.clone()
    if "rng/train" not in tensors:
        raise ValueError(f"{path} has no training RNG state; it was not written by mechgrok.train")
    g.set_state(tensors["rng/train"])


def _prepare_run(out: Path, run_config: dict, task: Task, overwrite: bool) -> int:
    """Create or reuse ``out``; return the step to start from (0 for a new run)."""
    cfg_file = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if not cfg_file.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists and is not a mechgrok run; choose another folder or "
                                      "pass overwrite=True (--overwrite) to replace it")
        else:
            old = json.loads(cfg_file.read_text())
            if old == run_config:
                steps = Run(out).steps()
                return steps[-1] if steps else 0
            if not overwrite:
                diff = _diff(old, run_config)
                raise FileExistsError(f"{out} holds a run with a different config ({diff}); choose another "
                                      "folder or pass overwrite=True (--overwrite) to replace it")
        log.warning("overwriting %s as requested", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    task.save(out / "task")
    atomic_write_text(cfg_file, json.dumps(run_config, indent=2))
    return 0


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{k}.")
            if sub:
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return "; ".join(parts[:6])


def _has_row(file: Path, step: int) -> bool:
    """Whether the history file holds the evaluation row of ``step``."""
    return file.exists() and any(json.loads(line)["step"] == step for line in file.read_text().splitlines()
                                 if line.strip())


def _trim_history(file: Path, upto: int) -> float:
    """Drop history rows after ``upto`` (written before a crash); return the last elapsed time."""
    if not file.exists():
        return 0.0
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] < upto]
    atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in rows))
    return rows[-1]["elapsed_s"] if rows else 0.0


# ---------------------------------------------------------------------------- train


def train(model: nn.Module, task: Task, config: TrainConfig | None = None, out: str | Path | None = None, *,
          overwrite: bool = False, progress: bool = True, stop_at: int | None = None) -> Run:
    """Train ``model`` on ``task``'s training split, **updating the model in place**.

    Args:
        model: built by ``mg.models.transformer`` / ``mg.models.mlp`` for this task.
        task: the data; only ``task.train`` examples (with their possibly corrupted labels) are used.
        config: optimisation settings (default ``TrainConfig()``).
        out: run folder. A folder with the same config is resumed from its last checkpoint; one with
            a different config is refused unless ``overwrite=True``. ``None`` trains into a fresh
            temporary folder.
        progress: show a tqdm progress bar.
        stop_at: stop after this step (saving a checkpoint) as if killed; for tests and time-boxing.

    Returns:
        The ``Run`` (its folder holds config, task, checkpoints and ``history.jsonl``).
    """
    cfg = config or TrainConfig()
    models.check_compatible(model, task)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="mechgrok-run-"))
    run_config = {"format": RUN_FORMAT, "task": task.config, "model": models.spec(model), "train": cfg.to_dict()}
    start = _prepare_run(out, json.loads(json.dumps(run_config)), task, overwrite)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    history_file = out / "history.jsonl"
    elapsed0 = 0.0
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    if start > 0:
        _load_checkpoint(Run(out).checkpoint(start), model, opt, g)
        if start >= end and _has_row(history_file, start):  # nothing left to do: leave the folder untouched
            log.info("%s is already trained to step %d", out, start)
            model.eval()
            return Run(out)
        elapsed0 = _trim_history(history_file, start)
        log.info("resuming %s from step %d", out, start)
    else:
        history_file.unlink(missing_ok=True)

    x, y = task.inputs[task.train], task.labels[task.train]  # [n_train, n_ctx], [n_train]
    fn = loss_fn(cfg.loss)
    with torch_threads(cfg.threads):
        hooks = _dropout_hooks(model, cfg.dropout, g) if cfg.dropout else []
        t0 = time.perf_counter() - elapsed0
        bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train {out.name}", unit="step")
        model.train()
        try:
            with open(history_file, "a") as hist:
                for step in range(start, end + 1):
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        for h in hooks:
                            h.remove()
                        row = _history_row(step, model, task, cfg, _lr_at(step, cfg), time.perf_counter() - t0)
                        hooks = _dropout_hooks(model, cfg.dropout, g) if cfg.dropout else []
                        hist.write(json.dumps(row) + "\n")
                        hist.flush()
                        bar.set_postfix(train=f"{row['train_acc']:.3f}", test=f"{row['test_acc'] or 0:.3f}")
                    if step == 0 or (step != start and (step % cfg.checkpoint_every == 0 or step == end)):
                        _save_checkpoint(out / "checkpoints" / checkpoint_name(step), model, opt, g)
                    if step == end:
                        break
                    lr = _lr_at(step, cfg)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    if cfg.batch_size is None or cfg.batch_size >= len(y):
                        xb, yb = x, y
                    else:
                        idx = torch.randperm(len(y), generator=g)[: cfg.batch_size]
                        xb, yb = x[idx], y[idx]
                    loss = fn(models.training_logits(model, xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optimizer == "adamw_orthograd":
                        _orthogonalize_grads(params)
                    opt.step()
                    bar.update(1)
        finally:
            for h in hooks:
                h.remove()
            bar.close()
            model.eval()
    return Run(out)
