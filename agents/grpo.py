"""GRPO for knob envs: a budget-conditioned categorical policy trained from group-relative rewards.

One update (``GRPOAgent.train_step``):

1. draw ``batch_size`` training samples and one budget each from the env budget's
   :meth:`~envs.budget.Budget.training_range` (the fixed budget or the range, widened by
   ``budget_jitter`` on each side);
2. for each (sample, budget) sample a group of ``num_generations`` trajectories from the current
   policy at ``temperature``, stage by stage: each stage is one categorical over the joint options
   of the knobs it sets (``MultiKnob-v0``: the tier, then top-k x depth), read at the observation
   *of the earlier choices this trajectory made* and at each option's estimated latency on this
   input relative to the budget (see :class:`PolicyNet`); the whole group shares sample and budget;
3. score the group with the env's ``evaluate_group`` (one shared stage 1 per tier, same reward as
   separate episodes);
4. advantages are group-relative: ``(r - mean_group) / (std_group + 1e-4)``, ``scale_rewards``
   choosing the std (``group``, ``batch`` or ``none``);
5. ``num_iterations`` gradient steps on the clipped objective
   ``-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * KL(pi || pi_ref) - entropy_coef * H``
   where ``ratio`` is the probability ratio of the whole trajectory (the sum of the
   log-probabilities of the option each stage chose).

Multi-stage envs (a KV env: one decision per chunk, 16 chunks): a group is whole episodes on one
(sample, budget), sampled stage by stage, each stage at the observation its own earlier chunks
produced, and scored by their returns. Why whole episodes rather than per-chunk groups: the
reward of a chunk depends on the cache the earlier chunks left (a window chosen early bounds
every later chunk's TPOT and NLL), so a per-chunk group would credit a chunk choice with effects
it does not own; whole-episode groups compare complete schedules, and the env shares the
stream's prefix state between the trajectories of a group (they diverge one chunk at a time,
so a group of G costs far fewer than G full episodes of model time).

Names and defaults follow TRL's ``GRPOConfig`` (trl 1.16) where the meaning is the same; see
:class:`GRPOConfig` for the deviations and why. :meth:`GRPOAgent.fit` is the whole training loop;
validation, checkpoints and logging are the caller's :class:`~agents.base.FitHooks`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backends.checks import is_int
from agents.base import TrajectoryPolicyAgent, EnvLayout, EpisodeContext, FitContext
from agents.checkpoint import check_finite
from agents.config_checks import (JITTER_BOUNDS, JITTER_HELP, SEED_BOUNDS, SEED_HELP, check_epsilon_high, check_flags,
                                  check_options, config_from_dict, described, normalize_scale_rewards, option)
from agents.registry import register_agent
from agents.rollout import (GroupCollector, GroupRequest, GroupResult, LocalGroupCollector, group_collector,
                            group_seed)
from envs.budget import Budget

SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    """GRPO hyperparameters.

    Same name, meaning and default as TRL's ``GRPOConfig``: ``num_generations`` (8), ``epsilon``
    (0.2), ``epsilon_high`` (None = ``epsilon``), ``beta`` (0.0: no KL term; KL to the reference
    is still measured and logged), ``scale_rewards`` ("group"; True/False accepted as in TRL),
    ``temperature`` (1.0), ``max_grad_norm`` (1.0), ``sync_ref_model``
    (False: the reference is the initial policy), ``ref_model_sync_steps`` (512) and
    ``ref_model_mixup_alpha`` (0.6) (TR-DPO refresh ``ref = alpha * policy + (1 - alpha) * ref``
    every ``ref_model_sync_steps`` updates; alpha = 1 is a plain copy).

    Same name, different default (why):

    - ``learning_rate`` 1e-3 (TRL 1e-6 fine-tunes a pretrained LLM; this is a freshly initialised
      MLP of a few thousand weights; on the tiny model over its suggested range 3e-3 drifted to a
      cheaper configuration than the budget allowed within 100 updates, BENCHMARKS.md, "Budget
      conditioning");
    - ``entropy_coef`` 0.03 (TRL 0.0): a stage's categorical is near-deterministic after a few
      dozen updates, and without a bonus it settles on whatever looked safest first; a policy
      trained over a budget range must keep exploring the options that only pay at the loose end
      of the range (BENCHMARKS.md, "Agents", has the measured runs);
    - ``num_iterations`` 4 (TRL 1 reuses nothing; here every group costs model runs while a
      gradient step costs microseconds, so each batch is reused for several clipped steps, which
      is what ``epsilon`` is for).

    Ours: ``batch_size`` (samples per update, each with its own group; 32: a real model's scores
    are 0/1 per input and differ by a few points between configurations, so 8 groups per update
    were mostly noise on the tiny model), ``total_updates``,
    ``hidden_sizes`` (policy MLP), ``budget_jitter`` (relative half-width of the budget range
    drawn around a fixed budget, so the budget feature varies during training),
    ``latency_features`` (each option's logit also reads the estimator's latency of that option on
    this input relative to the budget, see :class:`PolicyNet`; False: the observation only),
    ``feasibility_prior`` (initial logit penalty per unit of ``log(latency / budget)`` by which an
    option's cheapest completion is predicted to overshoot: 50 makes an option predicted 5% over
    budget about e^2.4 = 11x less likely than one that fits; learned from there; 0 = none; only
    with ``latency_features``),
    ``seed``.

    Not applicable: ``loss_type`` (a trajectory here is a few categorical choices with one ratio,
    so there is no length normalisation to choose) and TRL's sampled k3 KL estimate (the exact
    categorical KL is cheap for these stages, and has no variance).
    """

    num_generations: int = option(8, "actions sampled per group; a group needs two to compare", low=2)
    epsilon: float = option(0.2, "lower clip of the probability ratio", low=0, low_open=True)
    epsilon_high: float | None = described("upper clip of the ratio; None: epsilon", None)
    beta: float = option(0.0, "weight of the KL term to the reference policy", low=0)
    scale_rewards: Any = described("advantage scaling: group (or true), batch, none (or false)", "group")
    learning_rate: float = option(1e-3, "AdamW step size", low=0, low_open=True)
    num_iterations: int = option(4, "clipped steps per collected batch", low=1)
    temperature: float = option(1.0, "sampling temperature", low=0, low_open=True)
    entropy_coef: float = option(0.03, "entropy bonus", low=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", low=0)
    sync_ref_model: bool = described("refresh the reference policy (TR-DPO)", False)
    ref_model_sync_steps: int = option(512, "updates between reference refreshes", low=1)
    ref_model_mixup_alpha: float = option(0.6, "reference refresh weight of the policy", low=0, low_open=True,
                                          high=1)
    batch_size: int = option(32, "samples per update, each with its own group", low=1)
    total_updates: int = option(100, "updates of the whole run", low=0)
    hidden_sizes: Sequence[int] = described("policy MLP widths", default_factory=lambda: (64, 64))
    budget_jitter: float = option(0.2, JITTER_HELP, **JITTER_BOUNDS)
    latency_features: bool = described("options also read their estimated latency relative to the budget", True)
    feasibility_prior: float = option(50.0, "initial logit penalty per log-overshoot of an option", low=0)
    seed: int = option(0, SEED_HELP, **SEED_BOUNDS)

    def __post_init__(self) -> None:
        check_options(self)
        widths = list(self.hidden_sizes) if isinstance(self.hidden_sizes, Sequence) and not isinstance(
            self.hidden_sizes, str) else [self.hidden_sizes]
        if not widths or any(not is_int(h) or h < 1 for h in widths):
            raise ValueError(f"hidden_sizes={list(widths)!r} is invalid; accepted: a list of whole positive layer "
                             f"widths such as [64, 64] (a fractional width is not truncated)")
        self.hidden_sizes = tuple(widths)
        self.scale_rewards = normalize_scale_rewards(self.scale_rewards)
        check_flags(self, ("latency_features",))
        check_epsilon_high(self.epsilon_high)

    @classmethod
    def from_dict(cls, values: dict) -> "GRPOConfig":
        """Build from a config mapping; unknown keys are an error naming the accepted ones."""
        return config_from_dict(cls, values, "GRPO")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["hidden_sizes"] = list(self.hidden_sizes)
        return out


def group_advantages(rewards: np.ndarray, scale_rewards: Any = "group", eps: float = 1e-4) -> np.ndarray:
    """Group-relative advantages of a ``[groups, num_generations]`` reward array.

    ``(r - mean_group) / (std + eps)`` with the std of the group (``group``), of the whole batch
    (``batch``) or 1 (``none``); std is Bessel-corrected as in TRL. A group whose rewards are all
    equal carries no signal and gets exactly zero advantage (never NaN).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards of shape {rewards.shape} are invalid; accepted: [groups, generations>=2]")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards contain NaN or inf; accepted: finite rewards")
    mode = normalize_scale_rewards(scale_rewards)
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    # Float rounding of the mean can leave ~1e-17 residues in an all-equal group; zero them so
    # the std division cannot blow them up into a spurious signal.
    centered[np.ptp(rewards, axis=1) == 0] = 0.0
    if mode == "group":
        std = rewards.std(axis=1, ddof=1, keepdims=True)
    elif mode == "batch":
        std = np.full_like(rewards[:, :1], rewards.std(ddof=1) if rewards.size > 1 else 0.0)
    else:
        return centered
    return centered / (std + eps)


class PolicyNet(nn.Module):
    """The policy: one categorical per stage over the joint options of the heads that stage sets.

    ``logits[stage][o] = head_stage(trunk(obs))[o] + latency_scorer_stage(features[o])`` where
    ``features[o]`` is ``[log(lo_o / budget), log(hi_o / budget)]``: the estimator's latency of
    option ``o`` on this input with the later stages at their cheapest (``lo``) and at their most
    expensive completion (``hi``). The scorer is one small MLP shared by every option of a stage,
    so what it learns about "this option fits the budget" carries over to every option and budget.
    A third, learnable term ``w_stage * max(0, log(lo_o / budget))`` (``w`` initialised at
    ``-feasibility_prior``) starts the policy away from options the estimator predicts to overshoot
    the budget even with the cheapest completion.

    Why the prior: a stage's option is scored through the later stages' choices. At the start
    those are uniform, and most completions of an expensive early choice (a high vision tier)
    overshoot, so the early choice looks bad whatever the budget and the policy collapses onto
    the cheapest configuration before the later stage has learned to fit the budget (measured on
    the tiny model over its suggested range: the same configuration at every budget, BENCHMARKS.md,
    "Budget conditioning"). With the prior every stage starts by choosing among options that fit,
    so each option is judged by what it is worth within the budget; the weight is learned, so a
    reward that does pay for an overshoot can undo it.

    Why joint options and latency features: whether a knob setting fits a budget depends on the
    other knobs the same stage sets (top-k and depth together), and on the input; with one
    categorical per knob and only a budget scalar in the observation, a policy trained over a
    budget range settled on one configuration for every budget (BENCHMARKS.md, "Budget
    conditioning").
    """

    def __init__(self, obs_dim: int, stage_sizes: Sequence[int], hidden_sizes: Sequence[int] = (64, 64),
                 feasibility_prior: float = 0.0):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in stage_sizes)
        for head in self.heads:  # near-uniform initial policy: every option gets explored
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.latency_scorers = nn.ModuleList(
            nn.Sequential(nn.Linear(LATENCY_FEATURES, 16), nn.Tanh(), nn.Linear(16, 1)) for _ in stage_sizes)
        # One learnable weight per stage on the option's predicted overshoot, initialised at
        # -feasibility_prior (see the class docstring).
        self.overshoot_weights = nn.Parameter(torch.full((len(stage_sizes),), -float(feasibility_prior)))

    def forward(self, obs: torch.Tensor, features: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits ``[..., n_options]`` of ``stage`` from ``obs [..., obs_dim]`` and ``features [..., n_options, 2]``."""
        overshoot = torch.relu(features[..., 0])  # log(cheapest completion / budget) where it is over budget
        return (self.heads[stage](self.trunk(obs)) + self.latency_scorers[stage](features).squeeze(-1)
                + self.overshoot_weights[stage] * overshoot)


#: per option: log(latency with the cheapest completion / budget), log(latency with the dearest / budget)
LATENCY_FEATURES = 2
#: options x completions above which a stage's completions are only the all-cheapest / all-dearest ones
MAX_COMPLETION_QUERIES = 4096


@dataclass
class Rollout:
    """One update's groups; rows ``g * G .. (g + 1) * G`` are group ``g``.

    ``obs`` is ``[N, stages, obs_dim]``, ``features`` ``[N, stages, max_options, 2]`` (zeros for
    stages a trajectory never saw and options a stage does not have), ``options`` ``[N, stages]``
    the option each stage chose, ``actions`` ``[N, heads]`` the trajectories.
    """

    obs: torch.Tensor
    features: torch.Tensor
    options: torch.Tensor
    actions: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    rewards: np.ndarray
    infos: list
    num_generations: int


@register_agent
class GRPOAgent(TrajectoryPolicyAgent):
    """The GRPO controller: sampling groups, the clipped update, acting greedily at evaluation.

    Acting reads the env's latency predictions for each option (``needs_context``): run it through
    :func:`agents.base.run_episode` / :func:`agents.base.evaluate_agent` or the CLI.
    """

    name = "grpo"
    config_class = GRPOConfig

    def __init__(self, obs_dim: int, nvec: Sequence[int], stage_heads: Sequence[Sequence[int]],
                 config: GRPOConfig | None = None):
        self._set_shapes(obs_dim, nvec, stage_heads, config)
        # stage -> its joint options, rows of head values in the order of ``stage_heads[stage]``
        self.stage_options = [np.array(list(itertools.product(*[range(self.nvec[h]) for h in heads])),
                                       dtype=np.int64).reshape(-1, len(heads)) for heads in self.stage_heads]
        self.max_options = max(len(o) for o in self.stage_options)
        torch.manual_seed(self.config.seed)
        self.policy = PolicyNet(self.obs_dim, [len(o) for o in self.stage_options], self.config.hidden_sizes,
                                self.config.feasibility_prior if self.config.latency_features else 0.0)
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.config.learning_rate)
        self.rng = np.random.default_rng(self.config.seed)
        self.step = 0

    # ------------------------------------------------------------------------------- options
    def option_index(self, stage: int, trajectories: np.ndarray) -> np.ndarray:
        """The option index each trajectory row chose at ``stage``."""
        heads = self.stage_heads[stage]
        return np.ravel_multi_index(np.asarray(trajectories)[:, heads].T, [self.nvec[h] for h in heads])

    def latency_features(self, layout: EnvLayout, sample_id: int, budget_ms: float, split: str, stage: int,
                         trajectory: Sequence[int] | None) -> np.ndarray:
        """``[max_options, 2]``: each option's latency on this input with the cheapest and the dearest
        completion of the later stages, as ``log(ms / budget)`` (clipped to +-5; padding rows zero)."""
        out = np.zeros((self.max_options, LATENCY_FEATURES), dtype=np.float32)
        if not self.config.latency_features:
            return out
        options = self.stage_options[stage]
        later = [h for s in range(stage + 1, len(self.stage_heads)) for h in self.stage_heads[s]]
        # Count before enumerating: a many-stage env (16 chunks of a KV episode) has astronomically many.
        if len(options) * math.prod(self.nvec[h] for h in later) > MAX_COMPLETION_QUERIES:
            completions = np.array([[0] * len(later), [self.nvec[h] - 1 for h in later]], dtype=np.int64)
        else:
            completions = np.array(list(itertools.product(*[range(self.nvec[h]) for h in later])), dtype=np.int64)
        completions = completions.reshape(len(completions), len(later))
        rows = np.zeros((len(options), len(completions), len(self.nvec)), dtype=np.int64)
        if trajectory is not None and stage > 0:
            earlier = [h for s in range(stage) for h in self.stage_heads[s]]
            rows[:, :, earlier] = np.asarray(trajectory, dtype=np.int64)[earlier]
        rows[:, :, self.stage_heads[stage]] = options[:, None, :]
        rows[:, :, later] = completions[None, :, :]
        ms = layout.estimated_latency_ms(sample_id, rows.reshape(-1, len(self.nvec)), split)
        ms = np.asarray(ms, dtype=np.float64).reshape(len(options), len(completions))
        ratios = np.stack([ms.min(axis=1), ms.max(axis=1)], axis=1) / float(budget_ms)
        out[: len(options)] = np.clip(np.log(np.maximum(ratios, 1e-6)), -5.0, 5.0)
        return out

    # ------------------------------------------------------------------------------- acting
    def _stage_log_probs(self, net: nn.Module, obs: torch.Tensor, features: torch.Tensor, stage: int) -> torch.Tensor:
        """Temperature-scaled log-probabilities of ``stage``'s options: ``[..., n_options]``."""
        n = len(self.stage_options[stage])
        return F.log_softmax(net(obs, features[..., :n, :], stage) / self.config.temperature, dim=-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, context: EpisodeContext | None = None) -> np.ndarray:
        """The most probable option of this stage, as a whole trajectory vector (earlier stages'
        elements from ``context.trajectory``); the env reads the elements of its stage."""
        if context is None:
            raise ValueError("GRPOAgent.act needs an EpisodeContext (its options read the env's latency "
                             "predictions); accepted: run it through agents.run_episode / evaluate_agent")
        stage = int(context.stage)
        trajectory = np.zeros(len(self.nvec), dtype=np.int64)
        if context.trajectory is not None:
            trajectory[:] = np.asarray(context.trajectory, dtype=np.int64)
        layout = EnvLayout(context.env)
        features = self.latency_features(layout, context.sample_id, context.budget_ms, context.split, stage,
                                         trajectory)
        logp = self._stage_log_probs(self.policy, torch.as_tensor(np.asarray(obs, dtype=np.float32)),
                                     torch.as_tensor(features), stage)
        trajectory[self.stage_heads[stage]] = self.stage_options[stage][int(torch.argmax(logp))]
        return trajectory

    def configure(self, **options: Any) -> None:
        """New options for a resumed run (e.g. a larger ``total_updates``); shapes stay the checkpoint's."""
        self.config = GRPOConfig.from_dict(options)

    # ------------------------------------------------------------------------------- the loop
    def fit(self, env: gym.Env, context: FitContext | None = None) -> dict:
        """Train until ``config.total_updates`` updates (continuing from ``self.step``).

        Groups are collected where ``context.executor`` says (:mod:`agents.rollout`: in this
        process by default, on Ray actors with ``rollout=ray``); the result is the same either way.
        """
        context = context or FitContext()
        layout = EnvLayout(env)
        budgets = layout.env.budget.training_range(self.config.budget_jitter)
        total = self.config.total_updates
        collector = group_collector(env, self, context.executor)
        context.hooks.on_fit_start(self, self.step, total)
        try:
            while self.step < total:
                rollout, stats = self.train_step(layout, budgets, context.split, context.sample_pool, collector)
                context.hooks.on_update(self, self.step, rollout.infos, stats)
        finally:
            collector.close()
        context.hooks.on_fit_end(self, self.step)
        return {"updates": self.step}

    # ------------------------------------------------------------------------------- rollouts
    def collect(self, layout: EnvLayout, sample_ids: Sequence[int], budgets_ms: Sequence[float],
                split: str = "train", collector: GroupCollector | None = None) -> Rollout:
        """Sample and score one group per (sample, budget); advantages are group-relative.

        Group ``g`` of update ``self.step`` samples with its own generator seeded
        :func:`~agents.rollout.group_seed` ``(seed, step, g)`` (:meth:`sample_group`), so the
        groups are the same whichever ``collector`` ran them (default: this process, in order).
        """
        collector = collector or LocalGroupCollector(layout, self)
        requests = [GroupRequest(int(sample_id), float(budget_ms), split, group_seed(self.config.seed, self.step, g))
                    for g, (sample_id, budget_ms) in enumerate(zip(sample_ids, budgets_ms))]
        groups = collector.collect(requests)
        rewards = np.stack([g.rewards for g in groups])
        obs_t = torch.as_tensor(np.concatenate([g.obs for g in groups]))
        features_t = torch.as_tensor(np.concatenate([g.features for g in groups]))
        options_t = torch.as_tensor(np.concatenate([g.options for g in groups]))
        actions_t = torch.as_tensor(np.concatenate([g.actions for g in groups]))
        with torch.no_grad():
            old_logp = self.trajectory_log_prob(self.policy, obs_t, features_t, options_t)
        advantages = torch.as_tensor(group_advantages(rewards, self.config.scale_rewards).reshape(-1),
                                     dtype=torch.float32)
        return Rollout(obs_t, features_t, options_t, actions_t, old_logp, advantages, rewards,
                       [info for g in groups for info in g.infos], self.config.num_generations)

    def sample_group(self, layout: EnvLayout, request: GroupRequest) -> GroupResult:
        """Sample ``num_generations`` trajectories on one (sample, budget) and score them.

        A trajectory is sampled stage by stage: each stage's options are drawn at the observation
        (and latency features) of the earlier choices this trajectory made; trajectories of a group
        that share those choices share the query. The draws come from a generator seeded with
        ``request.seed`` only: the group depends on the env, the policy weights and the request.
        """
        G, S = self.config.num_generations, len(self.stage_heads)
        sample_id, budget_ms, split = request.sample_id, request.budget_ms, request.split
        generator = torch.Generator().manual_seed(request.seed)
        obs = np.zeros((G, S, self.obs_dim), dtype=np.float32)
        features = np.zeros((G, S, self.max_options, LATENCY_FEATURES), dtype=np.float32)
        options = np.zeros((G, S), dtype=np.int64)
        actions = np.zeros((G, len(self.nvec)), dtype=np.int64)
        for stage in range(S):
            earlier = actions[:, [h for s in range(stage) for h in self.stage_heads[s]]]
            for prefix in np.unique(earlier, axis=0):
                rows = np.flatnonzero((earlier == prefix).all(axis=1))
                trajectory = actions[rows[0]] if stage else None
                stage_obs = layout.observation(sample_id, budget_ms, split, stage, trajectory)
                stage_features = self.latency_features(layout, sample_id, budget_ms, split, stage, trajectory)
                obs[rows, stage], features[rows, stage] = stage_obs, stage_features
                with torch.no_grad():
                    logp = self._stage_log_probs(self.policy, torch.as_tensor(stage_obs),
                                                 torch.as_tensor(stage_features), stage)
                chosen = torch.multinomial(logp.exp(), len(rows), replacement=True, generator=generator).numpy()
                options[rows, stage] = chosen
                actions[np.ix_(rows, self.stage_heads[stage])] = self.stage_options[stage][chosen]
        rewards, infos = layout.evaluate(sample_id, budget_ms, actions, split)
        for info, r in zip(infos, rewards):
            info["reward"] = float(r)
        return GroupResult(obs, features, options, actions, np.asarray(rewards, dtype=np.float64), infos)

    # GroupSampler members (agents.rollout): what a Ray actor needs to sample as this agent does
    def policy_weights(self) -> dict:
        return self.policy.state_dict()

    def load_policy_weights(self, weights: dict) -> None:
        self.policy.load_state_dict(weights)

    def replica(self) -> Callable[[], "GRPOAgent"]:
        """A picklable factory of an agent with this one's shapes and options (weights set later)."""
        return functools.partial(GRPOAgent, self.obs_dim, self.nvec, self.stage_heads,
                                 GRPOConfig.from_dict(self.config.as_dict()))

    # ------------------------------------------------------------------------------- loss
    def stage_log_probs(self, net: nn.Module, obs: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
        """Per stage, the log-probabilities of its options at that stage's observation: ``[N, n_options]``."""
        return [self._stage_log_probs(net, obs[:, s], features[:, s], s) for s in range(len(self.stage_heads))]

    def trajectory_log_prob(self, net: nn.Module, obs: torch.Tensor, features: torch.Tensor,
                            options: torch.Tensor) -> torch.Tensor:
        """Sum over stages of log pi(option chosen | that stage's observation and features): ``[N]``."""
        per_stage = self.stage_log_probs(net, obs, features)
        return sum(lp.gather(1, options[:, s: s + 1]).squeeze(1) for s, lp in enumerate(per_stage))

    def loss(self, rollout: Rollout) -> tuple[torch.Tensor, dict]:
        """The clipped GRPO objective (to minimise) and its statistics."""
        cfg = self.config
        per_stage = self.stage_log_probs(self.policy, rollout.obs, rollout.features)
        logp = sum(lp.gather(1, rollout.options[:, s: s + 1]).squeeze(1) for s, lp in enumerate(per_stage))
        ratio = torch.exp(logp - rollout.old_logp)
        eps_low, eps_high = cfg.epsilon, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        adv = rollout.advantages
        clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        policy_loss = -torch.min(ratio * adv, clipped_ratio * adv).mean()
        with torch.no_grad():
            ref_per_stage = self.stage_log_probs(self.ref_policy, rollout.obs, rollout.features)
        # Exact KL(pi || pi_ref) and entropy of every stage's categorical, summed over stages.
        kl = sum((lp.exp() * (lp - ref)).sum(-1) for lp, ref in zip(per_stage, ref_per_stage)).mean()
        entropy = sum(-(lp.exp() * lp).sum(-1) for lp in per_stage).mean()
        loss = policy_loss + cfg.beta * kl - cfg.entropy_coef * entropy
        is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"loss": float(loss.detach()), "policy_loss": float(policy_loss.detach()), "kl": float(kl.detach()),
                 "entropy": float(entropy.detach()), "clip_fraction": float(is_clipped.float().mean())}
        return loss, stats

    def update(self, rollout: Rollout) -> dict:
        """``num_iterations`` clipped gradient steps on one rollout; returns the last step's statistics."""
        stats = {}
        for _ in range(self.config.num_iterations):
            loss, stats = self.loss(rollout)
            self.optimizer.zero_grad()
            loss.backward()
            if self.config.max_grad_norm > 0:
                stats["grad_norm"] = float(nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm))
            self.optimizer.step()
        self.step += 1
        check_finite({"policy": self.policy.state_dict()}, f"GRPO update {self.step} diverged")
        if self.config.sync_ref_model and self.step % self.config.ref_model_sync_steps == 0:
            alpha = self.config.ref_model_mixup_alpha
            with torch.no_grad():
                for ref, cur in zip(self.ref_policy.parameters(), self.policy.parameters()):
                    ref.mul_(1 - alpha).add_(cur, alpha=alpha)
        return stats

    def train_step(self, layout: EnvLayout, budgets: Budget, split: str = "train",
                   sample_pool: int | None = None, collector: GroupCollector | None = None) -> tuple[Rollout, dict]:
        """One GRPO update: draw samples and budgets (from ``budgets``, the training range), collect
        groups (with ``collector``; default: in this process), update; returns rollout and stats."""
        start = time.perf_counter()
        n_samples = layout.num_samples(split)
        pool = n_samples if sample_pool is None else min(int(sample_pool), n_samples)
        sample_ids = self.rng.integers(pool, size=self.config.batch_size)
        budgets = [budgets.sample(self.rng) for _ in sample_ids]
        rollout = self.collect(layout, sample_ids.tolist(), budgets, split, collector)
        stats = self.update(rollout)
        stats["samples_per_second"] = len(rollout.infos) / max(1e-9, time.perf_counter() - start)
        return rollout, stats

    # ------------------------------------------------------------------------------- state
    def freeze(self) -> "GRPOAgent":
        """Evaluation mode with gradients off (a frozen policy)."""
        self.policy.eval().requires_grad_(False)
        return self

    def state_dict(self) -> dict:
        # group sampling is seeded per group (agents.rollout.group_seed); the random states are in common_state
        return {**self.common_state(), "policy": self.policy.state_dict(), "ref_policy": self.ref_policy.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._check_shapes(state, self.obs_dim, self.nvec)
        self.policy.load_state_dict(state["policy"])
        self.ref_policy.load_state_dict(state["ref_policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_step_and_rng(state)
