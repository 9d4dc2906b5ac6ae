"""``rollout=local|ray``: where GRPO's groups are collected (see :mod:`agents.rollout`).

:func:`rollout_executor` opens what a run's ``rollout`` config names for the duration of training:
the in-process executor, or a Ray session (an existing cluster, or a local instance it starts and
stops) with a :class:`executors.ray.RayExecutor` of ``rollout.workers`` actors.
:func:`check_rollout_available` refuses ``rollout=ray`` without Ray installed before a run folder
exists.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from executors import Executor, LocalExecutor
from knobgym_cli.usage import UsageError
from knobgym_cli.logs import say

INSTALL_HINT = "install with pip install -e '.[ray]'"


def check_rollout_available(name: str) -> None:
    """``rollout=ray`` needs the ``ray`` package: a :class:`UsageError` saying how to install it."""
    if name != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError(f"rollout=ray needs Ray, which is not installed; {INSTALL_HINT}") from None


@contextmanager
def rollout_executor(rollout_cfg: Any, threads: int = 1) -> Iterator[Executor]:
    """The executor of ``rollout_cfg`` (``name``, ``workers``, ``address``) while the block runs."""
    name = str(rollout_cfg.get("name", "local")) if rollout_cfg is not None else "local"
    if name == "local":
        yield LocalExecutor()
        return
    check_rollout_available(name)
    from executors.ray import RayExecutor, ray_session

    workers, address = int(rollout_cfg.get("workers", 2)), rollout_cfg.get("address", "auto")
    with ray_session(address, workers) as started:
        where = "a local Ray instance started for this run" if started else "the running Ray cluster"
        say(f"rollout=ray: GRPO groups on {workers} Ray actor(s) on {where}")
        yield RayExecutor(workers, threads=threads)
