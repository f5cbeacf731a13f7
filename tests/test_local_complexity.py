"""Tests for mechgrok.measures.local_complexity (Humayun, Balestriero and Baraniuk 2024).

The hand-checkable models are ReLU nets on R^2 with chosen hyperplanes (float64): with the axis frame
the neighbourhood's vertices are ``x ± r e_1, x ± r e_2`` and every count can be done on paper; with
random frames only hyperplanes closer than ``r/√2`` (always counted) or farther than ``r`` (never) are
used, so the count is known whatever the frame.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mechgrok as mg
from mechgrok.measures.local_complexity import (
    LC_SETS,
    LocalComplexity,
    LocalComplexityOverTraining,
    boundary_points,
    local_complexity,
    local_complexity_over_training,
    relu_layers,
)

AXES = torch.eye(2, dtype=torch.float64)


def _lines_net() -> nn.Sequential:
    """One ReLU layer on R^2 whose neurons vanish on x = 0, y = 0, x + y = 1, x - y + 0.1 = 0, y = 0.75."""
    lin = nn.Linear(2, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -1], [0, 1]]))
        lin.bias.copy_(torch.tensor([0.0, 0, -1, 0.1, -0.75]))
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(5, 3, dtype=torch.float64))


def _pt(*xy: float) -> torch.Tensor:
    return torch.tensor([xy], dtype=torch.float64)


def test_hand_computed_one_layer_axis_frame():
    # x = (0.1, 0.4), r = 0.3: vertices (0.4, 0.4), (-0.2, 0.4), (0.1, 0.7), (0.1, 0.1).
    # x = 0 takes 0.4, -0.2: counts; x - y + 0.1 takes 0.1, -0.5: counts; y = 0 (all > 0), x + y = 1
    # (all < 0) and y = 0.75 (all < 0) do not.
    lc = local_complexity(_lines_net(), _pt(0.1, 0.4), 0.3, directions=AXES)
    assert lc.counts.tolist() == [[2]]
    assert lc.layers == ("1",) and lc.widths == (5,) and lc.n_directions == 2 and lc.seed is None


@pytest.mark.parametrize("seed", range(5))
def test_hand_computed_one_layer_any_frame(seed):
    # distances from (0.1, 0.4): 0.1 and 0.141 (< r/√2 = 0.212: always cut), 0.4, 0.354, 0.35 (> r: never)
    assert local_complexity(_lines_net(), _pt(0.1, 0.4), 0.3, seed=seed).counts.tolist() == [[2]]


@pytest.mark.parametrize("seed", range(5))
def test_point_on_a_hyperplane_counts_one(seed):
    # (0, -3) lies on x = 0; every other hyperplane is more than 2 away
    assert local_complexity(_lines_net(), _pt(0.0, -3.0), 0.1, seed=seed).counts.tolist() == [[1]]


def test_radius_to_zero_gives_zero_for_generic_points():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert int(local_complexity(net, x, 1e-9).counts.sum()) == 0
    # the first layer's hyperplanes are all farther than 1e-6 from these points (so 0 is the right answer)
    lin = net[0]
    with torch.no_grad():
        dist = (x @ lin.weight.T + lin.bias).abs() / lin.weight.norm(dim=1)  # [200, 16]
    assert float(dist.min()) > 1e-6
    assert int(local_complexity(net, x, 10.0).counts.sum()) > 0


def test_two_layers_hand_computed():
    # layer 1: h = relu(x, y) (hyperplanes x = 0, y = 0); layer 2: u = h1 + h2 - 1, v = h1 - 2
    l1, l2 = nn.Linear(2, 2, dtype=torch.float64), nn.Linear(2, 2, dtype=torch.float64)
    with torch.no_grad():
        l1.weight.copy_(torch.eye(2)), l1.bias.zero_()
        l2.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]])), l2.bias.copy_(torch.tensor([-1.0, -2.0]))
    net = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), nn.Linear(2, 2, dtype=torch.float64))
    # (0.5, 0.6), r = 0.2: vertices all in the positive quadrant (layer 1: 0); u takes 0.3 and -0.1 (1), v < 0
    # (0.1, 0.6), r = 0.2: x = 0 is cut (layer 1: 1); h = (0.3,.6), (0,.6), (.1,.8), (.1,.4): u, v < 0 (0)
    lc = local_complexity(net, torch.tensor([[0.5, 0.6], [0.1, 0.6]], dtype=torch.float64), 0.2, directions=AXES)
    assert lc.counts.tolist() == [[0, 1], [1, 0]]
    assert lc.layers == ("1", "3") and lc.total.tolist() == [1, 1] and lc.mean_per_layer() == (0.5, 0.5)


def _reference(net: nn.Sequential, x: torch.Tensor, frame: torch.Tensor, r: float) -> list[list[int]]:
    """Point by point, vertex by vertex, layer by layer with explicit matmuls."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    rows = []
    for point in x:
        verts = [point + s * r * v for v in frame for s in (1, -1)]
        row = []
        for lin in linears[:-1]:
            pres = [lin.weight @ v + lin.bias for v in verts]
            pre = torch.stack(pres)  # [2P, width]
            row.append(int(((pre > 0).any(0) & (pre < 0).any(0)).sum()))
            verts = [torch.relu(p) for p in pres]
        rows.append(row)
    return rows


def test_matches_an_explicit_reference():
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
                        nn.Linear(8, 3)).double()
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    frame = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64)).Q.T  # [4, 6]
    lc = local_complexity(net, x, 0.7, directions=frame, batch_size=7)
    assert lc.counts.tolist() == _reference(net, x, frame, 0.7)
    assert lc.counts.shape == (30, 3) and lc.widths == (12, 10, 8)


def test_first_layer_between_inscribed_and_circumscribed_balls():
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 2)).double()
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    lin, r = net[0], 0.8
    with torch.no_grad():
        dist = (x @ lin.weight.T + lin.bias).abs() / lin.weight.norm(dim=1)  # [50, 64] point-hyperplane distances
    full = local_complexity(net, x, r, n_directions=5).total
    assert ((dist < r / math.sqrt(5)).sum(1) <= full).all() and (full <= (dist < r).sum(1)).all()
    slice_ = local_complexity(net, x, r, n_directions=2).total  # a 2-D slice: still inside the ball of radius r
    assert (slice_ <= (dist < r).sum(1)).all()


def test_first_layer_grows_with_radius_for_a_fixed_frame():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 2)).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    counts = [local_complexity(net, x, r, n_directions=3, seed=7).total for r in (0.05, 0.2, 0.5, 1.0, 3.0)]
    assert all((a <= b).all() for a, b in zip(counts, counts[1:]))  # nested polytopes: same centre and frame


def test_frames_do_not_depend_on_batch_size_and_follow_the_seed():
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    x = torch.randn(20, 8, generator=g)
    a = local_complexity(net, x, 1.0, n_directions=4, seed=5, batch_size=3)
    b = local_complexity(net, x, 1.0, n_directions=4, seed=5, batch_size=64)
    assert torch.equal(a.counts, b.counts)
    assert local_complexity(net, x, 1.0).n_directions == 8  # default min(d_in, 25)


def test_hooked_mlp_matches_the_same_weights_as_a_sequential():
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, seed=0)
    model = mg.models.mlp(task, width=24, act="relu", bias=True, seed=1)
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.b_in.copy_(torch.randn(24, generator=torch.Generator().manual_seed(0)) * 0.3)
    l1, l2 = nn.Linear(14, 24), nn.Linear(24, 7)
    with torch.no_grad():
        l1.weight.copy_(mlp.W_in.T), l1.bias.copy_(mlp.b_in), l2.weight.copy_(mlp.W_out.T), l2.bias.copy_(mlp.b_out)
    seq = nn.Sequential(l1, nn.ReLU(), l2)
    x = task.onehot()
    a, b = local_complexity(model, x, 0.5, seed=2), local_complexity(seq, x, 0.5, seed=2)
    assert torch.equal(a.counts, b.counts) and a.layers == ("blocks.0.mlp.hook_pre",) and a.n_directions == 14
    assert 0 < a.mean() < 24
    assert model.training  # restored


def test_hooked_mlp_point_on_a_neuron_hyperplane():
    # move neuron 3's hyperplane through the one-hot point of (a, b) = (2, 5); the rest are generic
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, seed=0)
    model = mg.models.mlp(task, width=16, act="relu", bias=True, seed=0).double()
    mlp = model.blocks[0].mlp
    x = task.onehot(torch.float64)
    i = int(((task.inputs[:, 0] == 2) & (task.inputs[:, 1] == 5)).nonzero())
    with torch.no_grad():
        mlp.b_in.copy_(0.05 + 0.1 * torch.rand(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        mlp.b_in[3] = -(mlp.W_in[2, 3] + mlp.W_in[7 + 5, 3])
    assert local_complexity(model, x[i:i + 1], 1e-7).counts.tolist() == [[1]]


def test_result_round_trips_through_json():
    lc = local_complexity(_lines_net(), torch.tensor([[0.1, 0.4], [0.0, -3.0]], dtype=torch.float64), 0.3)
    back = LocalComplexity.from_dict(json.loads(json.dumps(lc.to_dict())))
    assert torch.equal(back.counts, lc.counts) and back.to_dict() == lc.to_dict()
    with pytest.raises(ValueError, match="format"):
        LocalComplexity.from_dict({"format": "other"})


def test_boundary_points_lie_on_the_decision_boundary():
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    bp = boundary_points(net, x, n=80, seed=1)
    pred = net(x).argmax(-1)
    assert 0 < len(bp.points) <= 80 and bp.points.shape[1] == 3
    assert (pred[bp.pairs[:, 0]] != pred[bp.pairs[:, 1]]).all()
    assert bp.margin.abs().max() < 1e-6 and ((bp.t > 0) & (bp.t < 1)).all()
    ends = x[bp.pairs[:, 0]] + bp.t[:, None] * (x[bp.pairs[:, 1]] - x[bp.pairs[:, 0]])
    assert torch.allclose(ends, bp.points)
    constant = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4)).double()
    with torch.no_grad():
        constant[2].weight.zero_(), constant[2].bias.copy_(torch.tensor([0.0, 1, 0, 0]))
    assert len(boundary_points(constant, x).points) == 0  # one class everywhere: no boundary


def test_bad_inputs_are_refused():
    net, x = _lines_net(), _pt(0.1, 0.4)
    for r in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="radius"):
            local_complexity(net, x, r)
    with pytest.raises(ValueError, match=r"\[n_points, 2\]"):
        local_complexity(net, torch.zeros(3, 4, dtype=torch.float64), 0.1)
    with pytest.raises(TypeError, match="token ids"):
        local_complexity(net, torch.zeros(3, 2, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="n_directions"):
        local_complexity(net, x, 0.1, n_directions=3)
    with pytest.raises(ValueError, match="orthonormal"):
        local_complexity(net, x, 0.1, directions=torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="not both"):
        local_complexity(net, x, 0.1, directions=AXES, n_directions=2)
    task = mg.tasks.modular_arithmetic(p=5, train_frac=0.5, seed=0)
    with pytest.raises(TypeError, match="act='relu'"):
        local_complexity(mg.models.mlp(task, width=8), task.onehot(), 0.1)  # x² MLP
    with pytest.raises(TypeError, match="HookedTransformer"):
        relu_layers(mg.models.transformer(task, d_model=8, n_heads=2, d_mlp=16))
    with pytest.raises(TypeError, match="Tanh"):
        local_complexity(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), x.float(), 0.1)
    with pytest.raises(TypeError, match="nn.Sequential"):
        local_complexity(nn.Linear(2, 3), x.float(), 0.1)


def test_over_training_on_a_tiny_run(tmp_path):
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, seed=0)
    model = mg.models.mlp(task, width=16, act="relu", bias=True, seed=0)
    run = mg.train(model, task, mg.TrainConfig(steps=20, lr=1e-2, eval_every=10, checkpoint_every=10),
                   out=tmp_path / "run", progress=False)
    res = local_complexity_over_training(run, radius=0.5, n_points=10, n_boundary=12, progress=False)
    assert res.steps == (0, 10, 20) and res.layers == ("blocks.0.mlp.hook_pre",) and res.n_directions == 14
    assert res.n_points["train"] == (10,) * 3 and res.n_points["test"] == (10,) * 3
    assert all(0 <= n <= 12 for n in res.n_points["boundary"])
    cols = res.columns()
    assert list(cols) == ["step", *(f"lc_{s}" for s in LC_SETS), "train_acc", "test_acc"]
    assert all(len(v) == 3 for v in cols.values()) and len(res.per_layer["train"][0]) == 1
    back = LocalComplexityOverTraining.from_dict(json.loads(json.dumps(res.to_dict(), allow_nan=False)))
    assert back.to_dict() == res.to_dict()
    one = local_complexity_over_training(run, [20], radius=0.5, n_points=10, n_boundary=12, progress=False)
    assert one.mean["train"][0] == res.mean["train"][2]  # the same points and frames on every checkpoint
    with pytest.raises(ValueError, match="no checkpoints at steps"):
        local_complexity_over_training(run, [5], radius=0.5)
