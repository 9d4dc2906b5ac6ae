"""Where GRPO's groups are collected: in this process, or on Ray actors (``train.py rollout=ray``).

One group is a pure function of (env, policy weights, :class:`GroupRequest`): the request names
the sample, the budget, the split and the group's own sampling seed (:func:`group_seed`, derived
from the run seed, the update and the group's index), so a group sampled here and one sampled
on a Ray actor from the same weights are the same group. A :class:`GroupCollector` maps requests
to :class:`GroupResult` s in request order:

- :class:`LocalGroupCollector` calls the sampler (the agent itself) on each request in turn;
- :class:`RayGroupCollector` runs them on a :class:`executors.ray.RayPool`: each actor builds the
  env once (envs pickle by their backend spec, so an actor loads the model itself) and a replica
  of the sampler, receives the policy weights once per update, and samples whole groups; a group
  whose actor dies is sampled again on another actor (see :mod:`executors.ray`).

Only GRPO's group collection runs on an executor; the baselines, validation and the final
evaluation stay in the driver process (they are a small share of a run's model time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from agents.base import EnvLayout


@dataclass(frozen=True)
class GroupRequest:
    """One group to sample: sample, budget (ms), split, and the seed of its sampling generator."""

    sample_id: int
    budget_ms: float
    split: str
    seed: int


@dataclass
class GroupResult:
    """One sampled and scored group of ``G`` trajectories over ``S`` stages.

    ``obs [G, S, obs_dim]`` and ``features [G, S, max_options, 2]`` are what each stage saw,
    ``options [G, S]`` what it chose, ``actions [G, heads]`` the trajectories, ``rewards [G]`` and
    ``infos`` (one dict per trajectory, ``reward`` included) the env's scoring.
    """

    obs: np.ndarray
    features: np.ndarray
    options: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    infos: list


def group_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of group ``index`` of update ``step`` of a run seeded ``seed`` (63 bits)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(index)]).generate_state(2, np.uint64)[0] >> 1)


class GroupSampler(Protocol):
    """What a collector needs from an agent: sample a group, and ship its policy to a replica.

    ``replica()`` is a picklable zero-argument callable building a sampler of the same shapes and
    options (its weights are then set with ``load_policy_weights(policy_weights())``).
    """

    def sample_group(self, layout: EnvLayout, request: GroupRequest) -> GroupResult: ...

    def policy_weights(self) -> dict: ...

    def load_policy_weights(self, weights: dict) -> None: ...

    def replica(self) -> Callable[[], "GroupSampler"]: ...


class GroupCollector(Protocol):
    """``collect(requests)``: one :class:`GroupResult` per request, in request order, sampled
    with the sampler's current weights. ``close()`` releases workers (idempotent)."""

    def collect(self, requests: Sequence[GroupRequest]) -> list[GroupResult]: ...

    def close(self) -> None: ...


class LocalGroupCollector:
    """Every group in this process, one after the other, with the sampler's own policy."""

    def __init__(self, layout: EnvLayout, sampler: GroupSampler):
        self.layout, self.sampler = layout, sampler

    def collect(self, requests: Sequence[GroupRequest]) -> list[GroupResult]:
        return [self.sampler.sample_group(self.layout, r) for r in requests]

    def close(self) -> None:
        pass


def _build_worker(env, make_sampler: Callable[[], GroupSampler]) -> tuple[EnvLayout, GroupSampler]:
    """On an actor: the env (unpickled there: its backend loads from the spec) and a sampler replica."""
    return EnvLayout(env), make_sampler()


def _sample_on_worker(state: tuple[EnvLayout, GroupSampler], weights: dict, request: GroupRequest) -> GroupResult:
    layout, sampler = state
    sampler.load_policy_weights(weights)
    return sampler.sample_group(layout, request)


class RayGroupCollector:
    """Groups sampled on the actors of an executor's pool (``executor.workers`` of them).

    The env must pickle without its model (made from a backend spec or name, as the CLI does), and
    the actors must import this project (the cluster's nodes have it installed). Actors start on
    the first :meth:`collect` and stop at :meth:`close`.
    """

    def __init__(self, env, sampler: GroupSampler, executor):
        self.sampler = sampler
        self.pool = executor.pool(functools.partial(_build_worker, env, sampler.replica()), _sample_on_worker,
                                  gpus=True)

    def collect(self, requests: Sequence[GroupRequest]) -> list[GroupResult]:
        return list(self.pool.map(requests, shared=self.sampler.policy_weights()))

    def close(self) -> None:
        self.pool.close()


def group_collector(env, sampler: GroupSampler, executor=None) -> GroupCollector:
    """A local collector (``executor`` ``None`` or in-process) or one on the executor's workers."""
    if executor is None or executor.in_process:
        return LocalGroupCollector(EnvLayout(env), sampler)
    return RayGroupCollector(env, sampler, executor)
