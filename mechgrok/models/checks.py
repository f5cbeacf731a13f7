"""Checks that a model fits a task or a batch of inputs, made before the model runs.

They raise an error that says what does not match and how to fix it, instead of the ``IndexError``
an embedding or a one-hot encoding would raise from inside the forward.

>>> import torch
>>> from mechgrok import models
>>> model = models.mlp(p=5, d_out=5, width=8)
>>> check_inputs(model, torch.tensor([[1, 2]]))
>>> check_inputs(model, torch.tensor([[1, 7]]))  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
ValueError: inputs holds operands in [1, 7] but the model's p is 5 (valid: 0 to 4); ...
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mechgrok.models._tl import HookedTransformer
from mechgrok.models.hooked_mlp import HookedMLP
from mechgrok.tasks import SequenceTask, Task

__all__ = ["check_compatible", "check_inputs"]


def check_compatible(model: nn.Module, task: Task) -> None:
    """Raise a clear error when ``model`` cannot read ``task``'s tokens or predict its classes."""
    if isinstance(task, SequenceTask):  # a language-model corpus (mg.tasks.lm_corpus)
        _check_sequence_model(model, task)
        return
    if not isinstance(task, Task):
        raise TypeError(f"task must be a mechgrok Task, got {type(task).__name__}")
    if isinstance(model, HookedTransformer):
        cfg = model.cfg
        have = {"d_vocab": cfg.d_vocab, "d_vocab_out": cfg.d_vocab_out}
        if task.n_ctx > cfg.n_ctx:
            raise ValueError(f"task {task.name!r} has sequences of length {task.n_ctx} but the model's "
                             f"n_ctx is {cfg.n_ctx}; build the model with mg.models.transformer(task, ...)")
    elif isinstance(model, HookedMLP):
        have = {"p": model.p, "d_vocab_out": model.d_out}
        if len(task.task_names) != 1:
            raise ValueError(f"the MLP cannot read multi-task data ({task.name!r})")
    else:
        raise TypeError(f"expected a HookedTransformer or HookedMLP, got {type(model).__name__} (a Hugging Face "
                        "model converts with mg.models.from_pretrained)")
    want = {k: int(getattr(task, k)) for k in have}
    bad = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k}: model {m} vs task {t}" for k, (m, t) in bad.items())
        raise ValueError(f"model and task {task.name!r} do not match ({detail}); build the model from "
                         "this task, e.g. mg.models.transformer(task, ...)")


def _check_sequence_model(model: nn.Module, task: SequenceTask) -> None:
    """A model fits a SequenceTask when it is a HookedTransformer that reads every token id, predicts
    every target and has the context: a larger vocabulary (a brought model) is fine."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"{task.name!r} is a SequenceTask (a target per position): it needs a HookedTransformer, whose "
                        f"logits are [batch, pos, vocab], got {type(model).__name__}; build one with "
                        "mg.models.transformer(task, ...) (a Hugging Face model converts with mg.models.from_pretrained)")
    cfg = model.cfg
    small = [f"{k}: model {m} < task {t}" for k, m, t in (("d_vocab", cfg.d_vocab, task.d_vocab),
                                                            ("d_vocab_out", cfg.d_vocab_out, task.d_vocab),
                                                            ("n_ctx", cfg.n_ctx, task.n_ctx)) if m < t]
    if small:
        raise ValueError(f"the model cannot read or predict {task.name!r} ({', '.join(small)}); build it with "
                         "mg.models.transformer(task, ...), which sizes it from the task")


def check_inputs(model: nn.Module, inputs: Any, what: str = "inputs") -> None:
    """Raise a clear error unless ``inputs`` ``[N, ...]`` (N >= 1) can be fed to ``model``: before
    it runs, instead of an ``IndexError`` from inside an embedding or a one-hot encoding.

    - ``HookedTransformer``: integer token ids ``[N, pos]`` with ``1 <= pos <= n_ctx`` and every id in
      ``[0, d_vocab)``.
    - ``HookedMLP``: integer token ids ``[N, n_ctx]`` whose operands (at ``operand_positions``) lie
      in ``[0, p)``, or the float one-hot view ``[N, 2p]``.
    - any other module: a tensor with at least one example (nothing else is known about it).
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{what} must be a torch tensor [N, ...], got {type(inputs).__name__} "
                        "(torch.as_tensor(...) turns a nested list into one)")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{what} must be a tensor [N, ...] with N >= 1 examples, got shape {tuple(inputs.shape)}")
    integer = not (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool)
    if isinstance(model, HookedTransformer):
        cfg = model.cfg
        if not integer:
            raise TypeError(f"{what} must be integer token ids [N, pos] for a HookedTransformer, got dtype "
                            f"{inputs.dtype} (tokens are indices into the vocabulary: use .long())")
        if inputs.ndim != 2 or not 1 <= inputs.shape[1] <= cfg.n_ctx:
            raise ValueError(f"{what} must be token ids [N, pos] with 1 <= pos <= the model's n_ctx={cfg.n_ctx}, "
                             f"got shape {tuple(inputs.shape)}")
        _check_ids(inputs, cfg.d_vocab, what, "token ids", "d_vocab")
    elif isinstance(model, HookedMLP):
        if not integer:
            if inputs.ndim != 2 or inputs.shape[1] != 2 * model.p or not inputs.is_floating_point():
                raise ValueError(f"{what}: a HookedMLP reads integer token ids [N, n_ctx] or the float one-hot view "
                                 f"[N, 2p={2 * model.p}] (Task.onehot()), got {inputs.dtype} {tuple(inputs.shape)}")
            return
        need = max(model.operand_positions) + 1
        if inputs.ndim != 2 or inputs.shape[1] < need:
            raise ValueError(f"{what} must be token ids [N, n_ctx] with the operands at positions "
                             f"{model.operand_positions} (n_ctx >= {need}), got shape {tuple(inputs.shape)}")
        _check_ids(inputs[:, list(model.operand_positions)], model.p, what, "operands", "p")


def _check_ids(ids: Tensor, size: int, what: str, kind: str, name: str) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{what} holds {kind} in [{lo}, {hi}] but the model's {name} is {size} (valid: 0 to "
                         f"{size - 1}); build the model from the task the inputs come from")
