"""Stable-Baselines3 PPO as an external reference, trained on the env through the plain Gym API.

PPO sees ordinary episodes (two steps in ``MultiKnob-v0``) on the training split, with the
budget drawn like GRPO's (the env's range, or the fixed budget jittered), and acts
deterministically at evaluation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents.base import Agent
from agents.io import atomic_torch_save
from envs.budget import Budget


class BudgetJitter(gym.Wrapper):
    """Resets with a budget drawn uniformly from ``[low, high]`` (unless the caller passes one)."""

    def __init__(self, env: gym.Env, low_ms: float, high_ms: float):
        super().__init__(env)
        self.low_ms, self.high_ms = float(low_ms), float(high_ms)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)  # seeds np_random first
        if options and "budget" in options:
            return obs, info
        budget = float(self.unwrapped.np_random.uniform(self.low_ms, self.high_ms))
        return self.env.reset(options={**(options or {}), "budget": budget, "sample_id": info["sample_id"]})


class PPOAgent(Agent):
    """SB3 PPO (``MlpPolicy``) over the env's observation and ``MultiDiscrete`` / ``Discrete`` action."""

    name = "ppo"

    def __init__(self, total_timesteps: int = 2048, n_steps: int = 256, batch_size: int = 64,
                 learning_rate: float = 3e-4, budget_jitter: float = 0.2, seed: int = 0):
        if int(total_timesteps) < 1 or int(n_steps) < 2 or int(batch_size) < 1:
            raise ValueError(f"total_timesteps={total_timesteps}, n_steps={n_steps}, batch_size={batch_size} are "
                             f"invalid; accepted: total_timesteps >= 1, n_steps >= 2, batch_size >= 1")
        self.options = {"total_timesteps": int(total_timesteps), "n_steps": int(n_steps),
                        "batch_size": int(batch_size), "learning_rate": float(learning_rate),
                        "budget_jitter": float(budget_jitter), "seed": int(seed)}
        self.model = None

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "PPOAgent":
        accepted = {"total_timesteps", "n_steps", "batch_size", "learning_rate", "budget_jitter", "seed"}
        unknown = set(options) - accepted
        if unknown:
            raise ValueError(f"unknown ppo option(s) {sorted(unknown)}; accepted: {', '.join(sorted(accepted))}")
        return cls(**options)

    def fit(self, env: gym.Env, **kwargs: Any) -> dict:
        """Train PPO on ``env`` (its own split and budget; fixed budgets are jittered)."""
        from stable_baselines3 import PPO

        if kwargs:
            raise ValueError(f"unknown ppo fit option(s) {sorted(kwargs)}; accepted: none (options go to from_env)")
        opts = self.options
        budget = Budget.parse(env.unwrapped.budget)
        low, high = budget.low_ms, budget.high_ms
        if not budget.is_range:
            low, high = low * (1 - opts["budget_jitter"]), high * (1 + opts["budget_jitter"])
        train_env = BudgetJitter(env, low, high)
        self.model = PPO("MlpPolicy", train_env, n_steps=opts["n_steps"], batch_size=opts["batch_size"],
                         learning_rate=opts["learning_rate"], seed=opts["seed"], verbose=0, device="cpu")
        self.model.learn(total_timesteps=opts["total_timesteps"])
        return {"ppo/timesteps": int(self.model.num_timesteps)}

    def act(self, obs, context=None) -> np.ndarray:
        if self.model is None:
            raise ValueError("the ppo agent is not fitted; call fit(env) or load a saved one")
        action, _ = self.model.predict(np.asarray(obs, dtype=np.float32), deterministic=True)
        return np.atleast_1d(np.asarray(action, dtype=np.int64))

    def save(self, path) -> Path:
        if self.model is None:
            raise ValueError("the ppo agent is not fitted; nothing to save")
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save(Path(tmp) / "ppo.zip")
            blob = (Path(tmp) / "ppo.zip").read_bytes()
        return atomic_torch_save({"agent": self.name, "state": {"options": self.options, "sb3_zip": blob}}, path)

    def load_state_dict(self, state: dict) -> None:
        from stable_baselines3 import PPO

        self.options = dict(state["options"])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "ppo.zip").write_bytes(state["sb3_zip"])
            self.model = PPO.load(Path(tmp) / "ppo.zip", device="cpu")

    def state_dict(self) -> dict:
        raise ValueError("the ppo agent is saved through save(path) (SB3's own format inside); use save()")
