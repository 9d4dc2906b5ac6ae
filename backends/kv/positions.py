"""Where cached keys sit under RoPE: original positions, or positions inside the cache (StreamingLLM).

A KV policy's ``rope_positions`` option (:class:`~backends.kv.policies.KVPolicy`) chooses:

* ``"original"``: every cached key stays rotated at the absolute position its token had in the
  document, and a new token gets its true position. Evicting leaves gaps; a stream longer than
  the model's positions feeds positions (and relative distances, from the sinks) it never saw.
* ``"cache"``: StreamingLLM's scheme: positions are re-numbered within the kept cache. The key in
  cache slot ``j`` is rotated at position ``j`` and a new token gets position ``kept`` (the number of
  tokens held), so no position or relative distance ever exceeds the peak cache size.

How ``"cache"`` is applied without re-running the model: a RoPE rotation by ``a`` followed by one
by ``b`` is the rotation by ``a + b``, so a key rotated at ``p`` is moved to ``q`` by rotating it by
``q - p`` (:meth:`KeyRotator.rotate`). The cache does this to the keys a compaction moves (they
shift down by the tokens evicted before them), in the same pass that moves them.

Supported: models whose rotary module has an ``inv_freq`` buffer and which rotate the first
``2 * len(inv_freq)`` dimensions of each head as ``x * cos + rotate_half(x) * sin`` (GPT-NeoX /
Pythia, Llama, Mistral, Qwen2, OLMo, ...). Interleaved-pair RoPE (GPT-J) is not.
"""

from __future__ import annotations

import torch

ROPE_POSITIONS = ("original", "cache")


class KeyRotator:
    """Rotates cached keys by per-token position deltas with a model's own RoPE frequencies.

    Args:
        inv_freq: the rotary module's inverse frequencies ``(rotary_dim / 2,)``.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()
        self.rotary_dim = 2 * len(self.inv_freq)

    @classmethod
    def from_model(cls, model) -> "KeyRotator | None":
        """The rotator of ``model``'s RoPE, or ``None`` when it has no rotary module with ``inv_freq``."""
        for module in model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if type(module).__name__.endswith("RotaryEmbedding") and isinstance(inv_freq, torch.Tensor):
                return cls(inv_freq)
        return None

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``keys`` ``(batch, heads, n, head_dim)`` rotated by ``delta`` ``(n,)`` positions (a new tensor)."""
        freqs = delta.to(device=keys.device, dtype=torch.float32)[:, None] * self.inv_freq.to(keys.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)
        rot, rest = keys[..., :self.rotary_dim], keys[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated_half * sin, rest), dim=-1)
