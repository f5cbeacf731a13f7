"""Tests for mechgrok.tickets (Minegishi et al., "Grokking Tickets", arXiv:2310.19470), the weight masks
of mg.train, and the ``tickets`` analysis.

Hand-computed masks use a module with weights set by hand: ``W_a = [[0.1, -3.0], [2.0, -0.5]]``,
``W_b = [[0.5, 1.0, -0.05]]`` and a bias ``b`` (never pruned by default). In parameter order, row-major,
the magnitudes are 0.1, 3.0, 2.0, 0.5 | 0.5, 1.0, 0.05 (positions 0..6).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

import mechgrok as mg
from mechgrok import tickets as tk
from mechgrok.analyses import tickets as ta
from mechgrok.analyses._base import ANALYSES  # noqa: F401 (the analysis registers on import)
from mechgrok.checkpoints import DamagedCheckpoint, read, write


class _Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.W_a = nn.Parameter(torch.tensor([[0.1, -3.0], [2.0, -0.5]], dtype=torch.float64))
        self.W_b = nn.Parameter(torch.tensor([[0.5, 1.0, -0.05]], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([100.0], dtype=torch.float64))


def _lists(mask):
    return {k: v.tolist() for k, v in mask.items()}


# ---------------------------------------------------------------------------- masks by hand


def test_default_params_are_the_weight_matrices():
    assert tk.default_params(_Hand()) == ["W_a", "W_b"]
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, seed=0)
    tf = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0)
    names = tk.default_params(tf)
    assert "pos_embed.W_pos" not in names and not any(".b_" in n for n in names)
    assert {"embed.W_E", "blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.0.mlp.W_in", "unembed.W_U"} <= set(names)
    assert tk.default_params(mg.models.mlp(task, width=8)) == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    moe = mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=8, num_experts=2, experts_per_token=1)
    assert {"blocks.0.mlp.experts.1.W_out.weight", "blocks.0.mlp.W_gate.weight"} <= set(tk.default_params(moe))


def test_global_mask_by_hand_with_a_tie():
    # 3/7 -> floor(3.01) = 3 pruned: 0.05 (pos 6), 0.1 (pos 0), then the tie 0.5 at pos 3 (W_a) and pos 4
    # (W_b): the earlier position, W_a[1, 1], is pruned.
    m = tk.magnitude_mask(_Hand(), 0.43)
    assert _lists(m) == {"W_a": [[False, True], [True, False]], "W_b": [[True, True, False]]}
    assert all(v.dtype == torch.bool for v in m.values())
    # 4 pruned (floor(0.6 * 7) = 4): the tie's second member goes too
    assert _lists(tk.magnitude_mask(_Hand(), 0.6)) == {"W_a": [[False, True], [True, False]],
                                                       "W_b": [[False, True, False]]}
    assert _lists(tk.magnitude_mask(_Hand(), 0.0)) == {"W_a": [[True, True], [True, True]], "W_b": [[True] * 3]}


def test_layer_mask_by_hand():
    # 0.6: W_a prunes floor(2.4) = 2 (0.1, 0.5), W_b floor(1.8) = 1 (0.05)
    assert _lists(tk.magnitude_mask(_Hand(), 0.6, scope="layer")) == {"W_a": [[False, True], [True, False]],
                                                                      "W_b": [[True, True, False]]}
    # 0.7 global prunes floor(4.9) = 4 (as 0.6); per layer W_a 2, W_b floor(2.1) = 2 (0.05, then 0.5)
    assert _lists(tk.magnitude_mask(_Hand(), 0.7, scope="layer"))["W_b"] == [[False, True, False]]


def test_ties_and_rounding_are_deterministic():
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.3)
    m = tk.magnitude_mask(lin, 0.29, params=["weight"])["weight"].reshape(-1)
    assert int((~m).sum()) == 29  # 0.29 * 100 = 28.999...: the slack keeps it 29
    assert m[:29].logical_not().all() and m[29:].all()  # equal magnitudes: the first positions go first
    only_b = tk.magnitude_mask(_Hand(), 0.5, params=["b", "W_b"])  # parameter order, whatever the list order
    assert list(only_b) == ["W_b", "b"]


def test_magnitude_masks_match_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    many = tk.magnitude_masks(model, [0.1, 0.5, 0.9], params=["0.weight", "1.weight"])
    for s, m in zip([0.1, 0.5, 0.9], many):
        assert _lists(m) == _lists(tk.magnitude_mask(model, s, params=["0.weight", "1.weight"]))
        assert sum(int((~v).sum()) for v in m.values()) == math.floor(s * 50 + 1e-6)


def test_random_mask_keeps_the_counts_per_parameter():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    like = tk.magnitude_mask(model, 0.7, params=["0.weight", "1.weight"])
    r0, r0b, r1 = (tk.random_mask(model, like, seed=s) for s in (0, 0, 1))
    for n in like:
        assert r0[n].shape == like[n].shape and int(r0[n].sum()) == int(like[n].sum())
        assert torch.equal(r0[n], r0b[n])
    assert any(not torch.equal(r0[n], r1[n]) for n in like) and any(not torch.equal(r0[n], like[n]) for n in like)


def test_norm_ratio_by_hand():
    model, m = _Hand(), tk.magnitude_mask(_Hand(), 0.43)  # keeps 3.0, 2.0, 0.5 (W_b), 1.0
    assert tk.norm_ratio(model, m, "l1") == pytest.approx(6.5 / 7.15, rel=1e-12)
    assert tk.norm_ratio(model, m, "l2") == pytest.approx(math.sqrt(14.25 / 14.5125), rel=1e-12)
    with pytest.raises(ValueError, match="norm must be one of"):
        tk.norm_ratio(model, m, "linf")


def test_mask_overlap_and_random_expectation():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}
    assert tk.mask_overlap(a, b) == {"jaccard": 1 / 3, "kept_of_b": 0.5}
    assert ta.random_overlap(0.5) == {"kept_of_b": 0.5, "jaccard": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="different parameters"):
        tk.mask_overlap(a, {"v": b["w"]})


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match=r"in \[0, 1\)|< 1"):
        tk.magnitude_mask(_Hand(), 1.0)
    with pytest.raises(ValueError, match="did you mean"):
        tk.magnitude_mask(_Hand(), 0.5, params=["W_c"])
    with pytest.raises(ValueError, match="scope must be one of"):
        tk.magnitude_mask(_Hand(), 0.5, scope="local")
    with pytest.raises(ValueError, match="no trainable weight matrix"):
        tk.magnitude_mask(nn.Linear(2, 2), 0.5)


# ---------------------------------------------------------------------------- mg.train's masks


def _tiny_transformer():
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.6, seed=0)
    return task, mg.models.transformer(task, n_layers=1, d_model=8, n_heads=2, d_mlp=16, seed=0)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_orthograd"])
def test_masked_weights_stay_exactly_zero(tmp_path, optimizer):
    task, model = _tiny_transformer()
    mask = tk.magnitude_mask(model, 0.5)
    cfg = mg.TrainConfig(steps=20, lr=1e-2, weight_decay=1.0, optimizer=optimizer, eval_every=10, checkpoint_every=5)
    run = mg.train(model, task, cfg, out=tmp_path / "run", progress=False, masks=mask, masks_meta={"k": 1})
    for step in run.steps():
        w = dict(run.load_model(step).named_parameters())
        for n, m in mask.items():
            assert bool((w[n][~m] == 0).all()), (step, n)
            if step:
                assert bool((w[n][m] != 0).any())
    back = run.masks()
    assert _lists(back) == _lists(mask)
    info = run.config["masks"]
    assert info["kept"] == sum(int(m.sum()) for m in mask.values()) and info["meta"] == {"k": 1}


def test_masked_resume_is_bitwise_and_other_masks_are_refused(tmp_path):
    task, model = _tiny_transformer()
    mask = tk.magnitude_mask(model, 0.4)
    cfg = mg.TrainConfig(steps=20, lr=1e-2, eval_every=5, checkpoint_every=10)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mg.train(model, task, cfg, out=tmp_path / "whole", progress=False, masks=mask)
    model.load_state_dict(init)
    mg.train(model, task, cfg, out=tmp_path / "cut", progress=False, masks=mask, stop_at=10)
    model.load_state_dict(init)
    mg.train(model, task, cfg, out=tmp_path / "cut", progress=False, masks=mask)
    a, b = (read(tmp_path / f"{f}/checkpoints/step_000020.safetensors") for f in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tk.magnitude_mask(model, 0.6)
    with pytest.raises(FileExistsError, match="different config"):
        mg.train(model, task, cfg, out=tmp_path / "cut", progress=False, masks=other)
    write(tmp_path / "cut" / "masks.safetensors", other)  # a swapped masks file is caught by its hash
    with pytest.raises(DamagedCheckpoint, match="hashes differ"):
        mg.Run(tmp_path / "cut").masks()


def test_bad_masks_are_refused(tmp_path):
    task, model = _tiny_transformer()
    shape = model.embed.W_E.shape
    cfg = mg.TrainConfig(steps=1)
    for masks, err, match in [({"embed.W_X": torch.ones(shape)}, ValueError, "not a parameter"),
                              ({"embed.W_E": torch.ones(2, 2)}, ValueError, "has shape"),
                              ({"embed.W_E": torch.full(shape, 0.5)}, ValueError, "only 0 and 1"),
                              ([torch.ones(shape)], TypeError, "must be a dict"), ({}, ValueError, "empty")]:
        with pytest.raises(err, match=match):
            mg.train(model, task, cfg, out=tmp_path / "bad", progress=False, masks=masks)
    with pytest.raises(ValueError, match="masks is None"):
        mg.train(model, task, cfg, out=tmp_path / "bad", progress=False, masks_meta={"a": 1})


# ---------------------------------------------------------------------------- tickets of a run


@pytest.fixture(scope="module")
def grokked(tmp_path_factory):
    """A 300-step x² MLP on a + b mod 23 that generalizes (test ≥ 0.95 from step 160)."""
    task = mg.tasks.modular_arithmetic(p=23, train_frac=0.8, seed=0)
    model = mg.models.mlp(task, width=64, act="square", seed=0)
    cfg = mg.TrainConfig(steps=300, lr=1e-2, weight_decay=1.0, eval_every=20, checkpoint_every=50)
    return mg.train(model, task, cfg, out=tmp_path_factory.mktemp("tk") / "base", progress=False)


def test_grokking_delay_on_a_hand_written_history():
    h = [{"step": 0, "train_acc": 0.1, "test_acc": None}, {"step": 50, "train_acc": 1.0, "test_acc": 0.2},
         {"step": 100, "train_acc": 0.9, "test_acc": float("nan")}, {"step": 400, "train_acc": 1.0, "test_acc": 0.95}]
    assert tk.grokking_delay(h) == tk.GrokkingDelay(50, 400, 350, 400)
    assert tk.grokking_delay(h[:3]).to_dict() == {"memorized": 50, "generalized": None, "delay": None, "last_step": 100}
    early = [{"step": 0, "train_acc": 0.5, "test_acc": 0.96}, {"step": 10, "train_acc": 1.0, "test_acc": 0.97}]
    assert tk.grokking_delay(early).delay == -10  # generalized before every training example was fitted
    assert tk.grokking_delay([]) == tk.GrokkingDelay(None, None, None, None)


def test_ticket_records_its_provenance(grokked, tmp_path):
    last = grokked.steps()[-1]
    t = tk.ticket(grokked, 0.5, out=tmp_path / "t", progress=False)
    meta = t.config["masks"]["meta"]
    assert meta["kind"] == "ticket" and meta["sparsity"] == 0.5 and meta["source_step"] == last
    assert meta["scope"] == "global" and meta["source_generalized"] == tk.grokking_delay(grokked).generalized
    assert tk.ticket_source(t).path == grokked.path.resolve()
    mask = tk.magnitude_mask(grokked.load_model(last), 0.5)
    assert _lists(t.masks()) == _lists(mask) and t.config["masks"]["kept"] == 2208  # half of 2·23·64 + 64·23
    w0, s0 = dict(grokked.load_model(0).named_parameters()), dict(t.load_model(0).named_parameters())
    assert all(torch.equal(s0[n], w0[n] * mask[n]) for n in mask)  # θ₀ ⊙ m
    # the random control keeps as many per parameter; a mask at the memorization step on request
    r = tk.ticket(grokked, 0.5, kind="random", step=50, seed=3, out=tmp_path / "r", progress=False)
    rm = r.masks()
    assert all(int(rm[n].sum()) == int(tk.magnitude_mask(grokked.load_model(50), 0.5)[n].sum()) for n in rm)
    assert r.config["masks"]["meta"]["seed"] == 3 and r.config["masks"]["meta"]["source_step"] == 50


def test_dense_controls_match_the_ticket_norm(grokked, tmp_path):
    cfg = mg.TrainConfig.from_dict(grokked.config["train"]).replace(steps=20)
    mask = tk.magnitude_mask(grokked.load_model(grokked.steps()[-1]), 0.7)
    w0 = {k: v.detach() for k, v in grokked.load_model(0).named_parameters()}
    for norm, p in (("l1", 1), ("l2", 2)):
        d = tk.ticket(grokked, 0.7, kind="dense", match_norm=norm, config=cfg, out=tmp_path / norm, progress=False)
        s0 = {k: v.detach() for k, v in d.load_model(0).named_parameters()}
        dense_norm = sum(float((s0[n].double().abs() ** p).sum()) for n in mask) ** (1 / p)
        ticket_norm = sum(float(((w0[n] * mask[n]).double().abs() ** p).sum()) for n in mask) ** (1 / p)
        assert dense_norm == pytest.approx(ticket_norm, rel=1e-6)
        assert d.config["masks"]["kept"] == d.config["masks"]["total"]  # all ones: nothing pruned
        scale = tk.norm_ratio(grokked.load_model(0), mask, norm)
        assert d.config["masks"]["meta"]["norm_scale"] == pytest.approx(scale)


def test_dense_retrain_with_ones_is_the_source_run_bitwise(grokked, tmp_path):
    d = tk.ticket(grokked, 0.5, kind="dense", out=tmp_path / "d", progress=False)
    assert d.config["masks"]["meta"]["sparsity"] is None and d.config["masks"]["meta"]["norm_scale"] is None
    a, b = (dict(r.load_model(300).named_parameters()) for r in (grokked, d))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_ticket_arguments_are_checked(grokked, tmp_path):
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.6, seed=0)
    young = mg.train(mg.models.mlp(task, width=8, seed=0), task, mg.TrainConfig(steps=10, checkpoint_every=5),
                     out=tmp_path / "young", progress=False)
    with pytest.raises(ValueError, match="pass step="):
        tk.ticket(young, 0.5)
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        tk.ticket(young, 0.5, step=7)
    with pytest.raises(ValueError, match="match_norm"):
        tk.ticket(grokked, 0.5, match_norm="l2")
    with pytest.raises(ValueError, match="kind must be one of"):
        tk.ticket(grokked, 0.5, kind="snip")
    with pytest.raises(ValueError, match=r"sparsity"):
        tk.ticket(grokked, -0.1)
    with pytest.raises(TypeError, match="TrainConfig"):
        tk.ticket(grokked, 0.5, config={"steps": 3})
    with pytest.raises(ValueError, match="kinds must be"):
        tk.ticket_sweep(grokked, [0.5], kinds=["ticket", "lottery"], out=tmp_path / "sw")
    with pytest.raises(ValueError, match="sparsities is empty"):
        tk.ticket_sweep(grokked, [], out=tmp_path / "sw")


def test_ticket_sweep_round_trips_and_reads_back(grokked, tmp_path):
    sw = tk.ticket_sweep(grokked, [0.5], kinds=("ticket", "random", "dense", "dense_l2"), out=tmp_path / "sw",
                         progress=False)
    kinds = [(p.kind, p.sparsity, p.run) for p in sw.points]
    last = grokked.steps()[-1]
    assert kinds == [("ticket", 0.5, f"ticket_s0.5_step{last}"), ("random", 0.5, f"random_s0.5_step{last}_seed0"),
                     ("dense", None, "<source>"), ("dense_l2", 0.5, f"dense_l2_s0.5_step{last}")]
    assert sw.points[2].generalized == sw.source_delay.generalized  # the dense row is the source run itself
    assert all(p.final_test_acc is not None for p in sw.points)
    assert tk.TicketSweep.from_dict(json.loads(json.dumps(sw.to_dict()))) == sw
    mtime = (tmp_path / "sw" / sw.points[0].run / "history.jsonl").stat().st_mtime_ns
    again = tk.ticket_sweep(grokked, [0.5], kinds=("ticket", "random", "dense", "dense_l2"), out=tmp_path / "sw",
                            progress=False)
    assert again == sw and (tmp_path / "sw" / sw.points[0].run / "history.jsonl").stat().st_mtime_ns == mtime
    assert sw.generalized("ticket", 0.5) == [sw.points[0].generalized]


# ---------------------------------------------------------------------------- the analysis and section


def test_analysis_round_trip_section_and_skip_reason(grokked, tmp_path):
    assert ANALYSES["tickets"].applies(grokked) is None
    res = ta.ticket_analysis(grokked, progress=False)
    n = len(grokked.steps())
    assert res.steps == grokked.steps() and res.ticket is None and res.n_weights == 2 * 23 * 64 + 64 * 23
    assert all(len(k) == n and k[-1] == 1.0 for k in res.kept_of_final) and res.jaccard_prev[0][0] is None
    back = ta.TicketAnalysis.from_json(json.loads(json.dumps(res.to_json(), allow_nan=False)))
    assert back == res
    grokked.write_analysis("tickets", res.to_json())
    sec = ta.tickets_section(grokked)
    assert sec.title == "Grokking tickets" and sec.figures[0].png[:4] == b"\x89PNG"
    assert len(sec.tables[0].rows) == 3 and "memorization" in sec.headline and "s0.5" in sec.numbers
    # a run with one checkpoint: skipped, saying why
    task = mg.tasks.modular_arithmetic(p=7, train_frac=0.6, seed=0)
    one = mg.train(mg.models.mlp(task, width=8), task, mg.TrainConfig(steps=0), out=tmp_path / "one", progress=False)
    assert "1 checkpoint" in ANALYSES["tickets"].applies(one)
    assert ta.tickets_section(one) is None  # no analysis file: no section


def test_section_of_a_ticket_run_names_its_source(grokked, tmp_path):
    t = tk.ticket(grokked, 0.5, out=tmp_path / "t", progress=False)
    res = ta.ticket_analysis(t, progress=False)
    assert res.ticket["kind"] == "ticket" and res.ticket["source_from"] == "folder"
    assert res.ticket["source_generalized"] == tk.grokking_delay(grokked).generalized
    t.write_analysis("tickets", res.to_json())
    assert "taken from" in ta.tickets_section(t).text
    # the source moved away: the record in config.json still gives its steps
    moved = tmp_path / "copy"
    shutil.copytree(t.path, moved)
    (moved / "config.json").write_text((moved / "config.json").read_text().replace(str(grokked.path.resolve()),
                                                                                   "/nonexistent/base"))
    cfg = json.loads((moved / "config.json").read_text())
    cfg["masks"]["meta"]["source_run_relative"] = "../nowhere"
    (moved / "config.json").write_text(json.dumps(cfg))
    rec = ta.ticket_analysis(mg.Run(moved), progress=False).ticket
    assert rec["source_from"] == "record" and rec["source_generalized"] == res.ticket["source_generalized"]
