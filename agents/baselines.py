"""Baseline controllers behind the :class:`~agents.base.Agent` interface.

- ``random``: uniform over every head.
- ``static``: one configuration per budget, the best mean reward on a calibration split.
- ``greedy``: the most expensive configuration whose *estimated* latency fits the budget for
  this input (latency estimator only; blind to accuracy).
- ``bandit``: LinUCB over the first observation's features, one arm per configuration.
- ``oracle``: per sample, the best configuration found by trying every one (evaluation only).

"Every configuration" is :func:`search_space`: all trajectories of a small env, the constant
per-episode settings of a many-stage one (a KV env's 16 per-chunk decisions).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from backends.base import SPLITS
from agents.base import Agent, EnvLayout, EpisodeContext, FitContext, eval_sample_ids
from agents.config_checks import JITTER_BOUNDS, JITTER_HELP, SEED_BOUNDS, SEED_HELP, DeclaredOptions, option
from agents.registry import register_agent
from envs.budget import check_budget_ms


#: trajectories above which the baselines search a restricted set (see :func:`search_space`)
MAX_SEARCH_TRAJECTORIES = 4096


def search_space(layout: EnvLayout) -> np.ndarray:
    """The trajectories ``static``, ``greedy``, ``bandit`` and ``oracle`` choose among.

    Every trajectory when there are at most :data:`MAX_SEARCH_TRAJECTORIES` (``MultiKnob-v0``:
    all tier x top-k x depth). An env whose stages all offer the same options (one decision per
    chunk, e.g. ``StreamingKV-v0``: 16 chunks of 48 settings, 48^16 sequences) gets the *constant*
    sequences: one option held for the whole episode. Over that set the oracle is the best
    per-episode setting, not the best per-chunk schedule (an upper bound of the static policies,
    which a per-chunk controller may beat).
    """
    total = int(np.prod([float(n) for n in layout.nvec]))
    if total <= MAX_SEARCH_TRAJECTORIES:
        return layout.all_actions()
    stage_nvec = {tuple(layout.nvec[h] for h in heads) for heads in layout.stage_heads}
    if len(stage_nvec) != 1:
        raise ValueError(f"the env has {total} trajectories and stages with different options; accepted: at most "
                         f"{MAX_SEARCH_TRAJECTORIES} trajectories, or stages that all offer the same options")
    options = np.array(list(itertools.product(*[range(n) for n in next(iter(stage_nvec))])), dtype=np.int64)
    out = np.zeros((len(options), len(layout.nvec)), dtype=np.int64)
    for heads in layout.stage_heads:
        out[:, heads] = options
    return out


@dataclass
class RandomConfig(DeclaredOptions):
    """Options of ``random``."""

    seed: int = option(0, SEED_HELP, **SEED_BOUNDS)


@dataclass
class StaticConfig(DeclaredOptions):
    """Options of ``static`` (no seed: calibration tries every configuration)."""

    calibration_split: str = option("validation", "the split the configurations are scored on", choices=SPLITS)
    calibration_samples: int = option(24, "calibration samples", low=1)


@dataclass
class BanditConfig(RandomConfig):
    """Options of ``bandit`` (LinUCB)."""

    alpha: float = option(0.5, "exploration bonus", low=0)
    ridge: float = option(1.0, "ridge regulariser", low=0, low_open=True)
    rounds: int = option(256, "fit episodes", low=1)
    budget_jitter: float = option(0.2, JITTER_HELP, **JITTER_BOUNDS)


def _need_context(agent: Agent, context: EpisodeContext | None) -> EpisodeContext:
    if context is None:
        raise ValueError(f"the {agent.name} agent needs an EpisodeContext (sample, budget, split) to act; "
                         f"accepted: act(obs, context)")
    return context


@register_agent
class RandomAgent(Agent):
    """Uniformly random head indices (seeded)."""

    name = "random"
    seeded = True
    config_class = RandomConfig

    def __init__(self, nvec: Sequence[int], seed: int = 0):
        self.nvec, self.seed = [int(n) for n in nvec], int(seed)
        self.rng = np.random.default_rng(self.seed)

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "RandomAgent":
        return cls(EnvLayout(env).nvec, RandomConfig.from_dict(options).seed)

    def act(self, obs, context=None) -> np.ndarray:
        return np.array([self.rng.integers(n) for n in self.nvec], dtype=np.int64)

    def state_dict(self) -> dict:
        return {"nvec": self.nvec, "seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.nvec, self.seed = [int(n) for n in state["nvec"]], int(state["seed"])
        self.rng.bit_generator.state = state["rng"]


@register_agent
class StaticAgent(Agent):
    """One fixed configuration per budget: the best mean reward over a calibration split.

    ``fit`` tries every configuration on the first ``calibration_samples`` samples of
    ``calibration_split`` at each evaluation budget (runs are memoised by the env, so extra budgets
    cost no model runs). At a budget it was not fitted for, it uses the configuration of the
    nearest fitted budget (in ratio).
    """

    name = "static"
    config_class = StaticConfig
    needs_context = True
    fits_budgets = True

    def __init__(self, config: StaticConfig = StaticConfig()):
        self.calibration_split, self.calibration_samples = config.calibration_split, config.calibration_samples
        self.table: dict[float, list[int]] = {}
        self.calibration: dict[str, Any] = {}

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "StaticAgent":
        return cls(StaticConfig.from_dict(options))

    def fit(self, env: gym.Env, context: FitContext | None = None) -> dict:
        """Calibrate at ``context.budgets_ms`` (default: the env budget's evaluation budgets)."""
        context = context or FitContext()
        layout = EnvLayout(env)
        budgets = list(context.budgets_ms) or layout.env.budget.evaluation_budgets()
        ids = eval_sample_ids(env, self.calibration_split, self.calibration_samples)
        return self.calibrate(env, budgets, ids, self.calibration_split)

    def calibrate(self, env: gym.Env, budgets_ms: Sequence[float], sample_ids: Sequence[int],
                  split: str = "validation") -> dict:
        """The best mean-reward configuration of ``sample_ids`` at each budget (ms)."""
        if not budgets_ms or not sample_ids:
            raise ValueError("static calibration needs at least one budget and one calibration sample id")
        layout = EnvLayout(env)
        actions = search_space(layout)
        for budget in budgets_ms:
            budget_ms = check_budget_ms(budget)
            rewards = np.stack([layout.evaluate(sid, budget_ms, actions, split)[0] for sid in sample_ids])
            best = int(np.argmax(rewards.mean(axis=0)))  # ties: the first, i.e. the cheapest tier / top-k / depth
            self.table[budget_ms] = actions[best].tolist()
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
        return {"table": {float(b): list(a) for b, a in self.table.items()}, "calibration": self.calibration,
                "calibration_split": self.calibration_split, "calibration_samples": self.calibration_samples}

    def load_state_dict(self, state: dict) -> None:
        self.table = {float(b): [int(i) for i in a] for b, a in state["table"].items()}
        self.calibration = dict(state.get("calibration", {}))
        self.calibration_split = state.get("calibration_split", self.calibration_split)
        self.calibration_samples = state.get("calibration_samples", self.calibration_samples)


@register_agent
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
            layout = EnvLayout(env)
            actions = search_space(layout)
            estimated = layout.env.estimated_latency_ms(int(sample_id), actions, split)
            self._estimates[key] = (actions, np.asarray(estimated))
        return self._estimates[key]

    def act(self, obs, context=None) -> np.ndarray:
        ctx = _need_context(self, context)
        actions, est = self.estimates(ctx.env, ctx.sample_id, ctx.split)
        fits = np.flatnonzero(est <= ctx.budget_ms)
        best = fits[np.argmax(est[fits])] if len(fits) else int(np.argmin(est))
        return actions[best]


@register_agent
class BanditAgent(Agent):
    """LinUCB contextual bandit: one arm per configuration, context = the first observation + 1.

    ``fit`` plays ``rounds`` single-action episodes on the training split (budgets drawn from the
    env budget's :meth:`~envs.budget.Budget.training_range` with ``budget_jitter``) with the
    upper-confidence rule ``theta_a . x + alpha * sqrt(x' A_a^-1 x)``; ``act`` is greedy on
    ``theta_a . x``. In a two-stage env the arm is chosen from the stage-1
    observation and kept for stage 2.
    """

    name = "bandit"
    seeded = True
    config_class = BanditConfig

    def __init__(self, n_features: int, actions: np.ndarray, config: BanditConfig = BanditConfig()):
        self.actions = np.asarray(actions, dtype=np.int64)
        self.alpha, self.ridge, self.seed = float(config.alpha), float(config.ridge), int(config.seed)
        self.rounds, self.budget_jitter = config.rounds, float(config.budget_jitter)
        d, n_arms = n_features + 1, len(self.actions)
        self.A = np.repeat(np.eye(d)[None] * self.ridge, n_arms, axis=0)
        self.b = np.zeros((n_arms, d))
        self.rng = np.random.default_rng(self.seed)
        self._last_choice: np.ndarray | None = None

    @classmethod
    def from_env(cls, env: gym.Env, **options: Any) -> "BanditAgent":
        layout = EnvLayout(env)
        return cls(layout.obs_dim, search_space(layout), BanditConfig.from_dict(options))

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

    def fit(self, env: gym.Env, context: FitContext | None = None) -> dict:
        """``rounds`` LinUCB rounds on ``context.split``."""
        context = context or FitContext()
        layout = EnvLayout(env)
        budgets = layout.env.budget.training_range(self.budget_jitter)
        split = context.split
        n_samples = layout.num_samples(split)
        rewards = []
        for _ in range(self.rounds):
            sample_id = int(self.rng.integers(n_samples))
            budget_ms = budgets.sample(self.rng)
            x = self._features(layout.observation(sample_id, budget_ms, split, 0))
            scores = self._scores(x, explore=True)
            arm = int(self.rng.choice(np.flatnonzero(scores == scores.max())))
            reward = float(layout.evaluate(sample_id, budget_ms, self.actions[arm:arm + 1], split)[0][0])
            self.A[arm] += np.outer(x, x)
            self.b[arm] += reward * x
            rewards.append(reward)
        return {"bandit/rounds": self.rounds, "bandit/mean_reward": float(np.mean(rewards)) if rewards else 0.0}

    def act(self, obs, context=None) -> np.ndarray:
        if context is not None and context.stage > 0 and self._last_choice is not None:
            return self._last_choice
        self._last_choice = self.actions[int(np.argmax(self._scores(self._features(obs), explore=False)))]
        return self._last_choice

    def state_dict(self) -> dict:
        return {"actions": self.actions, "alpha": self.alpha, "ridge": self.ridge, "seed": self.seed,
                "rounds": self.rounds, "budget_jitter": self.budget_jitter,
                "A": self.A, "b": self.b, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["A"].shape != self.A.shape:
            raise ValueError(f"saved bandit has {state['A'].shape[0]} arms of {state['A'].shape[1]} features; "
                             f"this env needs {self.A.shape[0]} arms of {self.A.shape[1]}")
        self.actions = np.asarray(state["actions"], dtype=np.int64)
        self.alpha, self.ridge, self.seed = float(state["alpha"]), float(state["ridge"]), int(state["seed"])
        self.rounds = int(state.get("rounds", self.rounds))
        self.budget_jitter = float(state.get("budget_jitter", self.budget_jitter))
        self.A, self.b = np.asarray(state["A"]), np.asarray(state["b"])
        self.rng.bit_generator.state = state["rng"]


@register_agent
class OracleAgent(Agent):
    """Per sample and budget, the action with the highest reward among all of them (an upper bound).

    Evaluation only: it reads the outcome of every configuration on the very sample it is scored on.
    In a many-stage env it searches the constant sequences only (:func:`search_space`).
    """

    name = "oracle"
    needs_context = True
    evaluation_only = True

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
            actions = search_space(layout)
            rewards, _ = layout.evaluate(ctx.sample_id, ctx.budget_ms, actions, ctx.split)
            self._best[key] = actions[int(np.argmax(rewards))]
        return self._best[key]
