"""How good an SAE is: reconstruction, sparsity, dead and dense latents, and the spliced model.

For activations X ``[N, d]`` at the SAE's site and reconstructions X̂:

- explained variance ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (x̄ the mean over the examples scored);
- L0: mean number of latents with a nonzero activation per example;
- dead fraction: latents that fire on no example of the task; dense fraction: latents that fire on
  more than half of them;
- the spliced model (``intervene.splice``): accuracy and loss per split, beside the original and
  the mean-ablated model, and the loss recovered ``(L_mean − L_spliced) / (L_mean − L_original)``
  (1: the SAE loses nothing the model uses; 0: no better than the mean activation).

Everything runs on the SAE as given; ``mechgrok.sae.train`` returns it as saved and reloaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok.sae.intervene import mean_ablate, splice
from mechgrok.sae.train import activations, site
from mechgrok.tasks import Task
from mechgrok.train import evaluate as evaluate_model

__all__ = ["evaluate", "reconstruction", "DENSE"]

#: A latent firing on more than this fraction of examples counts as dense.
DENSE = 0.5
_SPLITS = ("all", "train", "test", "train_clean", "train_corrupted")


@torch.no_grad()
def reconstruction(sae, x: Tensor) -> dict[str, float]:
    """Explained variance, MSE (per example, summed over d) and L0 of ``sae`` on ``x`` ``[N, d]``."""
    if not len(x):
        return {"explained_variance": math.nan, "mse": math.nan, "l0": math.nan}
    f = sae.encode(x)  # [N, d_sae]
    x_hat = sae.decode(f).to(x.dtype)
    err = ((x - x_hat) ** 2).sum(-1)  # [N]
    var = ((x - x.mean(0)) ** 2).sum(-1)  # [N]
    return {"explained_variance": float(1 - err.sum() / var.sum().clamp_min(1e-30)), "mse": float(err.mean()),
            "l0": float((f != 0).sum(-1).float().mean())}


def _ratio(num: float, den: float) -> float | None:
    return num / den if abs(den) > 1e-12 and math.isfinite(num) and math.isfinite(den) else None


@torch.no_grad()
def evaluate(model: nn.Module, sae, task: Task, *, loss: str = "cross_entropy") -> dict[str, Any]:
    """Reconstruction and sparsity per split, dead / dense latents, and the spliced model.

    Returns:
        ``{"hook", "position", "d_in", "d_sae", "by_split": {split: {explained_variance, mse, l0}},
        "dead_fraction", "dense_fraction", "fire_rate": [d_sae] (fraction of all examples),
        "original" / "spliced" / "mean_ablated": evaluate() results, "loss_recovered": {split: value}}``.
    """
    hook, position = site(sae)
    x = activations(model, task, hook, -1 if position is None else position)  # [N, d]
    by_split = {s: reconstruction(sae, x[task.mask(s)]) for s in _SPLITS}
    fire = (sae.encode(x) > 0).float().mean(0)  # [d_sae]
    original = evaluate_model(model, task, loss)
    spliced = evaluate_model(splice(model, sae), task, loss)
    mean = evaluate_model(mean_ablate(model, sae, x), task, loss)
    recovered = {s: _ratio(mean[s]["loss"] - spliced[s]["loss"], mean[s]["loss"] - original[s]["loss"])
                 for s in original}
    return {"hook": hook, "position": position, "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae),
            "architecture": getattr(sae.cfg.metadata, "mechgrok_architecture", None) or sae.cfg.architecture(),
            "by_split": by_split, "dead_fraction": float((fire == 0).float().mean()),
            "dense_fraction": float((fire > DENSE).float().mean()), "fire_rate": fire.tolist(),
            "original": original, "spliced": spliced, "mean_ablated": mean, "loss_recovered": recovered}
