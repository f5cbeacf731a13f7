"""Bad arguments fail before anything runs, with a message that names the argument and how to fix it
(issue 13: "silently wrong results" and "raw errors instead of a message"). Tiny models only."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import mechgrok as mg
from mechgrok import neurons
from mechgrok.capture import capture, load_cache
from mechgrok.circuits import metrics
from mechgrok.circuits.graph import graph
from mechgrok.circuits.overlap import expected_jaccard, overlap, overlap_vs_k, score_overlap
from mechgrok.circuits.planted import induction_data, induction_model

HOOK = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def setup():
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, corrupt_frac=0.3, seed=0)
    tf = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
    mlp = mg.models.mlp(task, width=16)
    clean, corrupted, labels, _ = mg.circuits.contrast(task, "test", n=16)
    return task, tf, mlp, clean, corrupted, metrics.generalization(labels)


def circuit(model, k=3, level="neuron"):
    g = graph(model, level)
    return mg.circuits.select(g, {c: float(i) for i, c in enumerate(g.components)}, top_k=k)


# ------------------------------------------------------------------------------------ neurons


def test_classify_threshold_is_checked(setup):
    task, _, mlp, *_ = setup
    with pytest.raises(ValueError, match="threshold must be a finite number, got nan"):
        neurons.classify(mlp, task, threshold=math.nan)  # used to label every neuron generalizing
    with pytest.raises(ValueError, match=r"threshold must be >= 0 and <= 1"):
        neurons.classify(mlp, task, threshold=1.5)  # IPR lies in (0, 1]
    with pytest.raises(TypeError, match="threshold must be a number, got '0.5'"):
        neurons.classify(mlp, task, threshold="0.5")
    with pytest.raises(TypeError, match="layer must be an integer"):
        neurons.classify(mlp, task, layer="0")
    assert neurons.classify(mlp, task, threshold=0.5).threshold == 0.5


def test_prune_indices_are_checked(setup):
    _, tf, mlp, *_ = setup
    for bad in ([1.5], [True], [[1, 2]]):  # [1.5] used to prune neuron 1
        with pytest.raises(TypeError, match=r"neurons\[0\] must be an integer"):
            neurons.prune(mlp, bad)
    with pytest.raises(TypeError, match="1-D tensor of integer indices"):
        neurons.prune(mlp, torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"list of neuron indices, e\.g\. \[3\]"):
        neurons.prune(mlp, 3)
    with pytest.raises(ValueError, match=r"in \[0, 16\) \(layer 0 has width=16\), got \[-1\]"):
        neurons.prune(mlp, [-1])  # no counting from the end
    with pytest.raises(ValueError, match=r"d_mlp=32\), got \[32\]"):
        neurons.prune(tf, [32])
    with pytest.raises(ValueError, match=r"neurons \[2\] are listed more than once.*sorted\(set"):
        neurons.prune(mlp, [2, 3, 2])
    with pytest.raises(ValueError, match=r"layer 1 does not exist; the model has 1 layer"):
        neurons.prune(mlp, [1], layer=1)
    a = neurons.prune(mlp, torch.tensor([1, 4]))  # integer tensors and numpy arrays are fine
    b = neurons.prune(mlp, np.array([1, 4]))
    assert torch.equal(a.blocks[0].mlp.W_in, b.blocks[0].mlp.W_in)
    assert (a.blocks[0].mlp.W_in[:, [1, 4]] == 0).all() and (a.blocks[0].mlp.W_in[:, 0] != 0).any()


def test_prune_sweep_and_otsu_arguments(setup):
    task, _, mlp, *_ = setup
    s = torch.rand(16)
    with pytest.raises(TypeError, match="counts must be an integer, got 1.5"):
        neurons.prune_sweep(mlp, task, s, counts=[1.5], progress=False)
    with pytest.raises(ValueError, match="counts is empty"):
        neurons.prune_sweep(mlp, task, s, counts=[], progress=False)
    with pytest.raises(ValueError, match=r"write \['random'\]"):
        neurons.prune_sweep(mlp, task, s, orders="random", progress=False)
    with pytest.raises(TypeError, match="seeds must be an integer"):
        neurons.prune_sweep(mlp, task, s, orders=["random"], seeds=["a"], progress=False)
    with pytest.raises(ValueError, match="must be finite"):
        neurons.prune_sweep(mlp, task, torch.full((16,), math.nan), progress=False)
    with pytest.raises(ValueError, match="bins must be >= 2"):
        neurons.otsu_threshold(torch.rand(10), bins=0)
    with pytest.raises(ValueError, match="non-empty sample of finite numbers"):
        neurons.otsu_threshold(torch.tensor([]))


def test_neuron_scores_refuse_a_model_of_another_task(setup):
    task, *_ = setup
    other = mg.models.mlp(mg.tasks.modular_arithmetic(p=11, train_frac=0.5), width=8)
    with pytest.raises(ValueError, match="p: model 11 vs task 7"):  # W_in[:7] would be read silently
        neurons.ipr(other, task)


# ------------------------------------------------------------------------------------ circuits


def test_discover_selection_arguments(setup):
    _, _, mlp, x, xc, m = setup
    kw = dict(method="eap", level="neuron", progress=False)
    with pytest.raises(ValueError, match=r"target must be > 0 and <= 1, got -1"):
        mg.circuits.discover(mlp, x, xc, m, target=-1, **kw)  # used to return an empty circuit
    with pytest.raises(ValueError, match="target must be a finite number"):
        mg.circuits.discover(mlp, x, xc, m, target=math.nan, **kw)
    with pytest.raises(ValueError, match=r"graph of 16 components\): top_k must be in \[1, 16\], got 0"):
        mg.circuits.discover(mlp, x, xc, m, top_k=0, **kw)
    with pytest.raises(TypeError, match="top_k must be an integer, got 1.5"):
        mg.circuits.discover(mlp, x, xc, m, top_k=1.5, **kw)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        mg.circuits.discover(mlp, x, xc, m, threshold=-1.0, **kw)
    with pytest.raises(TypeError, match="threshold must be a number"):
        mg.circuits.discover(mlp, x, xc, m, threshold="1", **kw)
    with pytest.raises(ValueError, match=r"tau must be >= 0, got -1"):  # used to keep everything
        mg.circuits.discover(mlp, x, xc, m, method="acdc", level="neuron", tau=-1, progress=False)
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):  # used to be KeyError 'src:...'
        mg.circuits.discover(mlp, x, xc, m, method="eap-ig", level="neuron", top_k=3, steps=0, progress=False)
    with pytest.raises(ValueError, match="did you mean 'eap-ig'"):
        mg.circuits.discover(mlp, x, xc, m, method="eapig", level="neuron", top_k=3, progress=False)
    assert len(mg.circuits.discover(mlp, x, xc, m, top_k=16, **kw)) == 16


def test_metric_must_be_a_callable_returning_a_scalar(setup):
    _, tf, mlp, x, xc, m = setup
    kw = dict(method="eap", level="neuron", top_k=3, progress=False)
    with pytest.raises(TypeError, match=r"got the string 'generalization'.*mg\.circuits\.metrics\.generalization"
                                        r"\(labels\)"):
        mg.circuits.discover(mlp, x, xc, "generalization", **kw)
    with pytest.raises(ValueError, match=r"returned a tensor of shape \[16, 1, 7\]: reduce it over the batch"):
        mg.circuits.discover(mlp, x, xc, lambda logits: logits, **kw)
    with pytest.raises(ValueError, match=r"returned a tensor of shape \[16\]"):
        mg.circuits.attribute(tf, x, xc, lambda logits: logits[:, -1, 0], method="exact", level="node", progress=False)
    with pytest.raises(ValueError, match=r"was the constructor generalization passed .* generalization\(labels\)"):
        mg.circuits.discover(mlp, x, xc, metrics.generalization, **kw)
    with pytest.raises(ValueError, match="returned a function"):  # a custom constructor passed as the metric
        mg.circuits.discover(mlp, x, xc, lambda logits: (lambda y: y), **kw)
    with pytest.raises(ValueError, match="metric is nan on the clean run"):
        mg.circuits.discover(mlp, x, xc, lambda logits: logits.sum() * math.nan, **kw)
    c = circuit(mlp)
    with pytest.raises(TypeError, match="metric must be a function"):
        mg.circuits.faithfulness(mlp, c, x, xc, None)


def test_metric_labels_match_the_batch(setup):
    task, tf, mlp, x, xc, m = setup
    kw = dict(method="eap", level="neuron", top_k=3, progress=False)
    labels = task.labels[:16]
    with pytest.raises(ValueError, match="holds 3 labels but scores a batch of 16"):  # was a gather RuntimeError
        mg.circuits.discover(mlp, x, xc, metrics.generalization(labels[:3]), **kw)
    with pytest.raises(ValueError, match="a label is 106 but the logits have only 7 classes"):
        mg.circuits.discover(mlp, x, xc, metrics.logit_diff(labels + 100, labels), **kw)
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D tensor of integer class indices"):
        metrics.loss(labels.float())
    with pytest.raises(ValueError, match=r"but the clean ones are \[3, 7\]"):
        mg.circuits.discover(mlp, x, xc, metrics.kl_to(torch.zeros(3, 7)), **kw)
    assert len(mg.circuits.discover(mlp, x, xc, metrics.prob(labels.tolist()), **kw)) == 3  # a list is fine


def test_patching_inputs_are_checked_before_the_model_runs(setup):
    task, tf, mlp, x, xc, m = setup
    kw = dict(method="eap", level="node", top_k=1, progress=False)
    with pytest.raises(ValueError, match=r"clean holds token ids in \[100, 107\] but the model's d_vocab is 8"):
        mg.circuits.discover(tf, x + 100, xc, m, **kw)
    with pytest.raises(TypeError, match="corrupted must be a tensor like clean"):
        mg.circuits.discover(tf, x, xc.tolist(), m, **kw)
    with pytest.raises(ValueError, match=r"Prompts.clean must be \[batch, pos\] with batch, pos >= 1, got shape \[0, 3\]"):
        mg.circuits.discover(mlp, x[:0], xc[:0], m, **kw)
    with pytest.raises(ValueError, match="operands in"):
        mg.circuits.faithfulness(mlp, circuit(mlp), x, xc - 50, m)


def test_circuits_of_another_graph_are_refused(setup):
    task, tf, mlp, x, xc, m = setup
    with pytest.raises(ValueError, match="found on another graph"):  # its neurons exist in tf's graph too
        mg.circuits.faithfulness(tf, circuit(mlp), x, xc, m)
    multi = mg.tasks.multi_task([("add", 7), ("sub", 7)], train_frac=0.5, seed=0)
    model = mg.models.transformer(multi, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
    c = circuit(model, level="node")
    with pytest.raises(ValueError, match=r"unknown tasks \['mul'\]"):  # was: 'mul' is not in list
        mg.circuits.cross_faithfulness(model, {"mul": c}, multi, n=8, n_random=2)
    with pytest.raises(ValueError, match="n_random must be >= 1"):
        mg.circuits.cross_faithfulness(model, {"add": c}, multi, n=8, n_random=0)
    with pytest.raises(ValueError, match="non-empty dict"):
        mg.circuits.cross_faithfulness(model, {}, multi)
    with pytest.raises(ValueError, match="graph= is not this model's neuron-level graph"):  # was scored silently
        mg.circuits.attribute(tf, x, xc, m, method="eap", level="neuron", graph=graph(mlp, "neuron"))
    with pytest.raises(TypeError, match="positions must be True or False"):
        graph(tf, "edge", positions="yes")


def test_selection_helpers(setup):
    task, _, mlp, *_ = setup
    g = graph(mlp, "neuron")
    scores = {c: float(i) for i, c in enumerate(g.components)}
    with pytest.raises(ValueError, match="select_greedy: target must be a finite number"):
        mg.circuits.select_greedy(g, scores, lambda c: 1.0, target=math.nan)
    with pytest.raises(TypeError, match="threshold must be a number"):
        mg.circuits.select(g, scores, threshold="1")
    with pytest.raises(TypeError, match=r"sizes must be integers .* got \[1.5\]"):
        mg.circuits.circuit.faithfulness_curve(g, scores, len, sizes=[1.5])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n must be >= 1"):
            mg.circuits.contrast(task, "test", n=bad)  # n=-1 used to drop the last example silently
    with pytest.raises(TypeError, match="n must be an integer"):
        mg.circuits.contrast(task, "test", n=1.5)


def test_overlap_arguments(setup):
    _, _, mlp, *_ = setup
    a, b = circuit(mlp, 3), circuit(mlp, 5)
    with pytest.raises(TypeError, match="baseline must be an integer, got 25.5"):
        overlap(a, b, baseline=25.5)
    with pytest.raises(ValueError, match="baseline must be >= 0"):
        overlap(a, b, baseline=-1)
    with pytest.raises(TypeError, match="seed must be an integer"):
        overlap(a, b, seed="a")
    with pytest.raises(TypeError, match=r"ks must be integer circuit sizes .* got \[1.5\]"):
        overlap_vs_k(a, b, ks=[1.5])
    with pytest.raises(TypeError, match="size_a must be an integer"):
        expected_jaccard(1.5, 1, 3)
    with pytest.raises(TypeError, match="selected_a must be integer component indices"):
        score_overlap(np.ones(4), np.ones(4), [0.5, 1.0], [1], baseline=0)  # 0.5 used to become 0
    assert overlap_vs_k(a, b, ks=iter([1, 2]))["k"] == [1, 2]


def test_induction_model_arguments(setup):
    _, tf, *_ = setup
    with pytest.raises(ValueError, match="n_heads must be >= 2"):
        induction_model(n_heads=1)
    with pytest.raises(TypeError, match="d_vocab must be an integer"):
        induction_model(d_vocab=8.5)
    with pytest.raises(ValueError, match="qk_scale must be a finite number"):
        induction_model(qk_scale=math.nan)
    with pytest.raises(ValueError, match="n must be >= 1"):
        induction_data(tf, n=0)
    with pytest.raises(ValueError, match="needs n_ctx >= 4"):  # tf's n_ctx is 3: no induction sequence fits
        induction_data(tf, n=4)


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_heads": 0}, ValueError, "n_heads must be >= 1, got 0"),  # was ZeroDivisionError
    ({"act_fn": "foo"}, ValueError, r"unknown act_fn 'foo'; choose one of \['gelu'"),  # was an AssertionError
    ({"act_fn": "rellu"}, ValueError, "did you mean 'relu'"),
    ({"n_heads": 3}, ValueError, r"not divisible by n_heads=3; choose n_heads among \[1, 2, 4, 8, 16\]"),
    ({"n_layers": 0}, ValueError, "n_layers must be >= 1"),
    ({"n_layers": True}, TypeError, "n_layers must be an integer, got True"),
    ({"d_model": "16"}, TypeError, "d_model must be an integer"),
    ({"d_mlp": -1}, ValueError, "d_mlp must be >= 1"),
    ({"d_head": 0}, ValueError, "d_head must be >= 1"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"n_ctx": 0}, ValueError, "n_ctx must be >= 1"),
])
def test_transformer_arguments(setup, kwargs, error, match):
    task, *_ = setup
    with pytest.raises(error, match=f"models.transformer: .*{match}"):
        mg.models.transformer(task, **{"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, **kwargs})


def test_mlp_and_helper_arguments(setup):
    task, tf, *_ = setup
    with pytest.raises(TypeError, match="models.mlp: width must be an integer, got 1.5"):
        mg.models.mlp(task, width=1.5)
    with pytest.raises(ValueError, match="models.mlp: unknown act 'foo'"):
        mg.models.mlp(task, width=4, act="foo")
    with pytest.raises(TypeError, match="bias must be True or False"):
        mg.models.mlp(task, width=4, bias="yes")
    with pytest.raises(TypeError, match="task must be a mechgrok Task"):
        mg.models.transformer("add", d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="layer must be >= 0"):
        mg.models.mlp_hook(-1)
    with pytest.raises(ValueError, match=r"unknown arguments \['wdth'\]"):
        mg.models.build({"kind": "mlp", "kwargs": {"wdth": 3, "p": 3, "d_out": 3}})
    with pytest.raises(TypeError, match="task must be a mechgrok Task"):
        mg.models.check_compatible(tf, "task")


def test_nothing_replaces_a_file_by_a_folder(setup, tmp_path):
    task, tf, mlp, *_ = setup
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt is a file; a model is saved as a folder"):
        mg.models.save(mlp, file)  # atomic_dir used to swap the file for the model folder
    with pytest.raises(FileExistsError, match="notes.txt is a file, so .* cannot be a folder inside it"):
        capture(tf, task.inputs, [HOOK], out=file / "cache", progress=False)
    assert file.read_text() == "keep me"
    (tmp_path / "c.json").mkdir()
    with pytest.raises(IsADirectoryError, match="c.json is a folder"):
        circuit(mlp).save(tmp_path / "c.json")


def test_model_load_names_a_damaged_file(setup, tmp_path):
    _, _, mlp, *_ = setup
    folder = mg.models.save(mlp, tmp_path / "m")
    (folder / "model.json").write_text('{"format": "mechgrok.model/1", "spec": ')
    with pytest.raises(ValueError, match="model.json is damaged"):
        mg.models.load(folder)


# ------------------------------------------------------------------------------------ capture


def test_capture_checks_tokens_and_lengths(setup):
    task, tf, mlp, *_ = setup
    for bad, match in ((task.inputs + 100, r"token ids in \[100, 107\] but the model's d_vocab is 8"),
                       (task.inputs - 100, r"token ids in \[-100, -93\]"),
                       (torch.zeros(4, 9, dtype=torch.long), r"1 <= pos <= the model's n_ctx=3, got shape \(4, 9\)"),
                       (task.inputs[:, 0], r"got shape \(49,\)")):
        with pytest.raises(ValueError, match=match):
            capture(tf, bad, [HOOK], progress=False)
    with pytest.raises(ValueError, match="d_vocab is 8"):  # every backend
        capture(tf, task.inputs + 100, ["blocks.0.mlp"], backend="torch", progress=False)
    with pytest.raises(TypeError, match="integer token ids .* got dtype torch.float32"):
        capture(tf, task.inputs.float(), [HOOK], progress=False)
    with pytest.raises(ValueError, match=r"operands in \[100, 106\] but the model's p is 7"):
        capture(mlp, task.inputs + 100, [HOOK], progress=False)
    with pytest.raises(ValueError, match=r"one-hot view \[N, 2p=14\]"):
        capture(mlp, torch.zeros(4, 5), [HOOK], progress=False)
    assert capture(mlp, task.onehot()[:4], [HOOK], progress=False)[HOOK].shape == (4, 16)


def test_capture_arguments(setup, tmp_path):
    task, tf, *_ = setup
    for bad, error in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="batch_size must be"):
            capture(tf, task.inputs, [HOOK], batch_size=bad, progress=False)
    cache = capture(tf, task.inputs, [HOOK], batch_size=np.int64(16), progress=False)
    assert cache.meta["batch_size"] == 16 and type(cache.meta["batch_size"]) is int  # JSON-ready
    for bad in (None, 3):
        with pytest.raises(TypeError, match="hooks must be a list of hook names"):
            capture(tf, task.inputs, bad, progress=False)
    with pytest.raises(TypeError, match=r"hook names must be strings, got \[3\]"):
        capture(tf, task.inputs, [3], progress=False)
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):  # was replaced by a folder
        capture(tf, task.inputs, [HOOK], out=file, overwrite=True, progress=False)
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("entry", ["../x.npy", "/tmp/x.npy", "sub/x.npy", ".hidden.npy"])
def test_load_cache_refuses_files_outside_its_folder(setup, tmp_path, entry):
    task, tf, *_ = setup
    out = tmp_path / "cache"
    capture(tf, task.inputs, [HOOK], out=out, progress=False)
    np.save(tmp_path / "x.npy", np.zeros((49, 3, 32), dtype=np.float32))  # a file the entry could reach
    meta = json.loads((out / "meta.json").read_text())
    meta["files"][HOOK] = entry
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"the file of hook 'blocks.0.mlp.hook_post' .* in .*meta.json cannot be "
                                         "used as a file name"):
        load_cache(out)


def test_load_cache_damaged_meta(setup, tmp_path):
    task, tf, *_ = setup
    out = tmp_path / "cache"
    capture(tf, task.inputs, [HOOK], out=out, progress=False)
    meta_file = out / "meta.json"
    good = json.loads(meta_file.read_text())
    for text, match in (('{"format": ', "JSONDecodeError"),
                        (json.dumps({**good, "hooks": "x"}), "'hooks' must be a list"),
                        (json.dumps({**good, "files": {}}), "'files' must map every hook")):
        meta_file.write_text(text)
        with pytest.raises(ValueError, match=f"meta.json is not a valid activation-cache description.*{match}"):
            load_cache(out)
    meta_file.write_text(json.dumps(good))
    (out / good["files"][HOOK]).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="is damaged or truncated"):
        load_cache(out)


class _TwoNames(nn.Module):
    """Two submodules whose names map to the same file name under the old rule ("a b", "a_b")."""

    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleDict({"a b": nn.Linear(2, 2), "a_b": nn.Linear(2, 3)})

    def forward(self, x):
        return self.parts["a b"](x).sum(-1) + self.parts["a_b"](x).sum(-1)


def test_capture_file_names_are_safe_and_distinct(tmp_path):
    model, x = _TwoNames(), torch.randn(5, 2)
    hooks = ["parts.a b", "parts.a_b"]
    disk = capture(model, x, hooks, backend="torch", out=tmp_path / "c", progress=False)
    files = disk.meta["files"]
    assert len(set(files.values())) == 2 and all("/" not in f and " " not in f for f in files.values())
    mem = capture(model, x, hooks, backend="torch", progress=False)
    for h in hooks:
        assert torch.equal(disk[h], mem[h])


# ------------------------------------------------------------------------------------ SAE and EK-FAC configs


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": "1e-3"}, TypeError, "SAEConfig: lr must be a number"),  # was: '>' not supported
    ({"lr": math.inf}, ValueError, "lr must be a finite number"),
    ({"d_sae": True}, ValueError, "d_sae must be a positive integer"),
    ({"k": "16"}, TypeError, "k must be a number"),
    ({"k": 4.5}, ValueError, "must be a whole number for topk"),
    ({"l1": -1.0}, ValueError, "l1 must be >= 0"),
    ({"warmup": 2.5}, TypeError, "warmup must be an integer"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"batch_size": 0}, ValueError, "batch_size .* must be >= 1"),
])
def test_sae_config_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        mg.sae.SAEConfig(**kwargs)


def test_sae_position_must_be_an_integer(setup):
    task, tf, *_ = setup
    with pytest.raises(TypeError, match="position must be an integer, got 1.5"):  # was an IndexError
        mg.sae.activations(tf, task, "blocks.0.hook_resid_post", position=1.5)


def test_sae_config_values_are_plain_python():
    cfg = mg.sae.SAEConfig(d_sae=np.int64(32), lr=np.float32(1e-3), architecture="batchtopk", k=2.5)
    assert type(cfg.d_sae) is int and type(cfg.lr) is float
    json.dumps(cfg.to_dict())


def test_sae_interventions_refuse_fractional_features():
    from mechgrok.sae.intervene import _indices

    with pytest.raises(TypeError, match="feature indices must be integers"):
        _indices([1.5], 8)  # used to become feature 1
    with pytest.raises(TypeError, match=r"e\.g\. \[3\]"):
        _indices(3, 8)
    assert _indices(torch.tensor([3, 1, 3]), 8).tolist() == [1, 3]


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": math.inf}, "damping must be a positive finite number"),  # inf made every score 0
    ({"damping": math.nan}, "damping must be a positive finite number"),
    ({"damping": "0.1"}, "damping must be a positive finite number"),
    ({"n_samples": True}, "n_samples must be a positive integer"),
    ({"per_head": "yes"}, "per_head must be True or False"),
])
def test_ekfac_config_fields(kwargs, match):
    with pytest.raises(ValueError, match=f"EKFAC: {match}"):
        mg.influence.EKFACConfig(**kwargs)
    with pytest.raises(TypeError, match="EKFAC: seed must be an integer"):
        mg.influence.EKFACConfig(seed="0")
    with pytest.raises(ValueError, match="EKFAC: modules must be 'all' or a list of map names, got 3"):
        mg.influence.EKFACConfig(modules=3)


def test_influence_helpers(setup):
    task, _, mlp, *_ = setup
    S = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="top_influences: k must be an integer"):
        mg.influence.top_influences(S, task, torch.arange(5), k="3")
    with pytest.raises(TypeError, match="ranking_agreement: k must be an integer"):
        mg.influence.ranking_agreement(S, S, k=2.5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        mg.influence.tfidf_candidates(task, [0], k=True)
    with pytest.raises(ValueError, match="exact_influence: damping must be > 0"):
        mg.influence.exact_influence(mlp, task, [0], [1, 2], damping=-0.1)
