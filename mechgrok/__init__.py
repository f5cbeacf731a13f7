"""mechgrok: mechanistic interpretability of memorization versus generalization (grokking).

>>> import mechgrok as mg
>>> task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)
>>> model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
>>> sorted(mg.evaluate(model, task))[:2]
['test', 'train']
"""

from mechgrok import circuits, measures, memorization, models, neurons, presets, tasks, tickets
from mechgrok.analyze import analyze
from mechgrok.capture import ActivationCache, capture, load_cache
from mechgrok.run import Run
from mechgrok.sweeps import gather, sweep, sweep_figure
from mechgrok.train import TrainConfig, evaluate, train

__version__ = "0.1.0"

__all__ = ["tasks", "models", "presets", "train", "TrainConfig", "evaluate", "Run", "capture",
           "ActivationCache", "load_cache", "measures", "memorization", "neurons", "tickets", "circuits", "analyze", "analyses", "report", "sae", "influence", "sweep", "sweep_figure", "gather",
           "__version__"]


def __getattr__(name: str):
    # The report (and the analyses, whose sections it holds) pull in matplotlib and sae pulls in
    # sae-lens; load them (and influence) on first use to keep `import mechgrok` light.
    if name in ("report", "analyses", "sae", "influence"):
        import importlib

        return importlib.import_module(f"mechgrok.{name}")
    raise AttributeError(f"module 'mechgrok' has no attribute {name!r}")
