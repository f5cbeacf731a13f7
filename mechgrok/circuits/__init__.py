"""Circuit discovery: the computational graph, attribution (exact patching, EAP, EAP-IG, ACDC),
the Circuit type, faithfulness, and generalizing vs memorizing circuits.

>>> import mechgrok as mg
>>> task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, corrupt_frac=0.3, seed=0)
>>> model = mg.models.mlp(task, width=8)
>>> prompts = mg.circuits.prompts(task, "test", n=16)
>>> circ = mg.circuits.discover(model, prompts, mg.circuits.metrics.generalization(),
...                             method="eap", level="neuron", top_k=3, progress=False)
>>> len(circ), circ.level
(3, 'neuron')
"""

from mechgrok.circuits import metrics
from mechgrok.circuits.attribution import METHODS, acdc_kept, attribute
from mechgrok.circuits.circuit import Circuit, select, select_greedy
from mechgrok.circuits.discover import (circuit_metric, contrast, discover, faithfulness, faithfulness_curve,
                                        generalizing_vs_memorizing, task_circuits)
from mechgrok.circuits.graph import LEVELS, Edge, Graph, graph
from mechgrok.circuits.overlap import overlap, overlap_matrix, overlap_vs_k, project, score_overlap
from mechgrok.circuits.overlap_figures import draw_shared, overlap_heatmap, overlap_vs_k_figure
from mechgrok.circuits.patching import CORRUPTIONS, Patcher
from mechgrok.circuits.prompts import Prompts
from mechgrok.circuits.prompts import from_task as prompts
from mechgrok.circuits.reuse import cross_faithfulness, overlap_over_training

__all__ = ["Prompts", "prompts", "graph", "Graph", "Edge", "LEVELS", "attribute", "METHODS", "acdc_kept", "Patcher", "CORRUPTIONS",
           "Circuit", "select", "select_greedy", "discover", "faithfulness", "faithfulness_curve", "circuit_metric",
           "contrast", "generalizing_vs_memorizing", "task_circuits", "metrics", "overlap", "overlap_matrix",
           "overlap_heatmap", "draw_shared", "overlap_vs_k", "overlap_vs_k_figure", "project", "score_overlap",
           "cross_faithfulness",
           "overlap_over_training"]
