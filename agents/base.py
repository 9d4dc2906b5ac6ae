"""The agent interface and the episode / evaluation helpers every agent shares.

An agent picks one env action from an observation. Agents that need more than the observation
(``greedy`` asks the latency estimator about this input, ``oracle`` tries every configuration)
read an :class:`EpisodeContext` naming the sample, budget and split of the current episode.

Envs are driven through the Gymnasium API (``reset(options={sample_id, budget, split})`` then
``step`` until done), so an evaluation is exactly a sequence of ordinary episodes; group-based
training and the oracle use the envs' ``evaluate_group`` (same scoring, stage 1 shared).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from backends.base import SPLITS
from envs.budget import Budget


@dataclass(frozen=True)
class EpisodeContext:
    """What an agent may know about the current episode besides its observation.

    ``stage`` counts steps taken in this episode (``MultiKnob-v0``: 0 chooses the tier, 1 the
    top-k and depth). ``env`` is the unwrapped env (estimator, backend, group evaluation).
    """

    env: Any
    sample_id: int
    budget_ms: float
    split: str
    stage: int = 0


class Agent:
    """Base of every agent: ``act`` (required), ``fit`` (agents that learn), ``save`` / ``load``.

    Actions are vectors of head indices (one per element of a ``MultiDiscrete`` action, a single
    element for ``Discrete``; :func:`as_env_action` converts); in a two-stage env the same vector is returned at both stages and the env reads the elements the
    stage uses.
    """

    name: str = "agent"
    #: whether :meth:`act` needs an :class:`EpisodeContext` (not only the observation)
    needs_context: bool = False

    def act(self, obs: np.ndarray, context: EpisodeContext | None = None):
        raise NotImplementedError

    def fit(self, env: gym.Env, **kwargs: Any) -> dict:
        """Learn from ``env``; returns a dict of fit statistics. Agents that do not learn return {}."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write the agent's state to ``path`` (atomically); agents without state write their name."""
        from agents.io import atomic_torch_save

        return atomic_torch_save({"agent": self.name, "state": self.state_dict()}, path)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    @classmethod
    def load(cls, path: str | Path, env: gym.Env) -> "Agent":
        """An agent of this class for ``env`` with the state saved at ``path``."""
        import torch

        payload = torch.load(Path(path), map_location="cpu", weights_only=False)
        if payload.get("agent") != cls.name:
            raise ValueError(f"{str(path)!r} holds a {payload.get('agent')!r} agent, not {cls.name!r}")
        agent = cls.from_env(env)
        agent.load_state_dict(payload["state"])
        return agent

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "Agent":
        """An agent for ``env`` (action and observation shapes read from it)."""
        return cls(**options)


# ------------------------------------------------------------------------------------------------
# Env layout: heads, stages and the observations of a group
# ------------------------------------------------------------------------------------------------
class EnvLayout:
    """How an env's action decomposes into categorical heads and which stage reads which head.

    ``MultiKnob-v0`` is two-stage: stage 0 reads head 0 (tier), stage 1 heads 1 and 2 (top-k,
    depth). One-step envs read every head in stage 0. Also gives the observations of an arbitrary
    (sample, budget, partial action) without stepping an episode, for group-based agents.
    """

    def __init__(self, env: gym.Env):
        self.env = env
        self.base = env.unwrapped
        space = self.base.action_space
        if isinstance(space, gym.spaces.Discrete):
            self.nvec, self.discrete = [int(space.n)], True
        elif isinstance(space, gym.spaces.MultiDiscrete) and len(space.nvec.shape) == 1:
            self.nvec, self.discrete = [int(n) for n in space.nvec], False
        else:
            raise ValueError(f"action space {space} is not supported; accepted: Discrete or 1-D MultiDiscrete")
        if not hasattr(self.base, "evaluate_group"):
            raise ValueError(f"env {type(self.base).__name__} has no evaluate_group(); accepted: knob envs "
                             f"(MultiKnob-v0, TokenBudget-v0 and their variants)")
        self.two_stage = hasattr(self.base, "stage2_observation")
        self.stage_heads: list[list[int]] = ([[0], list(range(1, len(self.nvec)))] if self.two_stage
                                             else [list(range(len(self.nvec)))])
        self.obs_dim = int(np.prod(self.base.observation_space.shape))

    @property
    def n_heads(self) -> int:
        return len(self.nvec)

    @property
    def n_stages(self) -> int:
        return len(self.stage_heads)

    def all_actions(self) -> np.ndarray:
        """Every action of the env as rows of head indices (the oracle / static search space)."""
        return np.array(list(itertools.product(*[range(n) for n in self.nvec])), dtype=np.int64)

    def to_env_action(self, heads: Sequence[int]):
        """Head indices -> the env's action (an int for ``Discrete``)."""
        heads = np.asarray(heads, dtype=np.int64)
        return int(heads[0]) if self.discrete else heads

    def observation(self, sample_id: int, budget_ms: float, split: str, stage: int,
                    heads: Sequence[int] | None = None) -> np.ndarray:
        """The observation at ``stage`` of an episode on (sample, budget) whose earlier stages chose ``heads``."""
        if stage == 0:
            if hasattr(self.base, "stage1_observation"):
                return self.base.stage1_observation(sample_id, budget_ms, split)
            obs, _ = self.base.reset(options={"sample_id": int(sample_id), "budget": float(budget_ms),
                                              "split": split})
            return obs
        if not self.two_stage or stage != 1 or heads is None:
            raise ValueError(f"stage={stage} is invalid for {type(self.base).__name__}; accepted: "
                             f"0..{self.n_stages - 1} (with the earlier heads for stage 1)")
        return self.base.stage2_observation(sample_id, budget_ms, int(heads[0]), split)

    def evaluate(self, sample_id: int, budget_ms: float, actions: np.ndarray, split: str):
        """Rewards and infos of head-index rows on one sample and budget (one shared stage 1)."""
        env_actions = [self.to_env_action(a) for a in actions]
        return self.base.evaluate_group(int(sample_id), float(budget_ms), env_actions, split=split)


# ------------------------------------------------------------------------------------------------
# Episodes and evaluation
# ------------------------------------------------------------------------------------------------
def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; accepted: {', '.join(SPLITS)}")
    return split


def eval_sample_ids(env: gym.Env, split: str, num_samples: int | None) -> list[int]:
    """The first ``num_samples`` sample ids of ``split`` (all when ``None``): a fixed evaluation set."""
    check_split(split)
    total = len(env.unwrapped.backend.samples(split))
    if num_samples is not None and (not isinstance(num_samples, (int, np.integer)) or num_samples < 1):
        raise ValueError(f"num_samples={num_samples!r} is invalid; accepted: a positive integer or None (all)")
    return list(range(total if num_samples is None else min(int(num_samples), total)))


def as_env_action(env: gym.Env, action):
    """An agent's head-index vector as the env's action (an int for ``Discrete`` spaces)."""
    if isinstance(env.action_space, gym.spaces.Discrete):
        return int(np.asarray(action).reshape(-1)[0])
    return np.asarray(action, dtype=np.int64)


def run_episode(env: gym.Env, agent: Agent, sample_id: int, budget_ms: float, split: str) -> dict:
    """One Gymnasium episode of ``agent`` on a fixed sample and budget; returns the final step's info."""
    obs, info = env.reset(options={"sample_id": int(sample_id), "budget": float(budget_ms), "split": split})
    stage, done, reward = 0, False, 0.0
    while not done:
        context = EpisodeContext(env.unwrapped, int(sample_id), float(info.get("budget_ms", budget_ms)), split,
                                 stage)
        obs, reward, terminated, truncated, info = env.step(as_env_action(env, agent.act(obs, context)))
        done, stage = terminated or truncated, stage + 1
    return {**info, "reward": float(reward)}


def summarize(infos: Sequence[dict]) -> dict:
    """Mean reward and score, latency p50 / p95, violation rate and mean knobs of episode infos."""
    if not infos:
        raise ValueError("cannot summarise zero episodes; accepted: at least one episode info")
    lat = np.array([i["latency_ms"] for i in infos], dtype=np.float64)
    summary = {
        "episodes": len(infos),
        "reward": float(np.mean([i["reward"] for i in infos])),
        "score": float(np.mean([i["score"] for i in infos])),
        # an answer that arrives after the budget is of no use to a latency-bound caller
        "score_in_budget": float(np.mean([0.0 if i["violated"] else i["score"] for i in infos])),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "violation_rate": float(np.mean([bool(i["violated"]) for i in infos])),
    }
    knobs = [i["knobs"] for i in infos if i.get("knobs")]
    for key in ("top_k", "depth", "token_budget"):
        values = [k[key] for k in knobs if k.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = float(np.mean(values))
    tiers = [k["tier"] for k in knobs if k.get("tier") is not None]
    if tiers:
        names, counts = np.unique(tiers, return_counts=True)
        summary["tier_share"] = {str(n): float(c) / len(tiers) for n, c in zip(names, counts)}
    return summary


def evaluate_agent(env: gym.Env, agent: Agent, sample_ids: Sequence[int], budget: Any, split: str) -> dict:
    """Run ``agent`` on every sample at one fixed ``budget``; returns :func:`summarize` plus ``infos``."""
    budget_ms = Budget.parse(budget)
    if budget_ms.is_range:
        raise ValueError(f"budget={budget!r} is invalid for an evaluation; accepted: one fixed budget")
    infos = [run_episode(env, agent, sid, budget_ms.low_ms, check_split(split)) for sid in sample_ids]
    return {**summarize(infos), "budget_ms": budget_ms.low_ms, "infos": infos}
