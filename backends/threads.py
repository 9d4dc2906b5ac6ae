"""How many torch intra-op threads a backend runs with: one default for every door, and fork safety.

:data:`DEFAULT_TORCH_THREADS` is the one default. Every backend factory (``tiny``, ``hf``,
``decoding``) takes ``num_threads`` with this default and applies it with :func:`set_torch_threads`
when it loads, and ``train.py`` / ``evaluate.py`` pass their ``torch_threads`` (the same default)
to the backend, so ``gym.make(...)``, the CLI and ``python -m latency_model`` run a backend with
the same thread count and read the same latency cache entry (its key holds the thread count,
:func:`configured_threads`). Why one thread: the shipped models' matrices are tiny, so extra
threads only add synchronisation, and on a shared CPU spinning threads make latency erratic.

Fork safety: OpenMP's thread pool does not survive ``fork``. A process forked after its parent ran
torch with several threads (an ``AsyncVectorEnv`` worker under the ``fork`` start method, the
Linux default) hangs at its first multi-threaded op. So a child forked from a parent running more
than one thread runs torch on one thread, as PyTorch's own DataLoader workers do;
:func:`configured_threads` still reports the count asked for (the parent's), so the child reads
the parent's latency cache entries. Use the ``spawn`` or ``forkserver`` start
method (``make_vec(..., vector_kwargs={"context": "spawn"})``) to run workers multi-threaded.
"""

from __future__ import annotations

import os

import torch

from backends.checks import check_int

DEFAULT_TORCH_THREADS = 1
"""torch intra-op threads of every backend unless ``num_threads`` (CLI: ``torch_threads``) says otherwise."""

_forked_single_thread = False  # this process was forked from a multi-threaded parent: torch runs on one thread
_requested: int | None = None  # there: the count asked for (the parent's, then set_torch_threads')


def check_num_threads(num_threads, error: type[Exception] = ValueError, name: str = "num_threads") -> int:
    """``num_threads`` if it is an integer >= 1; otherwise ``error`` naming ``name`` and the value."""
    try:
        return check_int(name, num_threads, 1, where=f"default {DEFAULT_TORCH_THREADS}")
    except ValueError as bad:
        raise error(str(bad)) from None


def resolve_threads(num_threads: int | None) -> int:
    """``num_threads`` checked, or :data:`DEFAULT_TORCH_THREADS` for ``None`` (a CLI's ``torch_threads: null``)."""
    return DEFAULT_TORCH_THREADS if num_threads is None else check_num_threads(num_threads)


def set_torch_threads(num_threads: int) -> None:
    """Run torch with ``num_threads`` intra-op threads in this process (one in a child forked from a
    multi-threaded parent, where more would hang: see the module docstring)."""
    global _requested
    check_num_threads(num_threads)
    if _forked_single_thread:
        _requested = num_threads
        num_threads = 1
    torch.set_num_threads(num_threads)


def configured_threads() -> int:
    """The thread count latency depends on as configured: torch's setting, or in a child forked from
    a multi-threaded parent (running on one thread) the count asked for, so the child reads the
    parent's latency cache entries."""
    return _requested if _forked_single_thread and _requested is not None else torch.get_num_threads()


def _after_fork_in_child() -> None:
    global _forked_single_thread, _requested
    if torch.get_num_threads() > 1 and not _forked_single_thread:
        _forked_single_thread, _requested = True, torch.get_num_threads()
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
