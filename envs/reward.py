"""The one reward definition every env uses.

``reward = score - overshoot_penalty * max(0, latency/budget - 1) - violation_penalty * [latency > budget]``

``score`` is the task metric in [0, 1] (exact match after VQA normalisation for VQA data, or
a transformed negative NLL for language modelling). The two penalties make overshooting
costly in proportion (a 10% overshoot costs ``0.1 * overshoot_penalty``) plus a fixed cost for
any violation, so a controller cannot buy accuracy with small, frequent violations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RewardConfig:
    """Coefficients of the shared reward.

    Args:
        overshoot_penalty: cost per unit of relative overshoot ``latency/budget - 1`` (default 1.0).
        violation_penalty: fixed cost of any budget violation (default 0.5).
    """

    overshoot_penalty: float = 1.0
    violation_penalty: float = 0.5

    def __post_init__(self) -> None:
        for name in ("overshoot_penalty", "violation_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} is invalid; accepted: a finite number >= 0")


def compute_reward(score: float, latency_ms: float, budget_ms: float,
                   config: RewardConfig = RewardConfig()) -> tuple[float, bool]:
    """Reward of one outcome and whether it violated the budget."""
    if not budget_ms > 0:
        raise ValueError(f"budget_ms={budget_ms!r} is invalid; accepted: > 0")
    violated = bool(latency_ms > budget_ms)
    overshoot = max(0.0, latency_ms / budget_ms - 1.0)
    reward = float(score) - config.overshoot_penalty * overshoot - config.violation_penalty * float(violated)
    return float(reward), violated


def compute_rewards(scores, latencies_ms, budgets_ms, config: RewardConfig = RewardConfig()):
    """Vectorised :func:`compute_reward` over numpy arrays (same formula, for batched replay)."""
    scores = np.asarray(scores, dtype=np.float64)
    lat = np.asarray(latencies_ms, dtype=np.float64)
    bud = np.asarray(budgets_ms, dtype=np.float64)
    if np.any(~(bud > 0)):
        raise ValueError("budgets_ms must all be > 0")
    violated = lat > bud
    overshoot = np.maximum(0.0, lat / bud - 1.0)
    reward = scores - config.overshoot_penalty * overshoot - config.violation_penalty * violated
    return reward, violated
