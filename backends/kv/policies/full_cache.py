"""FullCache: keep every token (the reference every other policy is compared against)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backends.kv.policies.base import KVPolicy, register_kv_policy


@register_kv_policy
@dataclass(frozen=True)
class FullCache(KVPolicy):
    """Never prune (``window`` is fixed to ``None``); ``compress_every`` has no effect."""

    window: None = field(default=None, init=False)

    def score(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return positions.float()  # never asked: a full cache is never pruned
