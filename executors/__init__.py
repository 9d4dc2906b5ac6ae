"""Where repeated, independent work runs: in this process, or on a pool of Ray actors.

Two kinds of work outgrow one process: recording a trace (every sample of a split over the whole
knob grid; ``backends.trace.record_trace``) and collecting GRPO groups (``agents.rollout``). Both
are a list of independent *tasks* run against *worker state* that is expensive to build (a
loaded model, an env) and cheap to reuse. An :class:`Executor` turns ``(setup, work)`` into a
:class:`WorkerPool`; the pool builds the state once per worker (``state = setup()``) and runs
``work(state, shared, task)`` for every task, returning results **in task order**, so whoever
consumes them (the trace writer, the GRPO update) sees the same sequence whatever ran where.

``LocalExecutor`` (here) runs everything in the calling process, in order. ``executors.ray``
holds the Ray one (an optional extra: ``pip install -e '.[ray]'``), which retries the tasks of a
worker that died on a fresh worker, so a result is neither lost nor produced twice.

This package sits beside ``latency_model`` at the bottom of the stack: it knows nothing of
backends, envs or agents; they hand it callables.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar, runtime_checkable

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class WorkerPool(Protocol):
    """Workers that each hold ``setup()``'s state; :meth:`map` runs tasks on them.

    ``map(tasks, shared)`` yields ``work(state, shared, task)`` for each task, in task order
    (``shared`` is sent to the workers once per call: e.g. the policy weights of this update).
    ``close()`` releases the workers (idempotent).
    """

    workers: int

    def map(self, tasks: Sequence[T], shared: Any = None) -> Iterator[R]: ...

    def close(self) -> None: ...


@runtime_checkable
class Executor(Protocol):
    """Makes worker pools. ``in_process``: the pool runs in the calling process (so its workers may
    use the caller's objects as they are, unpickled); ``workers``: how many run at once."""

    name: str
    workers: int
    in_process: bool

    def pool(self, setup: Callable[[], S], work: Callable[[S, Any, T], R], gpus: bool = False) -> WorkerPool: ...


class LocalPool:
    """One worker: this process. ``setup()`` runs once, on the first :meth:`map`."""

    workers = 1

    def __init__(self, setup: Callable[[], S], work: Callable[[S, Any, T], R]):
        self._setup, self._work = setup, work
        self._state: Any = None
        self._ready = False

    def map(self, tasks: Iterable[T], shared: Any = None) -> Iterator[R]:
        if not self._ready:
            self._state, self._ready = self._setup(), True
        for task in tasks:
            yield self._work(self._state, shared, task)

    def close(self) -> None:
        self._state, self._ready = None, False


class LocalExecutor:
    """Runs every task in the calling process, in order (the default everywhere)."""

    name = "local"
    workers = 1
    in_process = True

    def pool(self, setup: Callable[[], S], work: Callable[[S, Any, T], R], gpus: bool = False) -> LocalPool:
        del gpus  # the process uses whatever device its backend was loaded on
        return LocalPool(setup, work)
