"""Save and load fitted EK-FAC factors: ``ekfac.json`` + ``factors.safetensors``, atomic, no pickle.

``ekfac.json`` holds the settings (:class:`~mechgrok.influence.ekfac.EKFACConfig`), the absolute
damping of every map, the token and example counts, the maps' shapes and provenance (model class
and spec, a hash of the weights, the data's kind and name, the coverage, versions).
``factors.safetensors`` holds, per map ``NAME``: ``NAME/A``, ``NAME/S``, ``NAME/QA``, ``NAME/eigA``,
``NAME/QS``, ``NAME/eigS``, ``NAME/lambda`` (float64) and ``fit_idx``. Factors can be reused on
another checkpoint of the same architecture (the weight hash then differs and is logged), never on
a model whose maps differ, nor with data of another kind (a Task vs Sequences).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mechgrok import models
from mechgrok._io import atomic_dir, atomic_write_text, read_safetensors
from mechgrok.influence.data import Sequences
from mechgrok.tasks import Task

__all__ = ["save", "load", "FORMAT", "weights_hash"]

log = logging.getLogger(__name__)

FORMAT = "mechgrok.ekfac/1"
_FIELDS = ("A", "S", "QA", "eigA", "QS", "eigS", "lambda")


def _spec(model) -> dict | None:
    """How to rebuild ``model`` (``models.spec``), or None for a module mechgrok cannot rebuild."""
    try:
        return models.spec(model)
    except (TypeError, ValueError):
        return None


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the model's parameter names and bytes (to tell checkpoints apart)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save(ek, folder: str | Path) -> Path:
    """Write a fitted EKFAC's factors (safetensors) and settings (JSON) to ``folder``, atomically; returns it."""
    ek._check_fitted()
    folder = Path(folder)
    tensors = {"fit_idx": ek.fit_idx_.contiguous()}
    attrs = dict(A=ek.A_, S=ek.S_, QA=ek.QA_, eigA=ek.eigA_, QS=ek.QS_, eigS=ek.eigS_, **{"lambda": ek.lambda_})
    for m in ek.maps:
        for f in _FIELDS:
            tensors[f"{m.name}/{f}"] = attrs[f][m.name].detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "config": ek.config.to_dict(),
        "maps": {m.name: {"shape": list(m.shape), "onehot": m.onehot, "positions": m.positions} for m in ek.maps},
        "damping_": ek.damping_,
        "n_tokens_": ek.n_tokens_,
        "n_examples_": ek.n_examples_,
        "model": {"class": type(ek.model).__name__, "spec": _spec(ek.model),
                  "weights_sha256": weights_hash(ek.model)},
        "task": ek.data.name,
        "data": {"kind": "sequences" if ek.per_token else "task", "name": ek.data.name},
        "coverage": ek.coverage.to_dict(),
        "torch": torch.__version__,
    }
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "factors.safetensors"))
        atomic_write_text(tmp / "ekfac.json", json.dumps(meta, indent=2))
    return folder


def load(cls, folder: str | Path, model: nn.Module, data: Task | Sequences, **kwargs: Any):
    """An EKFAC of ``cls`` for ``model`` / ``data`` with the factors saved in ``folder`` (no refit, no pickle)."""
    folder = Path(folder)
    meta_file, tensor_file = folder / "ekfac.json", folder / "factors.safetensors"
    if not meta_file.exists() or not tensor_file.exists():
        raise FileNotFoundError(f"{folder} holds no saved EK-FAC factors (expected ekfac.json and "
                                "factors.safetensors, written by EKFAC.save)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    saved_class = meta["model"]["class"]
    if saved_class != type(model).__name__:
        raise ValueError(f"{folder} was fitted on a {saved_class}, not a {type(model).__name__}; load it with "
                         "the model it was fitted on")
    cfg = dict(meta["config"])
    modules = list(meta["maps"])
    cfg["modules"] = modules
    try:
        ek = cls(model, data, **cfg, **kwargs)
    except ValueError as e:
        raise ValueError(f"{folder} does not fit this model: {e}") from e
    kind = meta.get("data", {}).get("kind", "task")
    if kind != ("sequences" if ek.per_token else "task"):
        raise ValueError(f"{folder} was fitted on {'Sequences (a per-token loss)' if kind == 'sequences' else 'a Task'}"
                         f", not on {'Sequences' if ek.per_token else 'a Task'}; load it with data of that kind")
    diffs = [f"{m.name}: saved {meta['maps'][m.name]['shape']}, model {list(m.shape)}"
             for m in ek.maps if list(m.shape) != meta["maps"][m.name]["shape"]]
    if diffs:
        raise ValueError(f"{folder} was fitted on a model of another size ({'; '.join(diffs)}); fit new factors "
                         "for this model")
    if meta["model"]["weights_sha256"] != weights_hash(model):
        log.info("%s: factors were fitted on other weights (another checkpoint?); reusing them", folder)
    t = read_safetensors(tensor_file)
    dev = ek.device
    for f, attr in zip(_FIELDS, ("A_", "S_", "QA_", "eigA_", "QS_", "eigS_", "lambda_")):
        setattr(ek, attr, {m.name: t[f"{m.name}/{f}"].to(dev) for m in ek.maps})
    ek.damping_ = {k: float(v) for k, v in meta["damping_"].items()}
    ek.n_tokens_ = meta["n_tokens_"]
    ek.n_examples_ = int(meta["n_examples_"])
    ek.fit_idx_ = t["fit_idx"]
    return ek
