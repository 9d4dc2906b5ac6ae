"""Where an env's latency comes from: the learned estimator (default) or the wall clock.

One type for every env family: :class:`EnvLatency` (the mode, checked once here, the estimator
and how it is described in warnings and run records); :class:`LatencySource` for the
vision-language knob envs, :class:`DecodingLatency` for ``Decoding-v0`` and :class:`TpotLatency`
for the KV envs say how each family's runs are charged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.base import Backend
from backends.knobs import KnobConfig
from backends.outcome import Outcome, Stage1State, TokenCounts
from backends.runner import LRUCache
from backends.trace import TraceBackend
from latency_model.modes import LATENCY_MODES


def check_latency_mode(mode: str) -> str:
    """``mode`` if it is a latency mode (:data:`latency_model.modes.LATENCY_MODES`), else one line naming it."""
    if mode not in LATENCY_MODES:
        raise ValueError(f"latency={mode!r} is invalid; accepted: {', '.join(LATENCY_MODES)}")
    return mode


class EnvLatency:
    """An env's latency source: ``mode`` (``estimated`` or ``measured``, see
    :data:`latency_model.modes.LATENCY_MODES`) and the fitted ``estimator`` of this device.

    Attributes:
        measure: what the budget limits, in words (``latency``; ``TPOT`` for the KV envs).
    """

    measure = "latency"

    def __init__(self, mode: str, estimator) -> None:
        self.mode, self.estimator = check_latency_mode(mode), estimator

    def noise_description(self) -> str | None:
        """The estimator's profile noise in one line (e.g. ``repeat noise 7.9% (bound 40%)``), for
        warnings and run reports; ``None`` when the estimator carries no noise record. Every
        estimator declares ``noise`` (a :class:`latency_model.profile.ProfileNoise` or ``None``)."""
        noise = getattr(self.estimator, "noise", None)
        return None if noise is None else noise.describe()

    def estimator_record(self) -> dict:
        """JSON-able description of the estimator, for run records."""
        return {"class": type(self.estimator).__name__}


class LatencySource(EnvLatency):
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
        super().__init__(mode, None)
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

    def estimator_record(self) -> dict:
        try:
            from latency_model.cache import describe

            return describe(self.estimator)
        except AttributeError:  # a stand-in estimator without the fields a fitted one records
            return super().estimator_record()

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


class DecodingLatency(EnvLatency):
    """Latency of decoded answers: the decoding estimator (default) or the wall clock of ``generate``.

    Args:
        backend: the decoding backend.
        mode: ``estimated`` (deterministic) or ``measured``.
        estimator: a fitted :class:`latency_model.decoding.DecodingLatencyEstimator` (default: the
            cached one of this backend and device, profiled once when missing).
    """

    def __init__(self, backend, mode: str = "estimated", estimator=None):
        super().__init__(mode, None)
        if estimator is None:
            from latency_model.decoding import get_decoding_estimator

            estimator = get_decoding_estimator(backend)
        self.estimator = estimator

    def estimator_record(self) -> dict:
        return {"class": type(self.estimator).__name__, "identity": self.estimator.identity,
                "fingerprint": self.estimator.fingerprint}

    def predict_ms(self, knobs, counts) -> float:
        """Estimated latency of one configuration before running (expected acceptance for speculative decoding)."""
        return float(self.estimator.predict([knobs], [counts])[0])

    def outcomes_ms(self, outcomes: Sequence) -> np.ndarray:
        """Latency charged for finished runs (their actual tokens and, for speculative decoding, acceptance)."""
        if self.mode == "measured":
            return np.array([o.measured_ms for o in outcomes], dtype=np.float64)
        # Row by row: a run's latency must not depend on which group it was evaluated in.
        from latency_model.decoding import RunTokenCounts

        return np.array([float(self.estimator.predict([o.knobs], [RunTokenCounts(
            o.token_counts.prompt_tokens, o.token_counts.new_tokens, o.accepted_per_pass)])[0])
            for o in outcomes], dtype=np.float64)


class TpotLatency(EnvLatency):
    """Time per output token of a streamed chunk: the model's TPOT estimator (default) or the wall clock.

    Args:
        mode: ``estimated`` (deterministic) or ``measured`` (median step time of the chunk; the
            estimator still gives the achievable range and the suggested budget).
        estimator: a :class:`latency_model.tpot.TpotEstimator`, a dict of its coefficients
            (``base_ms``, ``per_slot_ms``, ``per_prune_ms``), or ``None``: ``default()`` is called
            (the model's cached estimator on this device, profiled once when missing).
    """

    measure = "TPOT"

    def __init__(self, mode: str, estimator, default) -> None:
        from latency_model.tpot import TpotEstimator

        super().__init__(mode, None)
        if isinstance(estimator, dict):
            estimator = TpotEstimator(**estimator)
        elif estimator is None:
            estimator = default()
        elif not isinstance(estimator, TpotEstimator):
            raise ValueError(f"tpot_model={estimator!r} is invalid; accepted: None, a TpotEstimator or a dict of its "
                             "coefficients (base_ms, per_slot_ms, per_prune_ms)")
        self.estimator = estimator

    def noise_description(self) -> str | None:
        return self.estimator.describe()

    def estimator_record(self) -> dict:
        return {"class": type(self.estimator).__name__, **self.estimator.coefficients,
                "noise_pct": self.estimator.noise_pct}

    def schedule_ms(self, pruned, attended) -> np.ndarray:
        """Estimated ms per step of a cache schedule (prune flags and attended lengths per step)."""
        return self.estimator.predict(pruned, attended)

    def chunk_ms(self, pruned, attended, step_ms) -> float:
        """The TPOT charged for one streamed chunk: estimated from its schedule, or its median step time."""
        if self.mode == "estimated":
            return float(np.mean(self.schedule_ms(pruned, attended)))
        return float(np.median(step_ms))
