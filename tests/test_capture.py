"""capture: the three backends agree with each other and with transformer-lens' run_with_cache."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mechgrok as mg  # noqa: E402
from mechgrok.capture import BACKENDS, ActivationCache, capture, load_cache  # noqa: E402

TF_HOOKS = ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern", "hook_embed"]
MLP_HOOKS = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "hook_out"]


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)


@pytest.fixture(scope="module")
def tf(task):
    return mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32)


@pytest.fixture(scope="module")
def mlp(task):
    return mg.models.mlp(task, width=16)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # transformers installs its own hooks on first use
    return model


def assert_same_maths(actual: torch.Tensor, expected: torch.Tensor, model: torch.nn.Module) -> None:
    """``actual`` is ``expected`` computed again in another order (another batch size, another
    kernel), so the two agree to rounding, not to the bit.

    Two orders of a sum of ``n`` floats each lie within about ``n * eps / 2`` times the sum of the
    terms' magnitudes of the exact sum (Higham, *Accuracy and Stability of Numerical Algorithms*,
    §4.2), so they differ by at most ``n * eps`` of it, ``eps`` being the dtype's machine epsilon
    (float32 1.2e-7, float64 2.2e-16: a float64 tensor gets a tolerance 5e8 times tighter). ``n``
    is the longest sum in ``model``, bounded by its largest weight dimension (every contraction
    runs over one, and the 3 positions attention sums over are fewer); ``max|expected|`` stands in
    for the terms' magnitude, and a factor 4 covers cancellation and the layers an error passes
    through. The bound is absolute as well as relative: an element near zero after cancellation
    can be wrong in every digit (under generic kernels the MLP's logits differ by 7.5e-9, 0.6 eps
    of their maximum, which is a relative 2.3e-6 on the smallest). A wrong row, a missed batch or
    a hook read at the wrong place differs by O(1) and still fails.
    """
    n = max(max(p.shape) for p in model.parameters())
    tol = 4 * n * torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def _hook_state(model: torch.nn.Module) -> list:
    """The forward hooks and instance attributes of every module (to check capture leaves none)."""
    return [(sorted(m._forward_hooks), sorted(m.__dict__)) for m in model.modules()]


@pytest.mark.parametrize("which, hooks", [("tf", TF_HOOKS), ("mlp", MLP_HOOKS)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_run_with_cache(request, task, which, hooks, backend):
    model = request.getfixturevalue(which)
    _, ref = model.run_with_cache(task.inputs)  # one batch of 121 examples
    before = _hook_state(model)
    cache = capture(model, task.inputs, hooks, backend=backend, batch_size=50, progress=False)
    assert isinstance(cache, ActivationCache) and cache.path is None
    assert list(cache) == hooks  # only the requested hooks, in the requested order
    # the default backend on the same batches runs the same kernels on the same inputs: hooks only
    # read values, so every backend agrees with it to the bit
    same = capture(model, task.inputs, hooks, backend="transformer_lens", batch_size=50, progress=False)
    for h in hooks:
        assert cache[h].shape == ref[h].shape
        assert torch.equal(cache[h], same[h]), h
        assert_same_maths(cache[h], ref[h], model)  # batches of 50 against one of 121: rounding only
    assert cache.meta["n"] == len(task.inputs) and cache.meta["backend"] == backend
    assert cache.meta["shapes"][hooks[0]] == list(ref[hooks[0]].shape)
    assert _hook_state(model) == before


def test_batching_does_not_change_values(tf, task):
    one = capture(tf, task.inputs, TF_HOOKS[:2], batch_size=len(task.inputs), progress=False)
    for bs in (1, 7, 64):
        many = capture(tf, task.inputs, TF_HOOKS[:2], batch_size=bs, progress=False)
        for h in TF_HOOKS[:2]:  # other batch shapes can pick other kernels: equal to rounding
            assert_same_maths(many[h], one[h], tf)


def test_mode_and_grad_restored(mlp, task):
    mlp.train()
    cache = capture(mlp, task.inputs, ["blocks.0.mlp.hook_post"], progress=False)
    assert mlp.training and all(m.training for m in mlp.modules())
    assert not cache["blocks.0.mlp.hook_post"].requires_grad


def test_gpt2_torch_and_nnsight_agree(gpt2):
    x = torch.randint(0, 50, (10, 8), generator=torch.Generator().manual_seed(0))
    hooks = ["transformer.h.1", "transformer.h.0.mlp", "transformer.h.0"]  # out of execution order
    before = _hook_state(gpt2)
    a = capture(gpt2, x, hooks, backend="torch", batch_size=4, progress=False)
    b = capture(gpt2, x, hooks, backend="nnsight", batch_size=4, progress=False)
    for h in hooks:  # the same forward passes on the same batches, read two ways: equal to the bit
        assert a[h].shape == (10, 8, 32)
        assert torch.equal(a[h], b[h]), h
    assert _hook_state(gpt2) == before
    with torch.no_grad():  # hidden_states = [embeddings, block 0 output, ln_f(block 1 output)]
        hidden = gpt2(x, output_hidden_states=True).hidden_states  # one batch of 10, not batches of 4
        assert_same_maths(a["transformer.h.0"], hidden[1], gpt2)
        assert_same_maths(gpt2.transformer.ln_f(a["transformer.h.1"]), hidden[2], gpt2)
    default = capture(gpt2, x, hooks, batch_size=4, progress=False)  # no backend: torch hooks on a non-TL model
    assert default.meta["backend"] == "torch" and all(torch.equal(default[h], a[h]) for h in hooks)
    with pytest.raises(TypeError, match="backend='torch' or 'nnsight'"):
        capture(gpt2, x, hooks, backend="transformer_lens", progress=False)


def test_unknown_hook_fails_before_anything_runs(tf, task, tmp_path):
    out = tmp_path / "acts"
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.0.mlp.hook_pst'; did you mean 'blocks.0.mlp.hook_post'"):
        capture(tf, task.inputs, ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_pst"], out=out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown backend 'jax'.*transformer_lens"):
        capture(tf, task.inputs, TF_HOOKS, backend="jax")
    with pytest.raises(ValueError, match="hooks is empty"):
        capture(tf, task.inputs, [])


class _Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_hook_that_never_runs(task):
    model = _Unused()
    for backend in ("torch", "nnsight"):
        with pytest.raises(ValueError, match="did not run"):
            capture(model, task.inputs.float(), ["used", "unused"], backend=backend, progress=False)


def test_disk_round_trip(tf, task, tmp_path):
    out = tmp_path / "acts"
    mem = capture(tf, task.inputs, TF_HOOKS, batch_size=50, progress=False)
    disk = capture(tf, task.inputs, TF_HOOKS, batch_size=50, out=out, progress=False)
    again = load_cache(out)
    assert disk.path == out and again.path == out and list(again) == TF_HOOKS
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json"] + [f"{h}.npy" for h in TF_HOOKS])
    assert [p.name for p in tmp_path.iterdir()] == ["acts"]  # no temporary folder left behind
    for h in TF_HOOKS:
        assert torch.equal(mem[h], disk[h]) and torch.equal(mem[h], again[h])
        file = out / disk.meta["files"][h]
        assert np.array_equal(np.load(file, allow_pickle=False), mem[h].numpy())  # a standard .npy
        assert file.stat().st_size >= mem[h].numel() * mem[h].element_size()
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else None
    if maps is not None:  # the values are memory-mapped from the files, not read into memory
        assert str(out / disk.meta["files"][TF_HOOKS[0]]) in maps
    again[TF_HOOKS[0]].zero_()  # copy-on-write: an in-place edit never reaches the file
    assert torch.equal(load_cache(out)[TF_HOOKS[0]], mem[TF_HOOKS[0]])


def test_disk_refuses_to_overwrite(mlp, task, tmp_path):
    out = tmp_path / "acts"
    capture(mlp, task.inputs, ["blocks.0.mlp.hook_post"], out=out, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        capture(mlp, task.inputs, ["hook_out"], out=out, progress=False)
    assert list(load_cache(out)) == ["blocks.0.mlp.hook_post"]
    cache = capture(mlp, task.inputs, ["hook_out"], out=out, overwrite=True, progress=False)
    assert list(cache) == ["hook_out"] and list(load_cache(out)) == ["hook_out"]


def test_load_cache_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an activation cache"):
        load_cache(tmp_path)


def test_cache_is_read_only_mapping():
    cache = ActivationCache({"a": torch.zeros(2, 3)})
    assert cache.meta["shapes"] == {"a": [2, 3]} and "a" in cache and len(cache) == 1
    with pytest.raises(TypeError):
        cache["b"] = torch.zeros(2)
    with pytest.raises(KeyError, match="was not captured"):
        cache["b"]


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
@pytest.mark.parametrize("batch_size", [4, 100])
def test_in_place_edit_after_the_hook_is_not_captured(backend, batch_size):
    """A single batch is kept by reference; a later in-place ReLU must not leak into it."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2))
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    cache = capture(model, x, ["0", "1"], backend=backend, batch_size=batch_size, progress=False)
    with torch.no_grad():
        pre = model[0](x)
    assert (pre < 0).any()
    assert_same_maths(cache["0"], pre, model)  # batches of 4 against one batch of 10
    assert_same_maths(cache["1"], pre.relu(), model)


class _Strided(torch.nn.Module):
    """Returns a non-contiguous view, to check that disk writes lay out rows correctly."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Identity()

    def forward(self, x):
        return self.inner(x.transpose(1, 2)[:, ::2])  # [batch, 2, 3], strided


def test_disk_non_contiguous_and_torch_backend(tmp_path):
    x = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(0))
    mem = capture(_Strided(), x, ["inner"], backend="torch", progress=False)
    disk = capture(_Strided(), x, ["inner"], backend="nnsight", batch_size=3, out=tmp_path / "a", progress=False)
    assert torch.equal(mem["inner"], x.transpose(1, 2)[:, ::2]) and torch.equal(disk["inner"], mem["inner"])
    assert disk.meta["shapes"]["inner"] == [7, 2, 3] and disk.meta["dtypes"]["inner"] == "float32"
