"""``HookedMLP``: the two-layer MLP on one-hot operands of Doshi et al. (2023), as a hooked model.

one-hot(a) ‖ one-hot(b) -> ``W_in`` -> act -> ``W_out`` -> logits, no biases by default. Its weights
live at ``blocks.0.mlp.W_in`` / ``W_out`` and its hooks at ``blocks.0.mlp.hook_pre`` / ``hook_post``,
the same paths as a 1-layer transformer's MLP, so neuron analyses serve both. Build one for a task
with ``models.mlp``.

>>> import torch
>>> model = HookedMLP(p=5, width=8, d_out=5)
>>> model(torch.tensor([[1, 2], [3, 4]])).shape  # token ids [batch, n_ctx] -> logits [batch, d_out]
torch.Size([2, 5])
>>> sorted(model.hook_dict)
['blocks.0.mlp.hook_post', 'blocks.0.mlp.hook_pre', 'hook_in', 'hook_out']
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechgrok._config import check_int
from mechgrok.models._args import _check_bool, _check_choice
from mechgrok.models._tl import HookedRootModule, HookPoint

__all__ = ["HookedMLP", "MLP_ACTS"]

_ACTS = {
    "square": lambda x: x * x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "linear": lambda x: x,
}
#: ``act`` names ``HookedMLP`` and ``models.mlp`` accept.
MLP_ACTS = tuple(sorted(_ACTS))


class _MLPLayer(nn.Module):
    """``W_in [d_in, width] -> act -> W_out [width, d_out]`` with hooks before and after ``act``."""

    def __init__(self, d_in: int, width: int, d_out: int, act: str, bias: bool, g: torch.Generator):
        super().__init__()
        # PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.W_in = nn.Parameter((torch.rand(d_in, width, generator=g) * 2 - 1) / d_in**0.5)
        self.W_out = nn.Parameter((torch.rand(width, d_out, generator=g) * 2 - 1) / width**0.5)
        self.b_in = nn.Parameter(torch.zeros(width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.act = _ACTS[act]
        self.hook_pre = HookPoint()  # [batch, width]
        self.hook_post = HookPoint()  # [batch, width]

    def forward(self, x: Float[Tensor, "batch d_in"] | None = None, *, rows: Int[Tensor, "batch k"] | None = None
                ) -> Float[Tensor, "batch d_out"]:
        """``x``: the input; or ``rows``: the indices of the input's ones when it is one-hot (then
        ``x @ W_in`` is the sum of those rows of ``W_in``, the same numbers without the zeros)."""
        pre = x @ self.W_in if rows is None else self.W_in[rows].sum(1)
        if self.b_in is not None:
            pre = pre + self.b_in
        post = self.hook_post(self.act(self.hook_pre(pre)))
        out = post @ self.W_out
        return out + self.b_out if self.b_out is not None else out


class _Block(nn.Module):
    def __init__(self, mlp: _MLPLayer):
        super().__init__()
        self.mlp = mlp


class HookedMLP(HookedRootModule):
    """Two-layer MLP on one-hot operands (Doshi et al. 2023, "To grok or not to grok").

    ``forward`` takes token ids ``[batch, n_ctx]`` (operands read at ``operand_positions`` and
    one-hot encoded) or the one-hot view ``[batch, 2p]`` (``Task.onehot()``) and returns logits
    ``[batch, d_out]``. Hooks: ``hook_in`` (one-hot input), ``blocks.0.mlp.hook_pre``,
    ``blocks.0.mlp.hook_post``, ``hook_out`` (logits). Inputs are moved to the weights' device.
    """

    def __init__(self, p: int, width: int, d_out: int, act: str = "square", bias: bool = False,
                 operand_positions: tuple[int, int] = (0, 1), seed: int = 0):
        super().__init__()
        owner = "HookedMLP"
        act = _check_choice(act, "act", MLP_ACTS, owner)
        p, width, d_out = (check_int(v, k, low=1, owner=owner) for k, v in (("p", p), ("width", width), ("d_out", d_out)))
        seed = check_int(seed, "seed", low=0, owner=owner)
        bias = _check_bool(bias, "bias", owner)
        if (isinstance(operand_positions, (str, bytes)) or not hasattr(operand_positions, "__len__")
                or len(operand_positions) != 2):
            raise ValueError(f"{owner}: operand_positions must be two token positions (a, b), got {operand_positions!r}")
        operand_positions = tuple(check_int(i, "operand_positions", low=0, owner=owner) for i in operand_positions)
        self.p, self.d_out, self.operand_positions = p, d_out, operand_positions
        g = torch.Generator().manual_seed(seed)
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList([_Block(_MLPLayer(2 * p, width, d_out, act, bias, g))])
        self.hook_out = HookPoint()
        self.setup()
        # how to rebuild it (see spec); operand_positions only when they are not the default (0, 1)
        self.mechgrok_spec = {"kind": "mlp", "kwargs": dict(
            width=width, act=act, bias=bias, seed=seed, p=p, d_out=d_out,
            **({"operand_positions": list(operand_positions)} if operand_positions != (0, 1) else {}))}

    def forward(self, x: Int[Tensor, "batch n_ctx"] | Float[Tensor, "batch two_p"]) -> Float[Tensor, "batch d_out"]:
        W_in = self.blocks[0].mlp.W_in
        x = x.to(W_in.device)
        if not x.is_floating_point():
            i, j = self.operand_positions
            if not (self.hook_in._forward_hooks or self.hook_in._forward_pre_hooks):
                # nothing reads or edits the one-hot input: add the operands' rows of W_in (training's
                # path; a third faster than the matmul at p = 97, width 500, and bitwise the same values)
                rows = torch.stack([x[:, i], x[:, j] + self.p], dim=1)  # [batch, 2]
                return self.hook_out(self.blocks[0].mlp(rows=rows))
            x = torch.cat([nn.functional.one_hot(x[:, i], self.p), nn.functional.one_hot(x[:, j], self.p)],
                          dim=-1).to(W_in.dtype)  # [batch, 2p]
        return self.hook_out(self.blocks[0].mlp(self.hook_in(x)))
