"""SinkWindow: StreamingLLM's attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.kv.policies.base import KVPolicy, register_kv_policy, require_int


@register_kv_policy
@dataclass(frozen=True)
class SinkWindow(KVPolicy):
    """StreamingLLM: ``n_sink`` attention-sink tokens plus the most recent tokens.

    Args:
        n_sink: the oldest cached tokens always kept (the document's first tokens; ``0`` = window only).
        window: KV slots kept after a prune, sinks included (StreamingLLM's cache size), so
            ``window - n_sink`` recent tokens survive. ``n_sink < window`` so the newest token
            always has room.
        compress_every: see :class:`~backends.kv.policies.base.KVPolicy`.

    If knobs change mid-stream, the sinks are the ``n_sink`` oldest tokens still cached: an
    evicted token never comes back.
    """

    scores_read_cache = False  # recency by slot: one keep per prune serves every layer

    n_sink: int = 4

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        require_int(name, "n_sink", self.n_sink, 0)
        if self.n_sink >= self.window:
            raise ValueError(f"{name}: n_sink={self.n_sink} must be < window={self.window} "
                             "(the window must hold at least one recent token besides the sinks)")

    def score(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # Recency by cache slot; the n_sink oldest slots score above every recent token.
        length = len(positions)
        scores = torch.arange(length, dtype=torch.float32, device=positions.device)
        scores[:self.n_sink] += length
        return scores
