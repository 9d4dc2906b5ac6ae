"""The one reward definition every env uses.

``reward = score - overshoot_penalty * max(0, latency/budget - 1) - violation_penalty * [latency > budget]``

``score`` is the task metric in [0, 1] (exact match after VQA normalisation for VQA data, or
a transformed negative NLL for language modelling). The two penalties make overshooting
costly in proportion (a 10% overshoot costs ``0.1 * overshoot_penalty``) plus a fixed cost for
any violation, so a controller cannot buy accuracy with small, frequent violations.

Bounds (checked before a reward reaches an agent): ``score`` must be finite and in [0, 1],
``latency`` finite and >= 0, ``budget`` inside :data:`envs.budget.MIN_BUDGET_MS` ..
:data:`envs.budget.MAX_BUDGET_MS`; anything else is a ``ValueError`` naming the value. The relative
overshoot is clipped at :data:`MAX_OVERSHOOT` (a run 100x over budget is as bad as it gets), so a
reward is always finite and inside :meth:`RewardConfig.reward_range`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from envs.budget import BOUNDS_TEXT, MAX_BUDGET_MS, MIN_BUDGET_MS

#: the relative overshoot ``latency/budget - 1`` is clipped here
MAX_OVERSHOOT = 100.0
#: the largest penalty coefficient accepted
MAX_PENALTY = 1e6


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
            v = vars(self)[name]
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= MAX_PENALTY):
                raise ValueError(f"{name}={v!r} is invalid; accepted: a number in [0, {MAX_PENALTY:g}]")

    def reward_range(self) -> tuple[float, float]:
        """The lowest and highest reward this configuration can give."""
        return -(self.overshoot_penalty * MAX_OVERSHOOT + self.violation_penalty), 1.0


def _check_inputs(scores: np.ndarray, latencies_ms: np.ndarray, budgets_ms: np.ndarray) -> None:
    """The inputs of the reward: scores in [0, 1], latencies finite and >= 0, budgets within bounds."""
    if not np.all(np.isfinite(scores)) or np.any((scores < 0) | (scores > 1)):
        bad = scores[~(np.isfinite(scores) & (scores >= 0) & (scores <= 1))].ravel()[0]
        raise ValueError(f"score={float(bad)!r} is invalid for the reward; accepted: a finite score in [0, 1]")
    if not np.all(np.isfinite(latencies_ms)) or np.any(latencies_ms < 0):
        bad = latencies_ms[~(np.isfinite(latencies_ms) & (latencies_ms >= 0))].ravel()[0]
        raise ValueError(f"latency_ms={float(bad)!r} is invalid for the reward; accepted: a finite latency >= 0")
    ok = np.isfinite(budgets_ms) & (budgets_ms >= MIN_BUDGET_MS) & (budgets_ms <= MAX_BUDGET_MS)
    if not np.all(ok):
        bad = budgets_ms[~ok].ravel()[0]
        raise ValueError(f"budget_ms={float(bad)!r} is invalid for the reward; accepted: a budget {BOUNDS_TEXT}")


def compute_rewards(scores, latencies_ms, budgets_ms, config: RewardConfig = RewardConfig()):
    """Rewards and violation flags of arrays of outcomes (the definition; :func:`compute_reward` is
    its one-outcome form). Bad inputs are a ``ValueError`` naming the value; the overshoot term is
    clipped at :data:`MAX_OVERSHOOT`, so every reward lies in :meth:`RewardConfig.reward_range`."""
    scores = np.asarray(scores, dtype=np.float64)
    lat = np.asarray(latencies_ms, dtype=np.float64)
    bud = np.asarray(budgets_ms, dtype=np.float64)
    _check_inputs(scores, lat, bud)
    violated = lat > bud
    overshoot = np.minimum(np.maximum(0.0, lat / bud - 1.0), MAX_OVERSHOOT)
    reward = scores - config.overshoot_penalty * overshoot - config.violation_penalty * violated
    return reward, violated


def compute_reward(score: float, latency_ms: float, budget_ms: float,
                   config: RewardConfig = RewardConfig()) -> tuple[float, bool]:
    """Reward of one outcome and whether it violated the budget (see :func:`compute_rewards`)."""
    reward, violated = compute_rewards([score], [latency_ms], [budget_ms], config)
    return float(reward[0]), bool(violated[0])
