"""KeyNormWindow: recent tokens plus the older tokens with the smallest key norms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.kv.policies.base import KVPolicy, register_kv_policy, require_int


@register_kv_policy
@dataclass(frozen=True)
class KeyNormWindow(KVPolicy):
    """Key-norm scoring: keep the ``n_recent`` newest tokens plus the older tokens whose keys have the
    smallest L2 norm (low-norm keys tend to draw the most attention), ``window`` tokens in all.

    Scores are computed per layer (mean over batch and heads), so layers may keep different
    tokens; every layer keeps the same number. RoPE rotations preserve a key's norm, so scoring
    rotated keys is the same as scoring unrotated ones.

    Args:
        window: KV slots kept after a prune.
        n_recent: newest tokens always kept, ``1 <= n_recent <= window``.
        compress_every: see :class:`~backends.kv.policies.base.KVPolicy`.
    """

    n_recent: int = 32

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        require_int(name, "n_recent", self.n_recent, 1)
        if self.n_recent > self.window:
            raise ValueError(f"{name}: n_recent={self.n_recent} must be <= window={self.window}")

    def score(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        scores = -keys.float().norm(dim=-1).mean(dim=(0, 1))
        scores[max(len(positions) - self.n_recent, 0):] = float("inf")
        return scores
