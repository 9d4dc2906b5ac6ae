"""The base of every KV-cache policy, and the policy registry.

A policy answers two questions for a cache layer:

* :meth:`KVPolicy.should_prune` - is an eviction due now? Pruning is lazy: with
  ``compress_every=R`` the cache grows to ``window + R`` tokens and is then cut back to
  ``window`` (``R=1`` prunes on every token once the window is full).
* :meth:`KVPolicy.keep_indices` - which cached tokens survive: the ``window`` tokens with the
  highest :meth:`KVPolicy.score`, returned in cache (= position) order.

A new policy is one small frozen dataclass that overrides ONE method, :meth:`KVPolicy.score`
(as a kvpress press does), plus :meth:`KVPolicy.validate` if its extra fields have rules::

    @register_kv_policy
    @dataclass(frozen=True)
    class RecentOnly(KVPolicy):
        def score(self, positions, keys, values):
            return positions.float()          # newest tokens score highest

Its fields are its knobs; which values an RL env offers for each knob (the action grid) is the
env's business (:mod:`envs.streaming_kv`), not the policy's.

Positions under RoPE (``rope_positions``, :mod:`backends.kv.positions`): ``"original"`` (default)
keeps every cached key rotated at its token's absolute position in the document and gives new
tokens their true positions (evicted tokens leave gaps); ``"cache"`` is StreamingLLM's scheme,
positions re-numbered within the kept cache. Either way ``score`` sees the tokens' original
positions, ascending. ``rope_positions`` is an option of the policy, not a knob of the default
action grid (an env offers it only when its ``knob_grid`` names it). See :mod:`backends.kv.cache`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from backends.checks import check_int
from backends.kv.positions import ROPE_POSITIONS


def require_int(policy: str, name: str, value, minimum: int) -> None:
    """Raise a ``ValueError`` naming ``policy.name=value`` unless it is an integer >= ``minimum``."""
    check_int(f"{policy}: {name}", value, minimum)


@dataclass(frozen=True)
class KVPolicy:
    """Base class of KV-cache policies: keep the ``window`` highest-scoring tokens.

    Both base knobs are keyword-only, so a subclass's own fields come first positionally.

    Args:
        window: KV slots kept after a prune (an integer >= 1).
        compress_every: eviction schedule; prune only when the cache has grown ``compress_every``
            tokens past ``window`` (an integer >= 1; 1 = prune on every token). The peak cache a
            layer holds is ``window + compress_every - 1`` tokens plus the token being fed.
        rope_positions: ``"original"`` (default) or ``"cache"`` (StreamingLLM: positions re-numbered
            within the kept cache), see :mod:`backends.kv.positions`.

    Subclasses override :meth:`score`; :meth:`validate` when they add fields with rules. A subclass
    whose scores depend only on the number of cached tokens (not on positions, keys or values) sets
    ``scores_read_cache = False``: the cache then computes one keep per prune for all layers instead
    of one per layer (a prune's cost is mostly per-op overhead on small models).
    """

    scores_read_cache: ClassVar[bool] = True

    window: int = field(default=128, kw_only=True)
    compress_every: int = field(default=1, kw_only=True)
    rope_positions: str = field(default="original", kw_only=True, metadata={"knob": False})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad knob value and what is accepted (extend with ``super()``)."""
        name = type(self).__name__
        require_int(name, "compress_every", self.compress_every, 1)
        if self.rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"{name}: rope_positions={self.rope_positions!r} is invalid; accepted: "
                             f"{', '.join(ROPE_POSITIONS)}")
        if self.window is not None:
            require_int(name, "window", self.window, 1)

    @classmethod
    def policy_name(cls) -> str:
        return cls.__name__

    @property
    def budget(self) -> int | None:
        """Tokens kept after a prune (``None``: never prune)."""
        return self.window

    def should_prune(self, cache_length: int) -> bool:
        """Whether a layer holding ``cache_length`` tokens must be pruned now."""
        return self.window is not None and cache_length >= self.window + self.compress_every

    def schedule_step(self, cache_length: int) -> tuple[bool, int]:
        """``(pruned, kept)`` for a layer holding ``cache_length`` tokens (the new one included):
        whether it is pruned now (:meth:`should_prune`) and how many tokens it holds afterwards
        (:meth:`keep_indices` keeps ``min(window, cache_length)``).

        The eviction schedule the cache follows, step by step, and the one the KV envs' latency
        estimate simulates (:func:`envs.kv_schedule.simulate_schedule`) without running a model: a
        policy that overrides :meth:`should_prune` gets a matching estimate; one that overrides
        :meth:`keep_indices` to keep another number of tokens overrides this too.
        """
        if self.should_prune(cache_length):
            return True, min(self.window, cache_length)
        return False, cache_length

    def score(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Per-token scores ``(cache_length,)``: the ``window`` highest are kept (THE method to override).

        Args:
            positions: ``(cache_length,)`` original absolute positions of the cached tokens, ascending.
            keys: ``(batch, heads, cache_length, head_dim)`` cached (RoPE-rotated) keys of this layer.
            values: ``(batch, heads, cache_length, head_dim)`` cached values of this layer.

        Ties keep the older token (the selection is deterministic).
        """
        raise NotImplementedError(f"{type(self).__name__} must define score(positions, keys, values)")

    def keep_indices(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Indices into the cache (ascending, ``min(window, cache_length)`` of them) of the tokens kept."""
        scores = self.score(positions, keys, values)
        if scores.shape != positions.shape:
            raise ValueError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}; accepted: one "
                             f"score per cached token, shape {tuple(positions.shape)}")
        # A stable descending sort keeps the older token among equal scores.
        order = torch.sort(scores.float(), descending=True, stable=True).indices[:self.window]
        return torch.sort(order).values

    def knobs(self) -> dict:
        """The policy's knob values by field name (an option such as ``rope_positions`` only when not
        at its default, so a policy's text and knobs read as before the option existed)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and (f.metadata.get("knob", True) or getattr(self, f.name) != f.default)}

    def __str__(self) -> str:
        return f"{self.policy_name()}(" + ", ".join(f"{k}={v}" for k, v in self.knobs().items()) + ")"


# --- registry -----------------------------------------------------------------------------

_POLICIES: dict[str, type[KVPolicy]] = {}
_LISTENERS: list = []  # called with each policy class registered from now on (envs: its env id)


def on_kv_policy_registered(callback) -> None:
    """Call ``callback(policy_class)`` for every policy registered from now on (idempotent per callback).

    ``import envs`` listens, so a policy registered later gets its ``KV-<Policy>-v0`` id at once.
    """
    if callback not in _LISTENERS:
        _LISTENERS.append(callback)


def register_kv_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Register a policy class (usable as a decorator); registering the same class again is a no-op.

    Listeners (:func:`on_kv_policy_registered`) are told: after ``import envs``, the policy's
    ``KV-<Policy>-v0`` env id is registered with it.
    """
    if not (isinstance(cls, type) and issubclass(cls, KVPolicy) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{cls!r} is not a KV policy; accepted: a dataclass subclass of KVPolicy")
    if cls.__dataclass_params__.frozen is not True:
        raise ValueError(f"{cls.__name__} must be a frozen dataclass (policies are immutable knob values)")
    if cls.score is KVPolicy.score:
        raise ValueError(f"{cls.__name__} does not define score(positions, keys, values); accepted: a KVPolicy "
                         "subclass that overrides score")
    name = cls.policy_name()
    existing = _POLICIES.get(name)
    if existing is cls:
        return cls
    if existing is not None:
        raise ValueError(f"a different KV policy named {name!r} is already registered; rename the class")
    _POLICIES[name] = cls
    for callback in _LISTENERS:
        callback(cls)
    return cls


def kv_policy_class(name: str) -> type[KVPolicy]:
    """The registered policy class called ``name``."""
    if name not in _POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; accepted: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[name]


def registered_kv_policies() -> dict[str, type[KVPolicy]]:
    """Registered policy classes by name (a copy, in registration order)."""
    return dict(_POLICIES)
