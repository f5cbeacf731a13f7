"""The analyses of a run, each with its typed result and its report section.

One module per analysis, holding the three things that change together:

- the compute function (``neuron_analysis(model, task, ...)``, ``overlap_analysis(run, ...)``):
  usable from Python on any model or run, returning a typed result;
- the result: a frozen dataclass subclassing ``Result``, stored as ``RUN/analysis/NAME.json`` (one
  key per field) and read back with ``NeuronAnalysis.load(run)``;
- the report section: a function registered with ``@section(..., analysis=NAME)`` that reads the
  result by attribute.

``mechgrok analyze RUN`` (``mg.analyze``) runs every registered analysis, in the order below,
skipping (and logging why) those whose ``applies(run)`` gives a reason they do not apply.

Adding an analysis is one new module here plus one import line below::

    @dataclass(frozen=True)
    class IPRAnalysis(Result):
        name: ClassVar[str] = "ipr"
        mean: float

    @analysis(IPRAnalysis, applies=one_answer_task)
    def _ipr(run, progress):
        return IPRAnalysis(mean=float(mg.neurons.ipr(run.load_model(), run.task()).mean()))

    @section(order=45, title="Neuron IPR", analysis="ipr")
    def ipr_section(run):
        data = IPRAnalysis.load(run)
        return None if data is None else Section("Neuron IPR", text=f"Mean IPR {data.mean:.3f}.")
"""

from mechgrok.analyses._base import ANALYSES, Analysis, Result, analysis, dense_mlp_task, one_answer_task, sequence_task

# the order of these imports is the order ``analyze`` runs them in
from mechgrok.analyses.progress import ProgressAnalysis, phase_boundaries  # isort: skip
from mechgrok.analyses.local_complexity import LocalComplexityAnalysis, local_complexity_analysis  # isort: skip
from mechgrok.analyses.pathways import MoEPathwaysAnalysis, moe_pathways_analysis  # isort: skip
from mechgrok.analyses.lazy_rich import LazyRichAnalysis, lazy_rich_analysis  # isort: skip
from mechgrok.analyses.neurons import NeuronAnalysis, neuron_analysis  # isort: skip
from mechgrok.analyses.circuits import CircuitAnalysis, circuit_analysis, prune_nodes  # isort: skip
from mechgrok.analyses.overlap import LEARNED_ACC, OverlapAnalysis, overlap_analysis  # isort: skip
from mechgrok.analyses.sae import SAEAnalysis, sae_analysis, sae_config  # isort: skip
from mechgrok.analyses.influence import InfluenceAnalysis, influence_analysis  # isort: skip
from mechgrok.analyses.memorization import DEL_FRACTIONS, MemorizationAnalysis, memorization_analysis  # isort: skip
from mechgrok.analyses.tickets import TICKET_SPARSITIES, TicketAnalysis, ticket_analysis  # isort: skip
from mechgrok.analyses import not_run  # isort: skip  # noqa: F401, E402 - the "Analyses not shown" section, last

__all__ = ["ANALYSES", "Analysis", "Result", "analysis", "one_answer_task", "dense_mlp_task", "sequence_task",
           "ProgressAnalysis", "phase_boundaries", "LocalComplexityAnalysis", "local_complexity_analysis",
           "MoEPathwaysAnalysis", "moe_pathways_analysis", "LazyRichAnalysis", "lazy_rich_analysis",
           "NeuronAnalysis", "neuron_analysis",
           "CircuitAnalysis", "circuit_analysis", "prune_nodes", "OverlapAnalysis", "overlap_analysis", "LEARNED_ACC",
           "SAEAnalysis", "sae_analysis", "sae_config", "InfluenceAnalysis", "influence_analysis",
           "MemorizationAnalysis", "memorization_analysis", "DEL_FRACTIONS",
           "TicketAnalysis", "ticket_analysis", "TICKET_SPARSITIES"]
