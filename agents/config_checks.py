"""Validation shared by the agents' config dataclasses (``GRPOConfig``, ``GRPOLMConfig``, the baselines').

A field declared with :func:`option` carries its help and bounds in its metadata (as TRL's config
dataclasses carry ``metadata={"help": ...}``); :func:`check_options` checks every such field, so
an agent's options are declared once, on its config, and the CLI reads them from there. A field
with a check of its own (:func:`described`) carries its help only. Each check raises a
``ValueError`` naming the option, its value and what is accepted (the CLI turns it into one line
and exit 2). Booleans are not numbers here: ``learning_rate=true`` is an
error, not 1.0.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

from backends.checks import is_int

C = TypeVar("C")


def check_flags(config: Any, names: tuple[str, ...]) -> None:
    """Each named field a boolean."""
    for name in names:
        if not isinstance(vars(config)[name], bool):
            raise ValueError(f"{name}={vars(config)[name]!r} is invalid; accepted: true or false")


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


SEED_HELP = "random seed"
SEED_BOUNDS = {"low": 0, "high": 2**32 - 1}  # numpy and torch both accept this range
JITTER_HELP = "fixed budgets are widened by this fraction on each side for training"
JITTER_BOUNDS = {"low": 0, "high": 1, "high_open": True}  # a budget widened by 100% would reach 0


def described(help: str, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A config field with its ``help`` only (its own check is in the config's ``__post_init__``)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple = ()) -> Any:
    """A config field with its ``help`` and bounds (``low`` / ``high``, strict with ``*_open``) or
    ``choices``; :func:`check_options` checks it against them (an ``int`` default: an integer)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                            "high_open": high_open, "choices": tuple(choices)})


def accepted(default: Any, meta: dict) -> str:
    """What a field declared with :func:`option` accepts, in words (with its help)."""
    if meta["choices"]:
        text = "one of " + ", ".join(str(c) for c in meta["choices"])
    else:
        text = "an integer" if isinstance(default, int) and not isinstance(default, bool) else "a finite number"
        bounds = [f"{sign} {_number(x)}" for x, sign in ((meta["low"], ">" if meta["low_open"] else ">="),
                                                        (meta["high"], "<" if meta["high_open"] else "<="))
                  if x is not None]
        text += (" " + " and ".join(bounds)) if bounds else ""
    return f"{text} ({meta['help']})"


def _number(x: float) -> str:
    """A bound as written: whole numbers in full (4294967295, not 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _valid(value: Any, default: Any, meta: dict) -> bool:
    if meta["choices"]:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in meta["choices"]
    if isinstance(default, int) and not isinstance(default, bool):
        ok = is_int(value)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    low, high = meta["low"], meta["high"]
    return ok and (low is None or (value > low if meta["low_open"] else value >= low)) and (
        high is None or (value < high if meta["high_open"] else value <= high))


def check_options(config: Any) -> None:
    """Each field declared with :func:`option` within its declared bounds or choices."""
    for f in fields(config):
        if "choices" in f.metadata:
            value = getattr(config, f.name)
            if not _valid(value, f.default, f.metadata):
                raise ValueError(f"{f.name}={value!r} is invalid; accepted: {accepted(f.default, f.metadata)}")


class DeclaredOptions:
    """Base of an agent config whose fields are declared with :func:`option`: checked when created,
    built from an option mapping by :meth:`from_dict`."""

    def __post_init__(self) -> None:
        check_options(self)

    @classmethod
    def from_dict(cls, values: dict):
        """Build from an option mapping; unknown keys are an error naming the accepted ones."""
        return config_from_dict(cls, values, cls.__name__.removesuffix("Config").lower())
