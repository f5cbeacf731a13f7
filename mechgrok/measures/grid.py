"""The full (a, b) grid of a modular-arithmetic task: inputs, the map from examples to cells, and
one forward pass that yields the logits and neuron activations over every pair.

Fourier analyses of grokking (Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability") look at a model on *all* ``p²`` operand pairs laid out as a ``[p, p]`` grid,
row-major in ``(a, b)``: cell ``a * p + b``. For division, ``b = 0`` is not an example of the task,
but its cells are still filled (the model can be run on them) so the grid stays a full ``Z_p × Z_p``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechgrok.models import HookedTransformer
from mechgrok.tasks import Task

__all__ = ["TaskGrid", "task_grid", "grid_inputs", "grid_forward", "grid_logits"]


@dataclass(frozen=True, eq=False)
class TaskGrid:
    """One operation of a task laid out over the ``(a, b)`` grid of ``Z_p``.

    Attributes:
        name: the sub-task's name (``task.task_names[index]``).
        index: its position in ``task.task_names`` (its ``task_ids`` value).
        op: the operation (``"add"``, ``"sub"``, ...).
        p: its modulus (for a multi-task mix, this operation's modulus, not the largest one).
        inputs: token ids ``[p*p, n_ctx]`` for every pair, row-major in ``(a, b)``.
        rows: ``[M]`` indices into the task's examples that belong to this operation.
        cells: ``[M]`` grid cell ``a * p + b`` of each of those examples.
        labels, true_labels, train: the task's tensors at ``rows`` (``[M]`` each).
    """

    name: str
    index: int
    op: str
    p: int
    inputs: Int[Tensor, "pp n_ctx"]
    rows: Int[Tensor, " M"]
    cells: Int[Tensor, " M"]
    labels: Int[Tensor, " M"]
    true_labels: Int[Tensor, " M"]
    train: Bool[Tensor, " M"]


def _sub_task_index(task: Task, task_name: str | int | None) -> int:
    names = task.task_names
    if task_name is None:
        if len(names) != 1:
            raise ValueError(f"task {task.name!r} mixes the operations {names}; pass task_name=... "
                             "(one of those names, or its index) to pick the one laid out on the grid")
        return 0
    if isinstance(task_name, int):
        if not 0 <= task_name < len(names):
            raise ValueError(f"task_name index {task_name} is out of range for {names}")
        return task_name
    if task_name not in names:
        raise ValueError(f"task {task.name!r} has no operation {task_name!r}; choose one of {names}")
    return names.index(task_name)


def task_grid(task: Task, task_name: str | int | None = None) -> TaskGrid:
    """Lay out one operation of ``task`` over the full ``(a, b)`` grid.

    Args:
        task: a modular-arithmetic task (single operation ``[a, b, =]`` or multi-task
            ``[a, op, b, =]``).
        task_name: which operation of a multi-task mix (name or index); not needed for a single one.

    Returns:
        A ``TaskGrid``. Its ``inputs`` copy one of the operation's own examples and overwrite the
        operands, so they follow the task's token layout whatever it is.

    Raises:
        ValueError: a multi-task task without ``task_name``, or operands outside ``Z_p``.
    """
    i = _sub_task_index(task, task_name)
    rows = torch.nonzero(task.task_ids == i).squeeze(-1)  # [M]
    if len(rows) == 0:
        raise ValueError(f"task {task.name!r} has no examples of operation {task.task_names[i]!r}")
    config = task.config or {}
    if "specs" in config:  # multi_task
        op, p = str(config["specs"][i][0]), int(config["specs"][i][1])
    elif "op" in config:  # modular_arithmetic
        op, p = str(config["op"]), int(task.p)
    else:  # a hand-built task: read what we can from it
        op = re.sub(r"_p\d+$", "", task.task_names[i])
        operands = task.inputs[rows][:, list(task.operand_positions)]  # [M, 2]
        p = int(task.p) if len(task.task_names) == 1 else int(operands.max()) + 1
    pa, pb = task.operand_positions
    a, b = task.inputs[rows, pa], task.inputs[rows, pb]  # [M], [M]
    if bool((a < 0).any() | (a >= p).any() | (b < 0).any() | (b >= p).any()):
        raise ValueError(f"operation {task.task_names[i]!r} of task {task.name!r} has operands outside "
                         f"Z_{p}; is operand_positions={task.operand_positions} right?")
    ga, gb = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")  # [p, p] each
    inputs = task.inputs[rows[0]].repeat(p * p, 1)  # [p*p, n_ctx], template row
    inputs[:, pa], inputs[:, pb] = ga.reshape(-1), gb.reshape(-1)
    return TaskGrid(name=task.task_names[i], index=i, op=op, p=p, inputs=inputs, rows=rows, cells=a * p + b,
                    labels=task.labels[rows], true_labels=task.true_labels[rows], train=task.train[rows])


def grid_inputs(task: Task, task_name: str | int | None = None) -> Int[Tensor, "pp n_ctx"]:
    """Token inputs for every ``(a, b)`` pair of ``Z_p``, row-major, ``[p*p, n_ctx]``.

    Single operation: ``[a, b, =]`` with ``=`` the token ``p``. Multi-task (``task_name`` required):
    ``[a, op, b, =]``. For ``div`` the grid includes ``b = 0``, which is not an example of the task.

    >>> from mechgrok.tasks import modular_arithmetic
    >>> grid_inputs(modular_arithmetic(p=5))[:3].tolist()
    [[0, 0, 5], [0, 1, 5], [0, 2, 5]]
    """
    return task_grid(task, task_name).inputs


@torch.no_grad()
def grid_forward(model: nn.Module, grid: TaskGrid, hooks: Sequence[str] = ()
                 ) -> tuple[Float[Tensor, "p p d_out"], dict[str, Float[Tensor, "p p ..."]]]:
    """One forward pass over the grid: the answer-position logits and the requested activations.

    Args:
        model: a ``HookedTransformer`` or ``HookedMLP`` (any ``HookedRootModule`` mapping tokens to
            ``[batch, (pos,) d_out]`` logits).
        grid: from ``task_grid``.
        hooks: hook names to record (e.g. ``"blocks.0.mlp.hook_post"``); transformer activations are
            read at the last (answer) position.

    Returns:
        ``(logits [p, p, d_out], {hook: [p, p, ...]})``, on the CPU, in the model's dtype. The model
        is put in eval mode for the pass and restored afterwards.
    """
    p = grid.p
    was_training = model.training
    model.eval()
    try:
        if hooks:
            out, cache = model.run_with_cache(grid.inputs, names_filter=list(hooks))
            acts = {h: cache[h] for h in hooks}
        else:
            out, acts = model(grid.inputs), {}
    finally:
        model.train(was_training)
    last = out.ndim == 3  # transformer: [batch, pos, d_out]
    logits = (out[:, -1] if last else out).reshape(p, p, -1)  # [p*p, d_out] -> [p, p, d_out]
    for h, v in acts.items():
        if isinstance(model, HookedTransformer) and v.ndim >= 3:
            v = v[:, -1]  # [p*p, pos, ...] -> [p*p, ...]
        acts[h] = v.reshape(p, p, *v.shape[1:])  # [p, p, ...]
    return logits, acts


def grid_logits(model: nn.Module, task: Task, task_name: str | int | None = None) -> Float[Tensor, "p p d_out"]:
    """Answer-position logits of ``model`` over the full ``(a, b)`` grid, ``[p, p, d_out]``."""
    return grid_forward(model, task_grid(task, task_name))[0]
