"""The agent interface and the episode / evaluation helpers every agent shares.

An agent picks one env action from an observation. Agents that need more than the observation
(``greedy`` asks the latency estimator about this input, ``oracle`` tries every configuration)
read an :class:`EpisodeContext` naming the sample, budget and split of the current episode and
the env's :class:`~envs.protocols.GroupEnv` side.

Envs are driven through the Gymnasium API (``reset(options={sample_id, budget, split})`` then
``step`` until done), so an evaluation is exactly a sequence of ordinary episodes; group-based
training, the baselines and the oracle use the env's :class:`~envs.protocols.GroupEnv` members
(same scoring, shared work). Nothing here reaches into an env's backend or latency source.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from agents.checkpoint import env_id_of, read_checkpoint, write_checkpoint
from backends.base import check_split
from envs.budget import check_budget_ms
from envs.protocols import GroupEnv, group_env
from backends.checks import check_int


@dataclass(frozen=True)
class EpisodeContext:
    """What an agent may know about the current episode besides its observation.

    ``stage`` counts steps taken in this episode (``MultiKnob-v0``: 0 chooses the tier, 1 the
    top-k and depth). ``env`` is the env's :class:`~envs.protocols.GroupEnv` side.
    ``trajectory`` holds the elements earlier stages of this episode chose (``None`` at stage 0).
    """

    env: GroupEnv
    sample_id: int
    budget_ms: float
    split: str
    stage: int = 0
    trajectory: tuple | None = None


class FitHooks:
    """What the caller of :meth:`Agent.fit` plugs into a training loop: validation, checkpoints,
    logging. Every method is a no-op here; the CLI supplies its own (``knobgym_cli.training``), so
    agents never import the CLI. Agents that train in updates call them in this order:
    ``on_fit_start`` once, ``on_update`` after every update, ``on_fit_end`` once. ``step`` counts
    updates done so far (including those of a resumed run), ``total`` is where ``fit`` stops."""

    def on_fit_start(self, agent: "Agent", step: int, total: int) -> None:
        """Before the first update of this ``fit`` (also when a resumed agent continues)."""

    def on_update(self, agent: "Agent", step: int, infos: list[dict], stats: dict) -> None:
        """After update number ``step``: the episode infos it trained on and its statistics."""

    def on_fit_end(self, agent: "Agent", step: int) -> None:
        """After the last update."""


@dataclass
class FitContext:
    """What the caller of :meth:`Agent.fit` decides (agents' own options come from ``from_env``).

    Args:
        split: the split training episodes draw samples from.
        sample_pool: draw training samples from the split's first N only (``None``: all).
        budgets_ms: the budgets the agent will be evaluated at (``static`` calibrates at these;
            empty: the env budget's :meth:`~envs.budget.Budget.evaluation_budgets`).
        hooks: validation / checkpoint / logging callbacks.
        executor: where an agent's group collection runs (an :class:`executors.Executor`; ``None``:
            this process). GRPO honours it (:mod:`agents.rollout`); the other agents train in this process.
    """

    split: str = "train"
    sample_pool: int | None = None
    budgets_ms: Sequence[float] = ()
    hooks: FitHooks = field(default_factory=FitHooks)
    executor: Any = None


class Agent:
    """Base of every agent: ``act`` (required), ``fit`` (agents that learn), ``save`` / ``load``.

    Actions are trajectory vectors of head indices (see :class:`~envs.protocols.GroupEnv`); in a
    two-stage env the same vector is returned at both stages and the env reads the elements the
    stage uses. An agent's whole training loop is its ``fit``.

    Class attributes the CLI reads (so it needs no per-agent code):
        name: the registry name (``agent=<name>``).
        needs_context: :meth:`act` needs an :class:`EpisodeContext`.
        seeded: accepts a ``seed`` option (the CLI passes the run's seed).
        evaluation_only: cannot be trained and deployed (the oracle looks at the outcome it is scored on).
        resumable: ``fit`` continues from a loaded state; :meth:`configure` takes the new options.
        fits_budgets: ``fit`` depends on the evaluation budgets (re-fitted for other budgets).
        config_class: the dataclass declaring the agent's options (help and bounds per field, as
            TRL's configs; ``from_dict(options)`` validates a set): the CLI checks ``agent.<option>=``
            overrides through it. ``None``: the options are ``from_env``'s keyword arguments.
    """

    name: str = "agent"
    config_class: type | None = None
    needs_context: bool = False
    seeded: bool = False
    evaluation_only: bool = False
    resumable: bool = False
    fits_budgets: bool = False

    def act(self, obs: np.ndarray, context: EpisodeContext | None = None):
        raise NotImplementedError

    def fit(self, env: gym.Env, context: FitContext | None = None) -> dict:
        """Learn from ``env``; returns a dict of fit statistics. Agents that do not learn return {}."""
        return {}

    def configure(self, **options: Any) -> None:
        """Take new options before ``fit`` continues a resumed run (resumable agents only)."""
        raise ValueError(f"the {self.name} agent cannot continue a run; accepted: a new run")

    def freeze(self) -> "Agent":
        """The agent in evaluation mode (no further learning)."""
        return self

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to act (and continue fitting) as tensors, arrays and JSON-able values."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "Agent":
        """An agent for ``env`` (action and observation shapes read from it)."""
        return cls(**options)

    @classmethod
    def restore(cls, env: gym.Env, state: dict) -> "Agent":
        """An agent for ``env`` with ``state`` (from :meth:`state_dict`) loaded."""
        agent = cls.from_env(env)
        agent.load_state_dict(state)
        return agent

    def save(self, path: str | Path, env: gym.Env, metadata: dict | None = None) -> Path:
        """Write the agent's state (data only, atomically) as a checkpoint of this agent on ``env``."""
        return write_checkpoint(path, self.name, env_id_of(env), self.state_dict(), metadata)

    @classmethod
    def load(cls, path: str | Path, env: gym.Env) -> "Agent":
        """An agent of this class for ``env`` from the checkpoint at ``path`` (checked: agent and env)."""
        ckpt = read_checkpoint(path, agent=cls.name, env_id=env_id_of(env))
        return cls.restore(env, ckpt["state"])


# ------------------------------------------------------------------------------------------------
# Env layout: heads, stages and the observations of a group
# ------------------------------------------------------------------------------------------------
class EnvLayout:
    """An agent's view of a :class:`~envs.protocols.GroupEnv`: heads, stages, group queries.

    ``nvec`` and ``stage_heads`` are the env's declared trajectory layout; ``observation`` and
    ``evaluate`` are its pure stage-observation query and group evaluation.
    """

    def __init__(self, env: gym.Env):
        self.env = group_env(env)
        self.nvec = [int(n) for n in self.env.trajectory_nvec]
        self.stage_heads: list[list[int]] = [list(h) for h in self.env.stage_heads]
        self.obs_dim = int(np.prod(env.observation_space.shape))

    @property
    def n_heads(self) -> int:
        return len(self.nvec)

    @property
    def n_stages(self) -> int:
        return len(self.stage_heads)

    def all_actions(self) -> np.ndarray:
        """Every trajectory of the env as rows of head indices (the oracle / static search space)."""
        return np.array(list(itertools.product(*[range(n) for n in self.nvec])), dtype=np.int64)

    def to_env_action(self, heads: Sequence[int], stage: int = 0):
        """Head indices -> the env's action at ``stage``."""
        return self.env.to_env_action(np.asarray(heads, dtype=np.int64), stage)

    def observation(self, sample_id: int, budget_ms: float, split: str, stage: int,
                    heads: Sequence[int] | None = None) -> np.ndarray:
        """The observation at ``stage`` of an episode on (sample, budget) whose earlier stages chose ``heads``."""
        return self.env.stage_observation(int(sample_id), float(budget_ms), split, stage, heads)

    def evaluate(self, sample_id: int, budget_ms: float, actions: np.ndarray, split: str):
        """Rewards and infos of head-index rows on one sample and budget (shared work done once)."""
        return self.env.evaluate_group(int(sample_id), float(budget_ms), list(actions), split)

    def estimated_latency_ms(self, sample_id: int, actions: np.ndarray, split: str) -> np.ndarray:
        """The latency estimator's prediction for each head-index row on this input (no model run)."""
        return np.asarray(self.env.estimated_latency_ms(int(sample_id), list(actions), split), dtype=np.float64)

    def num_samples(self, split: str) -> int:
        return self.env.num_samples(split)


# ------------------------------------------------------------------------------------------------
# Episodes and evaluation
# ------------------------------------------------------------------------------------------------
def eval_sample_ids(env: gym.Env, split: str, num_samples: int | None) -> list[int]:
    """The first ``num_samples`` sample ids of ``split`` (all when ``None``): a fixed evaluation set."""
    check_split(split)
    total = group_env(env).num_samples(split)
    if num_samples is not None:
        check_int("num_samples", num_samples, 1, where="or None: all")
    return list(range(total if num_samples is None else min(int(num_samples), total)))


def as_env_action(env: gym.Env, action):
    """An agent's head-index vector as the env's action (an int for ``Discrete`` spaces)."""
    if isinstance(env.action_space, gym.spaces.Discrete):
        return int(np.asarray(action).reshape(-1)[0])
    return np.asarray(action, dtype=np.int64)


def run_episode(env: gym.Env, agent: Agent, sample_id: int, budget_ms: float, split: str) -> dict:
    """One Gymnasium episode of ``agent`` on a fixed sample and budget; returns the final step's info with
    ``reward`` the episode's return (the sum of its step rewards, as ``evaluate_group`` scores it)."""
    genv = group_env(env) if agent.needs_context else None
    obs, info = env.reset(options={"sample_id": int(sample_id), "budget": float(budget_ms), "split": split})
    stage, done, episode_return, trajectory = 0, False, 0.0, None
    while not done:
        context = EpisodeContext(genv, int(sample_id), float(info.get("budget_ms", budget_ms)), split, stage,
                                 trajectory)
        action = agent.act(obs, context)
        if genv is not None and stage < len(genv.stage_heads):  # what this stage chose, for the next ones
            chosen = np.zeros(len(genv.trajectory_nvec), dtype=np.int64) if trajectory is None else np.array(trajectory)
            heads = list(genv.stage_heads[stage])
            chosen[heads] = np.asarray(action, dtype=np.int64).reshape(-1)[heads]
            trajectory = tuple(int(v) for v in chosen)
        obs, reward, terminated, truncated, info = env.step(as_env_action(env, action))
        episode_return += float(reward)
        done, stage = terminated or truncated, stage + 1
    return {**info, "reward": episode_return}


def score_in_budget(info: dict) -> float:
    """An episode's score within budget: its score, or 0 when its answer arrived after the budget
    (an answer that arrives late is of no use to a latency-bound caller)."""
    return 0.0 if info["violated"] else float(info["score"])


def summarize(infos: Sequence[dict]) -> dict:
    """Mean reward and score, latency p50 / p95, violation rate and mean knobs of episode infos."""
    if not infos:
        raise ValueError("cannot summarise zero episodes; accepted: at least one episode info")
    lat = np.array([i["latency_ms"] for i in infos], dtype=np.float64)
    summary = {
        "episodes": len(infos),
        "reward": float(np.mean([i["reward"] for i in infos])),
        "score": float(np.mean([i["score"] for i in infos])),
        "score_in_budget": float(np.mean([score_in_budget(i) for i in infos])),
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


def evaluate_agent(env: gym.Env, agent: Agent, sample_ids: Sequence[int], budget_ms: float, split: str) -> dict:
    """Run ``agent`` on every sample at one fixed budget (ms); returns :func:`summarize` plus ``infos``."""
    budget_ms = check_budget_ms(budget_ms)
    infos = [run_episode(env, agent, sid, budget_ms, check_split(split)) for sid in sample_ids]
    return {**summarize(infos), "budget_ms": budget_ms, "infos": infos}


class TrajectoryPolicyAgent(Agent):
    """Base of the agents that learn a policy over whole trajectories (``grpo``, ``grpo_lm``): built
    from the env's layout and a config (:attr:`config_class`), resumable, checkpointed with their
    shapes, update step and random states, restored only onto an env of the same shapes.

    A subclass's ``__init__(obs_dim, nvec, stage_heads, config)`` calls :meth:`_set_shapes` first.
    """

    seeded = True
    resumable = True
    needs_context = True
    #: what the checkpoint holds, in error messages ("policy", "controller")
    checkpoint_noun = "policy"

    def _set_shapes(self, obs_dim: int, nvec: Sequence[int], stage_heads: Sequence[Sequence[int]], config) -> None:
        self.config = config or self.config_class()
        self.obs_dim, self.nvec = int(obs_dim), [int(n) for n in nvec]
        self.stage_heads = [list(h) for h in stage_heads]

    @classmethod
    def from_env(cls, env: gym.Env, config=None, **options: Any) -> "TrajectoryPolicyAgent":
        """An agent for ``env`` with ``config`` (a config, a mapping, or ``None``: built from ``options``)."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        elif config is None:
            config = cls.config_class.from_dict(options)
        layout = EnvLayout(env)
        return cls(layout.obs_dim, layout.nvec, layout.stage_heads, config)

    @classmethod
    def _check_shapes(cls, state: dict, obs_dim: int, nvec: list[int], accepted: str = "") -> None:
        if state["obs_dim"] != obs_dim or [int(n) for n in state["nvec"]] != nvec:
            raise ValueError(f"checkpoint {cls.checkpoint_noun} has observation size {state['obs_dim']} and action "
                             f"heads {list(state['nvec'])}; this env has {obs_dim} and {nvec}{accepted}")

    def common_state(self) -> dict:
        """The part of :meth:`state_dict` every trajectory-policy agent has: config, shapes, step, random states."""
        return {"config": self.config.as_dict(), "obs_dim": self.obs_dim, "nvec": self.nvec,
                "stage_heads": self.stage_heads, "step": self.step, "rng": self.rng_state()}

    def rng_state(self) -> dict:
        """The numpy, torch and Python random states (saved so a resumed run draws what it would have)."""
        import random

        import torch

        return {"numpy": self.rng.bit_generator.state, "torch_global": torch.get_rng_state(),
                "python": random.getstate()}

    def load_step_and_rng(self, state: dict) -> None:
        """The update step and random states of :meth:`state_dict`."""
        import random

        import torch

        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch_global"])
        random.setstate(state["rng"]["python"])

    @classmethod
    def from_state(cls, state: dict) -> "TrajectoryPolicyAgent":
        """Rebuild an agent (config, shapes, weights, optimizer, RNGs) from :meth:`state_dict`."""
        agent = cls(state["obs_dim"], state["nvec"], state["stage_heads"], cls.config_class.from_dict(state["config"]))
        agent.load_state_dict(state)
        return agent

    @classmethod
    def restore(cls, env: gym.Env, state: dict) -> "TrajectoryPolicyAgent":
        layout = EnvLayout(env)
        cls._check_shapes(state, layout.obs_dim, layout.nvec,
                          "; accepted: the env and backend the checkpoint was trained on")
        return cls.from_state(state)
