"""The serving-side budget guard: a served configuration is one the estimator says fits the budget.

A policy trained against a latency budget still picks an over-budget configuration now and then
(it was rewarded on average, not per input). A user deploying it under an SLO expects the server
never to choose a configuration it predicts over budget when one within budget exists. Per
request, before anything runs, :class:`BudgetGuard` prices every configuration of the knob space
with the estimator on this request's prompt and vision token counts (exact before the run) and an
answer length. The answer's length is known only after the run, so the guard has three readings
(``answer_lengths``):

- ``truncate`` (the default of ``serve.py`` and ``Controller.from_run``): priced at the question
  type's expected answer length, and the answer is then cut at the longest length whose price still
  fits the budget (the largest ``n`` with every length ``0 .. n`` within it; the backend's
  :meth:`~backends.base.BoundedGeneration.generation_capped`). A served admissible configuration is
  then within budget by the estimator with its actual token counts, what an env charges, whatever
  the model generates: a deadline cuts a rambling answer, not the model the budget affords;
- ``expected``: priced at the expected length, answers not cut (an answer longer than expected is
  charged over the price);
- ``every``: priced at the most expensive length up to the generation cap (holds the charge
  without cutting, but at a tight budget no configuration fits the cap's length).

A configuration is *admissible* when its price is within the budget. Then, stage by stage:

- the policy's choice stands when some admissible configuration keeps it (and the earlier stages'
  choices): ``guard="kept"``;
- otherwise it is replaced by the dearest admissible configuration that keeps the earlier stages'
  choices (dearest by the estimator with the expected answer length, the greedy baseline's rule:
  the most model the budget affords): ``guard="replaced"``;
- when no configuration is admissible, the fallback is served: the static configuration the run
  calibrated at that budget (else the configuration with the lowest price): ``guard="fallback"``
  (under ``truncate`` its answer is cut the same way where some length fits).

So with ``truncate`` every request is within budget (estimated, charged) whenever the calibrated
static would be, by construction: served admissible, it is within; otherwise it is the static's own
configuration, cut no later than the budget allows. A backend that cannot cut its generation or
declares no cap (:class:`backends.base.BoundedGeneration`, e.g. a trace replay) is priced with the
expected length only (:attr:`BudgetGuard.bounded` is ``False``): the guard then holds on the
prediction, not the charge.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from backends.base import BoundedGeneration, Sample

GUARD_OUTCOMES = ("kept", "replaced", "fallback")
ANSWER_LENGTHS = ("truncate", "expected", "every")


class BudgetGuard:
    """Keeps a controller's choices within the budget by the estimator (see the module docstring).

    Args:
        env: the controller's env (its knob space, backend and latency estimator).
        fallback: an agent with ``action_for(budget_ms)`` (the calibrated static) served when no
            configuration is admissible; ``None``: the configuration with the lowest price.
        answer_lengths: how the answer's unknown length is priced: ``truncate`` (default),
            ``expected`` or ``every`` (see the module docstring).
    """

    def __init__(self, env, fallback: Any = None, answer_lengths: str = "truncate"):
        if answer_lengths not in ANSWER_LENGTHS:
            raise ValueError(f"answer_lengths={answer_lengths!r} is invalid; accepted: {', '.join(ANSWER_LENGTHS)}")
        self.env, self.fallback = env, fallback
        nvec = self.nvec = tuple(int(n) for n in env.trajectory_nvec)
        grid = np.indices(nvec).reshape(len(nvec), -1).T  # every trajectory, first head slowest
        self.trajectories = np.ascontiguousarray(grid, dtype=np.int64)
        self.knobs = env.trajectory_knobs(self.trajectories)
        backend = env.backend
        self.answer_lengths = answer_lengths
        self.bounded = answer_lengths != "expected" and isinstance(backend, BoundedGeneration)
        self.lengths = tuple(range(int(backend.max_new_tokens) + 1)) if self.bounded else ()

    @property
    def truncates(self) -> bool:
        """Whether served answers are cut at the longest length the budget affords."""
        return self.bounded and self.answer_lengths == "truncate"

    def latencies(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(expected, by_length, expected_lengths)`` of every row of :attr:`trajectories` on
        ``sample``: ms by the estimator with the expected answer length ``[rows]``, ms with each
        answer length ``0 .. max_new_tokens`` ``[rows, lengths]`` (``None`` when the guard is not
        bounded), and the expected answer length ``[rows]``."""
        latency, backend = self.env.latency, self.env.backend
        counts = [backend.expected_token_counts(sample, k) for k in self.knobs]
        expected = latency.predict_ms(self.knobs, counts)
        expected_lengths = np.array([c.new_tokens for c in counts], dtype=np.int64)
        if not self.lengths:
            return expected, None, expected_lengths
        knobs = [k for k in self.knobs for _ in self.lengths]
        rows = [dataclasses.replace(c, new_tokens=n) for c in counts for n in self.lengths]
        by_length = latency.predict_ms(knobs, rows).reshape(len(self.knobs), len(self.lengths))
        return expected, by_length, expected_lengths

    def plan(self, sample: Sample, budget_ms: float) -> "GuardPlan":
        """The admissible configurations of ``sample`` at ``budget_ms`` (computed once per request)."""
        expected, by_length, expected_lengths = self.latencies(sample)
        caps = None
        if by_length is None:
            price = expected
        elif self.truncates:
            # fits[r, n]: every answer length 0..n of row r is priced within the budget (the estimator
            # need not grow with the length: a prefix maximum, not the price at n alone)
            fits = np.maximum.accumulate(by_length, axis=1) <= budget_ms
            caps = fits.sum(axis=1) - 1  # fits is a prefix of Trues: the longest fitting length, -1 none
            # priced at the expected length, and that length must survive the cut
            price = np.where(caps >= np.minimum(expected_lengths, self.lengths[-1]), expected, np.inf)
        else:
            price = np.maximum(by_length.max(axis=1), expected)
        admissible = price <= budget_ms
        fallback = None
        if not admissible.any():
            if self.fallback is not None:
                fallback = np.asarray(self.fallback.action_for(budget_ms), dtype=np.int64)
            else:
                fallback = self.trajectories[int(np.argmin(expected if caps is not None else price))]
        return GuardPlan(self, expected, admissible, fallback, caps)


@dataclasses.dataclass
class GuardPlan:
    """One request's admissible configurations; :meth:`check` vets each stage's choice."""

    guard: BudgetGuard
    expected: np.ndarray
    admissible: np.ndarray
    fallback: np.ndarray | None  #: the whole trajectory to serve when nothing is admissible
    caps: np.ndarray | None = None  #: per row the longest answer length within budget (-1: none); None: no cut
    outcome: str = "kept"

    def answer_cap(self, trajectory: np.ndarray) -> int | None:
        """The answer length to cut ``trajectory``'s run at (``None``: do not cut; no length fits or
        the guard does not truncate)."""
        if self.caps is None:
            return None
        row = int(np.ravel_multi_index(tuple(int(v) for v in trajectory), self.guard.nvec))
        cap = int(self.caps[row])
        return cap if cap >= 0 else None

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
