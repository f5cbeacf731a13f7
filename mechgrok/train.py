"""Training loop with checkpoints, a history of every evaluation, and exact resume.

``train(model, task, TrainConfig(...), out="runs/x")`` trains ``model`` **in place** and writes a run
folder (see ``mechgrok.run``). The model is any ``HookedTransformer`` (built by ``mg.models``, from a
``HookedTransformerConfig``, or converted with ``mg.models.from_pretrained``) or ``HookedMLP`` whose
vocabulary fits the task; it trains on the device it is on (the task's tensors are moved there).

Killing it and calling ``train`` again with the same arguments resumes from the last checkpoint and
ends with bitwise the same weights as an uninterrupted run: the checkpoint holds the parameters, the
optimizer state and the state of the training RNG.

The run folder is created atomically and locked while training (``mechgrok._runfolder``); every
checkpoint carries a content hash checked when it is loaded (``mechgrok.checkpoints``). A damaged
checkpoint or history is an error that says how to resume past it: ``resume="intact"``. A loss that
stops being finite ends training with an error naming the step (lower the learning rate).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok import checkpoints, models
from mechgrok._config import check_float, check_int
from mechgrok._config import from_dict as config_from_dict
from mechgrok._io import atomic_write_text
from mechgrok._runfolder import open_run, resume_point
from mechgrok._threads import torch_threads
from mechgrok._training import (
    _next_token_loss,
    _SequenceBatches,
    MASKS_FILE,
    OutputScale,
    apply_masks,
    check_masks,
    dropout_hooks,
    mask_grads,
    mask_summary,
    orthogonalize_grads,
)
from mechgrok.checkpoints import load_training_state, save_training_state
from mechgrok.evaluation import (  # noqa: F401 - evaluate, metrics_from_logits, sequence_metrics: public here too
    _EVAL_BATCH,
    EVAL_SPLITS,
    SEQUENCE_METRICS,
    _group_metrics,
    _token_stats,
    evaluate,
    metrics_from_logits,
    sequence_metrics,
)
from mechgrok.losses import LOSS_DTYPES, loss_fn, softmax_collapse
from mechgrok.run import RUN_FORMAT, Run, checkpoint_name
from mechgrok.tasks import SequenceTask, Task

__all__ = ["TrainConfig", "train", "evaluate", "metrics_from_logits", "sequence_metrics", "HISTORY_KEYS",
           "SEQUENCE_METRICS", "EVAL_SPLITS", "OBJECTIVES", "TrainingDiverged"]

log = logging.getLogger(__name__)

OBJECTIVES = ("auto", "last_token", "next_token")
HISTORY_KEYS = ("step", *(f"{s}_{m}" for s in EVAL_SPLITS for m in ("loss", "acc")),
                "weight_norm", "softmax_collapse", "lr", "elapsed_s")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings. Defaults follow Nanda et al. 2023 (full batch AdamW, wd 1.0).

    Every field is checked on construction (``_FIELD_CHECKS``): integers that are not bools, finite
    floats, positive counts; a wrong value is a ``TypeError`` / ``ValueError`` saying what the field
    must be. Numbers are stored as plain ``int`` / ``float`` (``lr=1`` becomes ``1.0``).

    ``loss_dtype`` and ``adam_eps`` exist to reproduce Prieto et al. 2025 ("Grokking at the edge of
    numerical stability"): a float32 loss lets softmax collapse zero the gradients of confidently
    correct examples (``mechgrok.measures.stability``), and a tiny ``adam_eps`` keeps AdamW from damping
    the tiny gradients left after it. Both apply to the training loss and to the losses in
    ``history.jsonl``; the model itself stays in its own dtype.

    ``output_scale`` (α) and ``center_output`` reproduce Kumar et al. 2024 ("Grokking as the transition
    from lazy to rich training dynamics"; Chizat et al. 2019): the run trains the predictor
    ``α·(f(x; θ) − f(x; θ₀))`` (``θ₀`` the weights at step 0; without centring ``α·f(x; θ)``) with the
    loss divided by α², so a larger α is lazier (the weights move less for the same change of output).
    ``history.jsonl`` scores that predictor (its loss without the 1/α²). Only for a ``Task`` (one
    label per example). The model saved in the checkpoints is ``f(·; θ)`` itself: analyses that load it
    see the network, not the centred, scaled predictor. Under AdamW the 1/α² is nearly a no-op (Adam's
    step does not depend on the loss's scale): the counterpart of the paper's gradient-descent rule
    ``lr ∝ 1/α²`` is ``lr ∝ 1/α`` (benchmarks/repro_lazy_rich.py), and weight decay pulls the weights
    towards 0, not towards θ₀.
    """

    steps: int = 8000  # number of optimizer updates
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (Nanda et al. 2023)
    warmup: int = 0  # linear warm-up steps from 0 to lr
    batch_size: int | None = None  # None = full batch (all training examples every step)
    loss: str = "cross_entropy"  # cross_entropy | mse (one-hot targets) | stablemax; in loss_dtype
    loss_dtype: str = "float64"  # precision of the loss and its backward: float64 | float32 (Prieto et al. 2025)
    adam_eps: float = 1e-8  # AdamW epsilon (torch's default); Prieto et al. use 1e-25 .. 1e-30 in some runs
    output_scale: float = 1.0  # α: train α·f (Kumar et al. 2024: larger is lazier); loss divided by α²
    center_output: bool = False  # train α·(f(x; θ) − f(x; θ₀)), the predictor that is 0 at step 0
    objective: str = "auto"  # last_token (a Task) | next_token (a SequenceTask, over its loss mask) | auto: the task's
    optimizer: str = "adamw"  # adamw | adamw_orthograd (⊥Grad, Prieto et al. 2025)
    dropout: float = 0.0  # dropout on MLP neurons (blocks.*.mlp.hook_post) during training
    eval_every: int = 100  # steps between evaluations (history.jsonl rows)
    checkpoint_every: int = 1000  # steps between checkpoints (step 0 and the last step always saved)
    seed: int = 0  # seeds minibatch sampling and dropout (a local generator)
    threads: int | None = 1  # torch threads while training (None = leave as is); 1 is fastest on 2 cores

    def __post_init__(self) -> None:
        for name, check, what, bounds in _FIELD_CHECKS:
            value = getattr(self, name)
            if value is None and name in ("batch_size", "threads"):
                continue
            object.__setattr__(self, name, _checked(name, value, check, what, bounds))
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise (TypeError if not isinstance(betas, (list, tuple)) else ValueError)(
                f"TrainConfig: betas must be two numbers in [0, 1), e.g. (0.9, 0.98), got {betas!r}")
        object.__setattr__(self, "betas", tuple(
            _checked("betas", b, check_float, "two numbers in [0, 1), e.g. (0.9, 0.98)",
                     dict(low=0, high=1, high_open=True), shown=betas) for b in betas))
        if not isinstance(self.center_output, bool):
            raise TypeError(f"TrainConfig: center_output must be True or False, got {self.center_output!r} "
                            f"({type(self.center_output).__name__})")
        for name in ("loss", "optimizer", "loss_dtype"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"TrainConfig: {name} must be a string, got {getattr(self, name)!r} "
                                f"({type(getattr(self, name)).__name__})")
        if self.loss_dtype not in LOSS_DTYPES:
            raise ValueError(f"TrainConfig: loss_dtype must be one of {sorted(LOSS_DTYPES)} (the precision of the loss "
                             f"and its gradient; 'float64' is the default), got {self.loss_dtype!r}")
        try:
            loss_fn(self.loss)
        except ValueError as e:
            raise ValueError(f"TrainConfig: {e}") from None
        if self.optimizer not in ("adamw", "adamw_orthograd"):
            raise ValueError(f"TrainConfig: optimizer must be 'adamw' or 'adamw_orthograd', got {self.optimizer!r}")
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig: objective must be one of {OBJECTIVES} ('last_token': one label at the last "
                             "position, for a Task; 'next_token': every target of a SequenceTask's loss mask; 'auto': "
                             f"the one the task has), got {self.objective!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values. Fields added after run folders existed are left out at
        their defaults (``_OMITTED_AT_DEFAULT``: ``objective="auto"``, which the task implies,
        ``loss_dtype="float64"``, ``adam_eps=1e-8``, ``output_scale=1.0``, ``center_output=False``), so
        that folders written before them keep matching (and resuming); ``from_dict`` fills them back in.
        Any other value is written."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# Fields whose default value to_dict leaves out (see its docstring), with the dataclass's defaults.
_OMITTED_AT_DEFAULT = {f.name: f.default for f in fields(TrainConfig)
                       if f.name in ("objective", "loss_dtype", "adam_eps", "output_scale", "center_output")}
# The smallest adam_eps: float32's smallest normal number (1.18e-38). A smaller eps is subnormal or rounds
# to 0 in a float32 model's optimizer, and a parameter whose gradient is always 0 then updates by 0 / 0 = NaN.
_ADAM_EPS_MIN = float(torch.finfo(torch.float32).tiny)

# (field, check, what it must be, bounds): one row per number of TrainConfig; None allowed where noted.
_FIELD_CHECKS: tuple[tuple[str, Callable, str, dict], ...] = (
    ("steps", check_int, "a non-negative integer (optimizer updates)", dict(low=0)),
    ("lr", check_float, "positive and finite (the peak learning rate, e.g. 1e-3)", dict(low=0, low_open=True)),
    ("weight_decay", check_float, "a finite number >= 0", dict(low=0)),
    ("warmup", check_int, "an integer >= 0 (steps of linear warm-up)", dict(low=0)),
    ("batch_size", check_int, "positive (an integer >= 1) or None (full batch)", dict(low=1)),
    ("dropout", check_float, "a number that lies in [0, 1)", dict(low=0, high=1, high_open=True)),
    ("adam_eps", check_float, f"a number in [{_ADAM_EPS_MIN:.3g}, 1) (AdamW's epsilon: 1e-8 is torch's default, "
     "Prieto et al. use 1e-25 to 1e-30; below float32's smallest normal number it rounds away)",
     dict(low=_ADAM_EPS_MIN, high=1, high_open=True)),
    ("output_scale", check_float, "a positive finite number (α of Kumar et al. 2024: 1 is ordinary training, larger "
     "is lazier)", dict(low=0, low_open=True)),
    ("eval_every", check_int, "an integer >= 1", dict(low=1)),
    ("checkpoint_every", check_int, "an integer >= 1", dict(low=1)),
    ("seed", check_int, "an integer in [0, 2**64)", dict(low=0, high=2**64 - 1)),
    ("threads", check_int, "an integer >= 1 or None (leave torch's setting)", dict(low=1)),
)


def _checked(name: str, value: Any, check: Callable, what: str, bounds: dict, shown: Any = None) -> Any:
    """``check(value, name, **bounds)``, re-raised as ``TrainConfig: NAME must be WHAT, got VALUE``."""
    try:
        return check(value, name, **bounds)
    except (TypeError, ValueError) as e:
        got = value if shown is None else shown
        kind = f" ({type(got).__name__})" if isinstance(e, TypeError) else ""
        raise type(e)(f"TrainConfig: {name} must be {what}, got {got!r}{kind}") from None


@torch.no_grad()
def _sequence_history_row(step: int, model: nn.Module, task: SequenceTask, cfg: TrainConfig, lr: float,
                          elapsed: float) -> dict:
    stats = _token_stats(model, task, loss_fn(cfg.loss, cfg.loss_dtype), _EVAL_BATCH)
    row: dict[str, Any] = {"step": step}
    for g, m in task.groups.items():
        for k, v in _group_metrics(stats, m).items():
            row[f"{g}_{k}"] = None if math.isnan(v) else v
    row.update(weight_norm=_weight_norm(model), lr=lr, elapsed_s=round(elapsed, 3))
    return row


def _weight_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float((p.double() ** 2).sum()) for p in model.parameters()))


def _history_row(step: int, model: nn.Module, task: Task, cfg: TrainConfig, lr: float, elapsed: float,
                 scale: OutputScale) -> dict:
    if isinstance(task, SequenceTask):
        return _sequence_history_row(step, model, task, cfg, lr, elapsed)
    model.eval()
    with torch.no_grad():
        logits = scale(models.final_logits(model, task.inputs)).cpu()  # [N, d_out], the trained predictor's
        metrics = metrics_from_logits(logits, task, cfg.loss, loss_dtype=cfg.loss_dtype)
        wnorm = _weight_norm(model)
        collapse = softmax_collapse(logits[task.train], task.labels[task.train])
    model.train()
    row: dict[str, Any] = {"step": step}
    for split, m in metrics.items():
        for k, v in m.items():
            row[f"{split}_{k}"] = None if math.isnan(v) else v
    row.update(weight_norm=wnorm, softmax_collapse=collapse, lr=lr, elapsed_s=round(elapsed, 3))
    if len(task.task_names) > 1:  # per sub-task accuracies: "add/test_acc", ...
        for i, name in enumerate(task.task_names):
            sub = metrics_from_logits(logits, task, cfg.loss, task_id=i, loss_dtype=cfg.loss_dtype)
            for split in ("train", "test"):
                v = sub[split]["acc"]
                row[f"{name}/{split}_acc"] = None if math.isnan(v) else v
    return row


# ---------------------------------------------------------------------------- optimisation pieces


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


# ---------------------------------------------------------------------------- train


class TrainingDiverged(ValueError):
    """The training loss stopped being finite (the weights diverged); a lower ``lr`` usually cures it."""


def _keep_history(file: Path, rows: list[dict], upto: int) -> float:
    """Rewrite ``file`` with the ``rows`` before step ``upto`` (later ones are recomputed); return the
    last kept elapsed time."""
    rows = [r for r in rows if r["step"] < upto]
    atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in rows))
    return float(rows[-1].get("elapsed_s") or 0.0) if rows else 0.0


def train(model: nn.Module, task: Task, config: TrainConfig | None = None, out: str | Path | None = None, *,
          overwrite: bool = False, progress: bool = True, stop_at: int | None = None, resume: str = "last",
          masks: dict[str, Tensor] | None = None, masks_meta: dict[str, Any] | None = None) -> Run:
    """Train ``model`` on ``task``'s training split, **updating the model in place**.

    Args:
        model: a ``HookedTransformer`` or ``HookedMLP`` whose vocabulary and context fit ``task``:
            built by ``mg.models.transformer`` / ``mg.models.mlp``, from any ``HookedTransformerConfig``,
            or converted with ``mg.models.from_pretrained``. It trains on its own device.
        task: the data; only ``task.train`` examples (with their possibly corrupted labels) are used.
        config: optimisation settings (default ``TrainConfig()``).
        out: run folder. A folder with the same config is resumed from its last checkpoint; one with
            a different config is refused unless ``overwrite=True``. ``None`` trains into a fresh
            temporary folder. A second process training the same folder is refused (``RUN/.lock``).
        progress: show a tqdm progress bar.
        stop_at: stop after this step (saving a checkpoint) as if killed; for tests and time-boxing.
        resume: ``"last"`` resumes from the newest checkpoint and refuses a damaged one (a content
            hash mismatch, a truncated file) or a history that lacks rows before it, saying so;
            ``"intact"`` moves damaged checkpoints to ``checkpoints/damaged/`` and resumes from the
            newest intact checkpoint whose history is complete (``mechgrok train --resume-intact``).
            Either way the result is bitwise what an uninterrupted run gives.
        masks: ``{parameter name: 0/1 tensor of its shape}``: weights held at exactly 0 all through
            training (a lottery ticket, ``mg.tickets``); the model's masked-out weights are zeroed at
            step 0. Saved as ``RUN/masks.safetensors`` (``Run.masks()``) and recorded (hash, weights kept)
            in ``config.json``, so a resume must pass the same masks.
        masks_meta: JSON-ready facts about where the masks came from, kept in ``config.json``
            (``mg.tickets`` records the source run, step, sparsity and kind).

    Returns:
        The ``Run`` (its folder holds config, task, checkpoints and ``history.jsonl``).

    Raises:
        TrainingDiverged: the training loss became NaN or infinite (the error names the step).
    """
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}; build one with mg.TrainConfig(...)")
    if resume not in ("last", "intact"):
        raise ValueError(f"resume must be 'last' (the newest checkpoint) or 'intact' (the newest intact one), "
                         f"got {resume!r}")
    if stop_at is not None:
        stop_at = check_int(stop_at, "stop_at", low=0, owner="train")
    models.check_compatible(model, task)
    _objective(cfg, task)
    if isinstance(task, SequenceTask) and (cfg.output_scale != 1.0 or cfg.center_output):
        raise ValueError(f"TrainConfig: output_scale={cfg.output_scale:g}, center_output={cfg.center_output} scale and "
                         f"centre one label's logits per example (a Task); {task.name!r} is a SequenceTask: train it "
                         "with output_scale=1.0 and center_output=False")
    if cfg.dropout and not models.has_mlp(model):
        raise ValueError(f"TrainConfig: dropout={cfg.dropout} acts on MLP neurons (blocks.*.mlp.hook_post), but this "
                         f"model is {models.mlp_kind(model)} (no such layer); train it with dropout=0")
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="mechgrok-run-"))
    if out.name in ("", ".", ".."):  # the run folder needs a name (its temporary siblings are named after it)
        out = out.resolve()
    try:  # the run folder records how to rebuild the model, so that its checkpoints can be loaded
        model_spec = models.spec(model)
    except (TypeError, ValueError) as e:
        raise type(e)(f"train: the run folder cannot record how to rebuild this model: {e}") from None
    # the objective is the task's (checked above), so it is recorded as "auto": one run whichever way it was given
    run_config = {"format": RUN_FORMAT, "task": task.config, "model": model_spec,
                  "train": cfg.replace(objective="auto").to_dict()}
    files = {}
    if masks is not None:
        masks = check_masks(model, masks)
        run_config["masks"] = {"file": MASKS_FILE, "sha256": checkpoints.content_hash(masks), **mask_summary(masks),
                               "meta": {} if masks_meta is None else masks_meta}
        files[MASKS_FILE] = lambda path: checkpoints.write(path, masks)
    elif masks_meta is not None:
        raise ValueError("masks_meta describes masks, but masks is None; pass the masks too")
    try:
        run_config = json.loads(json.dumps(run_config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"masks_meta must hold only JSON values (str, numbers, lists, dicts): {e}") from None
    lock = open_run(out, run_config, task, overwrite, files=files)
    try:
        return _train_locked(model, task, cfg, out, progress, stop_at, resume, masks)
    finally:
        lock.release()


def _objective(cfg: TrainConfig, task: Task | SequenceTask) -> str:
    """The objective ``task`` trains with; an error when ``cfg.objective`` names another one."""
    want = "next_token" if isinstance(task, SequenceTask) else "last_token"
    if cfg.objective not in ("auto", want):
        kind = "a SequenceTask (a target per position)" if want == "next_token" else "a Task (one label per example)"
        raise ValueError(f"TrainConfig: objective={cfg.objective!r} does not fit {task.name!r}, which is {kind}: "
                         f"its objective is {want!r}; pass objective={want!r} or 'auto'")
    return want


def _init_logits(model: nn.Module, task: Task, out: Path, fresh: bool) -> Tensor:
    """``f(x; θ₀)`` ``[N, d_out]`` on every example: the model as passed in (a fresh start) or the step-0
    checkpoint (a resume)."""
    if fresh:
        source = model
    else:  # the step-0 weights in a copy of the model itself (its dtype and device, unlike Run.load_model)
        source = copy.deepcopy(model)
        file = out / "checkpoints" / checkpoint_name(0)
        models.load_state(source, {k: v for k, v in checkpoints.read(file).items() if "/" not in k}, source=str(file))
    was_training = source.training
    source.eval()
    with torch.no_grad():
        f0 = models.final_logits(source, task.inputs.to(models.device_of(model)))
    source.train(was_training)
    return f0.detach()


def _train_locked(model: nn.Module, task: Task, cfg: TrainConfig, out: Path, progress: bool,
                  stop_at: int | None, resume: str, masks: dict[str, Tensor] | None) -> Run:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    g = torch.Generator().manual_seed(cfg.seed)
    history_file = out / "history.jsonl"
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    start, history = resume_point(out, cfg.eval_every, resume == "intact",
                                  lambda f: load_training_state(f, model, opt, g))
    if start is None:  # no checkpoint yet: a fresh start from the model passed in
        start, elapsed0 = 0, 0.0
        history_file.unlink(missing_ok=True)
    else:
        intact_file = not history.torn and not history.damaged
        done = start >= end and intact_file and any(r["step"] == start for r in history.rows)
        if done:  # nothing left to do: leave the folder untouched
            log.info("%s is already trained to step %d", out, start)
            model.eval()
            return Run(out)
        elapsed0 = _keep_history(history_file, history.rows, start)
        log.info("resuming %s from step %d", out, start)
    if masks is not None:  # once, on the parameters' device and dtype (not twice a step)
        named = dict(model.named_parameters())
        masks = {k: m.to(device=named[k].device, dtype=named[k].dtype) for k, m in masks.items()}
        if start == 0:
            apply_masks(model, masks)  # the ticket: the initial weights times the mask
    device = models.device_of(model)
    fn = loss_fn(cfg.loss, cfg.loss_dtype)
    if isinstance(task, SequenceTask):  # next-token: the loss over every target of the batch's loss masks
        batches = _SequenceBatches(task, cfg.batch_size, cfg.seed)

        def batch_loss(step: int) -> Tensor:
            return _next_token_loss(model, task, batches.rows(step), fn)
    else:  # last-token: one label per example
        x, y = task.inputs[task.train].to(device), task.labels[task.train].to(device)  # [n_train, n_ctx], [n_train]
        rows = task.train.nonzero().squeeze(1).to(device)  # [n_train] task row of each training example

        def batch_loss(step: int) -> Tensor:
            if cfg.batch_size is None or cfg.batch_size >= len(y):
                xb, yb, rb = x, y, rows
            else:
                idx = torch.randperm(len(y), generator=g)[: cfg.batch_size].to(device)
                xb, yb, rb = x[idx], y[idx], rows[idx]
            if scale.identity:
                return fn(models.training_logits(model, xb), yb)
            return fn(scale(models.training_logits(model, xb), rb), yb) / cfg.output_scale ** 2

    with torch_threads(cfg.threads):
        scale = OutputScale(cfg.output_scale,
                            _init_logits(model, task, out, start == 0) if cfg.center_output else None)
        hooks = dropout_hooks(model, cfg.dropout, g) if cfg.dropout else []
        t0 = time.perf_counter() - elapsed0
        bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train {out.name}", unit="step")
        model.train()
        try:
            with open(history_file, "a") as hist:
                for step in range(start, end + 1):
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        for h in hooks:
                            h.remove()
                        row = _history_row(step, model, task, cfg, _lr_at(step, cfg), time.perf_counter() - t0,
                                           scale)
                        hooks = dropout_hooks(model, cfg.dropout, g) if cfg.dropout else []
                        hist.write(json.dumps(row) + "\n")
                        hist.flush()
                        bar.set_postfix(train=f"{row['train_acc']:.3f}", test=f"{row['test_acc'] or 0:.3f}")
                    if step == 0 or (step != start and (step % cfg.checkpoint_every == 0 or step == end)):
                        save_training_state(out / "checkpoints" / checkpoint_name(step), model, opt, g)
                    if step == end:
                        break
                    lr = _lr_at(step, cfg)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    loss = batch_loss(step)
                    if not math.isfinite(value := loss.detach().item()):  # one scalar read a step: cheap on CPU
                        raise TrainingDiverged(
                            f"training diverged: the loss became {value} at step {step} (lr {lr:g}, weight decay "
                            f"{cfg.weight_decay:g}); the weights are no longer usable. Train again with a lower lr "
                            f"(e.g. lr={cfg.lr / 10:g}, --set lr={cfg.lr / 10:g}) or a warmup, into another folder "
                            f"or with overwrite=True ({out} keeps the checkpoints written so far)")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if masks is not None:
                        mask_grads(model, masks)
                    if cfg.optimizer == "adamw_orthograd":
                        orthogonalize_grads(params)
                    opt.step()
                    if masks is not None:  # AdamW leaves them at 0 already; this keeps it exact
                        apply_masks(model, masks)
                    bar.update(1)
        finally:
            for h in hooks:
                h.remove()
            bar.close()
            model.eval()
    return Run(out)
