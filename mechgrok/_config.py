"""What the config dataclasses (TrainConfig, EKFACConfig, SAEConfig) share: building one from a dict
with a clear error for unknown keys."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def from_dict(cls: type, d: dict[str, Any], hint: str = "") -> Any:
    """``cls(**d)``, refusing keys that are not fields of ``cls`` with a message that lists them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known fields are {sorted(known)}{hint}")
    return cls(**d)
