"""Number formatting shared by the report sections (the analyses' and the training ones)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fixed", "sig", "acc"]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def fixed(v: Any, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals, or an em dash for a missing value (None, NaN: a split with no examples)."""
    return "—" if _missing(v) else f"{v:.{digits}f}"


def sig(v: Any, digits: int = 3) -> str:
    """``v`` with ``digits`` significant digits, or an em dash for a missing value."""
    return "—" if _missing(v) else f"{v:.{digits}g}"


def acc(ev: dict[str, Any], key: str) -> str:
    """The accuracy ``ev[split]["acc"]`` of an ``evaluate`` dict for ``key = split + "_acc"``, three decimals."""
    return fixed(ev.get(key[: -len("_acc")], {}).get("acc"))
