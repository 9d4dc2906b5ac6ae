"""A transformers 5.23 cache whose layers evict tokens under a :class:`~backends.kv.policies.KVPolicy`.

How it plugs in (no model source is patched): attention modules call
``past_key_values.update(keys, values, layer_idx)``; a layer stores the new keys, returns every
token it holds plus the new ones to the attention, and, if the policy says a prune is due, keeps
only the selected tokens for the next step.

Storage (``KVPolicyCache(storage=...)``, :data:`STORAGES`):

* ``"slots"`` (default, :class:`SlotCacheLayer`): preallocated storage per layer, sized for the
  policy's peak (``window + compress_every`` plus the tokens fed), holding the kept tokens in
  position order in slots ``[0, kept)``. A new token is written into the next free slot; the
  attention gets a view of the used slots (no copy); a prune compacts the storage in place: the
  kept tokens that are not already in place (for SinkWindow: the recent ones; the sinks never
  move) are moved down once, right after the forward that decided the prune. Decoding therefore
  copies nothing per token except on the prunes, ``compress_every`` tokens apart. A full cache grows
  by doubling (amortised O(1) per token).
* ``"static"`` (:class:`StaticSlotCacheLayer`): the same slots, but every forward attends to the
  whole storage with the unused slots masked, so shapes stay fixed (for ``torch.compile``) at the
  cost of attending to the peak cache on every token;
* ``"concat"`` (:class:`ConcatCacheLayer`): the seed's implementation, kept as the reference the
  slots are tested against: ``torch.cat`` of the whole cache with the new token on every token, and
  a gathered copy of the kept tokens on every prune.

Both give the same outputs token for token (the same tokens in the same order reach the same
attention); ``bench/kv_storage.py`` times them side by side.

Positions under RoPE (the policy's ``rope_positions``, :mod:`backends.kv.positions`):

* ``"original"`` (default): every cached key stays rotated at the absolute position its token had
  in the document; :meth:`PolicyCacheLayer.get_seq_length` reports the number of tokens *seen*, so
  the model derives the true absolute position ids of new tokens (``arange(q) + seen``);
* ``"cache"`` (StreamingLLM; ``"slots"`` or ``"static"`` storage): the key in slot ``j`` is rotated at ``j``
  and ``get_seq_length`` reports the tokens *kept*, so a new token gets position ``kept``.

Either way :meth:`PolicyCacheLayer.get_mask_sizes` reports ``kv_length = kept + q`` and
``kv_offset = reported - kept``: every kept token is older than every query, so it is visible to
all of them, and the new tokens are causally masked among themselves. Evicted tokens are never
re-inserted, and :attr:`PolicyCacheLayer.positions` (original positions of the kept tokens) is
strictly increasing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from backends.checks import check_int
from backends.kv.policies import KVPolicy
from backends.kv.positions import KeyRotator


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


STORAGES = ("slots", "static", "concat")
DEFAULT_STORAGE = "slots"


class PolicyCacheLayer(DynamicLayer):
    """One decoder layer's cache, pruned by the owning :class:`KVPolicyCache`'s current policy (the
    part both storages share; see the module docstring).

    Attributes: ``keys`` / ``values`` are the kept tokens' keys and values ``(batch, heads, kept,
    head_dim)`` (after :meth:`KVPolicyCache.settle`), ``positions`` their original positions.
    """

    is_croppable = False

    def __init__(self, owner: "KVPolicyCache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.seen_tokens = 0
        self.positions = torch.zeros(0, dtype=torch.long)

    def _decide_prune(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """The slots to keep when the policy says a prune is due now (recorded from layer 0), else ``None``."""
        policy = self._owner.policy
        if not policy.should_prune(keys.shape[-2]):
            return None
        keep = self._owner.shared_keep(policy, keys.shape[-2], positions.device)
        if keep is None:
            keep = policy.keep_indices(positions, keys, values)
            if not policy.scores_read_cache:
                self._owner.remember_keep(policy, keys.shape[-2], keep)
        if self.layer_idx == 0:
            self._owner.record_prune(PruneEvent(self.seen_tokens, keys.shape[-2], len(keep)))
        return keep

    def get_seq_length(self) -> int:
        """What new tokens' positions start from: tokens seen (original positions) or kept (cache positions)."""
        return self.cache_length if self._owner.policy.rope_positions == "cache" else self.seen_tokens

    @property
    def cache_length(self) -> int:
        """Tokens currently held."""
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.cache_length
        return kept + query_length, self.get_seq_length() - kept

    def settle(self) -> None:
        """Apply a prune decided in the last forward (storages that defer it override this)."""

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

    def fork_into(self, copy: "PolicyCacheLayer") -> None:
        """Make ``copy`` (a fresh layer of the same class) an independent copy of this layer's state."""
        copy.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_owner", "layer_idx")})


class ConcatCacheLayer(PolicyCacheLayer):
    """The seed's storage: ``torch.cat`` per token, a gathered copy per prune (the reference).

    Stored tensors are never changed in place (every update builds new ones), so forks share them.
    """

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
        keep = self._decide_prune(positions, keys, values)
        if keep is not None:
            self.keys, self.values, self.positions = keys[:, :, keep], values[:, :, keep], positions[keep]
        else:
            self.keys, self.values, self.positions = keys, values, positions
        return keys, values


class SlotCacheLayer(PolicyCacheLayer):
    """Preallocated slots, compaction in place every prune (see the module docstring).

    ``key_slots`` / ``value_slots`` ``(batch, heads, capacity, head_dim)`` and ``position_slots``
    ``(capacity,)`` are the storage; ``keys`` / ``values`` / ``positions`` are views of its used part.
    A prune decided in a forward is applied (:meth:`settle`) after that forward's attention has read
    the slots: by :meth:`KVPolicyCache.settle` or at the start of the next update.

    Forks share the storage copy-on-write: the first write after a fork clones it.
    """

    def __init__(self, owner: "KVPolicyCache", layer_idx: int):
        super().__init__(owner, layer_idx)
        self._init_slots()

    def _init_slots(self) -> None:
        self.key_slots = self.value_slots = None
        self.position_slots = torch.zeros(0, dtype=torch.long)
        self.length = 0
        self.pending_keep: torch.Tensor | None = None
        self.shared = False
        self.cache_rotated = False  # keys rotated at their slot (rope_positions="cache") or at their position

    @property
    def cache_length(self) -> int:
        return len(self.pending_keep) if self.pending_keep is not None else self.length

    def _views(self) -> None:
        self.keys = self.key_slots[:, :, :self.length]
        self.values = self.value_slots[:, :, :self.length]
        self.positions = self.position_slots[:self.length]

    def _capacity_for(self, needed: int) -> int:
        """Slots the storage has once it holds ``needed`` tokens: the policy's peak for a window,
        doubling for a full cache (the ``static_capacity`` of the cache at least)."""
        capacity = 0 if self.key_slots is None else self.key_slots.shape[-2]
        if needed <= capacity:
            return capacity
        policy = self._owner.policy
        peak = policy.window + policy.compress_every if policy.window is not None else 2 * capacity
        return max(needed, peak, self._owner.static_capacity, 16)

    def _reserve(self, needed: int, like: torch.Tensor, like_values: torch.Tensor) -> None:
        """Storage for ``needed`` tokens, unshared (see :meth:`_capacity_for`)."""
        capacity = self._capacity_for(needed)
        if self.key_slots is not None and capacity == self.key_slots.shape[-2] and not self.shared:
            return
        b, h, _, d = like.shape
        # Zeros, not empty: a static layer's attention reads unused slots (masked), which must be finite.
        keys = like.new_zeros((b, h, capacity, d))
        values = like_values.new_zeros((b, h, capacity, like_values.shape[-1]))
        positions = torch.zeros(capacity, dtype=torch.long, device=like.device)
        if self.length:
            keys[:, :, :self.length] = self.key_slots[:, :, :self.length]
            values[:, :, :self.length] = self.value_slots[:, :, :self.length]
            positions[:self.length] = self.position_slots[:self.length]
        self.key_slots, self.value_slots, self.position_slots, self.shared = keys, values, positions, False
        self.is_initialized = True

    def settle(self) -> None:
        """Compact the storage to the kept slots (a no-op when no prune is pending)."""
        keep, self.pending_keep = self.pending_keep, None
        if keep is None:
            return
        if self.shared:
            self._reserve(self.length, self.key_slots, self.value_slots)
        kept = len(keep)
        start, source = self._owner.compaction_plan(keep)
        if start < kept:
            overlapping = isinstance(source, slice)  # a slice is a view of the storage it is written back to
            keys = self.key_slots[:, :, source]
            if self.cache_rotated:  # a moved key's slot, hence its position, drops by the tokens evicted below it
                moved = torch.arange(source.start, source.stop, device=keep.device) if overlapping else source
                keys = self._owner.rotator.rotate(keys, torch.arange(start, kept, device=keep.device) - moved)
            values, positions = self.value_slots[:, :, source], self.position_slots[source]
            if overlapping:
                keys, values, positions = keys.clone(), values.clone(), positions.clone()
            self.key_slots[:, :, start:kept] = keys
            self.value_slots[:, :, start:kept] = values
            self.position_slots[start:kept] = positions
        self.length = kept
        self._views()

    def _realign(self, cache_positions: bool) -> None:
        """Re-rotate every held key after the policy switched ``rope_positions``."""
        if self.length:
            if self.shared:
                self._reserve(self.length, self.key_slots, self.value_slots)
            slots = torch.arange(self.length, device=self.position_slots.device)
            original = self.position_slots[:self.length]
            delta = slots - original if cache_positions else original - slots
            self.key_slots[:, :, :self.length] = self._owner.rotator.rotate(self.key_slots[:, :, :self.length], delta)
        self.cache_rotated = cache_positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens into free slots, return views of all used slots, and decide a prune if due."""
        self.settle()
        cache_positions = self._owner.policy.rope_positions == "cache"
        if cache_positions != self.cache_rotated:
            self._realign(cache_positions)
        n_new = key_states.shape[-2]
        end = self.length + n_new
        self._reserve(end, key_states, value_states)
        self.key_slots[:, :, self.length:end] = key_states
        self.value_slots[:, :, self.length:end] = value_states
        self.position_slots[self.length:end] = torch.arange(self.seen_tokens, self.seen_tokens + n_new,
                                                            device=self.position_slots.device)
        self.length, self.seen_tokens = end, self.seen_tokens + n_new
        self._views()
        keys, values = self.keys, self.values
        self.pending_keep = self._decide_prune(self.positions, keys, values)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._init_slots()

    def fork_into(self, copy: "PolicyCacheLayer") -> None:
        super().fork_into(copy)
        self.shared = copy.shared = True


class StaticSlotCacheLayer(SlotCacheLayer):
    """Slots whose attention reads the whole storage, the unused slots masked out: the shapes a
    forward sees stay fixed while the capacity does (what ``torch.compile`` wants).

    The unused slots sit after the new tokens, at positions later than every query; a forward
    passes the 2-D ``attention_mask`` of :meth:`KVPolicyCache.attention_mask` (ones up to the
    newest token), which masks them (without it transformers' SDPA path skips the mask for one query).
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states)
        if self.seen_tokens == key_states.shape[-2]:  # the first forward: see get_mask_sizes
            return keys, values
        return self.key_slots, self.value_slots

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.cache_length
        if self.seen_tokens == 0:
            # transformers drops the mask of a first forward (query offset 0) whose padding mask is all
            # ones then all zeros, and one query would then attend to every slot: the first forward
            # attends to its own tokens only.
            return query_length, 0
        return self._capacity_for(kept + query_length), self.get_seq_length() - kept


LAYER_CLASSES = {"slots": SlotCacheLayer, "static": StaticSlotCacheLayer, "concat": ConcatCacheLayer}


class KVPolicyCache(Cache):
    """A cache of :class:`PolicyCacheLayer` whose policy may change between forwards (knobs per chunk).

    Args:
        policy: the policy in force.
        num_layers: decoder layers of the model.
        storage: ``"slots"`` (default, preallocated), ``"static"`` (slots whose attention reads the whole
            storage, masked: fixed shapes for ``torch.compile``) or ``"concat"`` (the reference), see
            the module docstring.
        rotator: the model's :class:`~backends.kv.positions.KeyRotator` (needed by a policy with
            ``rope_positions="cache"``; :func:`make_policy_cache` passes it).
        static_capacity: slots to allocate at least (``"static"``: a full cache of a stream this long
            keeps one shape); 0 = as the policy needs.
    """

    def __init__(self, policy: KVPolicy, num_layers: int, storage: str = DEFAULT_STORAGE,
                 rotator: KeyRotator | None = None, static_capacity: int = 0):
        check_int("num_layers", num_layers, 1)
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r} is invalid; accepted: {', '.join(STORAGES)}")
        check_int("static_capacity", static_capacity, 0)
        self.storage, self.rotator, self.static_capacity = storage, rotator, static_capacity
        self._check_policy(policy)
        super().__init__(layers=[LAYER_CLASSES[storage](self, i) for i in range(num_layers)])
        self.policy = policy
        self.prune_events: list[PruneEvent] = []
        self._keep_memo: tuple | None = None  # (policy, cache length, seen tokens, keep) of the last shared keep
        self._plan_memo: tuple | None = None  # (keep, plan) of the last compaction plan

    def shared_keep(self, policy: KVPolicy, length: int, device: torch.device) -> torch.Tensor | None:
        """The keep a content-independent policy (``scores_read_cache = False``) chose at this prune in
        an earlier layer of the same forward on the same device, else ``None``."""
        memo = self._keep_memo
        if (memo is not None and memo[0] is policy and memo[1] == length and memo[2] == self.layers[0].seen_tokens
                and memo[3].device == device):
            return memo[3]
        return None

    def remember_keep(self, policy: KVPolicy, length: int, keep: torch.Tensor) -> None:
        self._keep_memo = (policy, length, self.layers[0].seen_tokens, keep)

    def compaction_plan(self, keep: torch.Tensor) -> tuple[int, "torch.Tensor | slice"]:
        """``(start, source)`` for moving the kept slots down: slots below ``start`` already hold their
        token (the sinks); slots ``start..len(keep)-1`` take ``source`` (a slice when the kept tokens
        above ``start`` are contiguous, as a window's are, else the indices). Computed once per keep
        tensor, which every layer shares under a content-independent policy."""
        if self._plan_memo is not None and self._plan_memo[0] is keep:
            return self._plan_memo[1]
        kept = len(keep)
        in_place = keep == torch.arange(kept, device=keep.device)
        start = kept if bool(in_place.all()) else int((~in_place).int().argmax())
        source: torch.Tensor | slice = keep[start:]
        if start < kept:
            first, last = int(source[0]), int(source[-1])
            if last - first == kept - 1 - start:  # ascending and distinct, so contiguous
                source = slice(first, last + 1)
        self._plan_memo = (keep, (start, source))
        return start, source

    def _check_policy(self, policy: KVPolicy) -> None:
        if not isinstance(policy, KVPolicy):
            raise ValueError(f"policy={policy!r} is invalid; accepted: a KVPolicy instance")
        if policy.rope_positions == "cache":
            if self.storage == "concat":
                raise ValueError(f"{policy}: rope_positions='cache' needs storage='slots' or 'static' (got "
                                 f"{self.storage!r}); accepted: those, or rope_positions='original'")
            if self.rotator is None:
                raise ValueError(f"{policy}: rope_positions='cache' needs the model's rotary embedding; accepted: a "
                                 "RoPE model (GPT-NeoX, Llama, ...) and a cache from make_policy_cache(model, ...)")

    def attention_mask(self, query_length: int) -> torch.Tensor | None:
        """The 2-D mask a forward of ``query_length`` tokens passes with ``"static"`` storage (it masks
        the unused slots); ``None`` with the other storages (nothing to mask)."""
        if self.storage != "static":
            return None
        return torch.ones((1, self.get_seq_length() + query_length), dtype=torch.long)

    def set_policy(self, policy: KVPolicy) -> None:
        """Switch knobs; the next prune uses them (evicted tokens stay evicted)."""
        self._check_policy(policy)
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
        self.settle()
        return self.layers[layer_idx].positions

    def settle(self) -> None:
        """Apply prunes decided in the last forward now (they are applied lazily otherwise): after it,
        every layer's ``keys`` / ``values`` / ``positions`` hold exactly the kept tokens."""
        for layer in self.layers:
            layer.settle()

    def reset(self) -> None:
        super().reset()
        self.prune_events = []

    def fork(self) -> "KVPolicyCache":
        """An independent copy of this cache's state (same policy, storage, kept tokens and prune history).

        Cheap: the stored tensors are shared; concat storage never changes a stored tensor in place,
        and slots storage clones its storage on the first write after a fork (copy-on-write).
        """
        copy = KVPolicyCache(self.policy, len(self.layers), self.storage, self.rotator, self.static_capacity)
        for mine, theirs in zip(copy.layers, self.layers):
            theirs.fork_into(mine)
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


def make_policy_cache(model, policy: KVPolicy, storage: str = DEFAULT_STORAGE,
                      static_capacity: int = 0) -> KVPolicyCache:
    """A :class:`KVPolicyCache` for ``model`` (its layer count and, for a RoPE model, its key rotator)."""
    return KVPolicyCache(policy, num_decoder_layers(model), storage, KeyRotator.from_model(model), static_capacity)


@contextlib.contextmanager
def apply_kv_policy(model, policy: KVPolicy, storage: str = DEFAULT_STORAGE) -> Iterator[KVPolicyCache]:
    """Apply ``policy`` to ``model`` for one stream; yields the cache to pass as ``past_key_values``.

    Works for prefill and token-by-token decoding, with ``model(...)`` and ``model.generate(...)``::

        with apply_kv_policy(model, SinkWindow(4, 64)) as cache:
            out = model(input_ids, past_key_values=cache, use_cache=True)

    The model is put in eval mode and restored on exit; the cache is emptied on exit.
    """
    cache = make_policy_cache(model, policy, storage)
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
