"""Backends by name: ``backend=tiny`` (default), ``backend=hf`` with a model spec, ``backend=trace``.

Loaded backends are cached per (name, options) in the process, so making many envs (vector envs,
evaluation across budgets) loads a model once.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable

from backends.base import Backend

_FACTORIES: dict[str, str | Callable[..., Backend]] = {
    "tiny": "backends.tiny.backend:load_tiny_backend",
    "hf": "backends.hf_task:load_hf_backend",
    "trace": "backends.trace:load_trace_backend",
}
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Make ``backend=<name>`` resolve to ``factory(**options)``."""
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def _factory(name: str) -> Callable[..., Backend]:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(available_backends())}")
    target = _FACTORIES[name]
    if callable(target):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def load_backend(backend: Any = "tiny", **options: Any) -> Backend:
    """Resolve ``backend`` (a Backend object, a name, or a dict with ``name``) to a loaded backend.

    A dict passes every key except ``name`` to the backend's factory as a keyword option (so a
    Hydra ``backend`` config group maps one to one onto the factory's arguments).
    """
    if backend is None:
        backend = "tiny"
    if isinstance(backend, Backend):
        if options:
            raise ValueError(f"options {sorted(options)} were given with an already loaded backend; accepted: "
                             f"options only with a backend name or dict")
        return backend
    if isinstance(backend, dict):
        options = {**{k: v for k, v in backend.items() if k != "name"}, **options}
        backend = backend.get("name", "tiny")
    if not isinstance(backend, str):
        raise ValueError(f"backend={backend!r} is invalid; accepted: a backend name "
                         f"({', '.join(available_backends())}), a dict with 'name', or a Backend object")
    key = backend + json.dumps(options, sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED[key] = _factory(backend)(**options)
    return _LOADED[key]


def release_backend(backend: Backend) -> None:
    """Drop ``backend`` from the process cache, so that the caller's last reference frees its model
    (for loading several large models one after another in one process)."""
    for key in [k for k, v in _LOADED.items() if v is backend]:
        del _LOADED[key]
