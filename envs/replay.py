"""Vectorised replay of a recorded trace: many env steps per call, with the shared reward.

A :class:`BatchedReplay` answers "what reward would these actions get on these samples under
these budgets" for whole arrays at once, from a trace's dense score / estimated-latency tables;
it is the batched counterpart of ``MultiKnob-v0`` (and ``TokenBudget-v0``) on a trace backend
and gives the same rewards (see ``tests/test_trace.py``).
"""

from __future__ import annotations

import numpy as np

from backends.knobs import KnobConfig
from backends.trace import TraceBackend, TraceError
from envs.reward import RewardConfig, compute_rewards


class BatchedReplay:
    """Batched rewards over a trace split.

    Args:
        trace: a :class:`~backends.trace.TraceBackend`.
        split: which recorded split to replay.
        estimator: the latency estimator (the env's; default: the cached one of the trace's backend).
        reward: reward coefficients (default :class:`RewardConfig`).
        env: ``MultiKnob-v0`` (actions ``[tier, top-k, depth]`` indices) or ``TokenBudget-v0``
            (action = fraction index).
    """

    def __init__(self, trace: TraceBackend, split: str = "test", estimator=None,
                 reward: RewardConfig = RewardConfig(), env: str = "MultiKnob-v0"):
        if estimator is None:
            from envs.latency import LatencySource

            estimator = LatencySource(trace, "estimated").estimator
        self.table = trace.table(split, estimator)
        self.reward = reward
        space = trace.knob_space
        ids = {k: i for i, k in enumerate(self.table.configs)}
        if env == "MultiKnob-v0":
            shape = (len(space.tier_names), len(space.top_ks), len(space.depths))
            lookup = np.full(shape, -1, np.int64)
            for t, tier in enumerate(space.tier_names):
                for a, k in enumerate(space.top_ks):
                    for d, depth in enumerate(space.depths):
                        lookup[t, a, d] = ids.get(KnobConfig(tier, 1.0, k, depth), -1)
        elif env == "TokenBudget-v0":
            lookup = np.array([ids.get(space.resolve(KnobConfig(tier=space.tier_names[-1], token_budget=b)), -1)
                               for b in space.token_budgets], np.int64)
        else:
            raise ValueError(f"env={env!r} is invalid for batched replay; accepted: MultiKnob-v0, TokenBudget-v0")
        if (lookup < 0).any():
            raise TraceError(f"trace {str(trace.path)!r} lacks configurations of {env}'s action space")
        self.env, self.lookup = env, lookup

    @property
    def num_samples(self) -> int:
        return len(self.table.samples)

    def config_ids(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, np.int64)
        if self.env == "MultiKnob-v0":
            return self.lookup[actions[..., 0], actions[..., 1], actions[..., 2]]
        return self.lookup[actions]

    def step(self, sample_rows: np.ndarray, actions: np.ndarray, budgets_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Rewards of ``len(sample_rows)`` one-episode steps at once.

        ``sample_rows`` index ``self.table.samples``; returns ``reward``, ``score``, ``latency_ms``
        and ``violated`` arrays.
        """
        cfg = self.config_ids(actions)
        score = self.table.score[sample_rows, cfg]
        latency = self.table.latency_ms[sample_rows, cfg]
        reward, violated = compute_rewards(score, latency, budgets_ms, self.reward)
        return {"reward": reward, "score": score, "latency_ms": latency, "violated": violated}
