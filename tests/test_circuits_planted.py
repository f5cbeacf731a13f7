"""Circuit discovery against a planted ground truth: the hand-wired induction model."""

import pytest
import torch

from mechgrok import models
from mechgrok.circuits.attribution import acdc_default_tau, acdc_kept, attribute
from mechgrok.circuits.graph import graph
from mechgrok.circuits.metrics import logit_diff
from mechgrok.circuits.patching import Patcher
from mechgrok.circuits.planted import induction_answers, induction_data, induction_model, planted_edges

TRUE = {"input->a0.h0.v", "a0.h0->a1.h0.k", "input->a1.h0.q", "input->a1.h0.v", "a1.h0->logits"}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties averaged."""
    x = x.double()
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in x.unique():
        r[x == v] = r[x == v].mean()
    return r


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC by the rank (Mann-Whitney) formula."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((_ranks(score)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def _denoise(s: torch.Tensor) -> torch.Tensor:
    """Float32 rounding gives the unwired edges of the rotated model scores of ~1e-7 (exactly 0
    in the axis-aligned one); their order is noise, so they count as 0 when ranking."""
    return torch.where(s.abs() <= 1e-5 * s.abs().max(), torch.zeros_like(s), s)


@pytest.fixture(scope="module", params=[0, None], ids=["rotated", "axis-aligned"])
def setup(request):
    model, true = induction_model(d_vocab=16, n_ctx=8, seed=request.param)
    clean, corrupted, labels = induction_data(model, n=64, seed=0)
    metric = logit_diff(labels, induction_answers(corrupted))
    g = graph(model, "edge")
    scores = {m: attribute(model, clean, corrupted, metric, method=m, graph=g, progress=False)
              for m in ("exact", "eap", "eap-ig", "acdc")}
    vec = {m: torch.tensor([s[c] for c in g.components]) for m, s in scores.items()}
    positive = torch.tensor([c in true for c in g.components])
    return dict(model=model, true=true, clean=clean, corrupted=corrupted, labels=labels, metric=metric, g=g,
                scores=scores, vec=vec, positive=positive)


def test_true_edges_derived_from_weights(setup):
    model, g = setup["model"], setup["g"]
    assert setup["true"] == TRUE and set(TRUE) <= set(g.components) and len(g.components) == 29
    wired = planted_edges(model, positional=True)
    assert wired == TRUE | {"input->a0.h0.q", "input->a0.h0.k"}


def test_model_solves_induction_and_corruption_breaks_it(setup):
    model, clean, corrupted, labels = setup["model"], setup["clean"], setup["corrupted"], setup["labels"]
    with torch.no_grad():
        lc, lx = model(clean), model(corrupted)  # full logits [batch, pos, vocab]
    assert (lc[:, -1].argmax(-1) == labels).float().mean() == 1.0
    assert (lx[:, -1].argmax(-1) == labels).float().mean() == 0.0
    assert (lx[:, -1].argmax(-1) == induction_answers(corrupted)).all()
    assert float(setup["metric"](lc)) > 9.9 and float(setup["metric"](lx)) < -9.9


def test_patching_invariants(setup):
    model, clean, corrupted = setup["model"], setup["clean"], setup["corrupted"]
    p = Patcher(model, setup["g"], clean, corrupted)
    with torch.no_grad():
        lc, lx = model(clean), model(corrupted)  # full logits [batch, pos, vocab]
        assert torch.allclose(p.run()[0], lc, atol=1e-5)
        assert torch.allclose(p.run(masks=p.all_masks(0.0))[0], lx, atol=1e-5)
        assert torch.allclose(p.run(masks=p.all_masks(1.0))[0], lc, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "eap-ig", "acdc"])
def test_method_recovers_planted_edges(setup, method):
    s, positive, comps = setup["vec"][method], setup["positive"], setup["g"].components
    assert _auc(s.abs(), positive) >= 0.95
    k = int(positive.sum())
    top = set(s.abs().topk(k).indices.tolist())
    hits = sum(bool(positive[i]) for i in top)
    assert hits / k >= 0.9 and hits / int(positive.sum()) >= 0.9, [comps[i] for i in top]


def test_acdc_kept_set(setup):
    p = Patcher(setup["model"], setup["g"], setup["clean"], setup["corrupted"])
    with torch.no_grad():
        m_full = float(setup["metric"](p.run()[0]))
        m_empty = float(setup["metric"](p.run(masks=p.all_masks(0.0))[0]))
    kept = set(acdc_kept(setup["scores"]["acdc"], acdc_default_tau(m_full, m_empty)))
    true = setup["true"]
    assert kept and len(kept & true) / len(kept) >= 0.9 and len(kept & true) / len(true) >= 0.9, kept


def test_eap_ig_agrees_with_exact(setup):
    ex, ig = _denoise(setup["vec"]["exact"]), _denoise(setup["vec"]["eap-ig"])
    assert _spearman(ex, ig) >= 0.9
    assert (torch.sign(ex) == torch.sign(ig)).all()


def test_eap_misses_edges_acting_through_saturated_attention(setup):
    """Plain EAP is exact on the linear paths (value -> output -> logits) but sees ~0 for edges that
    act through a nearly hard attention pattern: the reason EAP-IG exists (Hanna et al. 2024)."""
    ex, eap = setup["scores"]["exact"], setup["scores"]["eap"]
    for e in ("a1.h0->logits", "input->a1.h0.v"):
        assert eap[e] == pytest.approx(ex[e], rel=1e-4)
    for e in ("input->a1.h0.q", "a0.h0->a1.h0.k", "input->a0.h0.v"):
        assert abs(eap[e]) < 1e-3 * abs(ex[e])


def test_positional_edges_are_invisible_to_resample_but_not_to_zero_ablation(setup):
    ex = setup["scores"]["exact"]
    for e in ("input->a0.h0.q", "input->a0.h0.k"):
        assert abs(ex[e]) < 1e-5  # positions are the same in clean and corrupted runs
    zero = attribute(setup["model"], setup["clean"], None, setup["metric"], method="exact", corruption="zero",
                     graph=setup["g"], progress=False)
    for e in ("input->a0.h0.q", "input->a0.h0.k"):
        assert abs(zero[e]) > 1.0
