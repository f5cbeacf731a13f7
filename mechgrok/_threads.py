"""Torch thread count for the duration of a long computation.

On the shared 2-core machines this project runs on, one torch thread was several times faster
than two whenever anything else was running (measured: a masked forward 58 ms vs 317 ms); long
loops in mechgrok therefore default to ``threads=1`` and restore the caller's setting afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads(threads)`` inside the block (``None``: leave it alone)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
