"""A per-token latency (TPOT) model for KV policies, fitted from a quick measurement.

Measured TPOT is wall clock and varies run to run; environments that must be deterministic use
this analytic estimate instead::

    tpot_ms = base_ms + per_slot_ms * attended_tokens + per_prune_ms * [a prune happened this step]

``attended_tokens`` is the cache length the step attends to (its own token included). The fit
times single-token forwards at a few cache lengths under the full cache (slope and intercept)
and the same with a prune on every step (prune overhead), taking medians.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from backends.kv.cache import KVPolicyCache, num_decoder_layers
from backends.kv.policies import FullCache, SinkWindow


@dataclass(frozen=True)
class TpotModel:
    """Analytic per-token latency in milliseconds (see module docstring)."""

    base_ms: float
    per_slot_ms: float
    per_prune_ms: float

    def __post_init__(self) -> None:
        for name in ("base_ms", "per_slot_ms", "per_prune_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TpotModel.{name}={value!r} is invalid; accepted: a finite number >= 0")

    def predict(self, attended_tokens, prunes) -> np.ndarray:
        """Per-step milliseconds for arrays of attended cache lengths and prune flags (0/1)."""
        attended = np.asarray(attended_tokens, dtype=np.float64)
        pruned = np.asarray(prunes, dtype=np.float64)
        return self.base_ms + self.per_slot_ms * attended + self.per_prune_ms * pruned


@torch.inference_mode()
def _median_step_ms(model, policy, prefill: int, steps: int, vocab: int, generator: torch.Generator) -> float:
    cache = KVPolicyCache(policy, num_decoder_layers(model))
    prompt = torch.randint(0, vocab, (1, prefill), generator=generator).to(model.device)
    model(prompt, past_key_values=cache, use_cache=True)
    times = []
    for _ in range(steps):
        token = torch.randint(0, vocab, (1, 1), generator=generator).to(model.device)
        start = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def fit_tpot_model(model, lengths: tuple[int, ...] = (32, 128, 512), steps: int = 15, seed: int = 0) -> TpotModel:
    """Fit :class:`TpotModel` to ``model`` on this machine (about 100 forwards).

    Args:
        model: a loaded causal LM.
        lengths: cache lengths timed (at least two, increasing).
        steps: timed forwards per length and schedule (medians are used).
        seed: seed of the random tokens fed.
    """
    if len(lengths) < 2 or any(b <= a for a, b in zip(lengths, lengths[1:])) or lengths[0] < 2:
        raise ValueError(f"lengths={lengths!r} is invalid; accepted: at least two increasing integers >= 2")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid; accepted: an integer >= 1")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(seed)
    full = np.array([_median_step_ms(model, FullCache(), n, steps, vocab, generator) for n in lengths])
    # SinkWindow(0, n - 1) with compress_every=1 prunes on every step at cache length n.
    pruned = np.array([_median_step_ms(model, SinkWindow(0, n - 1), n, steps, vocab, generator) for n in lengths])
    slope, intercept = np.polyfit(np.asarray(lengths, dtype=np.float64), full, 1)
    return TpotModel(base_ms=float(max(intercept, 0.0)), per_slot_ms=float(max(slope, 0.0)),
                     per_prune_ms=float(max(np.median(pruned - full), 0.0)))
