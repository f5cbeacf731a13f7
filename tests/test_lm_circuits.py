"""Generalizing vs memorizing circuits of a language model (mg.memorization.lm_circuits)."""

import pytest
import torch

import mechgrok as mg
from mechgrok.memorization import lm_circuits, sequence_prompts
from mechgrok.tasks import IGNORE


@pytest.fixture(scope="module")
def trained():
    task = mg.tasks.lm_corpus(n_structured=128, n_planted=16, repeats=(1, 30), n_held_out=16, seq_len=10, d_vocab=16)
    model = mg.models.transformer(task, n_layers=2, d_model=32, n_heads=2, d_mlp=32, seed=0)
    mg.train(model, task, mg.TrainConfig(steps=300, lr=1e-2, batch_size=32, weight_decay=0.0, eval_every=300),
             progress=False)
    return task, model


def test_sequence_prompts_read_the_last_target(trained):
    task, _ = trained
    p = sequence_prompts(task, "planted_r30", n=5, seed=1)
    rows = [next(r for r in task.mask("planted_r30").nonzero().flatten().tolist()
                 if torch.equal(task.inputs[r], p.clean[i])) for i in range(len(p))]
    for i, r in enumerate(rows):
        t = int(p.answer_pos[i])
        assert task.targets[r, t] != IGNORE and bool((task.targets[r, t + 1:] == IGNORE).all())
        assert int(p.correct[i]) == int(task.targets[r, t])
        held = [h for h in task.mask("held_out_planted").nonzero().flatten().tolist()
                if torch.equal(task.inputs[h], p.corrupted[i])]
        assert held and int(p.incorrect[i]) == int(task.inputs[held[0], t + 1])
    with pytest.raises(ValueError, match="is empty"):
        sequence_prompts(task.with_groups(none=torch.zeros(task.n, dtype=torch.bool)), "none")
    with pytest.raises(TypeError, match="SequenceTask"):
        sequence_prompts(mg.tasks.modular_arithmetic(p=5), "test")


@pytest.mark.slow(seconds=8)
def test_both_circuits_reach_their_faithfulness(trained):
    task, model = trained
    r = lm_circuits(model, task, level="neuron", baseline=50)
    assert r.memorizing_group == "planted_r30"
    for c in (r.generalizing, r.memorizing):
        assert c.provenance["faithfulness"] >= 0.8
        assert 0 < len(c) < len(mg.circuits.graph(model, "neuron"))
    assert 0 <= r.overlap["jaccard"]["value"] <= 1 and "baseline_mean" in r.overlap["jaccard"]
    d = r.to_dict()
    assert d["generalizing"]["size"] == len(r.generalizing)
    with pytest.raises(ValueError, match="no planted_r"):
        lm_circuits(model, mg.tasks.lm_corpus(n_structured=20, n_planted=0, n_held_out=2, seq_len=10, d_vocab=16))


@pytest.mark.slow(seconds=10)
def test_planted_feature_rates_by_hand(trained, tmp_path):
    from mechgrok.memorization import planted_features
    from mechgrok.sae.train import encode

    task, model = trained
    hook = "blocks.1.mlp.hook_post"
    sae = mg.sae.train(model, task.inputs, hook, position="all", architecture="topk", d_sae=16, k=4, steps=60,
                       progress=False, out=tmp_path / "sae")
    fs = planted_features(model, sae, task, batch_size=7)
    _, cache = model.run_with_cache(task.inputs)
    for g, rate in (("planted_r30", fs.rate_group), ("structured_train", fs.rate_reference),
                    ("held_out_planted", fs.rate_unseen)):
        m = task.mask(g)
        x = cache[hook][m][task.loss_mask[m]]  # [tokens, d_mlp]
        want = (encode(sae, x) > 0).double().mean(0)
        assert torch.allclose(rate, want, atol=1e-12), g
    sel = fs.rate_group - torch.maximum(fs.rate_reference, fs.rate_unseen)
    assert torch.equal(fs.selectivity, sel)
    assert fs.top(3) == torch.sort(-sel, stable=True).indices[:3].tolist()
    last = mg.sae.train(model, task.inputs, hook, position=-1, architecture="topk", d_sae=16, k=4, steps=10,
                        progress=False, out=tmp_path / "sae_last")
    with pytest.raises(ValueError, match="position='all'"):
        planted_features(model, last, task)
