"""The serving-side budget guard: a served configuration is one the estimator says fits the budget.

A policy trained against a latency budget still picks an over-budget configuration now and then
(it was rewarded on average, not per input). A user deploying it under an SLO expects the server
never to choose a configuration it predicts over budget when one within budget exists. Per
request, before anything runs, :class:`BudgetGuard` bounds every configuration of the knob space:
the estimator's latency on this request's prompt and vision token counts (exact before the run)
with each answer length the generation allows, ``0 .. max_new_tokens``, maximised (the answer's
length is known only after the run, and the estimator need not grow with it). A configuration is
*admissible* when that bound is within the budget. Then, stage by stage:

- the policy's choice stands when some admissible configuration keeps it (and the earlier stages'
  choices): ``guard="kept"``;
- otherwise it is replaced by the dearest admissible configuration that keeps the earlier stages'
  choices (dearest by the estimator with the expected answer length, the greedy baseline's rule:
  the most model the budget affords): ``guard="replaced"``;
- when no configuration is admissible, the fallback is served: the static configuration the run
  calibrated at that budget (else the configuration with the lowest bound): ``guard="fallback"``.

So a request served an admissible configuration is within budget by the estimator with its actual
token counts (what an env charges), and any other request gets the calibrated static's own
configuration: with deterministic decoding the guarded controller is within budget (estimated) on
every request the static is, by construction. A backend that declares no generation cap
(:class:`backends.base.BoundedGeneration`) is bounded with the expected answer length only
(:attr:`BudgetGuard.bounded` is ``False``): the guard then holds on the prediction, not the charge.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from backends.base import BoundedGeneration, Sample

GUARD_OUTCOMES = ("kept", "replaced", "fallback")
ANSWER_LENGTHS = ("expected", "every")


class BudgetGuard:
    """Keeps a controller's choices within the budget by the estimator (see the module docstring).

    Args:
        env: the controller's env (its knob space, backend and latency estimator).
        fallback: an agent with ``action_for(budget_ms)`` (the calibrated static) served when no
            configuration is admissible; ``None``: the configuration with the lowest bound.
    """

    def __init__(self, env, fallback: Any = None, answer_lengths: str = "expected"):
        if answer_lengths not in ANSWER_LENGTHS:
            raise ValueError(f"answer_lengths={answer_lengths!r} is invalid; accepted: {', '.join(ANSWER_LENGTHS)}")
        self.env, self.fallback = env, fallback
        nvec = [int(n) for n in env.trajectory_nvec]
        grid = np.indices(nvec).reshape(len(nvec), -1).T  # every trajectory, first head slowest
        self.trajectories = np.ascontiguousarray(grid, dtype=np.int64)
        self.knobs = env.trajectory_knobs(self.trajectories)
        backend = env.backend
        self.bounded = answer_lengths == "every" and isinstance(backend, BoundedGeneration)
        self.lengths = tuple(range(int(backend.max_new_tokens) + 1)) if self.bounded else ()

    def latencies(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """``(expected, bound)`` ms of every row of :attr:`trajectories` on ``sample``: the estimator
        with the expected answer length, and its maximum over every answer length (one call each)."""
        latency, backend = self.env.latency, self.env.backend
        counts = [backend.expected_token_counts(sample, k) for k in self.knobs]
        expected = latency.predict_ms(self.knobs, counts)
        if not self.lengths:
            return expected, expected
        knobs = [k for k in self.knobs for _ in self.lengths]
        rows = [dataclasses.replace(c, new_tokens=n) for c in counts for n in self.lengths]
        bound = latency.predict_ms(knobs, rows).reshape(len(self.knobs), len(self.lengths)).max(axis=1)
        return expected, np.maximum(bound, expected)

    def plan(self, sample: Sample, budget_ms: float) -> "GuardPlan":
        """The admissible configurations of ``sample`` at ``budget_ms`` (computed once per request)."""
        expected, bound = self.latencies(sample)
        admissible = bound <= budget_ms
        fallback = None
        if not admissible.any():
            if self.fallback is not None:
                fallback = np.asarray(self.fallback.action_for(budget_ms), dtype=np.int64)
            else:
                fallback = self.trajectories[int(np.argmin(bound))]
        return GuardPlan(self, expected, admissible, fallback)


@dataclasses.dataclass
class GuardPlan:
    """One request's admissible configurations; :meth:`check` vets each stage's choice."""

    guard: BudgetGuard
    expected: np.ndarray
    admissible: np.ndarray
    fallback: np.ndarray | None  #: the whole trajectory to serve when nothing is admissible
    outcome: str = "kept"

    def check(self, trajectory: np.ndarray, heads: list[int], earlier: list[int]) -> np.ndarray:
        """``trajectory`` with this stage's ``heads`` replaced when no admissible configuration keeps
        them and the ``earlier`` heads; records the replacement in :attr:`outcome`."""
        rows = self.guard.trajectories
        same_earlier = np.all(rows[:, earlier] == trajectory[earlier], axis=1) & self.admissible
        if np.any(same_earlier & np.all(rows[:, heads] == trajectory[heads], axis=1)):
            return trajectory
        # An earlier stage left an admissible completion, so same_earlier has a row.
        dearest = int(np.argmax(np.where(same_earlier, self.expected, -np.inf)))
        out = trajectory.copy()
        out[heads] = rows[dearest, heads]
        self.outcome = "replaced"
        return out
