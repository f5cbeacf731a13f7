"""Where a model lives: reading a ``device=`` argument, a model's device, and moving a model.

>>> import torch
>>> from mechgrok import models
>>> device_of(models.mlp(p=5, d_out=5, width=8, device="cpu"))
device(type='cpu')
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from mechgrok.models._tl import HookedTransformer


def _device(device: str | torch.device | None, owner: str) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` is torch's default device (``torch.get_default_device()``)."""
    if device is None:
        return torch.get_default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{owner}: device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def device_of(model: nn.Module) -> torch.device:
    """The device ``model`` computes on: that of its first parameter, else of its first buffer
    (torch's default device for a model with neither)."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.get_default_device()


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (a HookedTransformer's ``cfg.device`` follows)."""
    if device_of(model) == device:
        if isinstance(model, HookedTransformer):
            model.cfg.device = str(device)
        return model
    if isinstance(model, HookedTransformer):
        model.to(device, print_details=False)
        model.cfg.device = str(device)
        return model
    return model.to(device)
