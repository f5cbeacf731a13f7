"""Pieces of ``mechgrok.train``'s loop that change the update or the predictor, each on its own:

- ``orthogonalize_grads``: ⊥Grad (Prieto et al. 2025).
- ``dropout_hooks``: inverted dropout on the MLP neurons.
- ``check_masks`` / ``apply_masks``: fixed weight masks (a lottery ticket: Minegishi et al. 2024).
  A masked weight starts at 0, its gradient is zeroed every step and it is set back to 0 after the
  optimizer step, so it stays exactly 0 (AdamW's moments of a weight whose gradient is always 0 stay 0).
- ``_SequenceBatches`` / ``_next_token_loss``: the batches and the loss of a next-token run.
- ``OutputScale``: the centred, scaled predictor ``α·(f(x; θ) − f(x; θ₀))`` of lazy training
  (Chizat et al. 2019; Kumar et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok import models
from mechgrok.losses import IGNORE
from mechgrok.tasks import SequenceTask

__all__ = ["orthogonalize_grads", "dropout_hooks", "check_masks", "apply_masks", "mask_grads", "mask_summary",
           "OutputScale", "MASKS_FILE"]

#: The file of a run folder that holds its weight masks (``train(..., masks=...)``).
MASKS_FILE = "masks.safetensors"


@torch.no_grad()
def orthogonalize_grads(params: list[nn.Parameter]) -> None:
    """⊥Grad (Prieto et al. 2025): drop the gradient component parallel to the weights, then rescale
    to the original gradient norm, per parameter tensor."""
    for p in params:
        if p.grad is None:
            continue
        w, g = p.view(-1), p.grad.view(-1)
        g_orth = g - (torch.dot(w, g) / (torch.dot(w, w) + 1e-30)) * w
        p.grad.copy_((g_orth * (g.norm() / (g_orth.norm() + 1e-30))).view_as(p.grad))


def dropout_hooks(model: nn.Module, rate: float, g: torch.Generator) -> list:
    """Forward hooks applying inverted dropout to every MLP's neurons, drawing masks from ``g`` (a CPU
    generator, so a seed gives the same masks on every device)."""
    handles = []
    for layer in range(models.n_layers(model)):
        module = model.get_submodule(models.mlp_hook(layer))

        def hook(_m, _inp, out, keep=1.0 - rate):
            mask = (torch.rand(out.shape, generator=g) < keep).to(device=out.device, dtype=out.dtype)
            return out * mask / keep

        handles.append(module.register_forward_hook(hook))
    return handles


# ---------------------------------------------------------------------------- weight masks


def check_masks(model: nn.Module, masks: Any) -> dict[str, Tensor]:
    """``masks`` as ``{parameter name: bool tensor of its shape}`` on the CPU, after checking that
    every name is a trainable parameter of ``model`` and every mask has its shape and only 0/1 values.

    Raises:
        TypeError: ``masks`` is not a dict of tensors.
        ValueError: an unknown parameter name, a wrong shape, a value other than 0/1, or no mask at all.
    """
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{parameter name: 0/1 tensor of its shape}}, got {type(masks).__name__}")
    if not masks:
        raise ValueError("masks is empty; pass None to train without masks")
    params = dict(model.named_parameters())
    out = {}
    for name, m in masks.items():
        if name not in params:
            near = [n for n in params if name.split(".")[-1] in n][:4]
            raise ValueError(f"masks: {name!r} is not a parameter of this model" +
                             (f" (parameters with that ending: {near})" if near else
                              f" (it has {list(params)[:6]}...)"))
        if not isinstance(m, Tensor):
            raise TypeError(f"masks[{name!r}] must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, but the parameter has "
                             f"{tuple(params[name].shape)}")
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"masks[{name!r}] must hold only 0 and 1 (or be a bool tensor)")
            m = m != 0
        if not params[name].requires_grad:
            raise ValueError(f"masks: {name!r} is frozen (requires_grad=False); mask only trained parameters")
        out[name] = m.detach().cpu().contiguous()
    return out


def mask_summary(masks: dict[str, Tensor]) -> dict[str, Any]:
    """``{"params": [names], "kept": weights kept, "total": weights masked over}``."""
    return {"params": sorted(masks), "kept": int(sum(int(m.sum()) for m in masks.values())),
            "total": int(sum(m.numel() for m in masks.values()))}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Set every masked-out weight of ``model`` to 0 (in place)."""
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params[name]
        p.mul_(m.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def mask_grads(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the gradient of every masked-out weight (in place)."""
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params[name]
        if p.grad is not None:
            p.grad.mul_(m.to(device=p.grad.device, dtype=p.grad.dtype))


# ---------------------------------------------------------------------------- lazy training


class OutputScale:
    """The predictor ``α·(f(x; θ) − c·f(x; θ₀))`` that a run with ``output_scale=α`` trains (``c`` = 1 with
    ``center_output=True``, else 0), for the last-position logits of a ``Task``.

    ``init_logits`` ``[N, d_out]`` are ``f(x; θ₀)`` on every example of the task (the step-0 model), or
    ``None`` when not centred. ``rows`` picks the examples that ``logits`` belong to.
    """

    def __init__(self, alpha: float, init_logits: Tensor | None):
        self.alpha = float(alpha)
        self.init_logits = init_logits

    @property
    def identity(self) -> bool:
        return self.alpha == 1.0 and self.init_logits is None

    def __call__(self, logits: Tensor, rows: Tensor | None = None) -> Tensor:
        """``logits`` ``[n, d_out]`` of the examples ``rows`` ``[n]`` (all examples when ``None``) as the
        predictor's logits."""
        if self.identity:
            return logits
        if self.init_logits is not None:
            f0 = self.init_logits if rows is None else self.init_logits[rows.to(self.init_logits.device)]
            logits = logits - f0.to(device=logits.device, dtype=logits.dtype)
        return self.alpha * logits


# ---------------------------------------------------------------------------- next-token batches


def _epoch_seed(seed: int, epoch: int) -> int:
    """A seed of its own for each epoch's shuffle (a 64-bit mix of the run's seed and the epoch)."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % 2**64


class _SequenceBatches:
    """The training rows of each step of a next-token run.

    Step ``s`` takes rows ``[s·B, (s+1)·B)`` of the endless stream of epochs, each epoch being
    ``task.epoch_rows`` (every train row ``repeats`` times) shuffled by a generator seeded with
    ``_epoch_seed(seed, epoch)``. A batch is therefore a function of the step alone: resuming
    needs no sampler state. ``batch_size=None`` (or one at least an epoch) takes a whole epoch,
    unshuffled, every step.
    """

    def __init__(self, task: SequenceTask, batch_size: int | None, seed: int):
        self.task, self.seed = task, seed
        self._epochs: dict[int, Tensor] = {}
        reps = task.metadata.get("repeats")
        self.per_epoch = int(task.train.sum()) if reps is None else int(reps[task.train].sum())  # = len(epoch_rows())
        if self.per_epoch == 0:
            raise ValueError(f"task {task.name!r} has no training sequence to draw (its train rows have repeats 0 or "
                             "it has none); give some train rows repeats >= 1")
        if not bool(task.loss_mask[self._epoch(0)].any()):
            raise ValueError(f"task {task.name!r}: no training sequence has a target (its loss mask, targets != "
                             f"{IGNORE}, is empty on every train row), so there is nothing to learn; set the targets "
                             "of the tokens to predict")
        self.full = batch_size is None or batch_size >= self.per_epoch
        self.batch_size = self.per_epoch if self.full else batch_size

    def _epoch(self, e: int) -> Tensor:
        if e not in self._epochs:
            if len(self._epochs) > 2:  # steps only move forward: keep the few epochs a batch can span
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = self.task.epoch_rows(torch.Generator().manual_seed(_epoch_seed(self.seed, e)))
        return self._epochs[e]

    def rows(self, step: int) -> Tensor:
        """The task rows of step ``step`` ``[B]``."""
        if self.full:
            idx = self.task.train.nonzero().squeeze(1)
            reps = self.task.metadata.get("repeats")
            return idx if reps is None else torch.repeat_interleave(idx, reps[idx].long())
        start, end = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        for e in range(start // self.per_epoch, (end - 1) // self.per_epoch + 1):
            lo, hi = max(start - e * self.per_epoch, 0), min(end - e * self.per_epoch, self.per_epoch)
            parts.append(self._epoch(e)[lo:hi])
        return torch.cat(parts)


def _next_token_loss(model: nn.Module, task: SequenceTask, rows: Tensor, fn: Callable) -> Tensor:
    """The loss ``fn`` over every target token of the sequences ``rows`` ``[B]`` (a row listed twice
    counts twice): the mean over the batch's target tokens, each weighted equally."""
    device = models.device_of(model)
    y = task.targets[rows].to(device)  # [B, T]
    keep = y != IGNORE
    logits = model(task.inputs[rows].to(device))  # [B, T, d_vocab_out]
    if not bool(keep.any()):  # a batch of sequences without targets: no loss (weight decay still acts)
        return logits.sum() * 0.0
    return fn(logits[keep], y[keep])
