"""Backends by name: ``backend=tiny`` (default), ``backend=hf`` with a model spec, ``backend=trace``,
``backend=decoding`` (a causal LM with a draft, for ``Decoding-v0``).

Loaded backends are cached per (name, options) in the process, so making many envs (vector envs,
evaluation across budgets) loads a model once.

A loaded backend is an instance of one of the declared backend contracts: :class:`backends.base.Backend`
(the knob envs) or a contract a backend family registers with :func:`register_backend_type`
(``backends.decoding`` registers its ``DecodingBackend`` protocol). Which env accepts which
contract is the env's business; the registry only refuses objects of no declared contract.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Callable

from backends.base import Backend
from backends import threads as _threads  # noqa: F401  (registers the fork handler before any worker forks)

_FACTORIES: dict[str, str | Callable[..., Backend]] = {
    "tiny": "backends.tiny.backend:load_tiny_backend",
    "hf": "backends.hf_task:load_hf_backend",
    "trace": "backends.trace:load_trace_backend",
    "decoding": "backends.decoding.backend:load_decoding_backend",
}
#: a backend's cheap check of its options (no loading), run by the CLIs before any work
_CHECKS: dict[str, str | Callable[..., None]] = {
    "hf": "backends.hf_task:check_hf_backend",
}
_LOADED: dict[str, Any] = {}
#: the declared backend contracts (runtime-checkable protocols) a loaded backend may implement
_BACKEND_TYPES: list[type] = [Backend]


def register_backend_type(contract: type) -> None:
    """Accept loaded backends implementing ``contract`` (a ``runtime_checkable`` Protocol) besides ``Backend``."""
    if contract not in _BACKEND_TYPES:
        _BACKEND_TYPES.append(contract)


def backend_types() -> tuple[type, ...]:
    """The backend contracts :func:`load_backend` accepts, :class:`~backends.base.Backend` first."""
    return tuple(_BACKEND_TYPES)


def _type_names() -> str:
    return ", ".join(t.__name__ for t in _BACKEND_TYPES)


def register_backend(name: str, factory: Callable[..., Any], check: Callable[..., None] | None = None) -> None:
    """Make ``backend=<name>`` resolve to ``factory(**options)``; ``check(**options)``, when given, validates
    the options without loading anything (raising what the factory would) for :func:`check_backend`."""
    _FACTORIES[name] = factory
    _CHECKS.pop(name, None)
    if check is not None:
        _CHECKS[name] = check


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def check_backend(backend: Any) -> None:
    """Run the cheap option check of ``backend`` (a name or a dict with ``name``) where its backend
    registered one (``backend=hf``: every option, and that the model and dataset paths exist);
    nothing is loaded. Unknown names are left to :func:`load_backend`."""
    if isinstance(backend, dict):
        name, options = backend.get("name", "tiny"), {k: v for k, v in backend.items() if k != "name"}
    elif isinstance(backend, str):
        name, options = backend, {}
    else:
        return
    if name in _CHECKS:
        _resolve(_CHECKS[name])(**options)


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def _factory(name: str) -> Callable[..., Any]:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(available_backends())}")
    return _resolve(_FACTORIES[name])


def load_backend(backend: Any = "tiny", **options: Any) -> Any:
    """Resolve ``backend`` (a loaded backend, a name, or a dict with ``name``) to a loaded backend.

    A dict passes every key except ``name`` to the backend's factory as a keyword option (so a
    Hydra ``backend`` config group maps one to one onto the factory's arguments). The result is
    an instance of one of :func:`backend_types` (a factory returning anything else is an error).
    """
    if backend is None:
        backend = "tiny"
    if isinstance(backend, backend_types()):
        if options:
            raise ValueError(f"options {sorted(options)} were given with an already loaded backend; accepted: "
                             f"options only with a backend name or dict")
        return backend
    if isinstance(backend, dict):
        options = {**{k: v for k, v in backend.items() if k != "name"}, **options}
        backend = backend.get("name", "tiny")
    if not isinstance(backend, str):
        raise ValueError(f"backend={backend!r} is invalid; accepted: a backend name "
                         f"({', '.join(available_backends())}), a dict with 'name', or a loaded backend "
                         f"({_type_names()})")
    key = backend + json.dumps(options, sort_keys=True, default=str)
    if key not in _LOADED:
        loaded = _factory(backend)(**options)
        if not isinstance(loaded, backend_types()):
            raise ValueError(f"backend={backend!r} made a {type(loaded).__name__}, which implements no declared "
                             f"backend contract; accepted: {_type_names()} (see backends.registry.register_backend_type)")
        _LOADED[key] = loaded
    return _LOADED[key]


def with_threads(backend: Any, num_threads: int | None) -> Any:
    """``backend`` (a name or dict) as a dict whose ``num_threads`` is ``num_threads`` when it leaves
    it unset and the factory takes it (how a CLI's ``torch_threads`` reaches the backend); ``None``
    or a loaded backend: unchanged, so the factory's default (:data:`backends.threads.DEFAULT_TORCH_THREADS`)
    applies, as in ``gym.make``."""
    if num_threads is None or not isinstance(backend, (str, dict)):
        return backend
    spec = {"name": backend} if isinstance(backend, str) else dict(backend)
    if spec.get("num_threads") is None and "num_threads" in inspect.signature(_factory(spec.get("name", "tiny"))).parameters:
        spec["num_threads"] = num_threads
    return spec


def release_backend(backend: Backend) -> None:
    """Drop ``backend`` from the process cache, so that the caller's last reference frees its model
    (for loading several large models one after another in one process)."""
    for key in [k for k, v in _LOADED.items() if v is backend]:
        del _LOADED[key]
