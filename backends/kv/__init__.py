"""KV-cache policies for causal LMs on the transformers 5.23 cache API.

A policy is a frozen dataclass whose fields are its knobs and which overrides one method,
``score`` (:mod:`backends.kv.policies`, one policy per file). Apply one with
:func:`apply_kv_policy` (a context manager yielding the cache to pass as ``past_key_values``), or
stream a document with :class:`DocumentStreamer`. Storage: preallocated slots compacted in place
on prunes (default) or the seed's ``torch.cat`` per token (:mod:`backends.kv.cache`). Positions
under RoPE: original (default) or re-numbered inside the cache, StreamingLLM's scheme
(:mod:`backends.kv.positions`). Decode step: a fused one-token step for GPT-NeoX, the model's own
forward otherwise (:mod:`backends.kv.decode_step`). The per-token latency model is
:mod:`latency_model.tpot`.
"""

from backends.kv.cache import (STORAGES, ConcatCacheLayer, KVPolicyCache, PolicyCacheLayer, PruneEvent, SlotCacheLayer,
                               apply_kv_policy, kv_bytes_per_token, make_policy_cache)
from backends.kv.positions import ROPE_POSITIONS, KeyRotator
from backends.kv.diagnostics import DocumentReport, SpikeMetrics, document_report, nll_around_events, spike_metrics
from backends.kv.policies import (FullCache, KeyNormWindow, KVPolicy, SinkWindow, kv_policy_class, register_kv_policy,
                                  registered_kv_policies)
from backends.kv.stream import ChunkTrace, DocumentStreamer, greedy_generate, intra_op_threads

__all__ = [
    "KVPolicy", "FullCache", "SinkWindow", "KeyNormWindow", "register_kv_policy", "registered_kv_policies",
    "kv_policy_class", "KVPolicyCache", "PolicyCacheLayer", "SlotCacheLayer", "ConcatCacheLayer", "STORAGES",
    "make_policy_cache", "ROPE_POSITIONS", "KeyRotator", "PruneEvent", "apply_kv_policy", "kv_bytes_per_token",
    "DocumentStreamer", "ChunkTrace", "greedy_generate", "intra_op_threads", "DocumentReport", "SpikeMetrics",
    "document_report", "nll_around_events", "spike_metrics",
]
