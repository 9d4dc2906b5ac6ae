"""Stable-Baselines3 PPO as an external reference, trained on the env through the plain Gym API.

PPO sees ordinary episodes (two steps in ``MultiKnob-v0``) on the env's own split, with budgets
drawn from the env budget's :meth:`~envs.budget.Budget.training_range` (the fixed budget or
the range, widened by ``budget_jitter``), and acts deterministically at evaluation.

Saved as data only: the policy's ``state_dict`` tensors and the options; loading rebuilds the
SB3 model for the env and loads the weights (SB3's own zip format unpickles, so it is not used).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np

from agents.base import Agent, FitContext
from agents.baselines import RandomConfig
from agents.config_checks import JITTER_BOUNDS, JITTER_HELP, option
from agents.registry import register_agent
from envs.budget import Budget
from envs.protocols import group_env


class BudgetJitter(gym.Wrapper):
    """Resets with a budget drawn from ``budgets`` with the env's ``np_random`` (unless the caller passes one)."""

    def __init__(self, env: gym.Env, budgets: Budget):
        super().__init__(env)
        self.budgets = budgets

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)  # seeds np_random first
        if options and "budget" in options:
            return obs, info
        budget = self.budgets.sample(self.np_random)
        return self.env.reset(options={**(options or {}), "budget": budget, "sample_id": info["sample_id"]})


@dataclass
class PPOConfig(RandomConfig):
    """Options of ``ppo`` (SB3's names and meanings)."""

    total_timesteps: int = option(2048, "environment steps", low=1)
    n_steps: int = option(256, "steps per rollout", low=2)
    batch_size: int = option(64, "minibatch size", low=1)
    learning_rate: float = option(3e-4, "Adam step size", low=0, low_open=True)
    budget_jitter: float = option(0.2, JITTER_HELP, **JITTER_BOUNDS)


@register_agent
class PPOAgent(Agent):
    """SB3 PPO (``MlpPolicy``) over the env's observation and ``MultiDiscrete`` / ``Discrete`` action."""

    name = "ppo"
    seeded = True
    config_class = PPOConfig
    OPTIONS = tuple(sorted(f.name for f in fields(PPOConfig)))

    def __init__(self, env: gym.Env, config: PPOConfig = PPOConfig()):
        self.env = env
        self.options = asdict(config)
        self.model = None

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "PPOAgent":
        return cls(env, PPOConfig.from_dict(options))

    def _build(self):
        """The SB3 model on the env with budgets drawn from its training range."""
        from stable_baselines3 import PPO

        opts = self.options
        budgets = group_env(self.env).budget.training_range(opts["budget_jitter"])
        return PPO("MlpPolicy", BudgetJitter(self.env, budgets), n_steps=opts["n_steps"],
                   batch_size=opts["batch_size"], learning_rate=opts["learning_rate"], seed=opts["seed"], verbose=0,
                   device="cpu")

    def fit(self, env: gym.Env, context: FitContext | None = None) -> dict:
        """Train PPO on ``env`` (its own split; ``context`` is not used: SB3 runs its own loop)."""
        self.env = env
        self.model = self._build()
        self.model.learn(total_timesteps=self.options["total_timesteps"])
        return {"ppo/timesteps": int(self.model.num_timesteps)}

    def act(self, obs, context=None) -> np.ndarray:
        if self.model is None:
            raise ValueError("the ppo agent is not fitted; call fit(env) or load a saved one")
        action, _ = self.model.predict(np.asarray(obs, dtype=np.float32), deterministic=True)
        return np.atleast_1d(np.asarray(action, dtype=np.int64))

    def state_dict(self) -> dict:
        if self.model is None:
            raise ValueError("the ppo agent is not fitted; nothing to save")
        return {"options": dict(self.options), "policy": self.model.policy.state_dict(),
                "num_timesteps": int(self.model.num_timesteps)}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["options"]) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"saved ppo options {sorted(unknown)} are unknown; accepted: {', '.join(self.OPTIONS)}")
        self.options = dict(state["options"])
        self.model = self._build()
        self.model.policy.load_state_dict(state["policy"])
        self.model.num_timesteps = int(state.get("num_timesteps", 0))
