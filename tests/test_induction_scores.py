"""Induction-head scores (mg.measures.induction_scores) against by-hand computations."""

import pytest
import torch

import mechgrok as mg
from mechgrok.measures import induction_scores, repeated_sequences


def model(**kw):
    return mg.models.transformer(d_vocab=20, d_vocab_out=20, n_ctx=13, n_layers=2, d_model=16, n_heads=2, d_mlp=16,
                                 seed=1, **kw)


def test_prefix_matching_and_losses_by_hand():
    m = model(normalization="LN")
    s = induction_scores(m, bos=19, n=5, seed=3)
    assert s.segment == 6  # (13 - 1) // 2
    x = repeated_sequences(5, 6, 19, 19, seed=3)
    assert x.shape == (5, 13) and bool((x[:, 1:7] == x[:, 7:]).all()) and bool((x[:, 0] == 19).all())
    _, cache = m.run_with_cache(x)
    for layer in range(2):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [n, h, q, k]
        for h in range(2):
            vals = [float(pat[b, h, t, t - 6 + 1]) for b in range(5) for t in range(7, 13)]
            assert float(s.prefix_matching[layer, h]) == pytest.approx(sum(vals) / len(vals), rel=1e-9)
    with torch.no_grad():
        logp = torch.log_softmax(m(x).double(), -1)
    first = [-float(logp[b, t, x[b, t + 1]]) for b in range(5) for t in range(1, 6)]
    second = [-float(logp[b, t, x[b, t + 1]]) for b in range(5) for t in range(7, 12)]
    assert s.loss_first == pytest.approx(sum(first) / len(first), rel=1e-6)
    assert s.loss_second == pytest.approx(sum(second) / len(second), rel=1e-6)
    assert s.in_context_gain == pytest.approx(s.loss_first - s.loss_second)
    with torch.no_grad():
        pred = m(x).argmax(-1)
    right = [bool(pred[b, t] == x[b, t + 1]) for b in range(5) for t in range(7, 12)]
    assert s.acc_second == pytest.approx(sum(right) / len(right))
    assert s.strength == float(s.prefix_matching[1].max()) and s.best_head()[0] == 1


def test_copying_is_the_eigenvalue_ratio_of_the_full_ov_circuit():
    m = model()
    s = induction_scores(m, n=2)
    for layer in range(2):
        for h in range(2):
            full = (m.W_E.double() @ m.blocks[layer].attn.W_V[h].double() @ m.blocks[layer].attn.W_O[h].double()
                    @ m.W_U.double())  # [V, V]
            lam = torch.linalg.eigvals(full)
            assert float(s.copying[layer, h]) == pytest.approx(float(lam.real.sum() / lam.abs().sum()), abs=1e-9)
    assert bool(((s.copying >= -1) & (s.copying <= 1)).all())


def test_bad_input():
    m = model()
    with pytest.raises(ValueError, match="segment must be in"):
        induction_scores(m, segment=7)  # 2 * 7 > 13
    with pytest.raises(ValueError, match="bos must be in"):
        induction_scores(m, bos=20)
    with pytest.raises(TypeError, match="HookedTransformer"):
        induction_scores(mg.models.mlp(p=5, d_out=5, width=4))
