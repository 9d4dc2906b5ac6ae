"""The KV cache's schedule without a model: per step, the tokens attended and whether a prune ran.

The policy owns its schedule (:meth:`backends.kv.policies.KVPolicy.schedule_step`, the rule the
cache follows); this module only steps it, chunk by chunk, for the envs' latency estimates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.kv.policies import KVPolicy


def simulate_schedule(policies: Sequence[KVPolicy], chunk_tokens: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(attended, pruned)`` per step when chunk ``c`` runs under ``policies[c]`` (no model run;
    :func:`simulate_cache` with the policy switched at chunk boundaries)."""
    attended, pruned = np.zeros(tokens, dtype=np.int64), np.zeros(tokens)
    held = 0
    for t in range(tokens):
        policy = policies[min(t // chunk_tokens, len(policies) - 1)]
        attended[t] = held + 1
        did_prune, held = policy.schedule_step(held + 1)  # the policy owns its schedule
        pruned[t] = float(did_prune)
    return attended, pruned


def simulate_cache(policy: KVPolicy, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(attended, pruned)`` per step of ``policy`` over ``tokens`` fed tokens, without running a model.

    Exact for any policy whose :meth:`KVPolicy.schedule_step` says what its cache does (the base:
    grow to ``window + compress_every``, cut back to ``window``).
    """
    return simulate_schedule([policy], max(1, tokens), tokens)
