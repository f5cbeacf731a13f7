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


# ---------------------------------------------------------------------------- argument checks
# One way to check a number everywhere (config fields, CLI --set values, top_k / tau / threshold):
# the message names the argument, what it got and what it needs.


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None,
              owner: str = "") -> int:
    """``value`` as an ``int`` if it is an integer (not a bool, not a float) in ``[low, high]``;
    otherwise a ``TypeError`` / ``ValueError`` naming ``owner.name`` and the range it needs."""
    import numbers

    label = f"{owner}: {name}" if owner else name
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{label} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
        raise ValueError(f"{label} must be {rng}, got {value}")
    return value


def check_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, owner: str = "") -> float:
    """``value`` as a finite ``float`` if it is a real number (not a bool, not a string) within the
    bounds (``low_open`` / ``high_open`` exclude the bound itself); otherwise a ``TypeError`` /
    ``ValueError`` naming ``owner.name`` and the range it needs. NaN and ±inf are always refused."""
    import math
    import numbers

    label = f"{owner}: {name}" if owner else name
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{label} must be {' and '.join(x for x in (lo, hi) if x)}, got {value:g}")
    return value
