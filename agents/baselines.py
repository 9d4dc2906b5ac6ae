"""Baseline controllers behind the :class:`~agents.base.Agent` interface.

- ``random``: uniform over every head.
- ``static``: one configuration per budget, the best mean reward on a calibration split.
- ``greedy``: the most expensive configuration whose *estimated* latency fits the budget for
  this input (latency estimator only; blind to accuracy).
- ``bandit``: LinUCB over the first observation's features, one arm per configuration.
- ``oracle``: per sample, the best configuration found by trying every one (evaluation only).
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from agents.base import Agent, EnvLayout, EpisodeContext
from envs.budget import Budget


def _need_context(agent: Agent, context: EpisodeContext | None) -> EpisodeContext:
    if context is None:
        raise ValueError(f"the {agent.name} agent needs an EpisodeContext (sample, budget, split) to act; "
                         f"accepted: act(obs, context)")
    return context


class RandomAgent(Agent):
    """Uniformly random head indices (seeded)."""

    name = "random"

    def __init__(self, nvec: Sequence[int], seed: int = 0):
        self.nvec, self.seed = [int(n) for n in nvec], int(seed)
        self.rng = np.random.default_rng(self.seed)

    @classmethod
    def from_env(cls, env: gym.Env, seed: int = 0, **options: Any) -> "RandomAgent":
        if options:
            raise ValueError(f"unknown random-agent option(s) {sorted(options)}; accepted: seed")
        return cls(EnvLayout(env).nvec, seed)

    def act(self, obs, context=None) -> np.ndarray:
        return np.array([self.rng.integers(n) for n in self.nvec], dtype=np.int64)

    def state_dict(self) -> dict:
        return {"nvec": self.nvec, "seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.nvec, self.seed = list(state["nvec"]), int(state["seed"])
        self.rng.bit_generator.state = state["rng"]


class StaticAgent(Agent):
    """One fixed configuration per budget: the best mean reward over a calibration split.

    ``fit`` tries every configuration on every calibration sample at each budget (runs are
    memoised by the env, so extra budgets cost no model runs). At a budget it was not fitted for,
    it uses the configuration of the nearest fitted budget (in ratio).
    """

    name = "static"
    needs_context = True

    def __init__(self):
        self.table: dict[float, list[int]] = {}
        self.calibration: dict[str, Any] = {}

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "StaticAgent":
        if options:
            raise ValueError(f"unknown static-agent option(s) {sorted(options)}; accepted: none")
        return cls()

    def fit(self, env: gym.Env, budgets: Sequence[Any] = (), sample_ids: Sequence[int] = (),
            split: str = "validation", **kwargs: Any) -> dict:
        if kwargs:
            raise ValueError(f"unknown static fit option(s) {sorted(kwargs)}; accepted: budgets, sample_ids, split")
        if not budgets or not sample_ids:
            raise ValueError("static.fit needs at least one budget and one calibration sample id")
        layout = EnvLayout(env)
        actions = layout.all_actions()
        for budget in budgets:
            budget_ms = Budget.parse(budget)
            if budget_ms.is_range:
                raise ValueError(f"budget={budget!r} is invalid for static.fit; accepted: fixed budgets")
            rewards = np.stack([layout.evaluate(sid, budget_ms.low_ms, actions, split)[0] for sid in sample_ids])
            best = int(np.argmax(rewards.mean(axis=0)))  # ties: the first, i.e. the cheapest tier / top-k / depth
            self.table[budget_ms.low_ms] = actions[best].tolist()
        self.calibration = {"split": split, "samples": len(sample_ids)}
        return {f"static/{b:g}ms": a for b, a in self.table.items()}

    def action_for(self, budget_ms: float) -> np.ndarray:
        if not self.table:
            raise ValueError("the static agent is not fitted; call fit(env, budgets, sample_ids) first")
        nearest = min(self.table, key=lambda b: abs(np.log(b / budget_ms)))
        return np.asarray(self.table[nearest], dtype=np.int64)

    def act(self, obs, context=None) -> np.ndarray:
        return self.action_for(_need_context(self, context).budget_ms)

    def state_dict(self) -> dict:
        return {"table": {float(b): list(a) for b, a in self.table.items()}, "calibration": self.calibration}

    def load_state_dict(self, state: dict) -> None:
        self.table = {float(b): list(a) for b, a in state["table"].items()}
        self.calibration = dict(state.get("calibration", {}))


class GreedyAgent(Agent):
    """The most expensive configuration whose estimated latency fits the budget for this input.

    "Expensive" is the estimator's own prediction (from the input's expected token counts), so the
    agent spends the whole budget and never looks at accuracy; when nothing fits it takes the
    cheapest configuration.
    """

    name = "greedy"
    needs_context = True

    def __init__(self):
        self._estimates: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "GreedyAgent":
        if options:
            raise ValueError(f"unknown greedy-agent option(s) {sorted(options)}; accepted: none")
        return cls()

    def estimates(self, env, sample_id: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All actions of the env and their estimated latency on this input (cached per sample)."""
        key = (id(env), split, int(sample_id))
        if key not in self._estimates:
            base = env.unwrapped
            layout = EnvLayout(env)
            actions = layout.all_actions()
            sample = base.backend.sample(split, sample_id)
            knobs = [base.space.resolve(base.action_to_knobs(layout.to_env_action(a))) for a in actions]
            counts = [base.backend.expected_token_counts(sample, k) for k in knobs]
            self._estimates[key] = (actions, base.latency.predict_ms(knobs, counts))
        return self._estimates[key]

    def act(self, obs, context=None) -> np.ndarray:
        ctx = _need_context(self, context)
        actions, est = self.estimates(ctx.env, ctx.sample_id, ctx.split)
        fits = np.flatnonzero(est <= ctx.budget_ms)
        best = fits[np.argmax(est[fits])] if len(fits) else int(np.argmin(est))
        return actions[best]


class BanditAgent(Agent):
    """LinUCB contextual bandit: one arm per configuration, context = the first observation + 1.

    ``fit`` plays ``rounds`` single-action episodes on the training split (budgets drawn like
    GRPO's) with the upper-confidence rule ``theta_a . x + alpha * sqrt(x' A_a^-1 x)``; ``act``
    is greedy on ``theta_a . x``. In a two-stage env the arm is chosen from the stage-1
    observation and kept for stage 2.
    """

    name = "bandit"

    def __init__(self, n_features: int, actions: np.ndarray, alpha: float = 0.5, ridge: float = 1.0, seed: int = 0):
        if not (alpha >= 0 and ridge > 0):
            raise ValueError(f"alpha={alpha!r}, ridge={ridge!r} are invalid; accepted: alpha >= 0, ridge > 0")
        self.actions = np.asarray(actions, dtype=np.int64)
        self.alpha, self.ridge, self.seed = float(alpha), float(ridge), int(seed)
        d, n_arms = n_features + 1, len(self.actions)
        self.A = np.repeat(np.eye(d)[None] * self.ridge, n_arms, axis=0)
        self.b = np.zeros((n_arms, d))
        self.rng = np.random.default_rng(self.seed)
        self._last_choice: np.ndarray | None = None

    @classmethod
    def from_env(cls, env: gym.Env, alpha: float = 0.5, ridge: float = 1.0, seed: int = 0,
                 **options: Any) -> "BanditAgent":
        if options:
            raise ValueError(f"unknown bandit option(s) {sorted(options)}; accepted: alpha, ridge, seed")
        layout = EnvLayout(env)
        return cls(layout.obs_dim, layout.all_actions(), alpha, ridge, seed)

    @staticmethod
    def _features(obs: np.ndarray) -> np.ndarray:
        return np.append(np.asarray(obs, dtype=np.float64).reshape(-1), 1.0)

    def _scores(self, x: np.ndarray, explore: bool) -> np.ndarray:
        A_inv = np.linalg.inv(self.A)
        theta = np.einsum("aij,aj->ai", A_inv, self.b)
        mean = theta @ x
        if not explore:
            return mean
        return mean + self.alpha * np.sqrt(np.einsum("i,aij,j->a", x, A_inv, x))

    def fit(self, env: gym.Env, rounds: int = 256, budget: Any = None, split: str = "train",
            budget_jitter: float = 0.2, **kwargs: Any) -> dict:
        if kwargs:
            raise ValueError(f"unknown bandit fit option(s) {sorted(kwargs)}; accepted: rounds, budget, split, "
                             f"budget_jitter")
        layout = EnvLayout(env)
        budget = Budget.parse(budget if budget is not None else layout.base.budget)
        low, high = budget.low_ms, budget.high_ms
        if not budget.is_range:
            low, high = low * (1 - budget_jitter), high * (1 + budget_jitter)
        n_samples = len(layout.base.backend.samples(split))
        rewards = []
        for _ in range(int(rounds)):
            sample_id = int(self.rng.integers(n_samples))
            budget_ms = float(self.rng.uniform(low, high)) if high > low else low
            x = self._features(layout.observation(sample_id, budget_ms, split, 0))
            scores = self._scores(x, explore=True)
            arm = int(self.rng.choice(np.flatnonzero(scores == scores.max())))
            reward = float(layout.evaluate(sample_id, budget_ms, self.actions[arm:arm + 1], split)[0][0])
            self.A[arm] += np.outer(x, x)
            self.b[arm] += reward * x
            rewards.append(reward)
        return {"bandit/rounds": int(rounds), "bandit/mean_reward": float(np.mean(rewards)) if rewards else 0.0}

    def act(self, obs, context=None) -> np.ndarray:
        if context is not None and context.stage > 0 and self._last_choice is not None:
            return self._last_choice
        self._last_choice = self.actions[int(np.argmax(self._scores(self._features(obs), explore=False)))]
        return self._last_choice

    def state_dict(self) -> dict:
        return {"actions": self.actions, "alpha": self.alpha, "ridge": self.ridge, "seed": self.seed,
                "A": self.A, "b": self.b, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["A"].shape != self.A.shape:
            raise ValueError(f"saved bandit has {state['A'].shape[0]} arms of {state['A'].shape[1]} features; "
                             f"this env needs {self.A.shape[0]} arms of {self.A.shape[1]}")
        self.actions = np.asarray(state["actions"], dtype=np.int64)
        self.alpha, self.ridge, self.seed = float(state["alpha"]), float(state["ridge"]), int(state["seed"])
        self.A, self.b = np.asarray(state["A"]), np.asarray(state["b"])
        self.rng.bit_generator.state = state["rng"]


class OracleAgent(Agent):
    """Per sample and budget, the action with the highest reward among all of them (an upper bound).

    Evaluation only: it reads the outcome of every configuration on the very sample it is scored on.
    """

    name = "oracle"
    needs_context = True

    def __init__(self):
        self._best: dict[tuple, np.ndarray] = {}

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "OracleAgent":
        if options:
            raise ValueError(f"unknown oracle option(s) {sorted(options)}; accepted: none")
        return cls()

    def act(self, obs, context=None) -> np.ndarray:
        ctx = _need_context(self, context)
        key = (id(ctx.env), ctx.split, ctx.sample_id, ctx.budget_ms)
        if key not in self._best:
            layout = EnvLayout(ctx.env)
            actions = layout.all_actions()
            rewards, _ = layout.evaluate(ctx.sample_id, ctx.budget_ms, actions, ctx.split)
            self._best[key] = actions[int(np.argmax(rewards))]
        return self._best[key]
