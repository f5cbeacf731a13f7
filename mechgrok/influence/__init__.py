"""Influence functions via EK-FAC: which training examples a prediction depends on.

- :class:`EKFAC`: K-FAC factors with the eigenvalue correction (George et al. 2018) on the linear
  maps of a HookedTransformer / HookedMLP (read through transformer-lens hook points) or on the
  ``nn.Linear`` / ``transformers`` ``Conv1D`` layers of any model, for a Task (the loss at the answer)
  or :class:`Sequences` (the next-token loss summed over positions); :class:`Coverage` says which
  parameters a fit covers (:class:`CoverageWarning` for layers it cannot fit); pairwise scores,
  self-influence, per-map (per-head) breakdown, low-rank query batching (Grosse et al. 2023); save /
  load; ``torch.distributed`` fitting and scoring.
- :func:`top_influences`: the most influential training examples of each query, with their
  clean / corrupted membership.
- :func:`tfidf_candidates`: TF-IDF candidate filtering (Grosse et al. 2023): score each query
  against its most token-similar training examples only (:meth:`EKFAC.candidate_scores`), and
  :func:`candidate_recall`, how many true top influences the filter keeps.
- :func:`exact_influence`: the full damped Fisher / GGN / Hessian reference for small models.
- :func:`ranking_agreement`: how well two score matrices agree (Pearson, Spearman, top-k overlap).
- :func:`as_linear`: a HookedTransformer copied into ``nn.Linear`` layers (for kronfluence);
  :func:`conv1d_as_linear`: a model's ``Conv1D`` layers rewritten as ``nn.Linear``.

One module per capability: ``data`` (Task or Sequences, the loss), ``maps`` (which linear maps, where
their inputs and outputs live), ``coverage`` (what a fit covers),
``grads`` (inputs and output gradients from hooks), ``factors`` (the K-FAC / EK-FAC maths), ``ekfac``
(the fitted state), ``scores`` (contractions, query batching, reading scores), ``candidates``
(TF-IDF filtering), ``exact`` (the
reference), ``distributed`` (process groups; how to launch with torchrun), ``saving``, ``rewrite``.
"""

from mechgrok.influence.candidates import candidate_recall, tfidf_candidates, tfidf_vectors
from mechgrok.influence.coverage import Coverage, CoverageWarning
from mechgrok.influence.data import Sequences
from mechgrok.influence.ekfac import EKFAC, EKFACConfig
from mechgrok.influence.exact import exact_curvature, exact_influence, per_example_gradients
from mechgrok.influence.maps import LinearMap, linear_maps
from mechgrok.influence.rewrite import LinearTransformer, as_linear, conv1d_as_linear
from mechgrok.influence.scores import TopInfluences, ranking_agreement, top_influences

__all__ = ["EKFAC", "EKFACConfig", "Sequences", "Coverage", "CoverageWarning", "top_influences", "TopInfluences",
           "exact_influence", "exact_curvature", "per_example_gradients", "ranking_agreement", "linear_maps",
           "LinearMap", "as_linear", "conv1d_as_linear", "LinearTransformer", "tfidf_candidates", "tfidf_vectors",
           "candidate_recall"]
