"""Tests for mechgrok.measures: Fourier tools, key frequencies, restricted/excluded loss, Gini, progress."""

from __future__ import annotations

import math

import pytest
import torch

import mechgrok as mg
from mechgrok.measures import (
    PROGRESS_COLUMNS,
    embedding_frequency_norms,
    excluded_logits,
    excluded_loss,
    fourier_basis,
    fourier_gini,
    frequency_fractions,
    frequency_power,
    gini,
    grid_forward,
    grid_inputs,
    ipr,
    key_frequencies,
    key_frequencies_from,
    key_frequency_projection,
    n_frequencies,
    neuron_frequencies,
    neuron_ipr,
    progress,
    restricted_logits,
    restricted_loss,
    task_grid,
    unembedding_frequency_norms,
    weight_norm,
)
from mechgrok.measures.restricted import key_frequency_directions

TAU = 2 * math.pi


def _grid(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")


# ---------------------------------------------------------------------------- Fourier basics


@pytest.mark.parametrize("p", [7, 8, 13, 16])
def test_ipr_sinusoid_and_spike(p):
    a = torch.arange(p, dtype=torch.float64)
    for k in range(1, p // 2 + 1):
        assert ipr(torch.cos(TAU * k * a / p + 0.3)) == pytest.approx(1.0, abs=1e-12)
    spike = torch.zeros(p, dtype=torch.float64)
    spike[3] = 2.5
    assert ipr(spike) == pytest.approx(1 / (p // 2 + 1), abs=1e-12)


@pytest.mark.parametrize("p", [5, 6, 11, 12])
def test_fourier_basis_orthonormal_and_parseval(p):
    B = fourier_basis(p)
    assert torch.allclose(B @ B.T, torch.eye(p, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, p, generator=torch.Generator().manual_seed(p), dtype=torch.float64)
    power = frequency_power(x)
    assert power.shape == (4, n_frequencies(p))
    assert torch.allclose(power.sum(-1), (x**2).sum(-1), atol=1e-10)


@pytest.mark.parametrize("p", [7, 8])
def test_neuron_ipr_equals_fft_ipr(p):
    acts = torch.randn(p, p, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = 0.5 * (ipr(acts, dim=0, exclude_constant=True).mean(0) + ipr(acts, dim=1, exclude_constant=True).mean(0))
    assert torch.allclose(neuron_ipr(acts), ref, atol=1e-12)


# ---------------------------------------------------------------------------- Gini


def test_gini():
    assert gini(torch.ones(10)) == pytest.approx(0.0, abs=1e-12)
    for n in (2, 5, 29):
        x = torch.zeros(n)
        x[1] = 3.0
        assert gini(x) == pytest.approx((n - 1) / n)
    x = torch.rand(17, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    brute = float((x[:, None] - x[None, :]).abs().sum() / (2 * len(x) * x.sum()))
    assert gini(x) == pytest.approx(brute, rel=1e-12)
    assert gini(7.5 * x) == pytest.approx(gini(x), rel=1e-12)
    assert math.isnan(gini(torch.zeros(3)))
    with pytest.raises(ValueError, match="non-negative"):
        gini(torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------------------- grid


def test_grid_inputs_single_and_multi_task():
    task = mg.tasks.modular_arithmetic(p=7, op="add", train_frac=0.5, seed=0)
    g = task_grid(task)
    assert g.inputs.shape == (49, 3) and g.op == "add" and g.p == 7
    assert torch.equal(g.inputs[g.cells], task.inputs[g.rows])  # every example sits in its cell
    assert grid_inputs(task)[7 * 3 + 5].tolist() == [3, 5, 7]

    div = mg.tasks.modular_arithmetic(p=7, op="div", train_frac=0.5, seed=0)
    gd = task_grid(div)
    assert gd.inputs.shape == (49, 3) and len(gd.cells) == 42  # b = 0 cells exist, but no examples there
    assert torch.equal(gd.inputs[gd.cells], div.inputs)

    multi = mg.tasks.multi_task([("add", 7), ("sub", 5)], train_frac=0.5, seed=0)
    with pytest.raises(ValueError, match="task_name"):
        grid_inputs(multi)
    gs = task_grid(multi, "sub")
    assert gs.p == 5 and gs.op == "sub" and gs.inputs.shape == (25, 4)
    assert gs.inputs[5 * 2 + 3].tolist() == [2, 8, 3, 9]  # [a, op token P + 1, b, = token P + 2]
    assert torch.equal(gs.inputs[gs.cells], multi.inputs[gs.rows])


# ---------------------------------------------------------------------------- restricted / excluded


@pytest.mark.parametrize("p,op", [(11, "add"), (11, "sub"), (10, "add")])
def test_projection_is_an_orthogonal_projection(p, op):
    L = torch.randn(p, p, p, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    freqs = [1, 3, p // 2]
    U = key_frequency_directions(p, freqs, op)
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(U.sum(0), torch.zeros(U.shape[1], dtype=torch.float64), atol=1e-10)  # ⟂ constant
    P = key_frequency_projection(L, freqs, op)
    assert torch.allclose(key_frequency_projection(P, freqs, op), P, atol=1e-12)  # idempotent
    assert torch.allclose((L - P) + P, L)
    assert float(((L - P) * P).sum()) == pytest.approx(0.0, abs=1e-9)  # orthogonal decomposition
    # restricted + excluded = L + the constant (the mean is kept by both)
    assert torch.allclose(restricted_logits(L, freqs, op) + excluded_logits(L, freqs, op), L + L.mean((0, 1)))


@pytest.mark.parametrize("op,sign", [("add", 1), ("sub", -1)])
def test_projection_captures_known_frequencies(op, sign):
    p, k = 13, 4
    a, b = _grid(p)
    c = torch.arange(p, dtype=torch.float64)
    L = torch.cos(TAU * k * ((a + sign * b)[..., None] - c) / p)  # [p, p, p]
    assert torch.allclose(key_frequency_projection(L, [k], op), L, atol=1e-10)
    assert torch.allclose(key_frequency_projection(L, [1, 2, 5, 6], op), torch.zeros_like(L), atol=1e-10)
    wrong = "sub" if op == "add" else "add"
    assert torch.allclose(key_frequency_projection(L, [k], wrong), torch.zeros_like(L), atol=1e-10)


def test_projection_rejects_bad_input():
    L = torch.zeros(7, 7, 7)
    with pytest.raises(ValueError, match="not for 'mul'"):
        key_frequency_projection(L, [1], "mul")
    with pytest.raises(ValueError, match="constant"):
        key_frequency_projection(L, [0], "add")
    with pytest.raises(ValueError, match="outside"):
        key_frequency_projection(L, [4], "add")


class _SumModel(torch.nn.Module):
    """Logits that depend on (a + b) mod p only: a table lookup."""

    def __init__(self, p: int):
        super().__init__()
        self.p = p
        self.table = torch.randn(p, p, generator=torch.Generator().manual_seed(3)) * 3

    def forward(self, x):
        return self.table[(x[:, 0] + x[:, 1]) % self.p]  # [batch, p]


def test_restricted_and_excluded_loss_exact():
    p = 11
    task = mg.tasks.modular_arithmetic(p=p, op="add", train_frac=0.5, seed=0)
    everything = list(range(1, p // 2 + 1))
    # a model whose logits are a function of a + b: all frequencies restore it exactly
    model = _SumModel(p)
    full = float(torch.nn.functional.cross_entropy(model(task.inputs).double(), task.true_labels))
    assert restricted_loss(model, task, everything) == pytest.approx(full, rel=1e-10)
    # a real transformer: all frequencies = the logits averaged over the pairs with the same a + b
    tf = mg.models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=1).eval()
    L = grid_forward(tf, task_grid(task))[0].double().reshape(p * p, p)  # [p*p, p]
    s = ((task.inputs[:, 0] + task.inputs[:, 1]) % p)
    cells = task.inputs[:, 0] * p + task.inputs[:, 1]
    s_grid = (torch.arange(p * p) // p + torch.arange(p * p) % p) % p
    mean_by_s = torch.stack([L[s_grid == v].mean(0) for v in range(p)])  # [p, p]
    ref = float(torch.nn.functional.cross_entropy(mean_by_s[s], task.true_labels))
    assert restricted_loss(tf, task, everything) == pytest.approx(ref, rel=1e-10)
    # no frequencies excluded = the training loss of mg.evaluate
    train_loss = mg.evaluate(tf, task)["train"]["loss"]
    assert excluded_loss(tf, task, []) == pytest.approx(train_loss, rel=1e-6)
    ref_ex = float(torch.nn.functional.cross_entropy(L[cells][task.train], task.labels[task.train]))
    assert excluded_loss(tf, task, []) == pytest.approx(ref_ex, rel=1e-12)
    with pytest.raises(ValueError, match="not for 'mul'"):
        restricted_loss(tf, mg.tasks.modular_arithmetic(p=p, op="mul"), [1])


# ---------------------------------------------------------------------------- frequencies


def test_frequency_fractions_synthetic():
    p, k = 13, 5
    a, b = _grid(p)
    acts = torch.stack([
        torch.cos(TAU * k * a / p) + torch.cos(TAU * k * b / p),  # sum of k-terms
        torch.cos(TAU * k * a / p) * torch.sin(TAU * k * b / p) + 2.0,  # product of k-terms, offset
        torch.cos(TAU * 2 * a / p) * torch.cos(TAU * 3 * b / p),  # a cross term: no single frequency
        torch.full((p, p), 4.0, dtype=torch.float64),  # constant: a dead neuron
    ], dim=-1)  # [p, p, 4]
    nf = frequency_fractions(acts)
    assert nf.dominant.tolist()[:2] == [k, k] and nf.dominant[3] == 0
    assert torch.allclose(nf.fraction[:2], torch.ones(2, dtype=torch.float64))
    assert float(nf.fractions[2].sum()) == pytest.approx(0.0, abs=1e-12)
    assert nf.fraction[3] == 0 and nf.fractions.shape == (4, n_frequencies(p))
    assert bool((nf.fractions.sum(1) <= 1 + 1e-12).all())


def test_neuron_frequencies_of_a_linear_mlp():
    p, k = 11, 3
    task = mg.tasks.modular_arithmetic(p=p, op="add", train_frac=0.5, seed=0)
    model = mg.models.mlp(task, width=4, act="linear")
    x = torch.arange(p, dtype=torch.float32)
    with torch.no_grad():
        W = model.blocks[0].mlp.W_in  # [2p, width]
        W[:p, 0] = W[p:, 0] = torch.cos(TAU * k * x / p)  # neuron 0 = cos(k a) + cos(k b)
        W[:p, 1], W[p:, 1] = torch.sin(TAU * 1 * x / p), 0  # neuron 1 = sin(1 a)
    nf = neuron_frequencies(model, task)
    assert nf.dominant[:2].tolist() == [k, 1]
    assert nf.fraction[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert nf.fractions.shape == (4, p // 2 + 1)


def test_key_frequencies_rules():
    p = 11
    task = mg.tasks.modular_arithmetic(p=p, op="add", train_frac=0.5, seed=0)
    model = mg.models.transformer(task, d_model=16, n_heads=2, d_mlp=32)
    x = torch.arange(p, dtype=torch.float32)
    with torch.no_grad():  # embed the operands with frequency 2 (power 99) and 4 (power 49.5) only
        model.W_E[:p] = 0
        model.W_E[:p, 0], model.W_E[:p, 1] = 3 * torch.cos(TAU * 2 * x / p), 3 * torch.sin(TAU * 2 * x / p)
        model.W_E[:p, 2] = 3 * torch.cos(TAU * 4 * x / p)
    power = embedding_frequency_norms(model, task)
    assert float(power.sum()) == pytest.approx(float((model.W_E[:p].detach().double() ** 2).sum()), rel=1e-6)
    kf = key_frequencies(model, task, source="embedding")  # default: share >= 2 / (p // 2) = 0.4
    assert kf.freqs == (2,) and kf.source == "embedding" and "uniform share" in kf.rule
    assert kf.scores[0] == pytest.approx(2 / 3, rel=1e-5)
    assert key_frequencies(model, task, source="embedding", threshold=0.3).freqs == (2, 4)
    assert key_frequencies(model, task, source="embedding", k=2).freqs == (2, 4)
    # neurons: the rule counts dominant frequencies of well-explained neurons
    fake = frequency_fractions(torch.zeros(p, p, 1, dtype=torch.float64))
    dominant = torch.tensor([3] * 20 + [5] * 6 + [1] + [2] * 5)
    fraction = torch.tensor([0.9] * 27 + [0.1] * 5, dtype=torch.float64)
    kn = key_frequencies_from(p=p, neurons=type(fake)(dominant, fraction, torch.zeros(32, p // 2 + 1)))
    assert kn.freqs == (3, 5) and kn.scores == (20.0, 6.0)  # 1 neuron < 5% of 27; low-fraction ones ignored
    assert "2 of 27 of 32" in kn.rule
    kn = key_frequencies_from(p=p, neurons=type(fake)(dominant, fraction, torch.zeros(32, p // 2 + 1)), k=3)
    assert kn.freqs == (3, 5, 1)
    with pytest.raises(ValueError, match="source"):
        key_frequencies(model, task, source="weights")


def test_fourier_gini_and_weight_norm():
    task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)
    for model in (mg.models.transformer(task, d_model=16, n_heads=2, d_mlp=32), mg.models.mlp(task, width=16)):
        g = fourier_gini(model, task)
        assert set(g) == {"embedding", "unembedding"} and all(0 <= v < 1 for v in g.values())
        assert unembedding_frequency_norms(model, task).shape == (6,)
        ref = math.sqrt(sum(float((q.detach().double() ** 2).sum()) for q in model.parameters()))
        assert weight_norm(model) == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------- progress on real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cfg = mg.TrainConfig(steps=40, lr=1e-2, checkpoint_every=20, eval_every=20)
    out = {}
    add = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)
    mul = mg.tasks.modular_arithmetic(p=11, op="mul", train_frac=0.5, seed=0)
    root = tmp_path_factory.mktemp("measures")
    out["tf"] = mg.train(mg.models.transformer(add, d_model=16, n_heads=2, d_mlp=32), add, cfg, out=root / "tf",
                         progress=False)
    out["mlp"] = mg.train(mg.models.mlp(add, width=32), add, cfg, out=root / "mlp", progress=False)
    out["mul"] = mg.train(mg.models.transformer(mul, d_model=16, n_heads=2, d_mlp=32), mul, cfg, out=root / "mul",
                          progress=False)
    return out


@pytest.mark.parametrize("kind", ["tf", "mlp", "mul"])
def test_progress_on_a_run(runs, kind):
    run = runs[kind]
    res = progress(run, progress=False)
    steps = run.steps()
    assert res["step"] == steps == [0, 20, 40]
    assert all(len(res[c]) == len(steps) for c in PROGRESS_COLUMNS)
    history = {r["step"]: r for r in run.history()}
    for i, s in enumerate(steps):
        assert res["train_loss"][i] == pytest.approx(history[s]["train_loss"], rel=1e-5)
        assert res["test_acc"][i] == pytest.approx(history[s]["test_acc"], abs=1e-12)
        assert res["weight_norm"][i] == pytest.approx(history[s]["weight_norm"], rel=1e-9)
        assert res["softmax_collapse"][i] == pytest.approx(history[s]["softmax_collapse"], abs=1e-12)
    for c in ("train_loss", "test_loss", "gini_embedding", "gini_unembedding", "mean_neuron_ipr"):
        assert all(math.isfinite(v) for v in res[c]), c
    assert res["key_frequencies"]["step"] == 40 and res["meta"]["p"] == 11
    if kind == "mul":
        assert res["restricted_loss"] == [None] * 3 and res["excluded_loss"] == [None] * 3
        assert any("mul" in note for note in res["meta"]["notes"])
    else:
        assert all(math.isfinite(v) for v in res["restricted_loss"] + res["excluded_loss"])


def test_progress_given_steps_and_freqs(runs):
    run = runs["tf"]
    res = progress(run, steps=[40, 0], freqs=[2, 3], progress=False)
    assert res["step"] == [0, 40] and res["key_frequencies"]["freqs"] == [2, 3]
    model, task = run.load_model(40), run.task()
    assert res["restricted_loss"][1] == pytest.approx(restricted_loss(model, task, [2, 3]), rel=1e-12)
    assert res["excluded_loss"][1] == pytest.approx(excluded_loss(model, task, [2, 3]), rel=1e-12)
    with pytest.raises(ValueError, match="no checkpoints at steps"):
        progress(run, steps=[5], progress=False)
    with pytest.raises(ValueError, match="outside"):
        progress(run, freqs=[0, 2], progress=False)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="key_source"):
        progress(run, key_source="weights", progress=False, threads=1)
    assert torch.get_num_threads() == threads  # restored, even after an error
