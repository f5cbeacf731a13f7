"""Build, convert, save and load the models mechgrok studies.

Every model is a transformer-lens ``HookedRootModule``, so every analysis speaks hook names:

- ``transformer(task, ...)``: a ``HookedTransformer`` with no LayerNorm and ReLU by default, as in
  the grokking papers (Nanda et al. 2023); options for rotary or shortformer positions, parallel
  attention + MLP, grouped-query attention, gated MLPs, attention-only models, or any
  ``HookedTransformerConfig`` (``config=``).
- ``mlp(task, width, act, ...)``: ``HookedMLP``, one-hot(a) ‖ one-hot(b) -> ``W_in`` -> act ->
  ``W_out`` -> logits, no biases by default (Doshi et al. 2023). Its weights live at
  ``blocks.0.mlp.W_in`` / ``W_out`` and its hooks at ``blocks.0.mlp.hook_pre`` / ``hook_post``,
  the same paths as a 1-layer transformer's MLP, so neuron analyses serve both.
- ``from_pretrained(folder_or_hf_model)``: a Hugging Face causal LM converted, offline, by
  transformer-lens's own conversion code (``PRETRAINED_ARCHITECTURES``).

``save`` / ``load`` handle all of them, and any other ``HookedTransformer``: safetensors for the
weights, JSON for how to rebuild the model (a builder's arguments, or the transformer-lens config).

Where things live: ``builders`` (``transformer``, ``mlp``), ``hooked_mlp`` (``HookedMLP``),
``pretrained`` (``from_pretrained``), ``saving`` (``save``, ``load``, ``spec``, ``build``),
``config_json`` (transformer-lens configs as JSON), ``logits`` (``final_logits``,
``training_logits``), ``structure`` (``n_layers``, ``has_mlp``, ``mlp_hook``, ``patchable``),
``checks`` (``check_compatible``, ``check_inputs``), ``devices`` (``device_of``).

``_tl`` is the only module that imports transformer-lens and knows which version is installed:
other modules import ``HookedRootModule``, ``HookPoint`` and ``HookedTransformer`` from
``mechgrok.models``.

>>> import mechgrok as mg
>>> task = mg.tasks.modular_arithmetic(p=7, train_frac=0.5, seed=0)
>>> model = mg.models.mlp(task, width=8)
>>> mg.models.final_logits(model, task.inputs).shape  # [N, d_vocab_out]
torch.Size([49, 7])
"""

from mechgrok.models._tl import (POST_NORM_ARCHITECTURES, TL_VERSION, HookedRootModule, HookedTransformer,
                                 HookedTransformerConfig, HookPoint)
from mechgrok.models.builders import POSITIONAL, TRANSFORMER_ACTS, mlp, transformer
from mechgrok.models.checks import check_compatible, check_inputs
from mechgrok.models.devices import device_of
from mechgrok.models.hooked_mlp import MLP_ACTS, HookedMLP
from mechgrok.models.logits import final_logits, training_logits
from mechgrok.models.pretrained import PRETRAINED_ARCHITECTURES, from_pretrained
# load_state and state_tensors (checkpoints.py, run.py, benchmarks) are public but, as before, not in __all__
from mechgrok.models.saving import build, load, load_state, save, spec, state_tensors
from mechgrok.models.structure import has_mlp, mlp_hook, mlp_kind, n_layers, patchable

# Private helpers kept at the address they had when models was one file: tests/test_pretrained.py
# monkeypatches ``models._tl_loading.get_pretrained_state_dict`` (an attribute of transformer-lens's
# module, so from_pretrained sees the patch) and calls ``models._fast_last_block``; the argument, device
# and warning helpers are there for modules that reuse them.
from mechgrok.models._args import _check_bool, _check_choice  # noqa: F401
from mechgrok.models._tl import _quiet_build, _tl_loading  # noqa: F401
from mechgrok.models.devices import _device, _to_device  # noqa: F401
from mechgrok.models.logits import _fast_last_block  # noqa: F401

__all__ = ["HookedMLP", "HookedRootModule", "HookPoint", "HookedTransformer", "HookedTransformerConfig",
           "transformer", "mlp", "from_pretrained", "save", "load", "spec", "build", "final_logits",
           "training_logits", "patchable", "check_compatible", "check_inputs", "mlp_hook", "n_layers", "has_mlp", "mlp_kind",
           "device_of", "TL_VERSION", "TRANSFORMER_ACTS", "MLP_ACTS", "POSITIONAL",
           "PRETRAINED_ARCHITECTURES", "POST_NORM_ARCHITECTURES"]
