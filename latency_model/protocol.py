"""The one interface of knobgym's latency estimators: ``predict(configs, token_counts) -> ms``.

The vision-language estimator (:class:`latency_model.estimator.LatencyEstimator`: knob
configurations and token counts of runs), the decoding estimator
(:class:`latency_model.decoding.DecodingLatencyEstimator`: decoding configurations and prompt /
generated token counts, with a finished run's acceptance) and the TPOT estimator
(:class:`latency_model.tpot.TpotEstimator`: per-step prune decisions and attended cache lengths)
all predict milliseconds, one float64 per row, each row computed alone (a row's figure does not
depend on the batch it is in). Envs hold one through :class:`envs.latency.EnvLatency`; a stand-in
(``estimator=module:callable`` on the CLI) implements the same method.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class LatencyPredictor(Protocol):
    def predict(self, configs: Sequence, token_counts: Sequence) -> np.ndarray:
        """Milliseconds (float64 ``[N]``) of each (configuration, token counts) row."""
