"""An analytic stand-in for the latency estimator, shared by the agent and CLI tests.

Latency grows with vision tokens, top-k x depth and generated tokens. ``make`` is the
``estimator=module:callable`` hook train.py accepts (the CLI tests put this folder on PYTHONPATH).
"""

import numpy as np


class AnalyticEstimator:
    noise = None  # a stand-in has no measured profile noise

    def predict(self, knobs, counts):
        return np.array([20 + 0.5 * c.vision_tokens + (k.top_k or 8) * (k.depth or 16) * 0.4 + 8 * c.new_tokens
                         for k, c in zip(knobs, counts)], dtype=np.float64)

    def predict_stage1(self, tiers, counts):
        return np.array([5 + 0.2 * c.vision_tokens for c in counts], dtype=np.float64)


def make(backend):
    return AnalyticEstimator()


class DecodingAnalyticEstimator:
    """A stand-in for the decoding estimator (``Decoding-v0``'s ``estimator=``): latency grows with
    beams and generated tokens; speculative decoding is cheaper per token."""

    noise = None
    identity: dict = {}
    fingerprint: dict = {}

    def predict(self, knobs, counts, acceptance=None):
        return np.array([4 + 0.1 * c.prompt_tokens + c.new_tokens * (1.5 * k.num_beams if k.strategy != "speculative"
                                                                       else 0.8) for k, c in zip(knobs, counts)],
                        dtype=np.float64)
