import json
from collections import Counter

import pytest
import torch

import mechgrok as mg
from mechgrok.tasks import IGNORE, SequenceTask, lm_corpus, load_sequence_task

SMALL = dict(n_structured=60, n_planted=9, repeats=(1, 3, 10), n_held_out=5, seq_len=9, d_vocab=16, seed=0)


def _toy(**over):
    x = torch.tensor([[3, 0, 1, 2], [3, 2, 1, 0], [3, 1, 1, 1]])
    y = torch.cat([x[:, 1:], torch.full((3, 1), IGNORE)], dim=1)
    kw = dict(name="toy", inputs=x, targets=y, d_vocab=4,
              groups={"train": torch.tensor([True, False, False]), "test": torch.tensor([False, True, False])},
              metadata={"repeats": torch.tensor([2, 0, 0])})
    kw.update(over)
    return SequenceTask(**kw)


def _equal(a, b):
    assert a.name == b.name and a.d_vocab == b.d_vocab and a.config == b.config
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert list(a.groups) == list(b.groups) and list(a.metadata) == list(b.metadata)
    assert all(torch.equal(a.groups[g], b.groups[g]) for g in a.groups)
    assert all(torch.equal(a.metadata[k], b.metadata[k]) and a.metadata[k].dtype == b.metadata[k].dtype
               for k in a.metadata)


# ------------------------------------------------------------------ SequenceTask invariants

def test_views():
    t = _toy()
    assert t.n_ctx == 4 and t.d_vocab_out == 4 and t.task_names == ("lm",)
    assert torch.equal(t.loss_mask, t.targets != IGNORE) and t.loss_mask.shape == (3, 4)
    assert torch.equal(t.mask("all"), torch.ones(3, dtype=torch.bool))
    assert torch.equal(t.mask("train"), t.train) and torch.equal(t.mask("test"), t.test)
    with pytest.raises(ValueError, match="unknown group 'tset'.*'test'"):
        t.mask("tset")
    s = t.summary()
    assert s["n_train"] == 1 and s["n_test"] == 1 and s["n_loss_tokens"] == 9 and s["n_ctx"] == 4
    no_loss = _toy(targets=torch.full((3, 4), IGNORE))
    assert no_loss.summary()["n_without_loss"] == 3


def test_caller_dicts_do_not_change_the_task():
    groups = {"train": torch.tensor([True, False, False]), "test": torch.tensor([False, True, False])}
    t = _toy(groups=groups)
    groups["extra"] = torch.ones(3, dtype=torch.bool)
    assert "extra" not in t.groups


B = torch.tensor([True, False, False])


@pytest.mark.parametrize("over, err, match", [
    (dict(inputs=[[0, 1]]), TypeError, "inputs must be a torch.Tensor"),
    (dict(inputs=torch.zeros(3, 4)), TypeError, "inputs must be an integer tensor"),
    (dict(inputs=torch.zeros(3, 1, dtype=torch.long), targets=torch.zeros(3, 1, dtype=torch.long)), ValueError,
     "T >= 2"),
    (dict(targets=torch.zeros(3, 5, dtype=torch.long)), ValueError, "targets must have the shape of inputs"),
    (dict(inputs=torch.full((3, 4), 4)), ValueError, r"inputs must lie in \[0, d_vocab\)"),
    (dict(targets=torch.full((3, 4), -1)), ValueError, "or be IGNORE"),
    (dict(targets=torch.full((3, 4), 7)), ValueError, "or be IGNORE"),
    (dict(d_vocab=0), ValueError, "d_vocab must be a positive integer"),
    (dict(d_vocab=True), ValueError, "d_vocab must be a positive integer"),
    (dict(groups={"train": B}), ValueError, r"lacks \['test'\]"),
    (dict(groups={"train": B, "test": B}), ValueError, "in both 'train' and 'test'"),
    (dict(groups={"train": B, "test": ~B, "../x": B}), ValueError, "cannot be used as a file name"),
    (dict(groups={"train": B, "test": ~B, "all": B}), ValueError, "named 'all'"),
    (dict(groups={"train": B.long(), "test": ~B}), TypeError, "must be bool"),
    (dict(groups={"train": torch.tensor([True, False]), "test": ~B}), ValueError, r"shape \[N\] = \[3\]"),
    (dict(metadata={"r": torch.zeros(2)}), ValueError, r"metadata\['r'\] must be a tensor of shape \[N\]"),
    (dict(metadata={"r": torch.zeros(3, dtype=torch.complex64)}), TypeError, "integer, float or bool"),
    (dict(metadata={"repeats": torch.tensor([1, -1, 0])}), ValueError, "non-negative integers"),
    (dict(metadata={"repeats": torch.tensor([1.0, 1.0, 0.0])}), ValueError, "non-negative integers"),
    (dict(name=3), TypeError, "name must be a string"),
    (dict(config=[]), TypeError, "config must be a dict"),
])
def test_validation(over, err, match):
    with pytest.raises(err, match=match):
        _toy(**over)


def test_with_groups_is_pure():
    t = _toy()
    u = t.with_groups(extra=torch.tensor([False, False, True]))
    assert "extra" in u.groups and "extra" not in t.groups
    assert u.inputs is t.inputs
    with pytest.raises(ValueError, match="already has groups"):
        u.with_groups(extra=B)
    with pytest.raises(ValueError, match="file name"):
        t.with_groups(**{"a/b": B})


def test_epoch_rows_without_repeats_is_every_train_row_once():
    t = _toy(metadata={})
    assert t.epoch_rows().tolist() == [0]
    assert _toy().epoch_rows().tolist() == [0, 0]


# ------------------------------------------------------------------ sequences()

def test_sequences_matches_influence_semantics():
    t = lm_corpus(**SMALL)
    for split in ("train", "test", "held_out_planted"):
        s = t.sequences(split)
        m = t.mask(split)
        assert isinstance(s, mg.influence.Sequences)
        assert torch.equal(s.tokens, t.inputs[m])
        # Sequences' [N, T-1] entry [n, t]: the prediction at t of token t+1 counts
        assert torch.equal(s.loss_mask, t.loss_mask[m][:, :-1])
        # its token-aligned form gives the same mask
        assert torch.equal(mg.influence.Sequences(t.inputs[m], loss_mask=t.loss_mask[m].roll(1, 1)).loss_mask,
                           s.loss_mask)
        assert s.n_targets == int(t.loss_mask[m].sum())


def test_sequences_refuses_non_next_token_targets():
    t = _toy()
    y = t.targets.clone()
    y[0, 1] = 0  # next token is 2
    with pytest.raises(ValueError, match="not the shifted inputs.*row 0, position 1"):
        _toy(targets=y).sequences("train")
    y = t.targets.clone()
    y[0, -1] = 0
    with pytest.raises(ValueError, match="last position"):
        _toy(targets=y).sequences("train")
    with pytest.raises(ValueError, match="is empty"):
        _toy(groups={"train": B, "test": torch.zeros(3, dtype=torch.bool)}).sequences("test")


# ------------------------------------------------------------------ save / load

def test_round_trip(tmp_path):
    t = lm_corpus(**SMALL).with_groups(extra=torch.zeros(60 + 9 + 5, dtype=torch.bool))
    t.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    assert meta["format"] == "mechgrok.sequence_task/1"
    for u in (load_sequence_task(tmp_path / "t"), mg.tasks.load(tmp_path / "t")):
        assert isinstance(u, SequenceTask)
        _equal(t, u)
    t.save(tmp_path / "t")  # overwrite in place
    _equal(t, mg.tasks.load(tmp_path / "t"))


def test_a_task_folder_still_loads_as_task(tmp_path):
    mg.tasks.modular_arithmetic(p=5, train_frac=0.5).save(tmp_path / "m")
    assert isinstance(mg.tasks.load(tmp_path / "m"), mg.tasks.Task)
    with pytest.raises(ValueError, match="expected 'mechgrok.sequence_task/1'"):
        load_sequence_task(tmp_path / "m")


def _damage(folder, key, value):
    f = folder / "task.json"
    meta = json.loads(f.read_text())
    meta[key] = value
    f.write_text(json.dumps(meta))


@pytest.mark.parametrize("key, value, match", [
    ("format", "mechgrok.sequence_task/9", "unknown task format"),
    ("groups", ["train", "test", "../evil"], "cannot be used as a file name"),
    ("groups", ["train", "test", "missing"], r"lacks tensors \['group.missing'\]"),
    ("groups", ["train"], "does not list"),
    ("groups", ["train", "train", "test"], "twice"),
    ("metadata", "repeats", r"wrong types for metadata"),
    ("d_vocab", 3, "do not agree"),
    ("name", None, "wrong types for name"),
])
def test_damaged_json(tmp_path, key, value, match):
    folder = _toy().save(tmp_path / "t")
    _damage(folder, key, value)
    for load in (load_sequence_task, mg.tasks.load):
        with pytest.raises(ValueError, match=match):
            load(folder)


def test_damaged_files(tmp_path):
    folder = _toy().save(tmp_path / "t")
    data = (folder / "tensors.safetensors").read_bytes()
    (folder / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        mg.tasks.load(folder)
    (folder / "task.json").write_text("{not json")
    with pytest.raises(ValueError, match="task.json is damaged"):
        load_sequence_task(folder)
    (folder / "task.json").unlink()
    with pytest.raises(FileNotFoundError, match="SequenceTask.save"):
        load_sequence_task(folder)


# ------------------------------------------------------------------ lm_corpus

def test_groups_and_metadata():
    t = lm_corpus(**SMALL)
    g, rep, kind = t.groups, t.metadata["repeats"], t.metadata["kind"]
    n_test = round(0.1 * 60)
    assert int(g["test"].sum()) == n_test and int(g["structured_train"].sum()) == 60 - n_test
    for r in (1, 3, 10):
        assert int(g[f"planted_r{r}"].sum()) == 3 and (rep[g[f"planted_r{r}"]] == r).all()
        assert not (g[f"planted_r{r}"] & ~g["train"]).any()
    assert int(g["held_out_planted"].sum()) == 5
    ho = g["held_out_planted"]
    assert not (ho & (g["train"] | g["test"])).any()
    assert (rep[ho] == 0).all() and (rep[g["test"]] == 0).all() and (rep[g["structured_train"]] == 1).all()
    assert torch.equal(kind == 0, g["structured_train"] | g["test"]) and torch.equal(kind == 2, ho)
    planted = g["planted_r1"] | g["planted_r3"] | g["planted_r10"]
    assert torch.equal(kind == 1, planted)
    assert torch.equal(g["train"], g["structured_train"] | planted)
    # BOS is position 0 everywhere and nowhere else
    assert (t.inputs[:, 0] == 15).all() and (t.inputs[:, 1:] < 15).all()


def test_induction_targets_copy_only_the_repeated_half():
    t = lm_corpus(**SMALL)  # seq_len 9: L = 4, no padding
    s = t.mask("structured_train") | t.test
    x, y = t.inputs[s], t.targets[s]
    L = 4
    assert torch.equal(x[:, 1:1 + L], x[:, 1 + L:1 + 2 * L])
    assert (y[:, :L] == IGNORE).all() and (y[:, -1] == IGNORE).all()
    assert torch.equal(y[:, L:-1], x[:, L + 1:])
    # segments hold distinct tokens, so the copy is unambiguous
    assert all(len(set(r)) == L for r in x[:, 1:1 + L].tolist())
    odd = lm_corpus(**{**SMALL, "seq_len": 10})  # L = 4, one padding token continues the repeat
    x, y = odd.inputs[odd.metadata["kind"] == 0], odd.targets[odd.metadata["kind"] == 0]
    assert torch.equal(x[:, 9], x[:, 1]) and torch.equal(y[:, 8], x[:, 9]) and (y[:, :4] == IGNORE).all()


def test_induction_varied_repeats_a_segment_of_its_own_period():
    t = lm_corpus(**{**SMALL, "structure": "induction_varied", "seq_len": 13})  # L = 6: periods 3 to 6
    s = t.metadata["kind"] == 0
    x, y = t.inputs[s], t.targets[s]
    periods = set()
    for row, tgt in zip(x.tolist(), y.tolist()):
        body = row[1:]
        p = next(j for j in range(1, len(body)) if body[j] == body[0])
        periods.add(p)
        assert len(set(body[:p])) == p  # distinct segment tokens: the earlier occurrence is unique
        assert all(body[j] == body[j % p] for j in range(len(body)))  # periodic to the end
        assert tgt[:p] == [IGNORE] * p and tgt[-1] == IGNORE
        assert tgt[p:-1] == row[p + 1:]  # loss on every token inside a repeat
    assert periods == {3, 4, 5, 6}  # a fixed-offset head cannot serve them all


def test_planted_targets_are_every_next_token():
    t = lm_corpus(**SMALL)
    m = t.metadata["kind"] > 0
    assert torch.equal(t.targets[m][:, :-1], t.inputs[m][:, 1:]) and (t.targets[m][:, -1] == IGNORE).all()


def test_arithmetic_targets():
    t = lm_corpus(**{**SMALL, "structure": "arithmetic", "seq_len": 9, "d_vocab": 16})  # p = 13
    p = 13
    s = t.metadata["kind"] == 0
    x, y = t.inputs[s], t.targets[s]
    for row, tgt in zip(x.tolist(), y.tolist()):
        body = row[1:]
        for j in range(0, len(body) - 2, 3):
            a, b, c = body[j:j + 3]
            assert c == (a + b) % p and max(a, b) < p
            assert tgt[j + 2] == c  # predicted at the position of b (body j+1 = position j+2)
        assert sum(v != IGNORE for v in tgt) == (len(body)) // 3
    assert int((t.targets[s] != IGNORE).sum()) == int(s.sum()) * 2


def test_all_sequences_are_distinct_and_held_out_never_trained():
    t = lm_corpus(**{**SMALL, "d_vocab": 5, "seq_len": 5, "n_structured": 10})  # tiny space: duplicates drawn
    rows = [tuple(r) for r in t.inputs.tolist()]
    assert len(set(rows)) == len(rows)
    trained = {tuple(r) for r in t.inputs[t.train].tolist()}
    assert not trained & {tuple(r) for r in t.inputs[t.mask("held_out_planted")].tolist()}
    with pytest.raises(ValueError, match="distinct"):
        lm_corpus(**{**SMALL, "d_vocab": 3, "seq_len": 3, "n_structured": 10})


def test_seeded():
    a, b, c = lm_corpus(**SMALL), lm_corpus(**SMALL), lm_corpus(**{**SMALL, "seed": 1})
    _equal(a, b)
    assert not torch.equal(a.inputs, c.inputs) and not torch.equal(a.test, c.test)


@pytest.mark.parametrize("structure", ["induction", "arithmetic", "induction_varied"])
def test_from_config_rebuilds(structure, tmp_path):
    t = lm_corpus(**{**SMALL, "structure": structure})
    _equal(t, mg.tasks.from_config(t.config))
    u = mg.tasks.load(t.save(tmp_path / "t"))  # config read back from JSON
    _equal(t, mg.tasks.from_config(u.config))


def test_epoch_rows_counts():
    t = lm_corpus(**SMALL)
    rows = t.epoch_rows(torch.Generator().manual_seed(0))
    count = Counter(rows.tolist())
    rep = t.metadata["repeats"]
    for n in range(t.n):
        assert count.get(n, 0) == (int(rep[n]) if t.train[n] else 0)
    assert len(rows) == int(rep[t.train].sum())
    again = t.epoch_rows(torch.Generator().manual_seed(0))
    assert torch.equal(rows, again) and not torch.equal(rows, t.epoch_rows(torch.Generator().manual_seed(1)))
    assert not torch.equal(rows, rows.sort().values)  # shuffled


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(structure="copy"), ValueError, "unknown structure"),
    (dict(seq_len=2), ValueError, "seq_len must be >= 3"),
    (dict(structure="arithmetic", seq_len=3), ValueError, "seq_len must be >= 4"),
    (dict(d_vocab=4, seq_len=11), ValueError, "d_vocab must be >= 6"),
    (dict(structure="arithmetic", d_vocab=3), ValueError, "d_vocab must be >= 4"),
    (dict(n_planted=10), ValueError, "multiple of 3, e.g. 9 or 12"),
    (dict(repeats=(1, 1, 10)), ValueError, "distinct"),
    (dict(repeats=()), TypeError, "non-empty"),
    (dict(repeats=(1, 0, 10)), ValueError, "repeats"),
    (dict(repeats=(1, 2.5, 10)), TypeError, "integer"),
    (dict(test_frac=1.0), ValueError, "test_frac must be"),
    (dict(n_structured=1), ValueError, "n_structured"),
    (dict(n_held_out=-1), ValueError, "n_held_out"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_lm_corpus_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        lm_corpus(**{**SMALL, **kwargs})


def test_no_planted_or_held_out():
    t = lm_corpus(**{**SMALL, "n_planted": 0, "n_held_out": 0})
    assert t.n == 60 and int(t.groups["planted_r10"].sum()) == 0 and len(t.epoch_rows()) == 54
