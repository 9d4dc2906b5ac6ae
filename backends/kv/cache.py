"""A transformers 5.23 cache whose layers evict tokens under a :class:`~backends.kv.policies.KVPolicy`.

How it plugs in (no model source is patched): attention modules call
``past_key_values.update(keys, values, layer_idx)``; :class:`PolicyCacheLayer.update` appends the
new keys, returns everything it held plus the new keys to the attention, and then, if the policy
says a prune is due, keeps only the selected tokens for the next step.

Positions under RoPE (the choice made here: ORIGINAL positions):

* the model rotates keys before caching them, so every cached key stays rotated at the absolute
  position its token had in the document;
* :meth:`PolicyCacheLayer.get_seq_length` reports the number of tokens *seen*, not kept, so the
  model derives the true absolute position ids for new tokens (``arange(q) + seen``);
* :meth:`PolicyCacheLayer.get_mask_sizes` reports ``kv_length = kept + q`` and
  ``kv_offset = seen - kept``: every kept token is older than every query, so it is visible to all
  of them, and the new tokens are causally masked among themselves.

Evicted tokens are therefore never re-inserted at new tail positions, and the positions held by a
layer (:attr:`PolicyCacheLayer.positions`) are strictly increasing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from backends.checks import check_int
from backends.kv.policies import KVPolicy


@dataclass(frozen=True)
class PruneEvent:
    """One eviction (recorded once per cache, from layer 0).

    Args:
        seen_tokens: tokens seen when the prune happened (the last of them is the newest token).
        length_before: tokens cached before the prune.
        length_after: tokens cached after it.
    """

    seen_tokens: int
    length_before: int
    length_after: int

    @property
    def evicted(self) -> int:
        return self.length_before - self.length_after


class PolicyCacheLayer(DynamicLayer):
    """One decoder layer's cache, pruned by the owning :class:`KVPolicyCache`'s current policy."""

    is_croppable = False

    def __init__(self, owner: "KVPolicyCache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.seen_tokens = 0
        self.positions = torch.zeros(0, dtype=torch.long)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens, return all keys/values for this forward, then prune if due."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = self.positions.to(key_states.device)
        n_new = key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, torch.arange(self.seen_tokens, self.seen_tokens + n_new,
                                                            device=self.positions.device)])
        self.seen_tokens += n_new
        policy = self._owner.policy
        if policy.should_prune(keys.shape[-2]):
            keep = policy.keep_indices(positions, keys, values)
            if self.layer_idx == 0:
                self._owner.record_prune(PruneEvent(self.seen_tokens, keys.shape[-2], len(keep)))
            self.keys, self.values = keys[:, :, keep], values[:, :, keep]
            self.positions = positions[keep]
        else:
            self.keys, self.values, self.positions = keys, values, positions
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen so far (not kept): new tokens get their true absolute positions from it."""
        return self.seen_tokens

    @property
    def cache_length(self) -> int:
        """Tokens currently held."""
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.cache_length
        return kept + query_length, self.seen_tokens - kept

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.positions = torch.zeros(0, dtype=torch.long)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a KV-policy cache cannot be cropped (evicted tokens cannot be restored); "
                         "accepted: a fresh cache from apply_kv_policy")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("a KV-policy cache supports one stream at a time; accepted: batch expansion is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("a KV-policy cache supports one stream at a time; accepted: batch selection is not supported")


class KVPolicyCache(Cache):
    """A cache of :class:`PolicyCacheLayer` whose policy may change between forwards (knobs per chunk).

    Args:
        policy: the policy in force.
        num_layers: decoder layers of the model.
    """

    def __init__(self, policy: KVPolicy, num_layers: int):
        if not isinstance(policy, KVPolicy):
            raise ValueError(f"policy={policy!r} is invalid; accepted: a KVPolicy instance")
        check_int("num_layers", num_layers, 1)
        super().__init__(layers=[PolicyCacheLayer(self, i) for i in range(num_layers)])
        self.policy = policy
        self.prune_events: list[PruneEvent] = []

    def set_policy(self, policy: KVPolicy) -> None:
        """Switch knobs; the next prune uses them (evicted tokens stay evicted)."""
        if not isinstance(policy, KVPolicy):
            raise ValueError(f"policy={policy!r} is invalid; accepted: a KVPolicy instance")
        self.policy = policy

    def record_prune(self, event: PruneEvent) -> None:
        self.prune_events.append(event)

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen_tokens

    @property
    def cache_length(self) -> int:
        """Tokens held by layer 0 (every layer holds the same number)."""
        return self.layers[0].cache_length

    @property
    def tokens_since_prune(self) -> int:
        last = self.prune_events[-1].seen_tokens if self.prune_events else 0
        return self.seen_tokens - last

    def positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Original absolute positions of the tokens held by ``layer_idx`` (ascending)."""
        return self.layers[layer_idx].positions

    def reset(self) -> None:
        super().reset()
        self.prune_events = []

    def fork(self) -> "KVPolicyCache":
        """An independent copy of this cache's state (same policy, same kept tokens and prune history).

        Cheap: stored tensors are shared, which is safe because a layer never changes a stored tensor
        in place (:meth:`PolicyCacheLayer.update` builds new ones), so the copies evolve apart.
        """
        copy = KVPolicyCache(self.policy, len(self.layers))
        for mine, theirs in zip(copy.layers, self.layers):
            mine.__dict__.update({k: v for k, v in theirs.__dict__.items() if k not in ("_owner", "layer_idx")})
        copy.prune_events = list(self.prune_events)
        return copy


def num_decoder_layers(model) -> int:
    """Decoder layers of a loaded causal LM (from its text config)."""
    config = model.config.get_text_config(decoder=True)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{type(model).__name__} config has no usable num_hidden_layers ({layers!r}); "
                         "accepted: a decoder-only causal LM")
    return layers


@contextlib.contextmanager
def apply_kv_policy(model, policy: KVPolicy) -> Iterator[KVPolicyCache]:
    """Apply ``policy`` to ``model`` for one stream; yields the cache to pass as ``past_key_values``.

    Works for prefill and token-by-token decoding, with ``model(...)`` and ``model.generate(...)``::

        with apply_kv_policy(model, SinkWindow(4, 64)) as cache:
            out = model(input_ids, past_key_values=cache, use_cache=True)

    The model is put in eval mode and restored on exit; the cache is emptied on exit.
    """
    cache = KVPolicyCache(policy, num_decoder_layers(model))
    was_training = model.training
    model.eval()
    try:
        yield cache
    finally:
        cache.reset()
        model.train(was_training)


def kv_bytes_per_token(model) -> int:
    """Bytes one cached token takes in every layer together: keys and values of all KV heads.

    ``2 * layers * kv_heads * head_dim * bytes per element`` (of the model's parameter dtype).
    """
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int) and kv_heads > 0 and head_dim > 0):
        raise ValueError(f"{type(model).__name__} config has no usable attention heads / head_dim; accepted: a "
                         "decoder-only causal LM")
    element = next(model.parameters()).element_size()
    return 2 * num_decoder_layers(model) * kv_heads * head_dim * element
