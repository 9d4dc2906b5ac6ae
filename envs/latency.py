"""Where an env's latency comes from: the learned estimator (default) or the wall clock."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.base import Backend
from backends.knobs import KnobConfig
from backends.outcome import Outcome, Stage1State, TokenCounts
from backends.runner import LRUCache
from backends.trace import TraceBackend
from latency_model.modes import LATENCY_MODES


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

    def __init__(self, backend: Backend, mode: str = "estimated", estimator=None, cache_dir: str | None = None):
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

            # Every live backend (recorded_estimator_file() is None) is profiled on this device when
            # nothing is cached; a replay is not (profiling it would time the replay, not the model).
            estimator = get_estimator(backend, cache_dir=cache_dir,
                                      profile_if_missing=not isinstance(backend, TraceBackend))
        self.estimator = estimator
        # Predictions are pure functions of (knobs, token counts), and inputs share token counts
        # (prompt lengths take few values), so a row is predicted once per env: the estimator call
        # costs more than a small model's step on a CPU. Bounded, so memory stays flat.
        self._total_memo: LRUCache[float] = LRUCache(self.MEMO_SIZE)
        self._stage1_memo: LRUCache[float] = LRUCache(self.MEMO_SIZE)

    #: predictions kept per memo (total and stage-1 latency)
    MEMO_SIZE = 100_000

    @staticmethod
    def _memoised(memo: LRUCache, keys: list, predict_rows) -> np.ndarray:
        missing = [i for i, key in enumerate(keys) if key not in memo]
        if missing:
            values = np.asarray(predict_rows(missing), dtype=np.float64)
            for i, value in zip(missing, values):
                memo.put(keys[i], float(value))
        out = np.empty(len(keys), dtype=np.float64)
        for i, key in enumerate(keys):
            value = memo.get(key)
            if value is None:  # evicted while this call filled the memo (more rows than its size)
                value = float(predict_rows([i])[0])
            out[i] = value
        return out

    def noise_description(self) -> str | None:
        """The estimator's profile noise in one line (e.g. ``repeat noise 7.9% (bound 40%)``), for
        warnings and run reports; ``None`` when the estimator carries no noise record. Every
        estimator declares ``noise`` (a :class:`latency_model.profile.ProfileNoise` or ``None``)."""
        noise = self.estimator.noise
        return None if noise is None else noise.describe()

    def predict_ms(self, knobs: Sequence[KnobConfig], counts: Sequence[TokenCounts]) -> np.ndarray:
        knobs, counts = list(knobs), list(counts)
        keys = [(k, tuple(vars(c).values())) for k, c in zip(knobs, counts)]
        return self._memoised(self._total_memo, keys, lambda rows: self.estimator.predict(
            [knobs[i] for i in rows], [counts[i] for i in rows]))

    def stage1_ms(self, state: Stage1State) -> float:
        """Latency spent by stage 1 (vision tower + block 1)."""
        if self.mode == "measured":
            return float(state.measured_ms)
        key = (state.tier, tuple(vars(state.token_counts).values()))
        return float(self._memoised(self._stage1_memo, [key], lambda rows: self.estimator.predict_stage1(
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
