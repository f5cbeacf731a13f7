"""Memorization of sequences by language models (issue 15): per-sequence scores on a
``SequenceTask`` (``mg.tasks.lm_corpus``).

So far: k-extractability and match rate under greedy decoding (``extract``) and the per-sequence
loss (``sequence_loss``). Localization and deletion come next.
"""

from mechgrok.memorization.extraction import Extraction, extract, sequence_loss

__all__ = ["Extraction", "extract", "sequence_loss"]
