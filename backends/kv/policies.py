"""KV-cache policies: small frozen dataclasses whose fields are the knobs, plus their registry.

A policy answers two questions for a cache layer:

* :meth:`KVPolicy.should_prune` - is an eviction due now? Pruning is lazy: with
  ``compress_every=R`` the cache grows to ``budget + R`` tokens and is then cut back to
  ``budget`` (``R=1`` prunes on every token once the budget is reached).
* :meth:`KVPolicy.select` - which cached tokens survive (indices into the cache, ascending, so
  the cache stays in position order).

Positions under RoPE: the cache stores keys already rotated at their ORIGINAL absolute
positions, and new tokens always get their true absolute position (the cache reports the number
of tokens seen, not the number kept). Evicted tokens leave gaps; no key is ever re-rotated or
re-inserted at a new tail position. See :mod:`backends.kv.cache`.

To add a policy: subclass :class:`KVPolicy` as a frozen dataclass, declare ``knob_choices`` (the
discrete values an env may pick for every field) and decorate it with :func:`register_kv_policy`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

COMPRESS_EVERY_CHOICES = (1, 8, 32, 64)
WINDOW_CHOICES = (32, 64, 128, 256)


def _require_int(policy: str, name: str, value, minimum: int, accepted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{policy}: {name}={value!r} is invalid; accepted: {accepted}")


@dataclass(frozen=True)
class KVPolicy:
    """Base class of KV-cache policies.

    Args:
        compress_every: eviction schedule; prune only when the cache has grown ``compress_every``
            tokens past the policy's budget (an integer >= 1; 1 = prune on every token).

    Subclasses set ``knob_choices`` (field name -> the discrete values an env offers) and
    implement :attr:`budget` and :meth:`select`.
    """

    compress_every: int = field(default=1, kw_only=True)

    knob_choices: ClassVar[dict[str, tuple]] = {"compress_every": COMPRESS_EVERY_CHOICES}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad knob value and what is accepted."""
        _require_int(type(self).__name__, "compress_every", self.compress_every, 1, "an integer >= 1")

    @classmethod
    def policy_name(cls) -> str:
        return cls.__name__

    @property
    def budget(self) -> int | None:
        """Tokens kept after a prune (``None``: never prune)."""
        raise NotImplementedError

    def should_prune(self, cache_length: int) -> bool:
        """Whether a layer holding ``cache_length`` tokens must be pruned now."""
        return self.budget is not None and cache_length >= self.budget + self.compress_every

    def select(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Indices (ascending, ``budget`` of them) of the cached tokens to keep.

        Args:
            positions: ``(cache_length,)`` original absolute positions of the cached tokens, ascending.
            keys: ``(batch, heads, cache_length, head_dim)`` cached (rotated) keys of this layer.
        """
        raise NotImplementedError

    def knobs(self) -> dict:
        """The policy's knob values by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        return f"{self.policy_name()}(" + ", ".join(f"{k}={v}" for k, v in self.knobs().items()) + ")"


@dataclass(frozen=True)
class FullCache(KVPolicy):
    """Keep every token (the reference every other policy is compared against)."""

    @property
    def budget(self) -> None:
        return None

    def select(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(positions), device=positions.device)


@dataclass(frozen=True)
class SinkWindow(KVPolicy):
    """StreamingLLM: ``n_sink`` attention-sink tokens plus the most recent tokens.

    Args:
        n_sink: the oldest cached tokens always kept (the document's first tokens; ``0`` = window only).
        window: KV slots kept after a prune, sinks included (StreamingLLM's cache size), so
            ``window - n_sink`` recent tokens survive. ``n_sink < window`` so the newest token
            always has room.
        compress_every: see :class:`KVPolicy`.

    If knobs change mid-stream, the sinks are the ``n_sink`` oldest tokens still cached: an
    evicted token never comes back.
    """

    n_sink: int = 4
    window: int = 128

    knob_choices: ClassVar[dict[str, tuple]] = {
        "n_sink": (0, 4, 8), "window": WINDOW_CHOICES, "compress_every": COMPRESS_EVERY_CHOICES}

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        _require_int(name, "window", self.window, 1, "an integer >= 1")
        _require_int(name, "n_sink", self.n_sink, 0, "an integer >= 0")
        if self.n_sink >= self.window:
            raise ValueError(f"{name}: n_sink={self.n_sink} must be < window={self.window} "
                             "(the window must hold at least one recent token besides the sinks)")

    @property
    def budget(self) -> int:
        return self.window

    def select(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        length = len(positions)
        n_recent = self.window - self.n_sink
        sinks = torch.arange(min(self.n_sink, length), device=positions.device)
        recent = torch.arange(max(length - n_recent, len(sinks)), length, device=positions.device)
        return torch.cat([sinks, recent])


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
        compress_every: see :class:`KVPolicy`.
    """

    window: int = 128
    n_recent: int = 32

    knob_choices: ClassVar[dict[str, tuple]] = {
        "window": WINDOW_CHOICES, "n_recent": (8, 32), "compress_every": COMPRESS_EVERY_CHOICES}

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        _require_int(name, "window", self.window, 1, "an integer >= 1")
        _require_int(name, "n_recent", self.n_recent, 1, "an integer >= 1")
        if self.n_recent > self.window:
            raise ValueError(f"{name}: n_recent={self.n_recent} must be <= window={self.window}")

    @property
    def budget(self) -> int:
        return self.window

    def select(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        length = len(positions)
        n_old = length - self.n_recent
        n_old_kept = self.window - self.n_recent
        recent = torch.arange(n_old, length, device=positions.device)
        if n_old_kept <= 0 or n_old <= 0:
            return recent[-self.window:]
        norms = keys[:, :, :n_old].float().norm(dim=-1).mean(dim=(0, 1))
        # Stable sort so ties keep the older token: the selection is deterministic.
        order = torch.sort(norms, stable=True).indices[:n_old_kept]
        return torch.cat([torch.sort(order).values, recent])


# --- registry -----------------------------------------------------------------------------

_POLICIES: dict[str, type[KVPolicy]] = {}
_LISTENERS: list[Callable[[type[KVPolicy]], None]] = []


def _check_policy_class(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, KVPolicy) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{cls!r} is not a KV policy; accepted: a dataclass subclass of KVPolicy")
    if cls.__dataclass_params__.frozen is not True:
        raise ValueError(f"{cls.__name__} must be a frozen dataclass (policies are immutable knob values)")
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if not cls.knob_choices.get(f)]
    extra = [k for k in cls.knob_choices if k not in fields]
    if missing or extra:
        raise ValueError(f"{cls.__name__}.knob_choices must list non-empty choices for exactly its fields "
                         f"{fields}; missing: {missing}, unknown: {extra}")
    for combination in itertools.product(*(cls.knob_choices[f] for f in fields)):
        try:
            cls(**dict(zip(fields, combination)))
        except ValueError as error:
            raise ValueError(f"{cls.__name__}.knob_choices contain an invalid combination: {error}") from error


def register_kv_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Register a policy class (usable as a decorator); every choice combination must be valid.

    Listeners (``envs.streaming_kv`` adds one) are told, so registering a policy also creates its
    env id ``KV-<ClassName>-v0``. Registering the same class again is a no-op.
    """
    _check_policy_class(cls)
    name = cls.policy_name()
    existing = _POLICIES.get(name)
    if existing is cls:
        return cls
    if existing is not None:
        raise ValueError(f"a different KV policy named {name!r} is already registered; rename the class")
    _POLICIES[name] = cls
    for listener in list(_LISTENERS):
        listener(cls)
    return cls


def kv_policy_class(name: str) -> type[KVPolicy]:
    """The registered policy class called ``name`` (``FullCache`` is also accepted)."""
    if name == FullCache.policy_name():
        return FullCache
    if name not in _POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; accepted: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[name]


def registered_kv_policies() -> dict[str, type[KVPolicy]]:
    """Registered policy classes by name (a copy)."""
    return dict(_POLICIES)


def on_kv_policy_registered(listener: Callable[[type[KVPolicy]], None]) -> None:
    """Call ``listener(cls)`` for every policy registered from now on (added once)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


register_kv_policy(SinkWindow)
register_kv_policy(KeyNormWindow)
