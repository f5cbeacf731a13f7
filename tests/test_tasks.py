import json

import pytest
import torch

import mechgrok as mg
from mechgrok.tasks import OPS, modular_arithmetic, multi_task


def _py(op, a, b, p):
    if op == "div":
        return a * pow(b, p - 2, p) % p
    return {"add": a + b, "sub": a - b, "mul": a * b, "poly": a * a + a * b + b * b,
            "cubic": a**3 + a * b}[op] % p


@pytest.mark.parametrize("op", sorted(OPS))
def test_labels_match_python_arithmetic(op):
    p = 11
    t = modular_arithmetic(p=p, op=op, train_frac=0.5, seed=0)
    want = torch.tensor([_py(op, int(a), int(b), p) for a, b, _ in t.inputs])
    assert torch.equal(t.true_labels, want)
    assert torch.equal(t.labels, t.true_labels)  # no corruption asked
    assert (t.inputs[:, 2] == p).all() and t.d_vocab == p + 1 and t.d_vocab_out == p
    n = p * (p - 1) if op == "div" else p * p
    assert t.inputs.shape == (n, 3)
    if op == "div":
        assert (t.inputs[:, 1] != 0).all()


def test_sub_and_cubic_are_not_commutative():
    for op in ("sub", "cubic"):
        t = modular_arithmetic(p=7, op=op, train_frac=0.5)
        table = t.true_labels.reshape(7, 7)
        assert not torch.equal(table, table.T)


def test_split_and_corruption():
    t = modular_arithmetic(p=59, op="add", train_frac=0.3, corrupt_frac=0.1, seed=0)
    n_train = int(t.train.sum())
    assert n_train == round(0.3 * 59 * 59)
    assert int(t.train_corrupted.sum()) == round(0.1 * n_train)
    # a corrupted label never equals the true label, and only corrupted examples differ
    assert torch.equal(t.labels != t.true_labels, t.train_corrupted)
    assert not (t.train_corrupted & t.test).any()
    assert torch.equal(t.train_clean | t.train_corrupted, t.train)
    assert torch.equal(t.train | t.test, torch.ones_like(t.train))
    assert (t.labels >= 0).all() and (t.labels < 59).all()


def test_seeded():
    a = modular_arithmetic(p=13, train_frac=0.5, corrupt_frac=0.2, seed=3)
    b = modular_arithmetic(p=13, train_frac=0.5, corrupt_frac=0.2, seed=3)
    c = modular_arithmetic(p=13, train_frac=0.5, corrupt_frac=0.2, seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.train, c.train)


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=12, op="div"), "not prime"),
    (dict(p=11, op="pow"), "unknown op 'pow'"),
    (dict(p=11, train_frac=0.0), r"train_frac must lie in \(0, 1\)"),
    (dict(p=11, train_frac=1.0), r"train_frac must lie in \(0, 1\)"),
    (dict(p=11, train_frac=1.5), r"train_frac must lie in \(0, 1\)"),
    (dict(p=11, corrupt_frac=1.0), r"corrupt_frac must lie in \[0, 1\)"),
    (dict(p=11, corrupt_frac=-0.1), r"corrupt_frac must lie in \[0, 1\)"),
    (dict(p=1), "p must be an integer >= 2"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        modular_arithmetic(**kwargs)


def test_div_error_suggests_a_prime():
    with pytest.raises(ValueError, match="try 13"):
        modular_arithmetic(p=12, op="div")


def test_multi_task_tokens():
    t = multi_task([("add", 7), ("sub", 7), ("mul", 5)], train_frac=0.5, seed=0)
    assert t.task_names == ("add", "sub", "mul")
    assert t.inputs.shape == (49 + 49 + 25, 4) and t.d_vocab == 7 + 3 + 1 and t.d_vocab_out == 7
    for i, (op, p) in enumerate([("add", 7), ("sub", 7), ("mul", 5)]):
        rows = t.task_ids == i
        assert (t.inputs[rows, 1] == 7 + i).all() and (t.inputs[rows, 3] == 10).all()
        want = torch.tensor([_py(op, int(a), int(b), p) for a, _, b, _ in t.inputs[rows]])
        assert torch.equal(t.true_labels[rows], want)
        assert int(t.train[rows].sum()) == round(0.5 * int(rows.sum()))
    with pytest.raises(ValueError, match="one-hot view needs a single-operation task"):
        t.onehot()


def test_multi_task_names_and_errors():
    t = multi_task([("add", 5), ("add", 7)], train_frac=0.5)
    assert t.task_names == ("add_p5", "add_p7")
    with pytest.raises(ValueError, match="no modulus"):
        multi_task(["add"])
    assert multi_task(["add", "sub"], p=5).task_names == ("add", "sub")
    with pytest.raises(ValueError, match="duplicate"):
        multi_task([("add", 5), ("add", 5)])


def test_save_load_roundtrip(tmp_path):
    t = modular_arithmetic(p=11, op="sub", train_frac=0.4, corrupt_frac=0.2, seed=1)
    t.save(tmp_path / "task")
    u = mg.tasks.load(tmp_path / "task")
    for k in ("inputs", "labels", "true_labels", "train", "train_corrupted", "task_ids"):
        assert torch.equal(getattr(t, k), getattr(u, k))
    assert u.config == t.config and u.task_names == t.task_names and u.p == 11
    assert torch.equal(mg.tasks.from_config(u.config).labels, t.labels)


def test_truncated_task_file(tmp_path):
    t = modular_arithmetic(p=11, train_frac=0.4)
    t.save(tmp_path / "task")
    f = tmp_path / "task" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged or truncated"):
        mg.tasks.load(tmp_path / "task")


def test_onehot_view():
    t = modular_arithmetic(p=5, train_frac=0.5)
    x = t.onehot()
    assert x.shape == (25, 10) and torch.equal(x.sum(1), torch.full((25,), 2.0))
    assert torch.equal(x[:, :5].argmax(1), t.inputs[:, 0]) and torch.equal(x[:, 5:].argmax(1), t.inputs[:, 1])


def test_unknown_split():
    t = modular_arithmetic(p=5, train_frac=0.5)
    with pytest.raises(ValueError, match="unknown split"):
        t.mask("validation")


# ------------------------------------------------------------------ damaged or crafted task folders
def _saved(tmp_path, task=None):
    task = task or multi_task([("add", 5), ("sub", 5), ("mul", 5)], train_frac=0.5, seed=0)
    folder = task.save(tmp_path / "task")
    return folder, json.loads((folder / "task.json").read_text())


def _edit(folder, **meta):
    data = json.loads((folder / "task.json").read_text()) | meta
    (folder / "task.json").write_text(json.dumps(data))


@pytest.mark.parametrize("names, match", [
    (["../../../../x", "/tmp/y", "mul"], r"sub-task name '\.\./\.\./\.\./\.\./x' in .*task\.json cannot be used as a "
                                         "file name"),
    (["add", "/tmp/y", "mul"], r"sub-task name '/tmp/y' in .*task\.json"),
    (["add", ".hidden", "mul"], "cannot be used as a file name"),
    (["add", "add", "mul"], "task_names must be unique"),
    (["add", "sub"], r"names 2 sub-tasks .* but its config describes 3"),
    (["add", 3, "mul"], "sub-task name 3"),
    ("add", r"wrong types for task_names \(expected list\)"),
])
def test_load_refuses_unsafe_or_inconsistent_task_names(tmp_path, names, match):
    folder, _ = _saved(tmp_path)
    _edit(folder, task_names=names)
    with pytest.raises(ValueError, match=match):
        mg.tasks.load(folder)


def test_task_ids_must_index_task_names(tmp_path):
    folder, meta = _saved(tmp_path)
    _edit(folder, task_names=["add", "sub"], config=meta["config"] | {"kind": "custom"})  # no spec count to compare
    with pytest.raises(ValueError, match=r"task\.json and tensors\.safetensors\) do not agree: Task\.task_ids must "
                                         r"lie in \[0, the number of task_names \(2\)\)"):
        mg.tasks.load(folder)


def test_constructing_a_task_checks_names_shapes_and_ranges():
    import dataclasses

    t = multi_task([("add", 5), ("sub", 5)], train_frac=0.5, seed=0)
    for changes, err, match in [
        (dict(task_names=("a/b", "c")), ValueError, "cannot be used as a file name"),
        (dict(task_names=()), ValueError, "non-empty tuple"),
        (dict(labels=t.labels.float()), TypeError, "labels must be an integer tensor"),
        (dict(train=t.train.long()), TypeError, "train must be bool"),
        (dict(inputs=t.inputs[:, 0]), ValueError, r"inputs must have shape \[N, n_ctx\]"),
        (dict(true_labels=t.true_labels[:-1]), ValueError, r"true_labels must have shape \[50\]"),
        (dict(d_vocab=5), ValueError, r"inputs must lie in \[0, d_vocab\)"),
        (dict(d_vocab_out=True), ValueError, "d_vocab_out must be a positive integer"),
        (dict(operand_positions=(0, 9)), ValueError, "operand_positions must be two different positions"),
    ]:
        with pytest.raises(err, match=match):
            dataclasses.replace(t, **changes)


def test_load_names_the_file_whose_tensors_disagree(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = _saved(tmp_path)
    tensors = load_file(folder / "tensors.safetensors")
    save_file(tensors | {"labels": tensors["labels"][:-3]}, folder / "tensors.safetensors")
    with pytest.raises(ValueError, match=r"task\.json and tensors\.safetensors\) do not agree: Task\.labels must have "
                                         r"shape \[75\], got \(72,\)"):
        mg.tasks.load(folder)
    save_file(tensors | {"train": tensors["train"].float()}, folder / "tensors.safetensors")
    with pytest.raises(ValueError, match="do not agree: Task.train must be bool, got torch.float32"):
        mg.tasks.load(folder)
    save_file(tensors, folder / "tensors.safetensors")
    _edit(folder, d_vocab_out=3)  # labels up to 4 no longer fit
    with pytest.raises(ValueError, match=r"labels must lie in \[0, d_vocab_out\) = \[0, 3\)"):
        mg.tasks.load(folder)


@pytest.mark.parametrize("damage, match", [
    (lambda f: f.write_text(f.read_text()[:40]), r"task\.json is damaged or truncated \(not valid JSON: "),
    (lambda f: f.write_bytes(b"\xff\xfe\x00garbage"), r"task\.json is damaged \(not UTF-8 text: invalid start byte at byte 0\)"),
    (lambda f: f.write_text("[]"), r"task\.json: unknown task format 'list'"),
    (lambda f: _edit(f.parent, d_vocab="7"), r"task\.json lacks or has wrong types for d_vocab \(expected int\)"),
    (lambda f: (f.parent / "tensors.safetensors").write_bytes(b"garbage" * 30), "tensors.safetensors is damaged"),
])
def test_damaged_task_files_are_named(tmp_path, damage, match):
    folder, _ = _saved(tmp_path)
    damage(folder / "task.json")
    with pytest.raises(ValueError, match=match):
        mg.tasks.load(folder)
