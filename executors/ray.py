"""The Ray executor: worker pools of Ray actors, on this machine or a Ray cluster.

Ray is an optional extra (``pip install -e '.[ray]'``); :func:`require_ray` turns its absence into
one :class:`RayUnavailable` line. The CLI (``rollout=ray``) opens a :func:`ray_session`: it
connects to a running cluster (``address=auto`` finds one started with ``ray start --head``) or
starts a local instance with one CPU per worker, and shuts down what it started.

A :class:`RayPool` holds ``workers`` actors, each building its state once (``setup()``: a loaded
backend, an env) with ``torch.set_num_threads(threads)`` and, where the pool asks for GPUs and the
driver sees CUDA, one GPU. :meth:`RayPool.map` keeps one task in flight per actor and yields
results in task order. **Fault tolerance**: a task whose actor died (killed, out of memory, node
lost) is put back at the head of the queue and the dead actor is replaced by a fresh one; the
task runs again on whichever actor is free first. Work is a pure function of (state, shared,
task), so a retried task gives the result the lost one would have, and each task's result is
yielded exactly once. A task that raises is not retried: its exception is raised here, as itself.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence
from backends.checks import check_int

INSTALL_HINT = "install with pip install -e '.[ray]'"


class RayUnavailable(ValueError):
    """Ray is not installed (or a cluster address cannot be reached): one line for the CLI."""


class WorkerLost(RuntimeError):
    """A task's worker died more often than the pool retries."""


def require_ray():
    """The ``ray`` module, or :class:`RayUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"rollout=ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None = "auto", workers: int = 1) -> Iterator[bool]:
    """Ray for the duration of the block; yields whether this call started a local instance.

    ``address="auto"`` (or ``None``): a running cluster if ``ray.init(address="auto")`` finds one,
    else a new local instance with ``num_cpus=workers`` (GPUs detected by Ray). Any other address
    (``ray://host:10001``, ``host:6379``) must be reachable. An already initialised Ray (a notebook,
    a test session) is used as it is and left running. On exit the driver disconnects; an instance
    started here is stopped with it.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield False
        return
    started = False
    options = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address in (None, "auto"):
        try:
            ray.init(address="auto", **options)
        except ConnectionError:  # no running cluster: a local one sized to the workers
            ray.init(num_cpus=int(workers), include_dashboard=False, **options)
            started = True
    else:
        try:
            ray.init(address=str(address), **options)
        except ConnectionError as exc:
            raise RayUnavailable(f"rollout.address={address!r} cannot be reached ({str(exc).splitlines()[0]}); "
                                 f"accepted: auto, or the address of a running Ray cluster (ray start --head)") from None
    try:
        yield started
    finally:
        ray.shutdown()


class _Worker:
    """The actor body: ``setup()`` once, then ``work(state, shared, task)`` per call.

    A failing ``setup`` does not kill the actor (a dead actor would be retried forever): the error
    is kept and raised by every :meth:`run`, so the driver sees it as the task's error.
    """

    def __init__(self, setup: Callable[[], Any], work: Callable[[Any, Any, Any], Any], threads: int):
        import torch

        torch.set_num_threads(int(threads))
        self.work, self.state, self.error = work, None, None
        try:
            self.state = setup()
        except Exception as exc:  # noqa: BLE001 (re-raised by run, in the driver)
            self.error = exc

    def run(self, shared: Any, task: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.work(self.state, shared, task)


class RayPool:
    """``workers`` Ray actors holding ``setup()``'s state (see the module docstring).

    Attributes:
        actors: the live actor handles, one per slot (a dead one is replaced in its slot).
        retried: indices (within their :meth:`map` call) of the tasks run again after their actor died.
    """

    def __init__(self, setup: Callable[[], Any], work: Callable[[Any, Any, Any], Any], workers: int,
                 threads: int = 1, gpus: bool = False, max_retries: int = 3):
        ray = require_ray()
        import torch

        self.workers, self.threads, self.max_retries = int(workers), int(threads), int(max_retries)
        self.num_gpus = 1 if gpus and torch.cuda.is_available() else 0
        self._remote = ray.remote(num_cpus=1, num_gpus=self.num_gpus)(_Worker)
        self._setup, self._work = setup, work
        self._setup_ref = None
        self.actors: list = []
        self.retried: list[int] = []

    def _new_actor(self):
        return self._remote.remote(self._setup_ref, self._work, self.threads)

    def start(self) -> None:
        """Create the actors now (otherwise on the first :meth:`map`); their setup runs in the background."""
        ray = require_ray()
        if self.num_gpus and not self.actors:
            total = ray.cluster_resources().get("GPU", 0)
            if total < self.workers:  # Ray would wait forever for the missing GPUs
                raise ValueError(f"rollout.workers={self.workers} is invalid here: each worker takes one GPU and the "
                                 f"Ray cluster has {total:g}; accepted: rollout.workers <= {int(total)}, or more "
                                 f"GPUs (ray start --address=... on another node)")
        if not self.actors:
            self._setup_ref = ray.put(self._setup)  # shipped once, shared by every (re)started actor
            self.actors = [self._new_actor() for _ in range(self.workers)]

    def map(self, tasks: Sequence[Any], shared: Any = None) -> Iterator[Any]:
        ray = require_ray()
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        self.start()
        tasks = list(tasks)
        shared_ref = ray.put(shared)
        queue, idle = deque(range(len(tasks))), deque(range(self.workers))
        attempts = [0] * len(tasks)
        running: dict[Any, tuple[int, int]] = {}  # object ref -> (task index, actor slot)
        results: dict[int, Any] = {}
        next_out = 0
        while next_out < len(tasks):
            while queue and idle:
                index, slot = queue.popleft(), idle.popleft()
                running[self.actors[slot].run.remote(shared_ref, tasks[index])] = (index, slot)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, slot = running.pop(ref)
            try:
                results[index] = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError) as exc:
                if exc.actor_init_failed:  # the actor could not even be built (unpicklable setup): no retry
                    cause = [line for line in str(exc).splitlines() if line.strip()][-1].strip()
                    raise WorkerLost(f"a Ray worker could not start ({cause}); accepted: a setup that pickles and "
                                     f"imports on the worker (this project installed on every node)") from None
                attempts[index] += 1
                if attempts[index] > self.max_retries:
                    raise WorkerLost(f"task {index} lost its worker {attempts[index]} times (last: "
                                     f"{str(exc).splitlines()[0]}); accepted: at most {self.max_retries} "
                                     f"retries") from None
                ray.kill(self.actors[slot])  # an unavailable actor may come back: it must not run twice
                self.actors[slot] = self._new_actor()
                self.retried.append(index)
                queue.appendleft(index)
            except RayTaskError as exc:  # the work itself failed: its own exception, not Ray's wrapper
                raise exc.cause from None
            idle.append(slot)
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1

    def close(self) -> None:
        if self.actors:
            ray = require_ray()
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


class RayExecutor:
    """Makes :class:`RayPool` s of ``workers`` actors (``threads`` torch threads each) in the
    current Ray session (:func:`ray_session`). ``pools`` lists those made, latest last."""

    name = "ray"
    in_process = False

    def __init__(self, workers: int = 2, threads: int = 1, max_retries: int = 3):
        check_int("rollout.workers", workers, 1)
        self.workers, self.threads, self.max_retries = workers, int(threads), int(max_retries)
        self.pools: list[RayPool] = []

    def pool(self, setup: Callable[[], Any], work: Callable[[Any, Any, Any], Any], gpus: bool = False) -> RayPool:
        pool = RayPool(setup, work, self.workers, self.threads, gpus, self.max_retries)
        self.pools.append(pool)
        return pool
