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

from typing import Any, Sequence

from envs.budget import Budget, device_budget, device_kv_budget
from envs.protocols import group_env

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
    """``((cheapest_ms, full_ms), suggested_ms)`` of an env (members of :class:`envs.protocols.GroupEnv`)."""
    base = group_env(env)
    lo, hi = base.achievable_range_ms
    return (float(lo), float(hi)), float(base.suggested_budget_ms)


def probe_suggested_budget(env_cfg: dict, backend_cfg: dict, estimator_spec: str | None) -> float:
    """The suggested budget of the env a run config describes, rounded by :func:`round_budget_ms` (for
    ``budget=auto``).

    Builds the env once, as the run will (:func:`knobgym_cli.build.make_env`: a knob env gets the
    backend spec, a KV env loads its own model), with a placeholder budget whose out-of-range warning
    is irrelevant and not logged; the backend is loaded once per process, so the run's own env
    reuses it.
    """
    from knobgym_cli.build import make_env

    env, _ = make_env(env_cfg, backend_cfg, "1000000ms", estimator_spec, log_warnings=False)
    try:
        _, suggested = env_range(env)
    finally:
        env.close()
    return round_budget_ms(suggested)


def run_budget(value: Any) -> Any:
    """A ``budget=`` value parsed once, at the CLI's boundary: a :class:`Budget`, or a
    :class:`KVBudget` for a form with a KV cap (``20ms+256tok``); the env receives the object.
    A device-relative form (``auto``, ``50%``, ``[25%,75%]``, ``50%+256tok``) is checked here and
    returned as given: only the env knows its device's achievable range
    (:func:`envs.budget.device_budget`, :func:`envs.budget.device_kv_budget`)."""
    try:
        budget = device_budget(value)
    except ValueError as error:
        try:
            budget = device_kv_budget(value)
        except ValueError:
            raise error from None
    return value if budget is None else budget


def recorded_budget(env) -> str:
    """The budget an env resolved, as a run records it: a KV env's whole budget (TPOT and cache cap,
    ``env.kv_budget``), any other env's latency budget."""
    base = group_env(env)
    return str(getattr(base, "kv_budget", base.budget))


def round_budget_ms(ms: float) -> float:
    """A budget as the CLI writes it: whole milliseconds, or three significant digits below 10 ms
    (TPOT budgets are fractions of a millisecond, which whole milliseconds would erase)."""
    return float(f"{ms:.3g}") if ms < 10 else float(round(ms))


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
    """Evaluation budgets for ``budgets=auto``: :data:`AUTO_POINTS` of the achievable range rounded by :func:`round_budget_ms`,
    with each training budget inside the range added, or taking the place of a point within
    :data:`MERGE_FRACTION` of the range from it; sorted."""
    lo, hi = achievable
    points = [round_budget_ms(lo + f * (hi - lo)) for f in AUTO_POINTS]
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
    return (f"achievable latency on this device {lo:.3g}-{hi:.3g}ms, suggested budget "
            f"{round_budget_ms(suggested):g}ms")


def fixed_budgets_ms(budget: Any) -> list[float]:
    """The fixed values of a training budget: itself, or a range's low and high."""
    parsed = Budget.parse(budget)
    return [parsed.low_ms] if not parsed.is_range else [parsed.low_ms, parsed.high_ms]
