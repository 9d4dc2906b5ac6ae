"""KV-cache policies for causal LMs on the transformers 5.23 cache API.

A policy is a frozen dataclass whose fields are its knobs (:class:`SinkWindow`,
:class:`KeyNormWindow`, or your own registered with :func:`register_kv_policy`). Apply one with
:func:`apply_kv_policy` (a context manager yielding the cache to pass as ``past_key_values``), or
stream a document with :class:`DocumentStreamer`. Positions: original absolute positions are kept
under RoPE (see :mod:`backends.kv.cache`).
"""

from backends.kv.cache import KVPolicyCache, PolicyCacheLayer, PruneEvent, apply_kv_policy
from backends.kv.diagnostics import DocumentReport, SpikeMetrics, document_report, nll_around_events, spike_metrics
from backends.kv.policies import (FullCache, KeyNormWindow, KVPolicy, SinkWindow, kv_policy_class,
                                  on_kv_policy_registered, register_kv_policy, registered_kv_policies)
from backends.kv.stream import ChunkTrace, DocumentStreamer, greedy_generate

__all__ = [
    "KVPolicy", "FullCache", "SinkWindow", "KeyNormWindow", "register_kv_policy", "registered_kv_policies",
    "kv_policy_class", "on_kv_policy_registered", "KVPolicyCache", "PolicyCacheLayer", "PruneEvent",
    "apply_kv_policy", "DocumentStreamer", "ChunkTrace", "greedy_generate", "DocumentReport", "SpikeMetrics",
    "document_report", "nll_around_events", "spike_metrics",
]
