"""Run the analyses of a finished (or partly trained) run and store them in ``RUN/analysis/``.

``analyze(run)`` runs every registered analysis, writing ``analysis/NAME.json`` (atomically) for
each; ``mechgrok report RUN`` then shows them. An analysis is a function ``(run, progress) -> dict
| None`` in ``ANALYSES`` (``None``: not applicable to this run, with the reason logged). Adding one
is a function plus an entry in ``ANALYSES``, and a report section in ``mechgrok/report/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mechgrok import measures, models, neurons
from mechgrok._io import child_path
from mechgrok._threads import torch_threads
from mechgrok.components import is_neuron, parse
from mechgrok.run import MEMORIZED_ACC, Run, first_step
from mechgrok.tasks import SequenceTask
from mechgrok.train import evaluate

__all__ = ["analyze", "ANALYSES", "neuron_analysis", "circuit_analysis", "overlap_analysis", "sae_analysis",
           "influence_analysis", "memorization_analysis"]

log = logging.getLogger(__name__)


def _progress(run: Run, progress: bool) -> dict[str, Any] | None:
    task = run.task()
    if task.config.get("kind") not in ("modular_arithmetic", "multi_task"):
        log.info("progress: the Fourier measures need modular arithmetic; %s is %r", run.path, task.config.get("kind"))
        return None
    names = task.task_names  # a multi-task run: the measures of its first operation
    return measures.progress(run, progress=progress, task_name=names[0] if len(names) > 1 else None)


def neuron_analysis(model, task, *, layer: int = 0, seeds: Sequence[int] = (0, 1, 2),
                    progress: bool = True) -> dict[str, Any]:
    """Scores, groups and pruning sweeps of the MLP neurons of ``layer`` (JSON-ready).

    Scores: IPR when the task is a single modular operation, the memorization score when the task
    has corrupted labels. For each available score: the classification (``neurons.classify``), a
    pruning sweep in the three orders, and the accuracies after pruning the memorizing group.
    """
    out: dict[str, Any] = {"layer": layer, "evaluate": evaluate(model, task), "scores": {}, "groups": {},
                           "sweeps": {}, "pruned_memorizing": {}}
    available = []
    if len(task.task_names) == 1:
        available.append("ipr")
    if bool(task.train_corrupted.any()):
        available.append("memorization")
    for score in available:
        groups = neurons.classify(model, task, score=score, layer=layer)
        out["scores"][score] = groups.scores.tolist()
        out["groups"][score] = {k: v for k, v in groups.to_dict().items() if k != "scores"}
        out["sweeps"][score] = neurons.prune_sweep(model, task, order=groups.scores, seeds=seeds, layer=layer,
                                                   progress=progress)
        for row in out["sweeps"][score]:
            row["score"] = score
        out["pruned_memorizing"][score] = evaluate(neurons.prune(model, groups.memorizing, layer=layer), task)
    if len(task.task_names) == 1:
        nf = measures.neuron_frequencies(model, task, layer=layer)
        out["neuron_frequency"] = {"dominant": nf.dominant.tolist(), "fraction": nf.fraction.tolist()}
        out["embedding_power"] = measures.embedding_frequency_norms(model, task).tolist()
    return out


def _neurons(run: Run, progress: bool) -> dict[str, Any]:
    step = run.steps()[-1]
    result = neuron_analysis(run.load_model(step), run.task(), progress=progress)
    result["step"] = step
    return result


def _prune_nodes(model, task, names: list[str]) -> dict[str, Any]:
    """Accuracy per split after zeroing the neurons among ``names`` (``m{layer}.n{i}``)."""
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
                     progress: bool = True) -> dict[str, Any]:
    """The generalizing circuit (and, with corrupted labels, the memorizing one), saved as JSON in
    ``out_dir``, with their overlap and the accuracy after zero-ablating the neurons only one has."""
    from mechgrok import circuits

    gen, mem = circuits.task_circuits(model, task, method=method, level=level, progress=progress)
    out: dict[str, Any] = {"method": method, "level": level, "evaluate": evaluate(model, task)}
    for role, circ in (("generalizing", gen), ("memorizing", mem)):
        if circ is None:
            continue
        path = circ.save(out_dir / f"{role}.json")
        out[role] = {"file": path.relative_to(out_dir.parent.parent).as_posix(), "size": len(circ),
                     "n_components": len(circ.scores), "faithfulness": circ.provenance["faithfulness"],
                     "components": list(circ.components)}
    if mem is not None:
        g, m = set(gen.components), set(mem.components)
        out["overlap"] = {"shared": len(g & m), "jaccard": len(g & m) / max(1, len(g | m))}
        out["ablate_memorizing_only"] = _prune_nodes(model, task, sorted(m - g))
        out["ablate_generalizing_only"] = _prune_nodes(model, task, sorted(g - m))
    return out


def _circuits(run: Run, progress: bool) -> dict[str, Any]:
    step = run.steps()[-1]
    result = circuit_analysis(run.load_model(step), run.task(), run.path / "analysis" / "circuits", progress=progress)
    result["step"] = step
    return result


#: test accuracy at which an operation counts as learned; the overlap analysis compares only those
#: (a circuit of an operation the model has not generalized describes its memorization, not its algorithm)
LEARNED_ACC = 0.95


def overlap_analysis(run: Run, *, method: str = "eap-ig", level: str = "neuron", target: float = 0.8,
                     n_training_steps: int = 8, features: bool = True, learned_acc: float | None = None,
                     progress: bool = True) -> dict[str, Any] | None:
    """Per sub-task circuits of a multi-task run, their pairwise overlap with random baselines,
    cross-task faithfulness, and the first sub-task's circuit over training (issue: circuit reuse).
    With ``features``, the same question for SAE features: an SAE on the last MLP layer's neurons
    (``_sae_config`` defaults, every example; saved in ``analysis/overlap/sae``), each sub-task's
    features (``mg.sae.feature_overlap``) and a cross-task ablation against random features.

    Only operations the model has **learned** (test accuracy ≥ ``learned_acc``, default
    ``LEARNED_ACC`` = 0.95, at the last checkpoint)
    get a circuit: the others are listed in ``not_learned`` with their accuracy, and with fewer than
    two learned operations nothing is compared (``skipped`` says why). The feature part runs only when
    every operation is learned (the SAE's features are attributed to all of them).
    None for single-task runs."""
    from mechgrok import circuits

    task = run.task()
    if len(task.task_names) < 2:
        log.info("overlap: %s has a single task, nothing to compare", run.path)
        return None
    from mechgrok._config import check_float

    learned_acc = check_float(LEARNED_ACC if learned_acc is None else learned_acc, "learned_acc", low=0, high=1,
                              owner="overlap_analysis")
    out_dir = run.path / "analysis" / "overlap"
    # a sub-task name becomes a file name: checked again here (tasks.load checks it too), so no crafted
    # task.json can make this write outside the run
    source = run.path / "task" / "task.json"
    files = {name: child_path(out_dir, name, suffix=".json", what="sub-task name", source=source)
             for name in task.task_names}
    step = run.steps()[-1]
    model = run.load_model(step)
    by_task = evaluate(model, task, by_task=True)
    accuracy = {k: {split: by_task[k][split]["acc"] for split in ("train", "test")} for k in task.task_names}
    learned = [k for k in task.task_names if accuracy[k]["test"] == accuracy[k]["test"]
               and accuracy[k]["test"] >= learned_acc]
    head = {"step": step, "method": method, "level": level, "target": target, "accuracy": accuracy,
            "learned_acc": learned_acc, "not_learned": [k for k in task.task_names if k not in learned]}
    if len(learned) < 2:
        reason = (f"{len(learned)} of {len(task.task_names)} operations reached test accuracy {learned_acc:g} at "
                  f"step {step:,}; circuits of unlearned operations would describe memorization, so no overlap "
                  "is computed (train longer, or see docs/reproductions.md for settings that generalize)")
        log.warning("overlap: %s: %s", run.path, reason)
        return head | {"names": learned, "skipped": reason}
    if head["not_learned"]:
        log.warning("overlap: %s: leaving out %s (test accuracy below %g)", run.path, head["not_learned"], learned_acc)
    circs: dict[str, Any] = {}
    for name in learned:
        split = circuits.reuse.split_for(task, name)
        x, xc, y, _ = circuits.contrast(task, split, task_name=name)
        circs[name] = circuits.discover(model, x, xc, circuits.metrics.generalization(y), method=method, level=level,
                                        target=target, progress=progress,
                                        provenance={"task": name, "split": split, "step": step})
        circs[name].save(files[name])
    names = list(circs)
    pairs = {f"{a}|{b}": circuits.overlap(circs[a], circs[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    vs_k = {f"{a}|{b}": circuits.overlap_vs_k(circs[a], circs[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    steps = run.steps()
    pick = sorted({steps[round(i * (len(steps) - 1) / max(1, n_training_steps - 1))] for i in range(n_training_steps)})
    result = head | {"names": names,
            "sizes": {k: len(c) for k, c in circs.items()},
            "files": {k: files[k].relative_to(run.path).as_posix() for k in circs},
            "faithfulness": {k: c.provenance["faithfulness"] for k, c in circs.items()},
            "matrix": circuits.overlap_matrix(circs), "pairs": pairs, "overlap_vs_k": vs_k,
            "cross_faithfulness": circuits.cross_faithfulness(model, circs, task),
            "over_training": circuits.overlap_over_training(run, names[0], level=level, steps=pick, progress=progress)}
    if features and not head["not_learned"]:
        result["features"] = _feature_overlap(run, model, task, out_dir / "sae", target, progress)
    return result


def _feature_overlap(run: Run, model, task, folder: Path, target: float, progress: bool) -> dict[str, Any]:
    """SAE features shared across the sub-tasks (see ``overlap_analysis``)."""
    from mechgrok import models, sae as saes

    hook = models.mlp_hook(models.n_layers(model) - 1)
    config = _sae_config(model, task, hook, "all")
    sae = saes.train(model, task, hook, config, out=folder, overwrite=True, progress=progress)
    ev = saes.evaluate(model, sae, task)
    res = saes.feature_overlap(model, sae, task, target=target, split="test")
    return {"hook": hook, "settings": config.to_dict(), "folder": str(folder.relative_to(run.path)),
            "explained_variance_test": ev["by_split"]["test"]["explained_variance"],
            "l0": ev["by_split"]["all"]["l0"], "dead_fraction": ev["dead_fraction"],
            **{k: v for k, v in res.items() if k != "scores"},
            "ablation": saes.cross_ablation(model, sae, task, res["features"])}


def _overlap(run: Run, progress: bool) -> dict[str, Any] | None:
    return overlap_analysis(run, progress=progress)


def _sae_config(model, task, hook: str, split: str, *, architecture: str = "topk", d_sae: int | None = None,
                k: int | None = None, steps: int | None = None):
    """The analyses' SAE defaults: ``d_sae = 2 × d_in``, ``k = max(4, d_in // 16)``, about 50 passes
    over the ``split`` activations in batches of 256 (300 to 1,000 steps; 200 passes and up to 3,000
    steps until the demo had to fit ten minutes, with the same picture: docs/reproductions.md)."""
    from mechgrok import sae as saes

    d_in = int(saes.activations(model, task, hook).shape[1])
    n_rows = int(task.mask(split).sum())
    return saes.SAEConfig(architecture=architecture, d_sae=d_sae or 2 * d_in, k=k or max(4, d_in // 16),
                          steps=steps or min(1000, max(300, 50 * n_rows // min(256, n_rows))))


def sae_analysis(run: Run, *, hook: str | None = None, architecture: str = "topk", d_sae: int | None = None,
                 k: int | None = None, split: str | None = None, steps: int | None = None, n_random: int = 5,
                 n_training_steps: int = 3, training_sae_steps: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """An SAE on the last checkpoint's MLP neurons (``blocks.{L-1}.mlp.hook_post``, answer position)
    by default: evaluation, feature labels, ablations against random features, and SAEs on
    ``n_training_steps`` earlier checkpoints (``training_sae_steps`` steps each).

    Defaults: ``d_sae = 2 × d_mlp``, ``k = max(4, d_mlp // 16)``, about 50 passes over the
    activations in batches of 256 (``steps`` between 300 and 1,000; a third of that for the earlier
    checkpoints' SAEs); trained on the training examples when the task has corrupted labels
    (memorization lives there: on the whole table 80% of the data would carry none, and the SAE
    captured less of it — docs/reproductions.md), on every example otherwise. The SAE is saved in sae-lens's format in ``run/analysis/sae/final``
    (replaced on a rerun).
    """
    from mechgrok import models, sae as saes

    task, step = run.task(), run.steps()[-1]
    model = run.load_model(step)
    hook = hook or models.mlp_hook(models.n_layers(model) - 1)
    loss = run.config["train"].get("loss", "cross_entropy")
    split = split or ("train" if bool(task.train_corrupted.any()) else "all")
    config = _sae_config(model, task, hook, split, architecture=architecture, d_sae=d_sae, k=k, steps=steps)
    training_sae_steps = training_sae_steps or max(100, config.steps // 3)
    folder = run.path / "analysis" / "sae" / "final"
    sae = saes.train(model, task, hook, config, split=split, out=folder, overwrite=True, progress=progress)
    ev = saes.evaluate(model, sae, task, loss=loss)
    stats = saes.features(model, sae, task)
    groups = {name: stats.indices(name) for name in ("memorizing", "generalizing")}
    study = saes.ablation_study(model, sae, task, groups, alive=stats.alive, n_random=n_random, loss=loss)
    earlier = [s for s in saes.pick_steps(run.steps(), n_training_steps + 1) if s != step]
    over = saes.over_training(run, hook, earlier, loss=loss, progress=progress, split=split,
                              config=config.replace(steps=training_sae_steps))
    top = stats.table(k=8)
    spectra = ({str(r["feature"]): stats.spectra[r["feature"]].tolist() for r in top}
               if stats.spectra is not None else None)
    return {"step": step, "hook": hook, "settings": config.to_dict() | {"split": split},
            "folder": str(folder.relative_to(run.path)), "evaluate": {k_: v for k_, v in ev.items() if k_ != "fire_rate"},
            "counts": stats.counts(), "rule": stats.rule, "features": stats.table(k=50), "spectra": spectra,
            "generalizing_freqs": [int(stats.dominant_freq[f]) for f in groups["generalizing"]]
            if stats.dominant_freq is not None else None,
            "ablation": study, "over_training": {"sae_steps": training_sae_steps, **over}}


def _sae(run: Run, progress: bool) -> dict[str, Any] | None:
    return sae_analysis(run, progress=progress)


def influence_analysis(run: Run, *, n_queries: int = 64, k: int = 20, fisher: str = "true", damping: float = 0.1,
                       damping_mode: str = "relative", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Which training examples the model's predictions rest on (EK-FAC influence, Grosse et al. 2023),
    at the checkpoint where the model first fits its training set (memorization) and at the last one.

    Queries: up to ``n_queries`` corrupted training examples (labelled with their corrupted label:
    what the model memorized) and as many held-out examples (true label), drawn with ``seed``.
    For each query group: the composition of the top-``k`` most influential training examples
    (corrupted share against the base rate, sharing the query's label, sharing its true answer);
    for every training example: its self-influence, and how well that separates corrupted from
    clean examples (AUROC); and how much of the top-``k`` TF-IDF candidate filtering would keep
    (``_tfidf_recall``). The last checkpoint's factors are saved in
    ``run/analysis/influence/factors`` (replaced on a rerun).
    """
    import torch

    from mechgrok._stats import auroc
    from mechgrok.influence import EKFAC, top_influences

    task, steps, history = run.task(), run.steps(), run.history()
    loss = run.config["train"].get("loss", "cross_entropy")
    fit_step = first_step(history, "train_acc", MEMORIZED_ACC)  # the report's "memorized"
    early = next((s for s in steps if fit_step is not None and s >= fit_step), None)
    chosen = sorted({s for s in (early, steps[-1]) if s is not None})
    g = torch.Generator().manual_seed(seed)

    def sample(mask: torch.Tensor) -> torch.Tensor:
        idx = mask.nonzero().flatten()
        return idx[torch.randperm(len(idx), generator=g)[:n_queries]].sort().values

    queries = {"corrupted train": sample(task.train_corrupted), "test": sample(task.test)}
    queries = {name: q for name, q in queries.items() if len(q)}
    train_idx = task.train.nonzero().flatten()
    corrupted = task.train_corrupted[train_idx]
    base = {"frac_corrupted": float(corrupted.double().mean()),
            "frac_same_answer": 1.0 / max(1, int(task.labels.max()) + 1)}
    out: dict[str, Any] = {"settings": {"fisher": fisher, "damping": damping, "damping_mode": damping_mode,
                                        "loss": loss, "k": k, "n_queries": n_queries, "seed": seed},
                           "fit_step": fit_step, "steps": {}, "base_rates": base}
    for step in chosen:
        model = run.load_model(step)
        ek = EKFAC(model, task, fisher=fisher, damping=damping, damping_mode=damping_mode, loss=loss, seed=seed,
                   progress=progress).fit(train_idx)
        row: dict[str, Any] = {"groups": {}, "accuracy": {s: m["acc"] for s, m in evaluate(model, task, loss).items()}}
        for name, q in queries.items():
            labels = "labels" if name == "corrupted train" else "true_labels"
            S = ek.scores(q, train_idx, query_labels=labels)
            top = top_influences(S, task, train_idx, k=k, query_idx=q)
            row["groups"][name] = top.summary() | {"n_queries": int(len(q)), "mean_top_score": float(top.scores.mean()),
                                                   "example": _example(task, top, 0),
                                                   "tfidf_recall": _tfidf_recall(task, q, train_idx, S, labels, k)}
        self_inf = ek.self_influence(train_idx)
        row["self_influence"] = {"clean": self_inf[~corrupted].tolist(), "corrupted": self_inf[corrupted].tolist(),
                                 "auroc_corrupted": auroc(self_inf[corrupted].numpy(), self_inf[~corrupted].numpy())}
        row["damping"] = {name: float(v) for name, v in ek.damping_.items()}
        out["steps"][str(step)] = row
        if step == steps[-1]:
            ek.save(run.path / "analysis" / "influence" / "factors")
    out["factors"] = "analysis/influence/factors"
    return out


def _tfidf_recall(task, q, train_idx, S, labels: str, k: int, sizes: Sequence[int] = (50, 200)) -> dict[str, Any]:
    """How much of each query's top-``k`` TF-IDF candidate sets of ``sizes`` keep, with the input
    tokens alone and with the answer as a term (Grosse et al. 2023's filter; ``mg.influence.candidates``)."""
    from mechgrok.influence import candidate_recall, tfidf_candidates

    out: dict[str, Any] = {}
    for answers in (False, True):
        for size in sorted({min(s, len(train_idx)) for s in sizes}):
            cand = tfidf_candidates(task, q, train_idx, k=size, answers=answers, query_labels=labels)
            r = candidate_recall(S, train_idx, cand, task, top=k)
            out[f"{'tokens+answer' if answers else 'tokens'}@{size}"] = {"recall": r["recall"], "random": r["random"]}
    return out


def _example(task, top, i: int) -> dict[str, Any]:
    """Query ``i`` and its top influences as operands and labels, for the report."""
    a, b = task.operand_positions

    def describe(j: int) -> dict[str, Any]:
        return {"index": j, "a": int(task.inputs[j, a]), "b": int(task.inputs[j, b]), "label": int(task.labels[j]),
                "true_label": int(task.true_labels[j]), "corrupted": bool(task.train_corrupted[j])}

    return {"query": describe(int(top.query[i])),
            "top": [describe(int(j)) | {"score": float(sv)} for j, sv in zip(top.indices[i][:5], top.scores[i][:5])]}


def _influence(run: Run, progress: bool) -> dict[str, Any] | None:
    return influence_analysis(run, progress=progress)


def memorization_analysis(model, task: SequenceTask, *, k: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Memorized sequences of a language-model run (JSON-ready): the memorization scores
    (``mg.memorization.scores``: AUROC per repetition count, agreement, means by repetition
    count), the k-extractability rate per group at several prefix lengths, and the induction-head
    scores (``mg.measures.induction_scores``, BOS = the corpus' last token id)."""
    from mechgrok import memorization  # noqa: PLC0415 (only language-model runs need it)

    s = memorization.scores(model, task, k=k, progress=progress)
    ks = sorted({2, 4, s.k, task.n_ctx // 2} & set(range(1, task.n_ctx)))
    rates = {str(kk): {g: memorization.extract(model, task, kk, split=g).rate for g in task.groups
                       if bool(task.groups[g].any())} for kk in ks}
    bos = task.d_vocab - 1 if task.config.get("kind") == "lm_corpus" else None
    induction = measures.induction_scores(model, bos=bos).to_dict()
    out = {"k": s.k, "reference": s.reference, "auroc": s.auroc_by_group(), "agreement": s.agreement(),
           "by_repeats": s.by_repeats(), "extractable_rate": rates, "induction": induction}
    planted = s.planted_groups()
    if planted and models.has_mlp(model):  # DEL (Chang et al. 2024) on the most repeated planted group
        group = planted[-1][1]
        before = memorization.extract(model, task, s.k, split=group).rate
        if before > 0:  # nothing to delete when none of the group is extractable
            curves = {}
            for method in memorization.LOCALIZATION_METHODS:
                loc = memorization.localize(model, task, group, method, progress=False)
                curves[method] = [p.to_dict() for p in memorization.deletion_curve(model, task, loc, DEL_FRACTIONS,
                                                                                   k=s.k)]
            out["deletion"] = {"group": group, "fractions": list(DEL_FRACTIONS), "curves": curves, "before": before}
    return out


#: Shares of the MLP neurons the memorization analysis drops (DEL): 0.1%, 0.5%, 1% (Chang et al.), 5%.
DEL_FRACTIONS = (0.001, 0.005, 0.01, 0.05)


def _memorization(run: Run, progress: bool) -> dict[str, Any] | None:
    task = run.task()
    if not isinstance(task, SequenceTask):
        log.info("memorization: scores memorized sequences of a language-model corpus; %s trains on a %s",
                 run.path, type(task).__name__)
        return None
    return memorization_analysis(run.load_model(), task, progress=progress)


def _answer_tasks_only(fn: Callable[[Run, bool], dict[str, Any] | None]) -> Callable[[Run, bool], dict[str, Any] | None]:
    """``fn`` for runs on a Task (one answer per example); not applicable to a language-model corpus."""
    def wrapped(run: Run, progress: bool) -> dict[str, Any] | None:
        if isinstance(run.task(), SequenceTask):
            log.info("%s: not applicable to %s, a language-model run (a SequenceTask); its analysis is "
                     "'memorization'", fn.__name__.strip("_"), run.path)
            return None
        return fn(run, progress)

    wrapped.__name__ = fn.__name__
    return wrapped


#: name -> analysis function; the order is the order they run in.
ANALYSES: dict[str, Callable[[Run, bool], dict[str, Any] | None]] = {
    "progress": _progress,
    "neurons": _answer_tasks_only(_neurons),
    "circuits": _answer_tasks_only(_circuits),
    "overlap": _answer_tasks_only(_overlap),
    "sae": _answer_tasks_only(_sae),
    "influence": _answer_tasks_only(_influence),
    "memorization": _memorization,
}


def analyze(run: Run | str | Path, only: Sequence[str] | None = None, progress: bool = True,
            threads: int | None = 1) -> dict[str, Path]:
    """Run the analyses (all, or those named in ``only``) and write ``analysis/NAME.json``.

    ``threads``: torch threads while analysing (restored afterwards; ``None`` leaves them).

    Returns:
        name -> path of the written file, for the analyses that applied.
    """
    run = run if isinstance(run, Run) else Run(run)
    names = list(ANALYSES) if only is None else list(only)
    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    if not run.steps():
        raise ValueError(f"{run.path} has no checkpoints to analyse; train it first")
    written = {}
    with torch_threads(threads):
        for name in names:
            log.info("analysis %r on %s", name, run.path)
            t0 = time.perf_counter()
            result = ANALYSES[name](run, progress)
            if result is not None:
                written[name] = run.write_analysis(name, result)
            log.info("analysis %r on %s: %s in %.0f s", name, run.path, "done" if result is not None else "not applicable",
                     time.perf_counter() - t0)
    return written
