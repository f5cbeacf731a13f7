import pytest
import torch

import mechgrok as mg
from mechgrok import models


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)


def test_transformer_defaults(task):
    m = models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    assert m.cfg.normalization_type is None and m.cfg.act_fn == "relu"
    assert m.cfg.d_vocab == 12 and m.cfg.d_vocab_out == 11 and m.cfg.n_ctx == 3
    assert m(task.inputs[:4]).shape == (4, 3, 11)
    assert models.final_logits(m, task.inputs[:4]).shape == (4, 11)
    assert not any("ln" in n for n, _ in m.named_parameters())


def test_builders_are_seeded_and_leave_global_rng_alone(task):
    state = torch.get_rng_state()
    a = models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=1)
    b = models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=1)
    c = models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=2)
    m1, m2 = models.mlp(task, width=8, seed=1), models.mlp(task, width=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.W_E, b.W_E) and not torch.equal(a.W_E, c.W_E)
    assert torch.equal(m1.blocks[0].mlp.W_in, m2.blocks[0].mlp.W_in)


def test_mlp_matches_its_definition(task):
    m = models.mlp(task, width=8, act="square", seed=0)
    W_in, W_out = m.blocks[0].mlp.W_in, m.blocks[0].mlp.W_out
    assert W_in.shape == (22, 8) and W_out.shape == (8, 11)
    assert not any(n.startswith("blocks.0.mlp.b_") for n, _ in m.named_parameters())  # no biases
    x = task.onehot()
    ref = ((x @ W_in) ** 2) @ W_out
    assert torch.allclose(m(x), ref, atol=1e-6)
    assert torch.allclose(m(task.inputs), ref, atol=1e-6)  # token ids are one-hot encoded inside
    assert {"hook_in", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "hook_out"} <= set(m.hook_dict)
    _, cache = m.run_with_cache(task.inputs)
    assert torch.allclose(cache["blocks.0.mlp.hook_post"], cache["blocks.0.mlp.hook_pre"] ** 2)


def test_mlp_row_sums_equal_the_one_hot_matmul_and_hooks_still_see_the_input(task):
    """Token ids skip the one-hot matmul (W_in's two rows are added) only while nothing hooks the input:
    the same values bitwise (adding exact zeros changes no sum), and a hook on ``hook_in`` still reads
    and can edit the one-hot input."""
    m = models.mlp(task, width=16, act="square", bias=True, seed=1)
    with torch.no_grad():
        m.blocks[0].mlp.b_in.normal_()
    fast = m(task.inputs)
    assert torch.equal(fast, m(task.onehot()))  # the matmul path, bitwise
    seen = []
    with m.hooks(fwd_hooks=[("hook_in", lambda x, hook: seen.append(x) or x * 0)]):
        zeroed = m(task.inputs)
    assert torch.equal(seen[0], task.onehot()) and not torch.equal(zeroed, fast)
    assert torch.equal(zeroed, m.blocks[0].mlp(torch.zeros_like(task.onehot())).expand_as(zeroed))
    assert torch.equal(m(task.inputs), fast)  # the hook is gone again
    x = task.onehot().requires_grad_(True)  # gradients with respect to the input still flow
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("build", [
    lambda t: models.transformer(t, d_model=16, n_heads=2, d_mlp=32, seed=3),
    lambda t: models.mlp(t, width=8, act="relu", bias=True, seed=3),
])
def test_save_load_roundtrip(tmp_path, task, build):
    m = build(task)
    models.save(m, tmp_path / "m")
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))
    n = models.load(tmp_path / "m")
    assert type(n) is type(m)
    assert torch.equal(models.final_logits(m, task.inputs), models.final_logits(n, task.inputs))


def test_truncated_model_file(tmp_path, task):
    models.save(models.mlp(task, width=8), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="damaged or truncated"):
        models.load(tmp_path / "m")


def test_mismatched_vocabulary(task):
    other = mg.tasks.modular_arithmetic(p=13, train_frac=0.5)
    with pytest.raises(ValueError, match="do not match.*d_vocab: model 12 vs task 14"):
        mg.evaluate(models.transformer(task, d_model=16, n_heads=2, d_mlp=32), other)
    with pytest.raises(ValueError, match="p: model 11 vs task 13"):
        mg.train(models.mlp(task, width=8), other, mg.TrainConfig(steps=1))
    multi = mg.tasks.multi_task(["add", "sub"], p=11)
    with pytest.raises(ValueError, match="mixes several ops"):
        models.mlp(multi, width=8)


def test_bad_model_arguments(task):
    with pytest.raises(ValueError, match="not divisible"):
        models.transformer(task, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="unknown act"):
        models.mlp(task, act="swish")
    with pytest.raises(ValueError, match="normalization"):
        models.transformer(task, normalization="batch")


@pytest.mark.parametrize("kw", [dict(n_layers=1), dict(n_layers=2), dict(n_layers=2, normalization="LN")])
def test_training_logits_equal_final_logits(task, kw):
    m = models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=0, **kw)
    assert torch.allclose(models.training_logits(m, task.inputs), models.final_logits(m, task.inputs), atol=1e-5)
