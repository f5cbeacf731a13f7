"""Datasets as data: modular arithmetic with label corruption, and multi-task mixes.

>>> import mechgrok as mg
>>> task = mg.tasks.modular_arithmetic(p=59, op="add", train_frac=0.3, corrupt_frac=0.1, seed=0)
>>> int(task.train_corrupted.sum()) == round(0.1 * int(task.train.sum()))
True
"""

from mechgrok.tasks.induction import induction
from mechgrok.tasks.knowledge import knowledge, ood_entities
from mechgrok.tasks.modular import OPS, from_config, is_prime, modular_arithmetic, multi_task
from mechgrok.tasks.task import SPLITS, Task, load

__all__ = ["Task", "SPLITS", "OPS", "modular_arithmetic", "multi_task", "from_config", "load", "is_prime",
           "knowledge", "ood_entities", "induction"]
