"""The one definition of a latency budget: parsing, ranges and per-episode sampling.

Every env, agent and CLI override goes through :meth:`Budget.parse`; nothing else in the
package knows what ``"120ms"`` means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

ACCEPTED_FORMS = (
    "a positive number of milliseconds (120), a string with a unit ('120ms', '120 ms', '0.12s', "
    "'120000us'), or a range '[60ms,200ms]' / (low, high) sampled uniformly per episode"
)

_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3}
_SCALAR_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf|nan)\s*(ms|s|us|µs)?\s*$", re.I)


def _bad(value: Any, why: str) -> ValueError:
    return ValueError(f"invalid budget {value!r}: {why}; accepted: {ACCEPTED_FORMS}")


def _parse_scalar_ms(value: Any, original: Any) -> float:
    if isinstance(value, bool):
        raise _bad(original, "a boolean is not a latency")
    if isinstance(value, (int, float, np.integer, np.floating)):
        ms = float(value)
    elif isinstance(value, str):
        match = _SCALAR_RE.match(value)
        if not match:
            raise _bad(original, "cannot parse")
        number, unit = match.group(1), (match.group(2) or "ms").lower()
        ms = float(number) * _UNIT_TO_MS[unit]
    else:
        raise _bad(original, f"unsupported type {type(value).__name__}")
    if not math.isfinite(ms):
        raise _bad(original, "must be finite")
    if ms <= 0:
        raise _bad(original, "must be > 0")
    return ms


@dataclass(frozen=True)
class Budget:
    """A latency budget in milliseconds: fixed (``low_ms == high_ms``) or a uniform range."""

    low_ms: float
    high_ms: float

    def __post_init__(self) -> None:
        for v in (self.low_ms, self.high_ms):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise _bad((self.low_ms, self.high_ms), "bounds must be finite and > 0")
        if self.low_ms > self.high_ms:
            raise _bad((self.low_ms, self.high_ms), "range low must be <= high")

    @classmethod
    def parse(cls, value: Any) -> "Budget":
        """Parse any accepted budget form; raise ``ValueError`` naming the input otherwise."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "(")) and text.endswith(("]", ")")):
                return cls._parse_range(text[1:-1].split(","), value)
            ms = _parse_scalar_ms(text, value)
            return cls(ms, ms)
        # Hydra hands lists over as ListConfig: accept any non-string sequence of two bounds.
        if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")
                                                and not isinstance(value, (bytes, dict))):
            return cls._parse_range(list(value), value)
        ms = _parse_scalar_ms(value, value)
        return cls(ms, ms)

    @classmethod
    def _parse_range(cls, parts: list, original: Any) -> "Budget":
        if len(parts) != 2:
            raise _bad(original, "a range needs exactly two bounds")
        low, high = (_parse_scalar_ms(p, original) for p in parts)
        if low > high:
            raise _bad(original, "range low must be <= high")
        return cls(low, high)

    @property
    def is_range(self) -> bool:
        return self.high_ms > self.low_ms

    def sample(self, rng: np.random.Generator) -> float:
        """Budget for one episode: the fixed value, or uniform in the range from ``rng``."""
        if not self.is_range:
            return float(self.low_ms)
        return float(rng.uniform(self.low_ms, self.high_ms))

    def __str__(self) -> str:
        if self.is_range:
            return f"[{self.low_ms:g}ms,{self.high_ms:g}ms]"
        return f"{self.low_ms:g}ms"

    @property
    def slug(self) -> str:
        """File-name safe form, e.g. ``120ms`` or ``60-200ms``."""
        return f"{self.low_ms:g}-{self.high_ms:g}ms" if self.is_range else f"{self.low_ms:g}ms"


def parse_budget_ms(value: Any) -> float:
    """Parse a fixed budget to milliseconds (ranges are an error here)."""
    budget = Budget.parse(value)
    if budget.is_range:
        raise _bad(value, "a single budget is needed here, not a range")
    return budget.low_ms
