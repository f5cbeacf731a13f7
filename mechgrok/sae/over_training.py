"""SAEs on several checkpoints of a run: how many memorizing and generalizing features over training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from mechgrok._config import check_int
from mechgrok.run import Run
from mechgrok.sae.evaluate import evaluate
from mechgrok.sae.features import features
from mechgrok.sae.train import train

__all__ = ["over_training", "pick_steps"]


def pick_steps(steps: list[int], n: int) -> list[int]:
    """``n`` checkpoints spread evenly over ``steps`` (first and last included)."""
    n = check_int(n, "n", low=1, owner="pick_steps")
    if not steps:
        raise ValueError("pick_steps: there are no checkpoint steps to pick from")
    return sorted({steps[round(i * (len(steps) - 1) / max(1, n - 1))] for i in range(n)})


def over_training(run: Run, hook: str, checkpoints: Iterable[int] | None = None, *, n_checkpoints: int = 4,
                  loss: str | None = None, progress: bool = True, **train_kwargs: Any) -> dict[str, Any]:
    """Train one SAE per checkpoint (the steps in ``checkpoints``, default ``n_checkpoints`` spread
    over the run) with the same settings (``train_kwargs`` of ``train``, e.g. ``d_sae``, ``k``,
    ``steps``) and follow its features.

    SAEs are saved under ``run/analysis/sae/step_XXXXXX`` (replaced on a rerun: they are analysis
    products). Returns ``{"steps", "explained_variance" (test), "l0", "dead_fraction", "counts":
    {label: [...]}, "test_acc", "spliced_test_acc"}``, lists in step order.
    """
    run = run if isinstance(run, Run) else Run(run)
    available = run.steps()
    chosen = (pick_steps(available, n_checkpoints) if checkpoints is None else
              sorted({check_int(s, "checkpoints", low=0, owner="sae.over_training") for s in checkpoints}))
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ValueError(f"no checkpoints at steps {missing}; this run has {available[:5]}...{available[-3:]}")
    task = run.task()
    loss = loss or run.config["train"].get("loss", "cross_entropy")
    out: dict[str, Any] = {"steps": chosen, "explained_variance": [], "l0": [], "dead_fraction": [],
                           "counts": {}, "test_acc": [], "spliced_test_acc": []}
    for step in tqdm(chosen, desc="SAEs over training", disable=not progress):
        model = run.load_model(step)
        sae = train(model, task, hook, out=run.path / "analysis" / "sae" / f"step_{step:06d}", overwrite=True,
                    progress=False, **train_kwargs)
        ev, stats = evaluate(model, sae, task, loss=loss), features(model, sae, task)
        out["explained_variance"].append(ev["by_split"]["test"]["explained_variance"])
        out["l0"].append(ev["by_split"]["all"]["l0"])
        out["dead_fraction"].append(ev["dead_fraction"])
        out["test_acc"].append(ev["original"]["test"]["acc"])
        out["spliced_test_acc"].append(ev["spliced"]["test"]["acc"])
        for label, n in stats.counts().items():
            out["counts"].setdefault(label, []).append(n)
    return out
