"""What one streamed chunk produced, and the episode summary of a KV env's last step.

A :class:`ChunkRecord` is budget-free (rewards are computed from it at any budget):
:func:`play_chunk` streams one chunk into one; the env scores records against budgets.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from backends.kv.policies import KVPolicy
from backends.kv.stream import DocumentStreamer


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """What streaming one chunk under one policy produced (budget-free: rewards are computed from it)."""

    nll: np.ndarray
    cache_length: np.ndarray
    prune_steps: np.ndarray
    prune_events: tuple
    step_ms: np.ndarray
    end_cache_length: int
    end_since_prune: int

    @property
    def num_tokens(self) -> int:
        return len(self.nll)


def episode_summary(chunk_infos: Sequence[dict]) -> dict:
    """The episode-level fields the last step's info carries (token-weighted over the chunks).

    ``score`` (the episode's mean-NLL score), ``latency_ms`` (mean TPOT per token),
    ``violated`` (any chunk violated a limit); the last chunk's own ``score`` and ``violated``
    move to ``chunk_score`` and ``chunk_violated``; ``violated_chunks`` counts violating chunks,
    ``episode_reward`` is the return.
    """
    last = chunk_infos[-1]
    tokens = np.array([len(i["nll"]) for i in chunk_infos], dtype=np.float64)
    tpot = np.array([i["tpot_ms"] for i in chunk_infos])
    scores = np.array([i["score"] for i in chunk_infos])
    return {"chunk_score": last["score"], "chunk_violated": last["violated"],
            "score": float(np.average(scores, weights=tokens)),
            "latency_ms": float(np.average(tpot, weights=tokens)),
            "violated": any(i["violated"] for i in chunk_infos),
            "violated_chunks": int(sum(i["violated"] for i in chunk_infos)),
            "episode_reward": float(sum(i["chunk_reward"] for i in chunk_infos))}


def play_chunk(streamer: DocumentStreamer, policy: KVPolicy, chunk_tokens: int) -> ChunkRecord:
    """Stream the next ``chunk_tokens`` tokens under ``policy`` (the only place the KV envs run the model)."""
    first_seen = streamer.cursor
    trace = streamer.advance(chunk_tokens, policy)
    prune_steps = np.zeros(trace.num_tokens)
    for event in trace.prune_events:
        prune_steps[event.seen_tokens - 1 - first_seen] = 1.0
    return ChunkRecord(trace.nll, trace.cache_length, prune_steps,
                       tuple(dataclasses.asdict(e) for e in trace.prune_events), trace.step_ms,
                       int(streamer.cache.cache_length), int(streamer.cache.tokens_since_prune))
