"""Progress measures for grokking (Nanda et al. 2023; Doshi et al. 2023; Prieto et al. 2025).

- ``fourier``: the Fourier basis of Z_p, power per frequency, IPR.
- ``grid``: the full (a, b) grid of a task and one forward pass over it.
- ``keyfreq``: frequencies of the embedding and of the neurons; key frequencies.
- ``restricted``: restricted and excluded loss.
- ``sparsity``: Gini of Fourier norms, weight norm, softmax collapse (of given logits).
- ``stability``: softmax collapse of a model in float32 / float64 and NLM alignment, over training
  (Prieto et al. 2025).
- ``local_complexity``: density of ReLU linear-region boundaries around points (Humayun et al. 2024).
- ``ntk``: empirical NTK, its alignment with the labels, kernel and weight movement from
  initialization (lazy vs rich training, Kumar et al. 2024).
- ``pathways``: the experts a mixture-of-experts model routes each example through, their edit
  distance between examples and their consistency across layers (Li et al. 2025).
- ``progress``: all of them on every checkpoint of a run.
- ``induction``: prefix-matching and copying scores of attention heads (Olsson et al. 2022).
"""

from mechgrok.measures.fourier import basis_labels, fourier_basis, frequency_power, ipr, n_frequencies
from mechgrok.measures.grid import TaskGrid, grid_forward, grid_inputs, grid_logits, task_grid
from mechgrok.measures.induction import InductionScores, induction_scores, repeated_sequences
from mechgrok.measures.keyfreq import (
    KeyFrequencies,
    NeuronFrequencies,
    embedding_frequency_norms,
    frequency_fractions,
    key_frequencies,
    key_frequencies_from,
    neuron_frequencies,
    neuron_ipr,
)
from mechgrok.measures.local_complexity import (
    BoundaryPoints,
    LocalComplexity,
    LocalComplexityOverTraining,
    boundary_points,
    local_complexity,
    local_complexity_over_training,
)
from mechgrok.measures.ntk import (
    FeatureMovement,
    LazyRichOverTraining,
    empirical_ntk,
    feature_movement,
    kernel_distance,
    kernel_target_alignment,
    lazy_rich_over_training,
)
from mechgrok.measures.pathways import (
    ExpertPathways,
    PathwaysOverTraining,
    expert_pathways,
    pathway_consistency,
    pathway_distance,
    pathway_edit_distance,
    pathways_over_training,
)
from mechgrok.measures.progress import PROGRESS_COLUMNS, progress
from mechgrok.measures.restricted import (
    excluded_logits,
    excluded_loss,
    key_frequency_projection,
    restricted_logits,
    restricted_loss,
)
from mechgrok.measures.sparsity import (
    fourier_gini,
    gini,
    softmax_collapse,
    unembedding_frequency_norms,
    weight_norm,
)
from mechgrok.measures.stability import (
    StabilityOverTraining,
    model_softmax_collapse,
    nlm_alignment,
    stability_over_training,
)

__all__ = ["InductionScores", "induction_scores", "repeated_sequences", "fourier_basis", "basis_labels", "frequency_power", "ipr", "n_frequencies",
           "TaskGrid", "task_grid", "grid_inputs", "grid_forward", "grid_logits",
           "NeuronFrequencies", "KeyFrequencies", "embedding_frequency_norms", "neuron_frequencies",
           "frequency_fractions", "neuron_ipr", "key_frequencies", "key_frequencies_from",
           "key_frequency_projection", "restricted_logits", "excluded_logits", "restricted_loss", "excluded_loss",
           "gini", "fourier_gini", "unembedding_frequency_norms", "weight_norm", "softmax_collapse",
           "model_softmax_collapse", "nlm_alignment", "stability_over_training", "StabilityOverTraining",
           "LocalComplexity", "LocalComplexityOverTraining", "BoundaryPoints", "local_complexity",
           "local_complexity_over_training", "boundary_points", "progress", "PROGRESS_COLUMNS",
           "ExpertPathways", "PathwaysOverTraining", "expert_pathways", "pathway_consistency", "pathway_distance",
           "pathway_edit_distance", "pathways_over_training", "FeatureMovement", "LazyRichOverTraining",
           "empirical_ntk", "feature_movement", "kernel_distance", "kernel_target_alignment", "lazy_rich_over_training"]
