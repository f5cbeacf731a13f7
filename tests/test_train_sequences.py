"""Next-token training on a SequenceTask: the loss over the loss mask, epochs with repetition,
per-group evaluation, run folders that resume bitwise, and clear errors for what cannot train."""

import json
import math

import pytest
import torch

import mechgrok as mg
from mechgrok import losses, models
from mechgrok.tasks import IGNORE, SequenceTask
from mechgrok._training import _next_token_loss, _SequenceBatches
from mechgrok.evaluation import SEQUENCE_METRICS


@pytest.fixture(scope="module")
def corpus():
    return mg.tasks.lm_corpus(n_structured=96, n_planted=12, repeats=(1, 5), n_held_out=6, seq_len=10, d_vocab=16,
                              seed=0)


def tiny(task, seed=0, **kw):
    return models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=seed, **kw)


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_epochs_hold_each_train_row_repeats_times_and_batches_depend_on_the_step_only(corpus):
    b = _SequenceBatches(corpus, batch_size=7, seed=3)
    reps = corpus.metadata["repeats"]
    per_epoch = int(reps[corpus.train].sum())
    assert b.per_epoch == per_epoch
    stream = torch.cat([b.rows(s) for s in range(3 * per_epoch // 7)])  # three epochs' worth, batches spanning epochs
    for e in range(2):
        epoch = stream[e * per_epoch:(e + 1) * per_epoch]
        counts = torch.bincount(epoch, minlength=corpus.n)
        assert torch.equal(counts, torch.where(corpus.train, reps, 0)), e  # exactly `repeats` times each, per epoch
    assert not torch.equal(stream[:per_epoch], stream[per_epoch:2 * per_epoch])  # reshuffled each epoch
    fresh = _SequenceBatches(corpus, batch_size=7, seed=3)  # a resumed run rebuilds the same batches from the step
    assert torch.equal(fresh.rows(40), b.rows(40))
    assert not torch.equal(_SequenceBatches(corpus, batch_size=7, seed=4).rows(0), b.rows(0))
    full = _SequenceBatches(corpus, batch_size=None, seed=0)
    assert torch.equal(torch.bincount(full.rows(5), minlength=corpus.n), torch.where(corpus.train, reps, 0))


def test_training_loss_is_the_mean_over_the_batch_target_tokens(corpus):
    """The loss a step minimizes is the mean of the per-token losses over the batch's target tokens,
    a row drawn twice counting twice; computed here token by token."""
    model = tiny(corpus)
    rows = torch.tensor([0, 0, 3, int(corpus.mask("planted_r5").nonzero()[0]), int(corpus.test.nonzero()[0])])
    logits = model(corpus.inputs[rows]).double()  # [5, T, V]
    y = corpus.targets[rows]
    by_hand = torch.stack([-torch.log_softmax(logits[i, t], -1)[y[i, t]]
                           for i in range(len(rows)) for t in range(corpus.n_ctx) if y[i, t] != IGNORE]).mean()
    got = _next_token_loss(model, corpus, rows, losses.cross_entropy)
    assert float(got.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-9)
    got.backward()  # it is the loss the optimizer sees: differentiable
    assert model.W_E.grad is not None and float(model.W_E.grad.abs().sum()) > 0
    # the full batch is one epoch: every train row `repeats` times, unshuffled
    full = _SequenceBatches(corpus, batch_size=None, seed=0).rows(0)
    assert torch.equal(full, torch.repeat_interleave(corpus.train.nonzero().squeeze(1),
                                                     corpus.metadata["repeats"][corpus.train]))


def test_history_has_every_group_metric_and_matches_evaluate(tmp_path, corpus):
    cfg = mg.TrainConfig(steps=30, lr=3e-3, batch_size=16, eval_every=10, checkpoint_every=20, weight_decay=0.1)
    model = tiny(corpus)
    run = mg.train(model, corpus, cfg, out=tmp_path / "r", progress=False)
    h = run.history()
    assert [r["step"] for r in h] == [0, 10, 20, 30]
    want = {f"{g}_{m}" for g in corpus.groups for m in SEQUENCE_METRICS} | {"step", "weight_norm", "lr", "elapsed_s"}
    assert set(h[-1]) == want
    assert h[-1]["train_loss"] < h[0]["train_loss"]  # it learns
    ev = mg.evaluate(run.load_model(), corpus)
    for g in corpus.groups:
        for m in SEQUENCE_METRICS:
            assert ev[g][m] == pytest.approx(h[-1][f"{g}_{m}"], rel=1e-9, abs=1e-12), (g, m)
    assert isinstance(run.task(), SequenceTask) and torch.equal(run.task().targets, corpus.targets)
    assert "objective" not in json.loads((run.path / "config.json").read_text())["train"]
    # objective="next_token" is the same run as "auto": it resumes (here: nothing left to do)
    mg.train(run.load_model(), corpus, cfg.replace(objective="next_token"), out=run.path, progress=False)


def test_sequence_metrics_by_hand_and_exact_equals_extractability(corpus):
    """`exact` (teacher forcing, every target right) equals greedy extractability from the first
    token for sequences with a target at every position, the planted ones (SEQUENCE_METRICS)."""
    torch.manual_seed(0)
    model = tiny(corpus)
    mg.train(model, corpus, mg.TrainConfig(steps=150, lr=1e-2, batch_size=32, weight_decay=0.0, eval_every=150),
             progress=False)
    ev = mg.evaluate(model, corpus)
    for g in ("planted_r1", "planted_r5", "held_out_planted", "test"):
        m = corpus.mask(g)
        logits = model(corpus.inputs[m]).double()
        y = corpus.targets[m]
        keep = y != IGNORE
        nll = torch.nn.functional.cross_entropy(logits[keep], y[keep])
        right = logits.argmax(-1) == y
        assert ev[g]["loss"] == pytest.approx(float(nll), rel=1e-9)
        assert ev[g]["acc"] == pytest.approx(float(right[keep].double().mean()), abs=1e-12)
        exact = (right | ~keep).all(-1)
        assert ev[g]["exact"] == pytest.approx(float(exact.double().mean()), abs=1e-12)
        if g.startswith(("planted", "held_out")):
            x = mg.memorization.extract(model, corpus, k=1, split=g)
            assert torch.equal(x.extractable, exact), g
    assert ev["planted_r5"]["exact"] > 0  # the check above saw some extractable sequences


def test_resume_is_bitwise_identical_for_next_token_runs(tmp_path, corpus):
    cfg = mg.TrainConfig(steps=40, lr=3e-3, batch_size=16, eval_every=10, checkpoint_every=20, dropout=0.1)
    full = tiny(corpus)
    mg.train(full, corpus, cfg, out=tmp_path / "full", progress=False)
    part = tiny(corpus)
    mg.train(part, corpus, cfg, out=tmp_path / "part", progress=False, stop_at=20)
    resumed = tiny(corpus)
    with torch.no_grad():  # other weights: resuming must restore them all
        for p in resumed.parameters():
            p.zero_()
    run = mg.train(resumed, corpus, cfg, out=tmp_path / "part", progress=False)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in run.history()]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in mg.Run(tmp_path / "full").history()]


@pytest.mark.parametrize("name", ["mse", "stablemax", "cross_entropy"])
def test_losses_per_example_average_to_the_mean(name):
    torch.manual_seed(0)
    logits, labels = torch.randn(9, 5), torch.randint(0, 5, (9,))
    fn = losses.loss_fn(name)
    per = fn(logits, labels, reduction="none")
    assert per.shape == (9,) and per.dtype == torch.float64
    assert float(per.mean()) == pytest.approx(float(fn(logits, labels)), rel=1e-12)
    for i in range(9):
        assert float(per[i]) == pytest.approx(float(fn(logits[i:i + 1], labels[i:i + 1])), rel=1e-12)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        fn(logits, labels, reduction="sum")


def test_what_cannot_train_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(TypeError, match="SequenceTask .* needs a HookedTransformer"):
        mg.train(mg.models.mlp(p=15, d_out=16, width=8), corpus, progress=False)
    with pytest.raises(TypeError, match="SequenceTask .*build a transformer"):
        mg.models.mlp(corpus)
    short = models.transformer(d_vocab=16, d_vocab_out=16, n_ctx=6, d_model=8, n_heads=2, d_mlp=8)
    with pytest.raises(ValueError, match=r"n_ctx: model 6 < task 10"):
        mg.train(short, corpus, progress=False)
    with pytest.raises(ValueError, match=r"d_vocab_out: model 8 < task 16"):
        mg.evaluate(models.transformer(d_vocab=16, d_vocab_out=8, n_ctx=10, d_model=8, n_heads=2, d_mlp=8), corpus)
    with pytest.raises(ValueError, match="objective='last_token' does not fit .* 'next_token'"):
        mg.train(tiny(corpus), corpus, mg.TrainConfig(objective="last_token"), progress=False)
    arith = mg.tasks.modular_arithmetic(p=7)
    with pytest.raises(ValueError, match="objective='next_token' does not fit .* 'last_token'"):
        mg.train(tiny(arith), arith, mg.TrainConfig(objective="next_token"), progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        mg.TrainConfig(objective="causal")
    silent = SequenceTask("silent", corpus.inputs, torch.full_like(corpus.targets, IGNORE), groups=corpus.groups,
                          d_vocab=16, metadata=corpus.metadata)
    with pytest.raises(ValueError, match="no training sequence has a target"):
        mg.train(tiny(silent), silent, mg.TrainConfig(steps=2), out=tmp_path / "silent", progress=False)
    assert not (tmp_path / "silent" / "checkpoints").exists()  # refused before any step


def test_a_larger_brought_model_trains_and_scores(tmp_path, corpus):
    """A model with a larger vocabulary and context than the corpus (e.g. a converted checkpoint)
    trains on it and its metrics read only the corpus' targets."""
    big = models.transformer(d_vocab=40, d_vocab_out=40, n_ctx=24, d_model=16, n_heads=2, d_mlp=32)
    run = mg.train(big, corpus, mg.TrainConfig(steps=20, lr=3e-3, batch_size=16, eval_every=10), progress=False)
    h = run.history()
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert math.isfinite(h[-1]["held_out_planted_loss"])
