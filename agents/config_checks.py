"""Validation shared by the agents' config dataclasses (``GRPOConfig``, ``GRPOLMConfig``).

Each check raises a ``ValueError`` naming the option, its value and what is accepted (the CLI
turns it into one line and exit 2). Booleans are not numbers here: ``learning_rate=true`` is an
error, not 1.0.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, TypeVar

from backends.checks import check_int

C = TypeVar("C")


def check_integers(config: Any, names: tuple[str, ...], low: int = 1) -> None:
    """Each named field an integer >= ``low``."""
    for name in names:
        v = vars(config)[name]
        check_int(name, v, low)


def check_numbers(config: Any, names: tuple[str, ...], *, positive: bool) -> None:
    """Each named field a finite number, > 0 (``positive``) or >= 0."""
    for name in names:
        v = vars(config)[name]
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not (ok and (v > 0 if positive else v >= 0)):
            raise ValueError(f"{name}={v!r} is invalid; accepted: a finite number {'>' if positive else '>='} 0")


def check_flags(config: Any, names: tuple[str, ...]) -> None:
    """Each named field a boolean."""
    for name in names:
        if not isinstance(vars(config)[name], bool):
            raise ValueError(f"{name}={vars(config)[name]!r} is invalid; accepted: true or false")


def check_budget_jitter(value: float) -> None:
    """A relative jitter below 1 (a budget widened by 100% would reach 0); >= 0 via :func:`check_numbers`."""
    if value >= 1:
        raise ValueError(f"budget_jitter={value} is invalid; accepted: 0 <= jitter < 1")


def check_epsilon_high(value: Any) -> None:
    """TRL's ``epsilon_high``: ``None`` (= ``epsilon``) or a number > 0."""
    if value is not None and (isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0)):
        raise ValueError(f"epsilon_high={value!r} is invalid; accepted: None or a number > 0")


def normalize_scale_rewards(value: Any) -> str:
    """TRL's accepted forms: True / "group", "batch", False / "none"."""
    if value is True or value == "group":
        return "group"
    if value is False or value == "none":
        return "none"
    if value == "batch":
        return "batch"
    raise ValueError(f"scale_rewards={value!r} is invalid; accepted: group (or true), batch, none (or false)")


def config_from_dict(cls: type[C], values: dict, label: str) -> C:
    """``cls(**values)``; unknown keys are an error naming the accepted ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {label} option(s) {unknown}; accepted: {', '.join(sorted(names))}")
    return cls(**values)
