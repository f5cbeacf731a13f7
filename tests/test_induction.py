"""A 2-layer GPT-2-style model (LayerNorm, GELU, biases, learned positions) trained with mg.train on
in-context copying learns an induction circuit, and every circuit method finds it.

In this model the previous-token information reaches the induction heads' keys through MLP 0 (as
MLP 0 of GPT-2 small acts as an extended embedding), so the circuit is the path
``prev-token head -> m0 -> induction head (key) -> logits``; the heads are identified from their
attention patterns, not from the scores.
"""

import pytest
import torch

import mechgrok as mg
from mechgrok.circuits import Prompts, attribute, metrics

V, T = 24, 10
TOP = 16  # edges per method's circuit (of 46)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    task = mg.tasks.induction(d_vocab=V, n_ctx=T, n=12000, seed=0)
    model = mg.models.transformer(task, n_layers=2, d_model=32, n_heads=2, d_mlp=64, act_fn="gelu",
                                  normalization="LN", seed=0)
    cfg = mg.TrainConfig(steps=800, lr=3e-3, weight_decay=0.1, batch_size=256, warmup=50, eval_every=200,
                         checkpoint_every=400)
    out = tmp_path_factory.mktemp("induction") / "run"
    mg.train(model, task, cfg, out, progress=False)
    return task, model, out


def _prompts(task, n: int = 64) -> Prompts:
    test = torch.nonzero(task.test).flatten()
    clean, corrupted = task.inputs[test[:n]], task.inputs[test[n:2 * n]]  # an unrelated sequence each
    y, yc = task.labels[test[:n]], task.labels[test[n:2 * n]]
    return Prompts(clean, corrupted, correct=y, incorrect=torch.where(yc == y, (y + 1) % (V - 1), yc))


def _heads(model, clean) -> tuple[int, int]:
    """The layer-0 head attending most to the previous token and the layer-1 head attending most
    from the last position to the token after the cue."""
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_pattern"))
    p0, p1 = cache["blocks.0.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]  # [b, head, q, k]
    k = torch.arange(1, T)
    prev = p0[:, :, k, k - 1].mean((0, 2))  # [head]
    cue = (clean[:, :-1] == clean[:, -1:]).float().argmax(1)  # [b]
    ind = p1[torch.arange(len(clean)), :, -1, cue + 1].mean(0)  # [head]
    assert float(prev.max()) > 0.4 and float(ind.max()) > 0.8, (prev, ind)
    return int(prev.argmax()), int(ind.argmax())


@pytest.mark.slow(seconds=45)
def test_every_method_finds_the_induction_circuit(trained):
    task, model, _ = trained
    assert mg.evaluate(model, task)["test"]["acc"] > 0.95
    p = _prompts(task)
    prev, ind = _heads(model, p.clean)
    path = {f"a0.h{prev}->m0", f"m0->a1.h{ind}.k", f"a1.h{ind}->logits"}
    for method in ("exact", "eap", "eap-ig", "acdc"):
        circ = mg.circuits.discover(model, p, metrics.logit_diff(), method=method, level="edge", top_k=TOP,
                                    progress=False)
        assert path <= set(circ.components), (method, sorted(path - set(circ.components)))
    exact = attribute(model, p, metrics.logit_diff(), method="exact", level="node", progress=False)
    top = sorted(exact, key=lambda c: -abs(exact[c]))[:5]
    assert f"a0.h{prev}" in top and f"a1.h{ind}" in top


@pytest.mark.slow(seconds=20)
def test_induction_run_reloads_and_reports(trained):
    task, model, out = trained
    run = mg.Run(out)
    again = run.load_model()
    assert torch.equal(again(task.inputs[:8]), model(task.inputs[:8]))
    assert run.task().config["kind"] == "induction"
    mg.analyze(run, only=["progress", "circuits"], progress=False)
    html = mg.report.build(run).read_text()
    assert "induction" in html and "ircuit" in html


@pytest.mark.slow(seconds=30)
def test_a_converted_hugging_face_model_trains_saves_and_reports(tmp_path):
    """A Hugging Face GPT-2 checkpoint folder -> from_pretrained -> mg.train -> reload -> report."""
    from transformers import GPT2Config, GPT2LMHeadModel

    task = mg.tasks.induction(d_vocab=V, n_ctx=T, n=600, seed=1)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=T, vocab_size=V, bos_token_id=0,
                                    eos_token_id=0))
    hf.save_pretrained(tmp_path / "checkpoint")
    model = mg.models.from_pretrained(tmp_path / "checkpoint")
    cfg = mg.TrainConfig(steps=30, lr=3e-3, weight_decay=0.1, batch_size=128, eval_every=10, checkpoint_every=15)
    mg.train(model, task, cfg, tmp_path / "run", progress=False)
    run = mg.Run(tmp_path / "run")
    assert torch.equal(run.load_model()(task.inputs[:4]), model(task.inputs[:4]))
    mg.analyze(run, only=["progress", "circuits"], progress=False)
    html = mg.report.build(run).read_text()
    assert "GPT2LMHeadModel" in html and "n_layers=2" in html  # the model line names what it is
