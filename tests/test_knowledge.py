import pytest
import torch

import mechgrok as mg
from mechgrok.tasks.knowledge import knowledge, ood_entities

COMP = dict(kind="composition", n_entities=30, n_relations=6, inferred_ratio=2.5, ood_frac=0.3, seed=0)
CMP = dict(kind="comparison", n_entities=20, n_relations=3, inferred_ratio=4.0, ood_frac=0.25, seed=0, n_values=5)


def _rows(t, name):
    return t.task_ids == t.task_names.index(name)


def _atomic_table(t):
    """{(subject token, relation token): answer} read from the task's atomic rows."""
    rows = _rows(t, "atomic")
    return {(int(s), int(r)): int(y) for (_, s, r, _), y in zip(t.inputs[rows], t.labels[rows])}


def test_composition_layout_and_labels_compose_atomic_facts():
    t = knowledge(**COMP)
    N, R = 30, 6
    assert t.task_names == ("atomic", "two_hop", "two_hop_ood")
    assert t.n_ctx == 4 and t.d_vocab == N + R + 2 and t.d_vocab_out == N == t.p
    pad, eq = N + R, N + R + 1
    atomic = _rows(t, "atomic")
    assert int(atomic.sum()) == N * R and (t.inputs[atomic, 0] == pad).all()
    assert (t.inputs[:, 3] == eq).all()
    f = _atomic_table(t)
    assert len(f) == N * R  # every (entity, relation) exactly once
    for h, r1, r2, _ in t.inputs[~atomic].tolist():
        assert 0 <= h < N and N <= r1 < N + R and N <= r2 < N + R
    want = torch.tensor([f[(f[(h, r1)], r2)] for h, r1, r2, _ in t.inputs[~atomic].tolist()])
    assert torch.equal(t.labels[~atomic], want)
    assert torch.equal(t.labels, t.true_labels) and not t.train_corrupted.any()


def test_composition_split_rules():
    t = knowledge(**COMP)
    atomic, id_, ood_q = _rows(t, "atomic"), _rows(t, "two_hop"), _rows(t, "two_hop_ood")
    assert t.train[atomic].all()  # all atomic facts are training data
    assert not t.train[ood_q].any() and ood_q.any()  # OOD queries: test only
    n_atomic = int(atomic.sum())
    assert int((t.train & id_).sum()) == round(2.5 * n_atomic)  # the count rule
    assert (t.test & id_).any()  # an ID test set remains
    # ID queries: head and bridge ID; OOD queries: head and bridge OOD; mixed ones left out
    ood = ood_entities(t)
    f = _atomic_table(t)
    h = t.inputs[:, 0]
    bridge = torch.tensor([f.get((int(a), int(r)), -1) for a, r in t.inputs[:, :2]])
    assert (~ood[h[id_]]).all() and (~ood[bridge[id_]]).all()
    assert ood[h[ood_q]].all() and ood[bridge[ood_q]].all()
    # no OOD entity appears in an inferred training fact, neither as head nor as bridge
    inf_train = t.train & ~atomic
    assert not ood[h[inf_train]].any() and not ood[bridge[inf_train]].any()
    assert int(ood.sum()) == round(0.3 * 30)
    # the number of kept queries: all ID and OOD ones of the full grid, nothing mixed
    full = [(a, r1, r2) for a in range(30) for r1 in range(6) for r2 in range(6)]
    table = {(s, r - 30): y for (s, r), y in f.items()}
    n_id = sum(not ood[a] and not ood[table[(a, r1)]] for a, r1, _ in full)
    n_ood = sum(bool(ood[a]) and bool(ood[table[(a, r1)]]) for a, r1, _ in full)
    assert (int(id_.sum()), int(ood_q.sum())) == (n_id, n_ood)


def test_seeded_and_split_disjoint():
    a, b, c = knowledge(**COMP), knowledge(**COMP), knowledge(**{**COMP, "seed": 1})
    for k in ("inputs", "labels", "train", "task_ids"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert torch.equal(ood_entities(a), ood_entities(b))
    assert not torch.equal(ood_entities(a), ood_entities(c)) and not torch.equal(a.inputs[:900], c.inputs[:900])
    heads_id = set(a.inputs[_rows(a, "two_hop"), 0].tolist())
    heads_ood = set(a.inputs[_rows(a, "two_hop_ood"), 0].tolist())
    assert heads_id and heads_ood and not heads_id & heads_ood


def test_comparison_labels_and_splits():
    t = knowledge(**CMP)
    N, A, V = 20, 3, 5
    ent0, att0 = V + 3, V + 3 + N
    assert t.task_names == ("atomic", "comparison", "comparison_ood")
    assert t.d_vocab_out == V + 3 == t.p and t.d_vocab == V + 3 + N + A + 2
    atomic, id_, ood_q = _rows(t, "atomic"), _rows(t, "comparison"), _rows(t, "comparison_ood")
    val = _atomic_table(t)
    assert len(val) == N * A and all(0 <= v < V for v in val.values())
    sign = {-1: V, 0: V + 1, 1: V + 2}  # <, =, >
    for (e1, a, e2, _), y in zip(t.inputs[~atomic].tolist(), t.labels[~atomic].tolist()):
        assert e1 != e2 and ent0 <= e1 < att0 and att0 <= a < att0 + A
        v1, v2 = val[(e1, a)], val[(e2, a)]
        assert y == sign[(v1 > v2) - (v1 < v2)]
    # ratio rule (rounded to whole pairs), all atomic in train, no OOD in train
    assert int((t.train & id_).sum()) == 2 * round(4.0 * N * A / 2)
    assert t.train[atomic].all() and not t.train[ood_q].any() and (t.test & id_).any()
    # a training query's mirror image is in training too (no leak through symmetry)
    train_q = {tuple(x) for x in t.inputs[t.train & id_, :3].tolist()}
    assert all((e2, a, e1) in train_q for e1, a, e2 in train_q)
    ood = ood_entities(t)
    assert ood[t.inputs[ood_q][:, [0, 2]] - ent0].all() and (~ood[t.inputs[id_][:, [0, 2]] - ent0]).all()


@pytest.mark.parametrize("cfg", [COMP, CMP])
def test_from_config_and_save_load(cfg, tmp_path):
    t = knowledge(**cfg)
    assert t.config["kind"] == "knowledge"
    u = mg.tasks.from_config(t.config)
    t.save(tmp_path / "task")
    v = mg.tasks.load(tmp_path / "task")
    for other in (u, v):
        for k in ("inputs", "labels", "true_labels", "train", "train_corrupted", "task_ids"):
            assert torch.equal(getattr(t, k), getattr(other, k))
        assert (other.task_names, other.d_vocab, other.d_vocab_out, other.p, other.config) == \
            (t.task_names, t.d_vocab, t.d_vocab_out, t.p, t.config)
    assert torch.equal(ood_entities(v), ood_entities(t))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="chain"), "unknown knowledge kind 'chain'"),
    (dict(n_entities=2), "n_entities must be an integer >= 3"),
    (dict(n_relations=0), "n_relations must be an integer >= 1"),
    (dict(kind="comparison", n_values=1), "n_values must be an integer >= 2"),
    (dict(ood_frac=0.0), r"ood_frac must lie in \(0, 1\)"),
    (dict(ood_frac=1.0), r"ood_frac must lie in \(0, 1\)"),
    (dict(inferred_ratio=-1.0), "inferred_ratio must be >= 0"),
    (dict(n_entities=10, ood_frac=0.01), "0 OOD and 10 ID entities.*raise n_entities"),
    (dict(n_entities=20, n_relations=4, inferred_ratio=4.0), r"use inferred_ratio <= \d+\.\d+, raise n_relations"),
    (dict(kind="comparison", n_entities=10, inferred_ratio=9.0), r"use inferred_ratio <= \d+\.\d+, raise n_entities"),
    (dict(n_entities=2000, n_relations=200), "lower n_entities or n_relations"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        knowledge(**{**dict(n_entities=20, n_relations=4, inferred_ratio=1.0, ood_frac=0.2), **kwargs})


def test_ood_entities_refuses_other_tasks():
    with pytest.raises(ValueError, match="not built by mechgrok.tasks.knowledge"):
        ood_entities(mg.tasks.modular_arithmetic(p=5, train_frac=0.5))


@pytest.mark.parametrize("cfg", [COMP, CMP])
def test_tiny_model_builds_and_evaluates_per_subtask(cfg):
    t = knowledge(**cfg)
    model = mg.models.transformer(t, d_model=16, n_heads=2, d_mlp=32)
    out = mg.evaluate(model, t, by_task=True)
    assert set(out) == set(t.task_names)
    name = t.task_names[2]
    assert 0 <= out[name]["test"]["acc"] <= 1 and out[name]["train"]["acc"] != out[name]["train"]["acc"]  # NaN
    assert 0 <= out["atomic"]["train"]["acc"] <= 1


@pytest.mark.slow(seconds=5)
def test_analyze_a_knowledge_run(tmp_path):
    """Every analysis either applies to a knowledge task or steps aside; the report builds."""
    import mechgrok as mg

    task = mg.tasks.knowledge("composition", n_entities=20, n_relations=4, inferred_ratio=2.0, ood_frac=0.2, seed=0)
    model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
    run = mg.train(model, task, mg.TrainConfig(steps=20, eval_every=10, checkpoint_every=10), out=tmp_path / "k",
                   progress=False)
    written = mg.analyze(run, progress=False)
    assert "progress" not in written and {"circuits", "overlap"} <= set(written)
    html = mg.report.build(run).read_text()
    assert 'class="error"' not in html
