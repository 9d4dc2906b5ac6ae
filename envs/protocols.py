"""The env-agent contract: what an agent may ask an env besides the Gymnasium API.

Agents drive envs through Gymnasium (``reset(options={"sample_id", "budget", "split"})``, then
``step`` until done) and, for group-based training, the baselines and the oracle, through the
:class:`GroupEnv` protocol below. Nothing in ``agents/`` or the CLI reaches past these two into an
env's backend, latency source or knob space.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import gymnasium as gym
import numpy as np

from envs.budget import Budget


@runtime_checkable
class GroupEnv(Protocol):
    """An env whose episodes can be scored in groups and whose observations can be queried.

    **Trajectories and stages.** An episode is a fixed sequence of decision stages (``step``
    calls). A *trajectory* is one integer vector of length ``len(trajectory_nvec)``, element ``i``
    choosing among ``trajectory_nvec[i]`` values; stage ``s`` reads the elements
    ``stage_heads[s]``. ``MultiKnob-v0`` has two stages over one ``[tier, top-k, depth]`` vector
    (``stage_heads = ((0,), (1, 2))``); ``TokenBudget-v0`` one stage reading element 0. A
    multi-step env (e.g. a KV-cache env making one ``H``-element decision per chunk over ``C``
    chunks) declares ``C`` stages over a vector of ``C * H`` elements, stage ``c`` reading
    elements ``c*H .. (c+1)*H - 1``; its ``stage_observation`` replays the earlier chunks'
    decisions from the trajectory. Envs declare their stages; agents never infer them.

    Members:
        budget: the env's :class:`~envs.budget.Budget` (agents draw training budgets from it).
        trajectory_nvec: choices per trajectory element.
        stage_heads: per stage, the trajectory elements it reads (every element read by one stage).
        num_samples(split): how many samples ``split`` holds (ids are ``0 .. n-1``).
        stage_observation(sample_id, budget_ms, split, stage, trajectory): the observation an
            episode on (sample, budget) sees before ``stage``, given the elements earlier stages
            read from ``trajectory`` (``None`` for stage 0). Pure: it changes no episode state.
        evaluate_group(sample_id, budget_ms, trajectories, split): ``(rewards, infos)`` of each
            trajectory on one sample and a fixed budget, each as if it were its own episode (same
            reward and info as stepping it; shared work is done once).
        estimated_latency_ms(sample_id, trajectories, split): the latency estimator's prediction
            for each trajectory on this input, from expected token counts (no model run).
        to_env_action(trajectory, stage): the Gymnasium action a ``step`` at ``stage`` takes for
            this trajectory.
        provenance(): JSON-able description of what the env runs (backend identity, latency
            source, knob space) for run records.
        achievable_range_ms: ``(cheapest, dearest)`` estimated latency on this device: the budgets
            that can bind (``budget=auto`` and the CLI's range checks read it).
        suggested_budget_ms: a budget that binds on this device (what ``budget=auto`` resolves to).

    :class:`envs.base.KnobgymEnv` implements the budget members, actions, reset options and
    observation clipping once for every env family.
    """

    budget: Budget
    trajectory_nvec: tuple[int, ...]
    stage_heads: tuple[tuple[int, ...], ...]

    def num_samples(self, split: str) -> int: ...

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int,
                          trajectory: Sequence[int] | None = None) -> np.ndarray: ...

    def evaluate_group(self, sample_id: int, budget_ms: float, trajectories: Sequence[Sequence[int]],
                       split: str) -> tuple[np.ndarray, list[dict]]: ...

    def estimated_latency_ms(self, sample_id: int, trajectories: Sequence[Sequence[int]],
                             split: str) -> np.ndarray: ...

    def to_env_action(self, trajectory: Sequence[int], stage: int) -> Any: ...

    def provenance(self) -> dict: ...

    @property
    def achievable_range_ms(self) -> tuple[float, float]: ...

    @property
    def suggested_budget_ms(self) -> float: ...


def group_env(env: gym.Env) -> GroupEnv:
    """The :class:`GroupEnv` under ``env``'s wrappers; a ``ValueError`` naming the env otherwise."""
    base = env.unwrapped
    if not isinstance(base, GroupEnv):
        raise ValueError(f"env {type(base).__name__} does not implement envs.protocols.GroupEnv; accepted: "
                         f"a registered knobgym env (envs.list_envs()) or an env declaring it (envs.base.KnobgymEnv)")
    return base
