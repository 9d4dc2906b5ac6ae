"""Diagnostics of KV policies: NLL spikes around prune events, and whole-document PPL / TPOT.

Conventions: ``nll[i]`` is the NLL of token ``i + 1`` predicted after feeding token ``i`` (the
:class:`~backends.kv.stream.DocumentStreamer` order). A prune recorded at ``seen_tokens = s``
happened inside the forward that fed token ``s - 1``; the first prediction made without the
evicted tokens is ``nll[s]``.

Spike metrics compare the policy's per-token NLL with a baseline (the full-cache NLL of the same
document when available, otherwise the mean NLL of the ``before`` tokens preceding the event):

* ``peak``: the largest excess NLL in the ``after`` tokens following the event;
* ``area``: the sum of positive excess over those tokens (nats);
* ``width``: how many consecutive tokens from the event on stay above ``threshold`` excess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backends.checks import check_int
from backends.kv.cache import PruneEvent
from backends.kv.policies import KVPolicy
from backends.kv.stream import DocumentStreamer


@dataclass(frozen=True)
class SpikeMetrics:
    """NLL excess after one prune event (see module docstring)."""

    seen_tokens: int
    evicted: int
    peak: float
    area: float
    width: int


def _check_window(name: str, value) -> None:
    check_int(name, value, 1)


def nll_around_events(nll, events: list[PruneEvent], before: int = 8, after: int = 32) -> np.ndarray:
    """Per-token NLL aligned on prune events: ``(events, before + after)``, NaN where out of range.

    Column ``before`` is the first prediction made after the eviction.
    """
    _check_window("before", before)
    _check_window("after", after)
    nll = np.asarray(nll, dtype=np.float64)
    aligned = np.full((len(events), before + after), np.nan)
    for row, event in enumerate(events):
        for col, index in enumerate(range(event.seen_tokens - before, event.seen_tokens + after)):
            if 0 <= index < len(nll):
                aligned[row, col] = nll[index]
    return aligned


def spike_metrics(nll, events: list[PruneEvent], baseline_nll=None, before: int = 8, after: int = 32,
                  threshold: float = 0.1) -> list[SpikeMetrics]:
    """Peak, area and width of the NLL excess after each prune event.

    Args:
        nll: per-token NLL under the policy.
        events: prune events of the same pass.
        baseline_nll: per-token NLL of the same document with the full cache (same length as
            ``nll``); ``None`` = use the mean of the ``before`` tokens preceding each event.
        before, after: tokens before / after the event considered.
        threshold: excess NLL (nats) above which a token counts towards ``width``.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold={threshold!r} is invalid; accepted: a finite number >= 0")
    nll = np.asarray(nll, dtype=np.float64)
    if baseline_nll is not None:
        baseline_nll = np.asarray(baseline_nll, dtype=np.float64)
        if baseline_nll.shape != nll.shape:
            raise ValueError(f"baseline_nll has shape {baseline_nll.shape}; accepted: the shape of nll {nll.shape}")
    aligned = nll_around_events(nll, events, before, after)
    aligned_base = nll_around_events(baseline_nll, events, before, after) if baseline_nll is not None else None
    metrics = []
    for row, event in enumerate(events):
        following = aligned[row, before:]
        if aligned_base is not None:
            excess = following - aligned_base[row, before:]
        else:
            preceding = aligned[row, :before]
            reference = np.nanmean(preceding) if np.any(~np.isnan(preceding)) else np.nan
            excess = following - reference
        excess = excess[~np.isnan(excess)]
        if len(excess) == 0:
            continue
        above = excess > threshold
        width = int(np.argmin(above)) if not above.all() else len(above)
        metrics.append(SpikeMetrics(event.seen_tokens, event.evicted, float(excess.max()),
                                    float(np.clip(excess, 0, None).sum()), width))
    return metrics


@dataclass(frozen=True)
class DocumentReport:
    """A whole document under one fixed policy.

    Args:
        policy: the policy, as text.
        num_tokens: tokens predicted.
        ppl: perplexity ``exp(mean NLL)``.
        tpot_ms: median wall-clock milliseconds per token.
        mean_cache_length: mean tokens attended per step.
        num_prunes: prune events.
        nll: the per-token NLL (for spike analysis).
        prune_events: the prune events.
    """

    policy: str
    num_tokens: int
    ppl: float
    tpot_ms: float
    mean_cache_length: float
    num_prunes: int
    nll: np.ndarray
    prune_events: tuple

    def spikes(self, baseline: "DocumentReport | None" = None, **kwargs) -> list[SpikeMetrics]:
        """Spike metrics of this pass, against ``baseline``'s per-token NLL when given."""
        return spike_metrics(self.nll, list(self.prune_events),
                             baseline.nll if baseline is not None else None, **kwargs)


def document_report(model, token_ids, policy: KVPolicy) -> DocumentReport:
    """PPL and TPOT of ``token_ids`` streamed token by token under the fixed ``policy``."""
    streamer = DocumentStreamer(model, token_ids, policy)
    trace = streamer.advance(streamer.remaining)
    return DocumentReport(
        policy=str(policy), num_tokens=trace.num_tokens, ppl=float(np.exp(trace.nll.mean())),
        tpot_ms=float(np.median(trace.step_ms)), mean_cache_length=float(trace.cache_length.mean()),
        num_prunes=len(trace.prune_events), nll=trace.nll, prune_events=tuple(trace.prune_events))
