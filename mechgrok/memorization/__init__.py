"""Memorization of sequences by language models: per-sequence scores, counterfactual memorization,
localization and deletion, on a ``SequenceTask`` (``mg.tasks.lm_corpus``).

- ``extract`` (k-extractability under greedy decoding), ``sequence_loss``, ``token_accuracy``;
- ``scores``: extractability, loss gap and EK-FAC self-influence side by side, with AUROCs per
  repetition count and the methods' agreement (``MemorizationScores``);
- ``counterfactual``: Zhang et al. 2023's counterfactual memorization from a sweep over training
  subsets (``lm_corpus(subset_seed=...)``);
- ``localize`` (activations, integrated gradients, zero-out, slimming, hard concrete, the
  direct-logit memorization score, EK-FAC, SAE features); ``delete`` and Chang et al. 2024's INJ
  (``inject``, ``inj_recall``) and DEL (``deletion_curve``) benchmarks (``benchmarks``);
- ``lm_circuits``: the generalizing (structured) and memorizing (planted) circuits and their
  overlap; ``sequence_prompts`` turns sequences into contrastive ``mg.circuits.Prompts``;
- ``planted_features``: how selectively each SAE feature fires on memorized sequences.
"""

from mechgrok.memorization.circuits import LMCircuits, lm_circuits, sequence_prompts
from mechgrok.memorization.counterfactual import Counterfactual, counterfactual
from mechgrok.memorization.extraction import Extraction, extract, sequence_loss, token_accuracy
from mechgrok.memorization.features import FeatureSelectivity, planted_features
from mechgrok.memorization.benchmarks import DeletionPoint, delete, deletion_curve, inj_recall, inject, random_recall
from mechgrok.memorization.localize import METHODS as LOCALIZATION_METHODS, Localization, localize
from mechgrok.memorization.scores import SCORE_METHODS, MemorizationScores, scores

__all__ = ["Extraction", "extract", "sequence_loss", "token_accuracy", "scores", "MemorizationScores",
           "SCORE_METHODS", "Counterfactual", "counterfactual", "Localization", "localize", "LOCALIZATION_METHODS",
           "delete", "inject", "inj_recall", "random_recall", "DeletionPoint", "deletion_curve", "lm_circuits",
           "LMCircuits", "sequence_prompts", "FeatureSelectivity", "planted_features"]
