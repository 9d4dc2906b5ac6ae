"""Budgets that fit the device: ``budget=auto`` for training, ``budgets=auto`` for evaluation.

A latency budget only means something against what the model can do on this machine: the same
``120ms`` binds on one device and never binds on a faster one. The env knows its achievable range
(``achievable_range_ms``: the cheapest configuration's latency to the full configuration's) and a
budget that binds there (``suggested_budget_ms``), both from the latency estimator of this device.

- ``budget=auto`` (train.py): the env's ``suggested_budget_ms``, rounded to a whole millisecond,
  resolved once at startup and recorded in the run's config and report (a resumed run keeps it).
- ``budgets=auto`` (evaluate.py, the default): :data:`AUTO_POINTS` budgets spread across the
  achievable range, plus the run's training budget(s).
- Any budget given outside the achievable range is warned about (:func:`out_of_range_warnings`).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from envs.budget import Budget

AUTO = "auto"
# Fractions of the achievable range [cheapest, full] where budgets=auto evaluates: not its ends,
# where either nothing fits or nothing needs to be given up.
AUTO_POINTS = (0.2, 0.4, 0.6, 0.8)
# A training budget this close (as a fraction of the range) to an auto point replaces it.
MERGE_FRACTION = 0.05
# A budget at most this far (relative) outside the range is not worth a warning: the range comes
# from an estimator over typical inputs.
RANGE_TOLERANCE = 0.02


def is_auto(value: Any) -> bool:
    """Whether a ``budget=`` / ``budgets=`` value asks for budgets chosen from the device."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def env_range(env) -> tuple[tuple[float, float], float]:
    """``((cheapest_ms, full_ms), suggested_ms)`` of an env (through Gymnasium's wrapper-attribute API)."""
    try:
        lo, hi = env.get_wrapper_attr("achievable_range_ms")
        suggested = env.get_wrapper_attr("suggested_budget_ms")
    except AttributeError:
        env_id = env.spec.id if env.spec else type(env.unwrapped).__name__
        raise ValueError(f"env {env_id} does not report its achievable latency range, so budget=auto / budgets=auto "
                         f"cannot be resolved; accepted: an explicit budget such as budget=45ms") from None
    return (float(lo), float(hi)), float(suggested)


def probe_suggested_budget(env_cfg: dict, backend_cfg: dict, estimator_spec: str | None) -> float:
    """The suggested budget of the env a run config describes, in whole milliseconds (for ``budget=auto``).

    Builds the env once with a placeholder budget (its out-of-range warning is irrelevant and
    suppressed); the backend is loaded once per process, so the run's own env reuses it.
    """
    import gymnasium as gym

    import envs  # noqa: F401  (registers the env ids)
    from backends.registry import load_backend
    from envs.registry import check_env_id
    from knobgym_cli.build import import_callable

    check_env_id(env_cfg["id"])
    backend_spec = dict(backend_cfg)
    backend = load_backend(backend_spec)  # cached: the run's env gets the same object from the same spec
    estimator = import_callable(estimator_spec)(backend) if estimator_spec else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_cfg["id"], backend=backend_spec, budget="1000000ms", estimator=estimator,
                       **dict(env_cfg.get("kwargs") or {}))
    try:
        _, suggested = env_range(env)
    finally:
        env.close()
    return float(round(suggested))


def binding(budget: Any, achievable: tuple[float, float]) -> str:
    """``"binds"``, ``"never binds"`` (every budget above the full configuration) or ``"unreachable"``
    (every budget below the cheapest configuration) for a budget against the achievable range."""
    parsed = Budget.parse(budget)
    lo, hi = achievable
    if parsed.low_ms > hi * (1 + RANGE_TOLERANCE):
        return "never binds"
    if parsed.high_ms < lo * (1 - RANGE_TOLERANCE):
        return "unreachable"
    return "binds"


def auto_budgets(achievable: tuple[float, float], train_budgets_ms: Sequence[float] = ()) -> list[float]:
    """Evaluation budgets for ``budgets=auto``: :data:`AUTO_POINTS` of the achievable range in whole ms,
    with each training budget inside the range added, or taking the place of a point within
    :data:`MERGE_FRACTION` of the range from it; sorted."""
    lo, hi = achievable
    points = [float(round(lo + f * (hi - lo))) for f in AUTO_POINTS]
    for budget in train_budgets_ms:
        if binding(budget, achievable) != "binds":
            continue
        near = [i for i, p in enumerate(points) if abs(p - budget) <= MERGE_FRACTION * (hi - lo)]
        if near:
            points[near[0]] = float(budget)
        else:
            points.append(float(budget))
    return sorted(set(points))


def out_of_range_warnings(budgets_ms: Sequence[float], achievable: tuple[float, float], suggested: float) -> list[str]:
    """One message per budget outside the achievable range, saying what happens there and what binds."""
    lo, hi = achievable
    messages = []
    for b in budgets_ms:
        state = binding(b, achievable)
        if state == "binds":
            continue
        what = ("above the full configuration: it never binds, every agent can run everything"
                if state == "never binds" else "below the cheapest configuration: every agent violates it")
        messages.append(f"budget {b:g}ms is {what} (achievable range on this device {lo:.1f}-{hi:.1f}ms); "
                        f"budgets=auto picks budgets inside it, e.g. {suggested:.0f}ms binds")
    return messages


def describe_range(achievable: tuple[float, float], suggested: float) -> str:
    lo, hi = achievable
    return f"achievable latency on this device {lo:.1f}-{hi:.1f}ms, suggested budget {suggested:.0f}ms"


def fixed_budgets_ms(budget: Any) -> list[float]:
    """The fixed values of a training budget: itself, or a range's low and high."""
    parsed = Budget.parse(budget)
    return [parsed.low_ms] if not parsed.is_range else [parsed.low_ms, parsed.high_ms]
