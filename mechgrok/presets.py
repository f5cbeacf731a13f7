"""Named, ready-to-train configurations: task + model + TrainConfig.

- ``demo``: modular addition p=59 (DESIGN.md §5); groks on a 2-core CPU in about two minutes.
- ``test``: p=47, a few-second grokking run for tests and smoke checks.
- ``doshi-mlp``: Doshi et al. 2023's MLP (p=97, width 500, x², MSE on one-hot targets, AdamW lr 1e-2,
  full batch, train fraction 0.5, no weight decay) with 35% of training labels corrupted.
- ``multi``: add, sub and mul mod 31 in one 1-layer transformer (op token), 80% of each table
  trains, for circuit overlap; mostly but not fully generalized at its step budget (see
  docs/reproductions.md).
- ``demo-multi``: add and sub only, mod 31, 60% training data, 2,000 steps: the circuit-overlap run
  of ``make demo``, where both operations generalize (with mul added, or at p=23, they do not within
  the demo's budget: docs/reproductions.md).
- ``composition``: Wang et al. 2024's two-hop composition task, scaled down for CPU.
- ``lm``: next-token training on ``mg.tasks.lm_corpus`` (induction sequences whose period varies, so
  only content-based copying solves them, beside planted random sequences repeated 1, 10 and 100
  times per epoch), for memorization in language models.
- ``nanda``: the full-size setup of Nanda et al. 2023 (p=113, d_model 128, d_mlp 512, lr 1e-3,
  40k full-batch steps), for patient or GPU users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mechgrok import models
from mechgrok import tasks as _tasks
from mechgrok.train import TrainConfig

__all__ = ["Preset", "PRESETS", "get", "build"]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    task: dict[str, Any]  # a task config (mechgrok.tasks.from_config)
    model: dict[str, Any]  # {"kind": "transformer"|"mlp", "kwargs": {...}} without vocabulary sizes
    train: TrainConfig


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("demo", "1-layer transformer on a + b mod 59, 30% training data (groks in ~2 min on CPU)",
           {"kind": "modular_arithmetic", "p": 59, "op": "add", "train_frac": 0.3, "corrupt_frac": 0.0, "seed": 0},
           {"kind": "transformer", "kwargs": {"n_layers": 1, "d_model": 64, "n_heads": 4, "d_mlp": 256, "seed": 0}},
           TrainConfig(steps=5000, lr=1e-2, weight_decay=1.0, eval_every=100, checkpoint_every=200)),
    Preset("test", "tiny transformer on a + b mod 47, 40% training data (groks in seconds)",
           {"kind": "modular_arithmetic", "p": 47, "op": "add", "train_frac": 0.4, "corrupt_frac": 0.0, "seed": 0},
           {"kind": "transformer", "kwargs": {"n_layers": 1, "d_model": 32, "n_heads": 4, "d_mlp": 128, "seed": 0}},
           TrainConfig(steps=1500, lr=1e-2, weight_decay=1.0, eval_every=50, checkpoint_every=250)),
    Preset("doshi-mlp", "Doshi et al. 2023 MLP (width 500, x², MSE, no weight decay) on a + b mod 97, 35% corrupted labels",
           {"kind": "modular_arithmetic", "p": 97, "op": "add", "train_frac": 0.5, "corrupt_frac": 0.35, "seed": 0},
           {"kind": "mlp", "kwargs": {"width": 500, "act": "square", "seed": 0}},
           TrainConfig(steps=1000, lr=1e-2, weight_decay=0.0, loss="mse", eval_every=25, checkpoint_every=100)),
    Preset("multi", "1-layer transformer on a+b, a-b, a*b mod 31 with an op token, 80% training data (mostly "
           "generalized at its step budget: after 8,000 steps test accuracy add 0.92, sub 0.81, mul 0.88; ~6 min)",
           {"kind": "multi_task", "specs": [["add", 31], ["sub", 31], ["mul", 31]], "train_frac": 0.8,
            "corrupt_frac": 0.0, "seed": 0},
           {"kind": "transformer", "kwargs": {"n_layers": 1, "d_model": 64, "n_heads": 4, "d_mlp": 256, "seed": 0}},
           TrainConfig(steps=8000, lr=1e-2, weight_decay=1.0, eval_every=250, checkpoint_every=500)),
    Preset("demo-multi", "the circuit-overlap run of make demo: a+b and a-b mod 31 in one 1-layer transformer, 60% "
           "training data, 2,000 steps (~1.5 min; both generalize, test accuracy >= 0.99 by step 1,200 on a 2-core CPU)",
           {"kind": "multi_task", "specs": [["add", 31], ["sub", 31]], "train_frac": 0.6,
            "corrupt_frac": 0.0, "seed": 0},
           {"kind": "transformer", "kwargs": {"n_layers": 1, "d_model": 64, "n_heads": 4, "d_mlp": 256, "seed": 0}},
           TrainConfig(steps=2000, lr=1e-2, weight_decay=1.0, eval_every=100, checkpoint_every=250)),
    Preset("composition", "2-layer transformer on Wang et al. 2024's two-hop composition (50 entities, 16 relations, "
           "inferred/atomic ratio 7.2): ID two-hop ~0.76, OOD at chance after 5,000 steps (~3 min)",
           {"kind": "knowledge", "knowledge_kind": "composition", "n_entities": 50, "n_relations": 16,
            "inferred_ratio": 7.2, "ood_frac": 0.2, "seed": 0},
           {"kind": "transformer", "kwargs": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 256, "seed": 0}},
           TrainConfig(steps=5000, lr=3e-3, weight_decay=1.0, batch_size=512, eval_every=250, checkpoint_every=500)),
    Preset("lm", "2-layer transformer (LayerNorm) on induction sequences of varied period with planted random "
           "sequences repeated 1, 10 and 100 times per epoch: learns in-context copying (held-out structured "
           "sequences) and memorizes the repeated planted ones (~2-3 min on a 2-core CPU; docs/reproductions.md)",
           {"kind": "lm_corpus", "structure": "induction_varied", "n_structured": 8192, "n_planted": 96,
            "repeats": [1, 10, 100], "n_held_out": 96, "seq_len": 32, "d_vocab": 64, "test_frac": 0.1, "seed": 0,
            "subset_seed": None, "subset_frac": 0.5},
           {"kind": "transformer", "kwargs": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 256,
                                              "normalization": "LN", "seed": 0}},
           TrainConfig(steps=2400, lr=3e-3, weight_decay=0.1, warmup=100, batch_size=64, eval_every=400,
                       checkpoint_every=400)),
    Preset("nanda", "Nanda et al. 2023 full-size run: p=113, d_model 128, d_mlp 512, 40k full-batch steps",
           {"kind": "modular_arithmetic", "p": 113, "op": "add", "train_frac": 0.3, "corrupt_frac": 0.0, "seed": 0},
           {"kind": "transformer", "kwargs": {"n_layers": 1, "d_model": 128, "n_heads": 4, "d_mlp": 512, "seed": 0}},
           TrainConfig(steps=40000, lr=1e-3, weight_decay=1.0, eval_every=100, checkpoint_every=1000)),
]}


def get(name: str) -> Preset:
    """The Preset called ``name``; a clear error listing the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build(name: str, **train_overrides: Any) -> tuple[_tasks.Task, nn.Module, TrainConfig]:
    """The task, a freshly initialised model and the TrainConfig of preset ``name``.

    ``train_overrides`` replace TrainConfig fields (e.g. ``steps=2000``).
    """
    p = get(name)
    task = _tasks.from_config(p.task)
    builder = {"transformer": models.transformer, "mlp": models.mlp}[p.model["kind"]]
    model = builder(task, **p.model["kwargs"])
    cfg = p.train.replace(**train_overrides) if train_overrides else p.train
    return task, model, cfg
