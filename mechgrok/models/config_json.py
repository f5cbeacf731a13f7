"""transformer-lens configs as JSON, and back: how any ``HookedTransformer`` is saved and copied.

Dtypes are written as ``{"torch.dtype": "float32"}``; ``device`` is left out (``load`` chooses it).

>>> import torch
>>> from mechgrok.models._tl import HookedTransformerConfig
>>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu",
...                               dtype=torch.float64)
>>> d = _config_to_json(cfg)
>>> d["dtype"], "device" in d
({'torch.dtype': 'float64'}, False)
>>> back = _config_from_json(d, device="cpu")
>>> (back.d_model, back.dtype, back.device)
(8, torch.float64, 'cpu')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mechgrok.models._tl import TL_VERSION, HookedTransformerConfig

# Not saved: where the model lives is chosen when it is loaded (``load(path, device=...)``).
_CONFIG_NOT_SAVED = ("device",)


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """``cfg``'s fields as JSON values (dtypes as ``{"torch.dtype": "float32"}``), without ``device``."""
    return {k: _json_value(v, k) for k, v in dict(cfg.to_dict()).items() if k not in _CONFIG_NOT_SAVED}


def _json_value(v: Any, field: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if isinstance(v, float):
        return float(v)  # numpy float64 is a float
    if isinstance(v, torch.dtype):
        return {"torch.dtype": str(v).removeprefix("torch.")}
    if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy / torch scalars
        return _json_value(v.item(), field)
    if isinstance(v, (list, tuple)):
        return [_json_value(x, field) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x, field) for k, x in v.items()}
    raise TypeError(f"cannot save the transformer-lens config field {field!r} = {v!r:.80} ({type(v).__name__}) as "
                    "JSON; set it to a plain value before saving")


def _from_json_value(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"torch.dtype"}:
            dtype = getattr(torch, str(v["torch.dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {v['torch.dtype']!r}")
            return dtype
        return {k: _from_json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json_value(x) for x in v]
    return v


def _config_from_json(d: Any, *, device: str | torch.device) -> HookedTransformerConfig:
    """The config ``_config_to_json`` wrote, on ``device``; no weight initialisation, no seeding.

    ``seed`` is set after construction: ``HookedTransformerConfig`` seeds torch, ``random`` and
    numpy globally when it is given one.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a transformer-lens config is a JSON object, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    if unknown := sorted(set(d) - fields):
        raise ValueError(f"the saved transformer-lens config has fields {unknown} that the installed transformer-lens "
                         f"{TL_VERSION} does not know; load it with the version that saved it")
    kw = {k: _from_json_value(v) for k, v in d.items()}
    seed = kw.pop("seed", None)
    cfg = HookedTransformerConfig(**{**kw, "seed": None, "init_weights": False, "device": str(device)})
    cfg.seed = seed
    return cfg
