"""The one definition of a latency budget: parsing, bounds, ranges, jitter and per-episode sampling.

Parsing (:meth:`Budget.parse`) happens only at the boundary: the CLI and env constructors
(``gym.make(..., budget=...)``, ``reset(options={"budget": ...})``). Everything past the boundary
holds a :class:`Budget` (an env owns one, agents read ``env.budget``) or a float of milliseconds
that :func:`check_budget_ms` accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.checks import check_int

#: the smallest and largest budget accepted, in milliseconds (10 microseconds .. one hour)
MIN_BUDGET_MS = 0.01
MAX_BUDGET_MS = 3_600_000.0

BOUNDS_TEXT = f"between {MIN_BUDGET_MS:g} ms and {MAX_BUDGET_MS:.0f} ms (1 hour)"
ACCEPTED_FORMS = (
    f"a positive number of milliseconds {BOUNDS_TEXT} (120), a string "
    "with a unit ('120ms', '120 ms', '0.12s', '120000us'), or a range '[60ms,200ms]' / (low, high) sampled "
    "uniformly per episode"
)
_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3}
_SCALAR_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf|nan)\s*(ms|s|us|µs)?\s*$", re.I)


def _bad(value: Any, why: str) -> ValueError:
    return ValueError(f"invalid budget {value!r}: {why}; accepted: {ACCEPTED_FORMS}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_budget_ms(ms: Any, original: Any = None) -> float:
    """``ms`` as a float if it is a number of milliseconds inside the accepted bounds; else a ValueError."""
    original = ms if original is None else original
    if isinstance(ms, np.ndarray) and ms.ndim == 0:
        ms = ms.item()
    if not _is_number(ms):
        raise _bad(original, f"unsupported type {type(ms).__name__}")
    ms = float(ms)
    if not math.isfinite(ms):
        raise _bad(original, "must be finite")
    if not MIN_BUDGET_MS <= ms <= MAX_BUDGET_MS:
        raise _bad(original, f"must be {BOUNDS_TEXT}")
    return ms


def _parse_scalar_ms(value: Any, original: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise _bad(original, "a boolean is not a latency")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, str):
        match = _SCALAR_RE.match(value)
        if not match:
            raise _bad(original, "cannot parse")
        number, unit = match.group(1), (match.group(2) or "ms").lower()
        value = float(number) * _UNIT_TO_MS[unit]
    return check_budget_ms(value, original)


@dataclass(frozen=True)
class Budget:
    """A latency budget in milliseconds: fixed (``low_ms == high_ms``) or a uniform range.

    Both bounds lie in ``[MIN_BUDGET_MS, MAX_BUDGET_MS]``.
    """

    low_ms: float
    high_ms: float

    def __post_init__(self) -> None:
        bounds = (self.low_ms, self.high_ms)
        for name, v in zip(("low_ms", "high_ms"), bounds):
            object.__setattr__(self, name, check_budget_ms(v, bounds))
        if self.low_ms > self.high_ms:
            raise _bad(bounds, "range low must be <= high")

    # ---------------------------------------------------------------- construction
    @classmethod
    def parse(cls, value: Any) -> "Budget":
        """Parse any accepted budget form; raise ``ValueError`` naming the input otherwise (boundary only)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "(")) and text.endswith(("]", ")")):
                return cls._parse_range(text[1:-1].split(","), value)
            return cls.fixed(_parse_scalar_ms(text, value))
        if isinstance(value, np.ndarray) and value.ndim == 1:
            return cls._parse_range(value.tolist(), value)
        # Hydra hands lists over as ListConfig, a Sequence: any non-string sequence of two bounds.
        if isinstance(value, Sequence) and not isinstance(value, (bytes, str)):
            return cls._parse_range(list(value), value)
        return cls.fixed(_parse_scalar_ms(value, value))

    @classmethod
    def fixed(cls, ms: float) -> "Budget":
        """A fixed budget of ``ms`` milliseconds (a number; see :func:`check_budget_ms`)."""
        ms = check_budget_ms(ms)
        return cls(ms, ms)

    @classmethod
    def _parse_range(cls, parts: list, original: Any) -> "Budget":
        if len(parts) != 2:
            raise _bad(original, "a range needs exactly two bounds")
        low, high = (_parse_scalar_ms(p, original) for p in parts)
        if low > high:
            raise _bad(original, "range low must be <= high")
        return cls(low, high)

    # ---------------------------------------------------------------- what users ask
    @property
    def is_range(self) -> bool:
        return self.high_ms > self.low_ms

    @property
    def fixed_ms(self) -> float:
        """The budget of a fixed budget; a ``ValueError`` for a range (evaluations need one budget)."""
        if self.is_range:
            raise _bad(str(self), "a single budget is needed here, not a range")
        return float(self.low_ms)

    def training_range(self, jitter: float) -> "Budget":
        """The budgets a training episode draws from: ``[low * (1 - jitter), high * (1 + jitter)]``.

        A fixed budget becomes a range around it, so the budget feature varies during training;
        a range is widened the same way, so its ends, where the evaluation reports, lie inside
        the training distribution rather than at its edge (a policy trained on exactly
        ``[low, high]`` sees few episodes near ``low`` and was measured to violate there:
        BENCHMARKS.md, "Budget conditioning"). ``0 <= jitter < 1``; 0 trains on the budget as given.
        """
        if not (_is_number(jitter) and 0 <= float(jitter) < 1):
            raise ValueError(f"budget_jitter={jitter!r} is invalid; accepted: 0 <= jitter < 1")
        if jitter == 0:
            return self
        return Budget(max(MIN_BUDGET_MS, self.low_ms * (1 - float(jitter))),
                      min(MAX_BUDGET_MS, self.high_ms * (1 + float(jitter))))

    def sample(self, rng: np.random.Generator) -> float:
        """Budget for one episode: the fixed value (no draw), or uniform in the range from ``rng``."""
        if not self.is_range:
            return float(self.low_ms)
        return float(rng.uniform(self.low_ms, self.high_ms))

    def evaluation_budgets(self) -> list[float]:
        """The budgets an evaluation reports: the fixed budget, or a range's low, middle and high."""
        if not self.is_range:
            return [self.low_ms]
        return [self.low_ms, 0.5 * (self.low_ms + self.high_ms), self.high_ms]

    def __str__(self) -> str:
        if self.is_range:
            return f"[{self.low_ms:g}ms,{self.high_ms:g}ms]"
        return f"{self.low_ms:g}ms"

    @property
    def slug(self) -> str:
        """File-name safe form, e.g. ``120ms`` or ``60-200ms``."""
        return f"{self.low_ms:g}-{self.high_ms:g}ms" if self.is_range else f"{self.low_ms:g}ms"


# ================================================================================================
# Budgets relative to the device: "auto" and fractions of the achievable range
# ================================================================================================
DEVICE_FORMS = (
    "'auto' (the env's suggested_budget_ms: one that binds on this device), a fraction of this device's "
    "achievable range '50%' (0% = the cheapest configuration's latency, 100% = the most expensive one's), a "
    "range of two fractions '[25%,75%]', or any fixed form: " + ACCEPTED_FORMS
)
_FRACTION_RE = re.compile(r"^\s*(\d+\.?\d*|\.\d+)\s*%\s*$")


def _fraction(part: Any, original: Any) -> float | None:
    """``part`` ("50%") as a fraction in [0, 1]; ``None`` when it is not a percentage."""
    match = _FRACTION_RE.match(part) if isinstance(part, str) else None
    if match is None:
        return None
    value = float(match.group(1)) / 100
    if not 0 <= value <= 1:
        raise ValueError(f"invalid budget {original!r}: a fraction of this device's achievable range must be "
                         f"between 0% and 100%; accepted: {DEVICE_FORMS}")
    return value


def is_device_relative(value: Any) -> bool:
    """Whether ``value`` is ``None``, ``'auto'`` or holds a percentage: a budget only an env can resolve
    (for a KV budget, :func:`device_kv_budget`, its TPOT part)."""
    try:
        value = split_kv_budget(value)[0]
    except ValueError:  # a malformed KV mapping: not device-relative; parsing it says what is wrong
        return False
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return True
    parts = value.strip()[1:-1].split(",") if isinstance(value, str) and value.strip()[:1] in "[(" else (
        list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value])
    return any(isinstance(p, str) and p.strip().endswith("%") for p in parts)


def device_budget(value: Any, achievable_ms: tuple[float, float] | None = None,
                  suggested_ms: float | None = None) -> Budget | None:
    """Parse ``value`` in any :data:`DEVICE_FORMS` (the env constructors' boundary).

    ``None`` and ``'auto'`` are ``suggested_ms``; ``'P%'`` is the point P% of the way from
    ``achievable_ms[0]`` (the cheapest configuration) to ``achievable_ms[1]`` (the most expensive),
    so the same budget binds on any machine; a range may mix fractions and fixed bounds; fixed forms
    are :meth:`Budget.parse`. Without ``achievable_ms`` (an env checking its arguments before
    loading the estimator) a device-relative value is only checked and ``None`` is returned.
    """
    if not is_device_relative(value):
        return Budget.parse(value)
    if isinstance(value, str) and value.strip()[:1] in "[(" and value.strip()[-1:] in "])":
        parts: list = value.strip()[1:-1].split(",")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        parts = list(value)
    else:
        parts = [value]
    if len(parts) != 1 and len(parts) != 2 or (len(parts) == 1 and parts[0] is not value):
        raise ValueError(f"invalid budget {value!r}: a range needs exactly two bounds; accepted: {DEVICE_FORMS}")
    fractions = [_fraction(p, value) for p in parts]
    for part, fraction in zip(parts, fractions):
        if fraction is None and part is not None and not (isinstance(part, str) and part.strip().lower() == "auto"):
            try:
                _parse_scalar_ms(part.strip() if isinstance(part, str) else part, value)
            except ValueError:
                raise ValueError(f"invalid budget {value!r}: cannot parse {part!r}; accepted: {DEVICE_FORMS}") from None
    if len(fractions) == 2 and None not in fractions and fractions[0] > fractions[1]:  # wrong on any device
        raise ValueError(f"invalid budget {value!r}: range low must be <= high; accepted: {DEVICE_FORMS}")
    if achievable_ms is None:
        return None
    low, high = achievable_ms
    ms = [suggested_ms if fraction is None and (part is None or str(part).strip().lower() == "auto")
          else low + fraction * (high - low) if fraction is not None
          else _parse_scalar_ms(part.strip() if isinstance(part, str) else part, value)
          for part, fraction in zip(parts, fractions)]
    if len(ms) == 1:
        return Budget.fixed(float(ms[0]))
    if ms[0] > ms[1]:
        raise ValueError(f"invalid budget {value!r}: range low must be <= high; accepted: {DEVICE_FORMS}")
    return Budget(float(ms[0]), float(ms[1]))


# ================================================================================================
# KV budgets: a per-token latency (TPOT) budget, optionally with a cap on the KV cache
# ================================================================================================
KV_ACCEPTED_FORMS = (
    "a TPOT budget in any Budget form ('20ms', '[15ms,25ms]') or relative to this device's achievable TPOT range "
    "('auto', '50%', '[25%,75%]'), optionally followed by '+' and a KV-cache cap "
    "in tokens ('20ms+256tok') or bytes ('20ms+4MB'; units B, KB, MB, GB (powers of 1000), KiB, MiB, GiB "
    "(powers of 1024)), or a mapping {tpot: ..., kv: ...} (e.g. budget={tpot:[25%,75%],kv:256tok})"
)
_KV_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_KV_CAP_RE = re.compile(r"^\s*(\d+\.?\d*|\.\d+)(?:[eE]([+]?\d+))?\s*(tok|tokens|b|kb|mb|gb|kib|mib|gib)\s*$", re.I)


def _bad_kv(value: Any, why: str) -> ValueError:
    return ValueError(f"invalid KV budget {value!r}: {why}; accepted: {KV_ACCEPTED_FORMS}")


@dataclass(frozen=True)
class KVBudget:
    """A StreamingKV budget: per-token latency (``tpot``, a :class:`Budget`) and an optional KV-cache cap.

    The cap is in tokens (``kv_tokens``) or bytes (``kv_bytes``), at most one of them; the env turns
    bytes into tokens with its model's bytes per cached token. A chunk whose peak cache exceeds the
    cap is a violation (see :mod:`envs.streaming_kv`).
    """

    tpot: Budget
    kv_tokens: int | None = None
    kv_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tpot, Budget):
            raise _bad_kv(self.tpot, "tpot must be a Budget")
        if self.kv_tokens is not None and self.kv_bytes is not None:
            raise _bad_kv(self, "give the KV cap in tokens or in bytes, not both")
        for name in ("kv_tokens", "kv_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise _bad_kv(value, f"{name} must be an integer >= 1")

    @classmethod
    def parse(cls, value: Any) -> "KVBudget":
        """Parse a KV budget form with a fixed TPOT part (boundary only; a device-relative one needs the
        env's range: :func:`device_kv_budget`); a ``ValueError`` naming the input otherwise."""
        return device_kv_budget(value, fixed_only=True)

    @property
    def has_cap(self) -> bool:
        return self.kv_tokens is not None or self.kv_bytes is not None

    def cap_tokens(self, bytes_per_token: int) -> int | None:
        """The cap in cached tokens (bytes rounded down to whole tokens); ``None`` without a cap."""
        if self.kv_tokens is not None:
            return self.kv_tokens
        if self.kv_bytes is not None:
            check_int("bytes_per_token", bytes_per_token, 1)
            return self.kv_bytes // bytes_per_token
        return None

    def with_tpot(self, tpot: Any) -> "KVBudget":
        """The same cap with another TPOT budget (any :class:`Budget` form)."""
        return KVBudget(Budget.parse(tpot), self.kv_tokens, self.kv_bytes)

    def __str__(self) -> str:
        if self.kv_tokens is not None:
            return f"{self.tpot}+{self.kv_tokens}tok"
        if self.kv_bytes is not None:
            return f"{self.tpot}+{self.kv_bytes}B"
        return str(self.tpot)


def split_kv_budget(value: Any) -> tuple[Any, Any]:
    """``(tpot, cap)`` of a KV budget form (``cap`` is ``None`` without one): a mapping's ``tpot`` and
    ``kv``, or the two sides of a string's last ``+``; any other value is all TPOT."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"tpot", "kv"})
        if unknown or "tpot" not in value:
            raise _bad_kv(dict(value), f"mapping keys must be 'tpot' and optionally 'kv' (got {sorted(value)})")
        return value["tpot"], value.get("kv")
    if isinstance(value, str) and "+" in value.strip().lstrip("+"):
        tpot, cap = value.rsplit("+", 1)
        return tpot.strip(), cap
    return value, None


def device_kv_budget(value: Any, achievable_ms: tuple[float, float] | None = None, suggested_ms: float | None = None,
                     *, fixed_only: bool = False) -> KVBudget | None:
    """Parse ``value`` in any :data:`KV_ACCEPTED_FORMS` (the KV env constructor's and reset's boundary).

    The TPOT part is :func:`device_budget`'s: ``auto``, ``'50%'`` and ``'[25%,75%]'`` are resolved
    against ``achievable_ms`` (the env's achievable TPOT range) and ``suggested_ms``, the same one
    definition the knob envs use; the cap is kept as given. Without ``achievable_ms`` a
    device-relative TPOT part is only checked and ``None`` is returned. ``fixed_only``
    (:meth:`KVBudget.parse`) refuses the device-relative forms.
    """
    if isinstance(value, KVBudget):
        return value
    tpot, cap = split_kv_budget(value)
    try:
        if fixed_only:
            budget = Budget.parse(tpot)
        else:
            budget = device_budget(tpot, achievable_ms, suggested_ms)
    except ValueError as error:
        why = str(error).split("; accepted:")[0]  # the TPOT forms are part of KV_ACCEPTED_FORMS
        raise _bad_kv(value, f"its TPOT part is not a budget ({why})") from None
    limit = (None, None) if cap is None else _parse_kv_cap(cap, value)
    return None if budget is None else KVBudget(budget, *limit)


def _parse_kv_cap(cap: Any, original: Any) -> tuple[int | None, int | None]:
    """``(tokens, bytes)`` of a KV cap such as ``256tok`` or ``4MB`` (one of them ``None``)."""
    if isinstance(cap, (bool, np.bool_)) or not isinstance(cap, str):
        raise _bad_kv(original, f"the KV cap {cap!r} needs a unit (tok, B, KB, MB, GB, KiB, MiB, GiB)")
    match = _KV_CAP_RE.match(cap)
    if not match:
        raise _bad_kv(original, f"cannot parse the KV cap {cap!r}")
    try:
        number = float(match.group(1)) * (10 ** int(match.group(2)) if match.group(2) else 1)
    except OverflowError:  # 1e400tok: an exponent beyond what a float holds
        number = float("inf")
    if not np.isfinite(number) or number > 2 ** 62:
        raise _bad_kv(original, f"the KV cap {cap!r} is too large (at most {2 ** 62:.3g})")
    unit = match.group(3).lower()
    if unit in ("tok", "tokens"):
        if number != int(number) or number < 1:
            raise _bad_kv(original, f"the KV cap {cap!r} must be a whole number of tokens >= 1")
        return int(number), None
    size = int(number * _KV_BYTE_UNITS[unit])
    if size < 1:
        raise _bad_kv(original, f"the KV cap {cap!r} must be at least one byte")
    return None, size
