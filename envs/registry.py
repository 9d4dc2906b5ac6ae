"""Env registration: one call registers an id with Gymnasium and our own listing."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

_REGISTERED: dict[str, dict[str, Any]] = {}


def register_env(env_id: str, entry_point, *, nondeterministic: bool = False,
                 description: str = "", **default_kwargs: Any) -> str:
    """Register ``env_id`` with Gymnasium (idempotent for the same entry point; registering the same
    entry point again with other keyword arguments replaces them, e.g. a KV env given its own grid)."""
    if env_id in gym.registry:
        existing = _REGISTERED.get(env_id)
        if existing is None or existing["entry_point"] is not entry_point:
            raise ValueError(f"env id {env_id!r} is already registered; choose another id")
        if gym.registry[env_id].kwargs == dict(default_kwargs):
            return env_id
        del gym.registry[env_id]
    gym.register(id=env_id, entry_point=entry_point, nondeterministic=nondeterministic,
                 kwargs=dict(default_kwargs))
    _REGISTERED[env_id] = {"entry_point": entry_point, "description": description,
                           "nondeterministic": nondeterministic}
    return env_id


def list_envs() -> list[str]:
    """Ids registered by knobgym (not Gymnasium's own)."""
    return sorted(_REGISTERED)


def registered_entry_point(env_id: str):
    """The entry point ``env_id`` was registered with by :func:`register_env` (None for another id)."""
    entry = _REGISTERED.get(env_id)
    return None if entry is None else entry["entry_point"]


def check_env_id(env_id: str) -> str:
    if env_id not in _REGISTERED:
        raise ValueError(f"unknown env id {env_id!r}; accepted: {', '.join(list_envs()) or '(none registered)'}")
    return env_id
