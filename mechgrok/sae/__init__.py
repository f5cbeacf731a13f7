"""Sparse autoencoder features: train SAEs with sae-lens on captured activations, evaluate them,
label memorizing and generalizing features, and intervene on them.

Typical use (``model``, ``task`` from ``mg.presets.build`` or a run)::

    sae = mg.sae.train(model, task, hook="blocks.0.mlp.hook_post", architecture="topk", d_sae=512, k=16)
    cfg = mg.sae.SAEConfig(architecture="jumprelu", d_sae=1024, steps=2000)   # or one config object
    sae = mg.sae.train(model, task, "blocks.0.mlp.hook_post", cfg)
    mg.sae.evaluate(model, sae, task)["by_split"]["test"]["explained_variance"]
    feats = mg.sae.features(model, sae, task)
    mg.evaluate(mg.sae.ablate(model, sae, feats.memorizing), task)
    mg.sae.feature_overlap(model, sae, multi_task)["pairs"]["add|sub"]["jaccard"]   # features shared by tasks

Any model, every position (a raw Hugging Face GPT-2 and token ids ``[N, T]``; hook = a module path)::

    sae = mg.sae.train(hf_model, tokens, hook="transformer.h.0", position="all")   # [N, T, d] -> [N * T, d]
    mg.sae.evaluate(hf_model, sae, tokens)["spliced"]["all"]["loss"]              # next-token loss, spliced
    mg.sae.features(hf_model, sae, tokens).top_examples(3)                        # rows n * T + t

References: Bricken et al. 2023 (Towards monosemanticity), Gao et al. 2024 (Scaling and evaluating
sparse autoencoders: TopK), Bussmann et al. 2024 (BatchTopK), Rajamanoharan et al. 2024 (JumpReLU).
"""

from mechgrok.sae.evaluate import evaluate, next_token_metrics, reconstruction
from mechgrok.sae.features import LABELS, FeatureStats, features
from mechgrok.sae.intervene import ablate, ablation_study, edit, mean_ablate, splice
from mechgrok.sae.over_training import over_training, pick_steps
from mechgrok.sae.reuse import cross_ablation, feature_overlap, select_features, task_attribution
from mechgrok.sae.train import ARCHITECTURES, SAEConfig, activations, load, site, train

__all__ = ["train", "SAEConfig", "load", "activations", "site", "ARCHITECTURES", "evaluate", "reconstruction",
           "next_token_metrics", "features",
           "FeatureStats", "LABELS", "splice", "ablate", "mean_ablate", "edit", "ablation_study",
           "over_training", "pick_steps", "task_attribution", "select_features", "feature_overlap",
           "cross_ablation"]
