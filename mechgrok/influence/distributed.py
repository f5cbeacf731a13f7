"""EK-FAC across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

:class:`~mechgrok.influence.EKFAC` notices an initialised process group and then:

- **fit**: each rank takes a contiguous shard of the fit examples, accumulates the sums
  ``Σ a aᵀ``, ``Σ g gᵀ`` and their counts over its shard, the sums are all-reduced, rank 0
  eigendecomposes them and broadcasts ``Q_A, Q_S`` (so every rank holds the same bits), then each
  rank accumulates ``Σ (Q_Sᵀ G Q_A)²`` over its shard and those sums are all-reduced too.
  True-Fisher labels are drawn from one seeded stream over *all* fit examples before sharding, so
  the result does not depend on the number of processes (only on float summation order, ~1e-15).
- **scores / self_influence**: every rank preconditions the (few) query gradients; the training
  examples are sharded, each rank scores its shard, and the columns are all-gathered, so every
  rank returns the full ``[n_query, n_train]`` matrix.

Every rank must build the same model (same weights) and task. A script that works on one process
works unchanged on many::

    # influence.py
    import torch.distributed as dist
    import mechgrok as mg
    from mechgrok.influence import EKFAC

    dist.init_process_group("gloo")           # "nccl" with one GPU per rank (model.to(f"cuda:{local_rank}"))
    run = mg.Run("runs/demo")
    model, task = run.load_model(), run.task()  # identical on every rank
    ek = EKFAC(model, task, fisher="true", damping=0.1).fit(task.train)
    S = ek.scores(task.test, task.train)      # full matrix on every rank
    if dist.get_rank() == 0:
        ek.save("runs/demo/influence")
    dist.destroy_process_group()

One machine, 4 processes::

    torchrun --standalone --nproc_per_node=4 influence.py

Two machines (run on each; ``HOST`` is the first machine's address, reachable from the second)::

    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 --rdzv_id=influence influence.py   # on machine 0
    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=1 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 --rdzv_id=influence influence.py   # on machine 1

Set ``OMP_NUM_THREADS`` per process so the ranks of one machine do not oversubscribe its cores. Pass
``distributed=False`` to ``EKFAC`` to ignore an initialised process group (each rank then works alone).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "shard", "all_reduce_", "broadcast_", "all_gather_columns"]


def world(enabled: bool | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group or when ``enabled`` is False."""
    if enabled is False or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(n: int, rank: int, size: int) -> slice:
    """The contiguous block of ``range(n)`` that ``rank`` of ``size`` processes handles (sizes differ by ≤ 1)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def all_reduce_(tensors: list[Tensor], size: int) -> None:
    """Sum ``tensors`` over all ranks, in place (no-op on one process)."""
    if size > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(tensors: list[Tensor], size: int, src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values, in place (no-op on one process)."""
    if size > 1:
        for t in tensors:
            dist.broadcast(t, src=src)


def all_gather_columns(x: Tensor, n: int, size: int) -> Tensor:
    """Concatenate every rank's ``x [rows, shard columns]`` along the last dim into ``[rows, n]``,
    where rank ``r`` holds columns ``shard(n, r, size)``."""
    if size == 1:
        return x
    width = shard(n, 0, size).stop  # the widest shard
    padded = torch.zeros(x.shape[:-1] + (width,), dtype=x.dtype, device=x.device)
    padded[..., : x.shape[-1]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    cols = [p[..., : (shard(n, r, size).stop - shard(n, r, size).start)] for r, p in enumerate(parts)]
    return torch.cat(cols, dim=-1)
