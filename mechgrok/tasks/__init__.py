"""Datasets as data: modular arithmetic with label corruption, multi-task mixes, and language-model
corpora (``SequenceTask``, ``lm_corpus``).

>>> import mechgrok as mg
>>> task = mg.tasks.modular_arithmetic(p=59, op="add", train_frac=0.3, corrupt_frac=0.1, seed=0)
>>> int(task.train_corrupted.sum()) == round(0.1 * int(task.train.sum()))
True
"""

from mechgrok.tasks.induction import induction
from mechgrok.tasks.knowledge import knowledge, ood_entities
from mechgrok.tasks.lm import lm_corpus
from mechgrok.tasks.modular import OPS, from_config, is_prime, modular_arithmetic, multi_task
from mechgrok.tasks.sequence import IGNORE, SequenceTask, load_sequence_task
from mechgrok.tasks.task import SPLITS, Task, load

__all__ = ["Task", "SPLITS", "OPS", "modular_arithmetic", "multi_task", "from_config", "load", "is_prime",
           "knowledge", "ood_entities", "induction", "SequenceTask", "IGNORE", "load_sequence_task", "lm_corpus"]
