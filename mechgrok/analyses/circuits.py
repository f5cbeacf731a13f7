"""The generalizing and the memorizing circuit of a run (``mg.circuits.task_circuits``): the
analysis ``circuits``, its result and its report section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mechgrok.analyses._base import Result, analysis, dense_mlp_task
from mechgrok.report.text import acc, fixed
from mechgrok.analyses.neurons import SPLITS
from mechgrok.report.sections import Figure, Section, Table, run_file, section
from mechgrok.run import Run

__all__ = ["CircuitAnalysis", "circuit_analysis", "circuit_section", "prune_nodes"]


@dataclass(frozen=True)
class CircuitAnalysis(Result):
    """Generalizing vs memorizing circuits of one checkpoint.

    Attributes:
        method, level: how they were found (``mg.circuits.discover``).
        evaluate: ``mg.evaluate`` of the model.
        generalizing, memorizing: {"file" (the circuit's node-link JSON, relative to the run),
            "size", "n_components", "faithfulness", "components"}; ``memorizing`` is None without
            corrupted labels.
        overlap: {"shared", "jaccard"} of the two circuits' components (None without a memorizing one).
        ablate_memorizing_only, ablate_generalizing_only: ``prune_nodes`` of the neurons only one
            circuit holds (None without a memorizing circuit).
        step: the checkpoint (None for a model passed directly).
    """

    name: ClassVar[str] = "circuits"
    method: str
    level: str
    evaluate: dict[str, Any]
    generalizing: dict[str, Any] | None = None
    memorizing: dict[str, Any] | None = None
    overlap: dict[str, Any] | None = None
    ablate_memorizing_only: dict[str, Any] | None = None
    ablate_generalizing_only: dict[str, Any] | None = None
    step: int | None = None

    def roles(self) -> dict[str, dict[str, Any]]:
        """The circuits present, by role."""
        return {role: info for role, info in (("generalizing", self.generalizing), ("memorizing", self.memorizing))
                if info is not None}


def prune_nodes(model, task, names: list[str]) -> dict[str, Any]:
    """Accuracy per split after zeroing the neurons among ``names`` (``m{layer}.n{i}``):
    {"n_neurons", "evaluate"}."""
    from mechgrok import neurons  # noqa: PLC0415
    from mechgrok.components import is_neuron, parse  # noqa: PLC0415
    from mechgrok.train import evaluate  # noqa: PLC0415

    by_layer: dict[int, list[int]] = {}
    for n in filter(is_neuron, names):
        c = parse(n)
        if c.position is not None:
            raise ValueError(f"{n!r}: pruning zeroes a neuron at every position; give names without '@'")
        by_layer.setdefault(c.layer, []).append(c.index)
    pruned = model
    for layer, idx in by_layer.items():
        pruned = neurons.prune(pruned, idx, layer=layer)
    return {"n_neurons": sum(len(v) for v in by_layer.values()), "evaluate": evaluate(pruned, task)}


def circuit_analysis(model, task, out_dir: Path, *, method: str = "eap-ig", level: str = "neuron",
                     progress: bool = True) -> CircuitAnalysis:
    """The generalizing circuit (and, with corrupted labels, the memorizing one), saved as JSON in
    ``out_dir`` (``RUN/analysis/circuits``: the files are named relative to ``RUN``), with their
    overlap and the accuracy after zero-ablating the neurons only one has."""
    from mechgrok import circuits  # noqa: PLC0415
    from mechgrok.train import evaluate  # noqa: PLC0415

    gen, mem = circuits.task_circuits(model, task, method=method, level=level, progress=progress)
    info = {}
    for role, circ in (("generalizing", gen), ("memorizing", mem)):
        if circ is not None:
            path = circ.save(out_dir / f"{role}.json")
            info[role] = {"file": path.relative_to(out_dir.parent.parent).as_posix(), "size": len(circ),
                          "n_components": len(circ.scores), "faithfulness": circ.provenance["faithfulness"],
                          "components": list(circ.components)}
    extra: dict[str, Any] = {}
    if mem is not None:
        g, m = set(gen.components), set(mem.components)
        extra = {"overlap": {"shared": len(g & m), "jaccard": len(g & m) / max(1, len(g | m))},
                 "ablate_memorizing_only": prune_nodes(model, task, sorted(m - g)),
                 "ablate_generalizing_only": prune_nodes(model, task, sorted(g - m))}
    return CircuitAnalysis(method, level, evaluate(model, task), **info, **extra)


@analysis(CircuitAnalysis, applies=dense_mlp_task)
def _circuits(run: Run, progress: bool) -> CircuitAnalysis:
    step = run.steps()[-1]
    return dataclasses.replace(circuit_analysis(run.load_model(step), run.task(), run.path / "analysis" / "circuits",
                                                progress=progress), step=step)


_METRICS = {"generalizing": "correct logit − mean logit on held-out examples",
            "memorizing": "corrupted-label logit − true-label logit on corrupted training examples"}


@section(order=50, title="Circuits", analysis="circuits")
def circuit_section(run: Run) -> Section | None:
    """Report section: generalizing vs memorizing circuits (``analysis/circuits.json``)."""
    data = CircuitAnalysis.load(run)
    if data is None:
        return None
    from mechgrok.circuits import Circuit  # noqa: PLC0415

    text = [f"Circuits found with **{data.method}** at the **{data.level}** level (resample ablation: each "
            "example's operands replaced by another example's; selection: the smallest top-|score| circuit with "
            f"faithfulness ≥ 0.8) at step {data.step}."]
    figs, rows = [], []
    for role, info in data.roles().items():
        circ = Circuit.load(run_file(run, info["file"], source="analysis/circuits.json"))
        text.append(f"**{role.capitalize()} circuit** ({_METRICS[role]}): {info['size']} of {info['n_components']} "
                    f"components, faithfulness {info['faithfulness']:.3f}.")
        figs.append(Figure.from_mpl(circ.draw(), f"The {role} circuit.", name=f"circuit-{role}"))
    numbers: dict[str, Any] = {role: {"size": info["size"], "faithfulness": info["faithfulness"]}
                               for role, info in data.roles().items()}
    parts = [f"{role} circuit {info['size']} of {info['n_components']} components "
             f"(faithfulness {fixed(info['faithfulness'], 2)})" for role, info in data.roles().items()]
    if data.overlap is not None:
        text.append(f"They share {data.overlap['shared']} components (Jaccard {data.overlap['jaccard']:.3f}).")
        rows.append(["(none)", 0, *[acc(data.evaluate, k) for k in SPLITS]])
        for ab, label in ((data.ablate_memorizing_only, "memorizing-only neurons"),
                          (data.ablate_generalizing_only, "generalizing-only neurons")):
            rows.append([f"{label} zeroed", ab["n_neurons"], *[acc(ab["evaluate"], k) for k in SPLITS]])
        ab = data.ablate_memorizing_only
        numbers |= {"overlap": data.overlap, "ablate_memorizing_only": ab}
        parts.append(f"they share {data.overlap['shared']} (Jaccard {fixed(data.overlap['jaccard'], 2)}); zeroing the "
                     f"{ab['n_neurons']} memorizing-only neurons: corrupted-label accuracy "
                     f"{acc(data.evaluate, 'train_corrupted_acc')} → {acc(ab['evaluate'], 'train_corrupted_acc')}, "
                     f"test {acc(data.evaluate, 'test_acc')} → {acc(ab['evaluate'], 'test_acc')}")
    tables = [Table(["ablated", "neurons", *SPLITS.values()], rows,
                    "Accuracy per split after zero-ablating the neurons that only one circuit contains.")] if rows else []
    return Section("Circuits", text="\n\n".join(text), figures=figs, tables=tables, numbers=numbers,
                   headline="; ".join(parts) + ".")
