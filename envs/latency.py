"""Where an env's latency comes from: the learned estimator (default) or the wall clock."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.knobs import KnobConfig
from backends.outcome import Outcome, Stage1State, TokenCounts

LATENCY_MODES = ("estimated", "measured")


class LatencySource:
    """Per-sample latency for rewards, and predictions for observations and budget warnings.

    ``estimated`` (default): the learned estimator of (backend, device) from ``latency_model``,
    profiled and fitted once if not cached; deterministic, so the env is too.
    ``measured``: the backend's wall-clock time of this run (CUDA-synchronised on GPU); the
    estimator is still used for the predictive observation features.

    Args:
        backend: the backend whose latency is estimated.
        mode: ``estimated`` or ``measured``.
        estimator: an already-loaded estimator (skips the cache lookup).
        cache_dir: estimator cache directory (default: ``latency_model``'s).
    """

    def __init__(self, backend, mode: str = "estimated", estimator=None, cache_dir: str | None = None):
        if mode not in LATENCY_MODES:
            raise ValueError(f"latency={mode!r} is invalid; accepted: {', '.join(LATENCY_MODES)}")
        self.mode = mode
        recorded = backend.recorded_estimator_file()
        if estimator is None and recorded is not None:
            # A replayed trace charges the latencies of the device it was recorded on.
            from latency_model import LatencyEstimator

            estimator = LatencyEstimator.load(recorded)
        if estimator is None:
            from latency_model import get_estimator

            # A backend without a recorded estimator (every live backend: Backend.recorded_estimator_file
            # returns None) is profiled on this device when nothing is cached.
            estimator = get_estimator(backend, cache_dir=cache_dir, profile_if_missing=True)
        self.estimator = estimator

    # Predictions are pure functions of (knobs, token counts), and inputs share token counts
    # (prompt lengths take few values), so a row is predicted once per env: the estimator call
    # costs more than a small model's step on a CPU.
    _MEMO_SIZE = 100_000

    def _memoised(self, name: str, keys: list, predict_rows) -> np.ndarray:
        memo = self.__dict__.setdefault(f"_{name}_memo", {})
        missing = [i for i, key in enumerate(keys) if key not in memo]
        if missing:
            if len(memo) + len(missing) > self._MEMO_SIZE:
                memo.clear()
            values = np.asarray(predict_rows(missing), dtype=np.float64)
            for i, value in zip(missing, values):
                memo[keys[i]] = float(value)
        return np.array([memo[key] for key in keys], dtype=np.float64)

    def predict_ms(self, knobs: Sequence[KnobConfig], counts: Sequence[TokenCounts]) -> np.ndarray:
        knobs, counts = list(knobs), list(counts)
        keys = [(k, tuple(vars(c).values())) for k, c in zip(knobs, counts)]
        return self._memoised("total", keys, lambda rows: self.estimator.predict(
            [knobs[i] for i in rows], [counts[i] for i in rows]))

    def stage1_ms(self, state: Stage1State) -> float:
        """Latency spent by stage 1 (vision tower + block 1)."""
        if self.mode == "measured":
            return float(state.measured_ms)
        key = (state.tier, tuple(vars(state.token_counts).values()))
        return float(self._memoised("stage1", [key], lambda rows: self.estimator.predict_stage1(
            [state.tier], [state.token_counts]))[0])

    def outcome_ms(self, outcome: Outcome) -> float:
        """Latency of a whole run, charged against the budget."""
        if self.mode == "measured":
            return float(outcome.measured_ms)
        return float(self.predict_ms([outcome.knobs], [outcome.token_counts])[0])

    def outcomes_ms(self, outcomes: Sequence[Outcome]) -> np.ndarray:
        if self.mode == "measured":
            return np.array([o.measured_ms for o in outcomes], dtype=np.float64)
        return self.predict_ms([o.knobs for o in outcomes], [o.token_counts for o in outcomes])
