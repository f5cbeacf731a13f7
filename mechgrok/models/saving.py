"""Saving and loading models: safetensors for the weights, JSON for how to rebuild the model.

``save`` / ``load`` handle the models ``transformer`` and ``mlp`` build (their spec is the builder's
arguments) and any other ``HookedTransformer`` (its transformer-lens config, see ``config_json``).
Nothing is pickled.

>>> import tempfile, torch
>>> from mechgrok import models
>>> model = models.mlp(p=5, d_out=5, width=8, seed=1)
>>> spec(model)
{'kind': 'mlp', 'kwargs': {'width': 8, 'act': 'square', 'bias': False, 'seed': 1, 'p': 5, 'd_out': 5}}
>>> with tempfile.TemporaryDirectory() as tmp:
...     back = load(save(model, f"{tmp}/model"))
>>> x = torch.tensor([[1, 2], [3, 4]])
>>> torch.equal(back(x), model(x))
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mechgrok._io import atomic_dir, atomic_write_text, read_safetensors
from mechgrok.models._tl import TL_VERSION, HookedTransformer, _quiet_build
from mechgrok.models.builders import mlp, transformer
from mechgrok.models.config_json import _config_from_json, _config_to_json
from mechgrok.models.devices import _device

__all__ = ["save", "load", "spec", "build", "state_tensors", "load_state"]

_BUILDERS = {"transformer": transformer, "mlp": mlp}
_NOT_IN_SPECS = ("task", "config", "device")  # builder arguments a spec never holds


def spec(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``, as JSON: ``{"kind": "transformer" | "mlp", "kwargs": ...}`` for the
    models built here, ``{"kind": "hooked_transformer", "config": ..., "source": ...}`` (the
    transformer-lens config, and ``mechgrok_source`` when set) for any other ``HookedTransformer``."""
    s = getattr(model, "mechgrok_spec", None)
    if s is not None:
        return s
    if type(model) is HookedTransformer:
        out: dict[str, Any] = {"kind": "hooked_transformer", "config": _config_to_json(model.cfg)}
        if getattr(model, "mechgrok_source", None) is not None:
            out["source"] = dict(model.mechgrok_source)
        return out
    if isinstance(model, HookedTransformer):
        raise ValueError(f"a {type(model).__name__} (a subclass of HookedTransformer) cannot be rebuilt from its "
                         "transformer-lens config, so mechgrok cannot save it; save its state_dict with safetensors")
    raise ValueError(f"mechgrok saves HookedTransformer and HookedMLP models, not a {type(model).__name__}; convert a "
                     "Hugging Face model with mg.models.from_pretrained, or save its state_dict with safetensors")


def build(model_spec: dict[str, Any], *, device: str | torch.device | None = None) -> nn.Module:
    """Build a model from a ``spec`` dict (``{"kind": "transformer" | "mlp", "kwargs": {...}}`` or
    ``{"kind": "hooked_transformer", "config": {...}}``) on ``device`` (default: torch's default
    device). Builders' models are freshly initialised; a ``hooked_transformer``'s weights are left
    uninitialised for ``load_state`` to fill."""
    import inspect

    if not isinstance(model_spec, dict) or not isinstance(model_spec.get("kwargs", {}), dict):
        raise ValueError(f"a model spec is a dict {{'kind': ..., 'kwargs': {{...}}}}, got {model_spec!r:.200}")
    kind = model_spec.get("kind")
    target = _device(device, "models.build")
    if kind == "hooked_transformer":
        return _build_hooked_transformer(model_spec, target)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted([*_BUILDERS, 'hooked_transformer'])}")
    kwargs = model_spec.get("kwargs", {})
    known = [k for k in inspect.signature(_BUILDERS[kind]).parameters if k not in _NOT_IN_SPECS]
    if unknown := sorted(set(kwargs) - set(known)):
        raise ValueError(f"model spec of kind {kind!r} has unknown arguments {unknown}; known: {known}")
    return _BUILDERS[kind](None, **kwargs, device=target)


def _build_hooked_transformer(model_spec: dict[str, Any], device: torch.device) -> HookedTransformer:
    """A ``HookedTransformer`` of the saved config (weights uninitialised: ``load_state`` fills them)."""
    if unknown := sorted(set(model_spec) - {"kind", "config", "source"}):
        raise ValueError(f"a model spec of kind 'hooked_transformer' has keys kind, config, source; got also {unknown}")
    saved = model_spec.get("config")
    cfg = _config_from_json(saved, device=device)
    tokenizer_name, cfg.tokenizer_name = cfg.tokenizer_name, None  # no tokenizer is loaded (nor downloaded)
    model = _quiet_build(HookedTransformer, cfg)
    cfg.tokenizer_name, cfg.init_weights = tokenizer_name, saved.get("init_weights", True)
    if model_spec.get("source") is not None:
        model.mechgrok_source = dict(model_spec["source"])
    return model.eval()


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.json`` (spec, versions) and ``path/model.safetensors`` atomically.

    Any ``HookedTransformer`` (its transformer-lens config goes into the spec) or ``HookedMLP``; the
    weights are saved from whatever device they are on. Nothing is pickled.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():  # atomic_dir would replace the file by a folder
        raise FileExistsError(f"{path} is a file; a model is saved as a folder (model.json + model.safetensors): "
                              "choose another path")
    meta = {"format": "mechgrok.model/1", "spec": spec(model), "transformer_lens": TL_VERSION,
            "torch": torch.__version__}
    text = json.dumps(meta, indent=2)  # before anything is written: a config that is not JSON fails here
    with atomic_dir(path) as tmp:
        save_file(state_tensors(model), str(tmp / "model.safetensors"))
        atomic_write_text(tmp / "model.json", text)
    return path


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters as a flat dict of contiguous CPU tensors (for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}


def load_state(model: nn.Module, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy parameters from ``tensors`` into ``model`` in place (onto its device), checking names and shapes."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tensors[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, model wants {tuple(p.shape)}")
            p.copy_(tensors[k])


def load(path: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by ``save`` (safetensors + JSON; nothing is unpickled) onto ``device``
    (default: torch's default device). Its logits equal the saved model's."""
    path = Path(path)
    meta_file, weights = path / "model.json", path / "model.safetensors"
    if not meta_file.exists() or not weights.exists():
        raise FileNotFoundError(f"{path} is not a saved model: expected model.json and model.safetensors")
    try:
        meta = json.loads(meta_file.read_text())
        spec_ = meta["spec"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is damaged ({type(e).__name__}: {e}); save the model again") from None
    try:
        model = build(spec_, device=device)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_file}: {e}") from None
    load_state(model, read_safetensors(weights), source=str(weights))
    return model
