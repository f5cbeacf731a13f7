"""How good an SAE is: reconstruction, sparsity, dead and dense latents, and the spliced model.

For activations X ``[rows, d]`` at the SAE's site (one row per example, or per token for an SAE
of every position) and reconstructions X̂:

- explained variance ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (x̄ the mean over the rows scored);
- L0: mean number of latents with a nonzero activation per row;
- dead fraction: latents that fire on no row of the data; dense fraction: latents that fire on
  more than half of them;
- the spliced model (``intervene.splice``, at every position for an all-positions SAE): accuracy
  and loss per split, beside the original and the mean-ablated model, and the loss recovered
  ``(L_mean − L_spliced) / (L_mean − L_original)`` (1: the SAE loses nothing the model uses; 0: no
  better than the mean activation). With a ``Task`` these are ``mechgrok.evaluate``'s numbers
  (answer position); with a token tensor ``[N, T]`` they are the next-token cross-entropy and
  top-1 accuracy of a causal language model over all ``T − 1`` predictions, under ``"all"``.

Everything runs on the SAE as given; ``mechgrok.sae.train`` returns it as saved and reloaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mechgrok.models import device_of
from mechgrok.sae.intervene import mean_ablate, splice
from mechgrok.sae.train import encode, inputs_of, logits_of, site, site_activations
from mechgrok.tasks import Task
from mechgrok.train import evaluate as evaluate_model

__all__ = ["evaluate", "reconstruction", "next_token_metrics", "DENSE"]

#: A latent firing on more than this fraction of rows counts as dense.
DENSE = 0.5
_SPLITS = ("all", "train", "test", "train_clean", "train_corrupted")


@torch.no_grad()
def reconstruction(sae, x: Tensor) -> dict[str, float]:
    """Explained variance, MSE (per row, summed over d) and L0 of ``sae`` on ``x`` ``[rows, d]``
    (``[N, pos, d]`` counts every token as a row)."""
    x = x.reshape(-1, x.shape[-1])  # [rows, d]
    if not len(x):
        return {"explained_variance": math.nan, "mse": math.nan, "l0": math.nan}
    f = sae.encode(x.to(sae.device))  # [rows, d_sae], on the SAE's device
    x_hat = sae.decode(f).to(x.device, x.dtype)
    err = ((x - x_hat) ** 2).sum(-1)  # [rows]
    var = ((x - x.mean(0)) ** 2).sum(-1)  # [rows]
    return {"explained_variance": float(1 - err.sum() / var.sum().clamp_min(1e-30)), "mse": float(err.mean()),
            "l0": float((f != 0).sum(-1).float().mean())}


def _ratio(num: float, den: float) -> float | None:
    return num / den if abs(den) > 1e-12 and math.isfinite(num) and math.isfinite(den) else None


@torch.no_grad()
def next_token_metrics(model: nn.Module, tokens: Tensor, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """``{"all": {"acc", "loss"}}``: top-1 accuracy and mean cross-entropy of a causal language model
    predicting ``tokens[:, 1:]`` from the logits ``[N, T, vocab]`` at positions ``0 .. T−2``.

    The model runs on its own device in eval mode (restored afterwards); its output may be a
    tensor or a Hugging Face output object (``.logits``).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise ValueError(f"next-token metrics need integer token ids [N, T] with T >= 2, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}; for other inputs score the SAE with sae.reconstruction(sae, x)")
    device, was_training = device_of(model), model.training
    model.eval()
    loss, hits, n = 0.0, 0, 0
    try:
        for start in range(0, len(tokens), batch_size):
            t = tokens[start:start + batch_size].to(device)  # [b, T]
            logits = logits_of(model(t))
            if logits.ndim != 3 or logits.shape[:2] != t.shape:
                raise ValueError(f"the model gives {tuple(logits.shape)} for tokens {tuple(t.shape)}, not logits "
                                 "[batch, T, vocab]; evaluate on token data needs a causal language model (score "
                                 "any other with sae.reconstruction(sae, x))")
            lg, y = logits[:, :-1].flatten(0, 1).double(), t[:, 1:].flatten()  # [b * (T-1), vocab], [b * (T-1)]
            loss += float(torch.nn.functional.cross_entropy(lg, y, reduction="sum"))
            hits += int((lg.argmax(-1) == y).sum())
            n += int(y.numel())
    finally:
        model.train(was_training)
    return {"all": {"acc": hits / n, "loss": loss / n}}


@torch.no_grad()
def evaluate(model: nn.Module, sae, data: Task | Tensor, *, loss: str = "cross_entropy",
             backend: str | None = None) -> dict[str, Any]:
    """Reconstruction and sparsity per split, dead / dense latents, and the spliced model.

    Args:
        model: any ``nn.Module`` that has the SAE's hook (a hook name or module path).
        data: a ``Task`` (splits, ``mechgrok.evaluate`` for the spliced model, ``loss`` its loss)
            or token ids ``[N, T]`` of a causal language model (one split ``"all"``; next-token
            metrics, ``next_token_metrics``).
        backend: how activations are captured (``mechgrok.capture``; None: the default).

    Returns:
        ``{"hook", "position", "d_in", "d_sae", "by_split": {split: {explained_variance, mse, l0}},
        "dead_fraction", "dense_fraction", "fire_rate": [d_sae] (fraction of all rows),
        "original" / "spliced" / "mean_ablated": {split: {acc, loss}}, "loss_recovered": {split: value}}``.
    """
    hook, position = site(sae)
    x = site_activations(model, data, hook, position, backend=backend)  # [N, d] or [N, pos, d]
    if isinstance(data, Task):
        by_split = {s: reconstruction(sae, x[data.mask(s)]) for s in _SPLITS}

        def score(m: nn.Module) -> dict:
            return evaluate_model(m, data, loss)
    else:
        by_split = {"all": reconstruction(sae, x)}

        def score(m: nn.Module) -> dict:
            return next_token_metrics(m, inputs_of(data))
    rows = x.reshape(-1, x.shape[-1])  # [rows, d]
    fire = (encode(sae, rows) > 0).float().mean(0)  # [d_sae]
    original, spliced, mean = score(model), score(splice(model, sae)), score(mean_ablate(model, sae, rows))
    recovered = {s: _ratio(mean[s]["loss"] - spliced[s]["loss"], mean[s]["loss"] - original[s]["loss"])
                 for s in original}
    return {"hook": hook, "position": position, "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae),
            "architecture": getattr(sae.cfg.metadata, "mechgrok_architecture", None) or sae.cfg.architecture(),
            "by_split": by_split, "dead_fraction": float((fire == 0).float().mean()),
            "dense_fraction": float((fire > DENSE).float().mean()), "fire_rate": fire.tolist(),
            "original": original, "spliced": spliced, "mean_ablated": mean, "loss_recovered": recovered}
