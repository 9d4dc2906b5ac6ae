"""``TokenBudget-v0``: one step per episode choosing the fraction of vision tokens kept.

Action: ``Discrete(len(fractions))`` indexing ``fractions`` (default: the backend's knob space's
``token_budgets``, 0.25 / 0.5 / 0.75 / 1.0 unless configured);
the rest of the model runs at its defaults (highest tier, the model's own top-k, all blocks).
Observation (float32): ``[budget/ref, prompt_tokens/64, question-type one-hot...,
image_h/256, image_w/256, question features...]`` (see :mod:`envs.multiknob` for ``ref`` and the
question features).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from backends.knobs import KnobConfig
from backends.registry import load_backend
from envs.budget import check_budget_ms
from envs.knob_env import KnobEnv


class TokenBudgetEnv(KnobEnv):
    def __init__(self, fractions: Sequence[float] | None = None, **kwargs: Any):
        # Checked before the base class profiles latency: an env that cannot apply fails at once.
        backend = load_backend(kwargs.get("backend", "tiny"), **(kwargs.get("backend_options") or {}))
        if not backend.knob_space.has_vision:
            raise ValueError(f"TokenBudget-v0 needs a backend with a vision tower; "
                             f"{backend.knob_space.model_class} has none; accepted: a vision-language model "
                             f"(LLaVA, IDEFICS2, the tiny default), or MultiKnob-v0 for this model")
        fractions = tuple(float(f) for f in (backend.knob_space.token_budgets if fractions is None else fractions))
        if not fractions or any(not (math.isfinite(f) and 0 < f <= 1) for f in fractions):
            raise ValueError(f"fractions={fractions!r} is invalid; accepted: a non-empty list of fractions 0 < f <= 1")
        self.fractions = fractions  # before the base class: its latency references read the actions
        # the spec as given (load_backend caches, so this is the same object): the env pickles by it
        super().__init__(**kwargs)
        self.action_space = gym.spaces.Discrete(len(fractions))
        self.trajectory_nvec, self.stage_heads = (len(fractions),), ((0,),)
        self.obs_size = self.input_feature_dim
        self.observation_space = self._box(self.obs_size)

    def _action_help(self) -> str:
        return f"an integer in [0, {len(self.fractions) - 1}] indexing fractions {list(self.fractions)}"

    def action_to_knobs(self, action) -> KnobConfig:
        return KnobConfig(tier=self.space.tier_names[-1], token_budget=self.fractions[int(action)])

    def _reference_knobs(self) -> tuple[KnobConfig, KnobConfig]:
        return (self.action_to_knobs(int(np.argmin(self.fractions))),
                self.action_to_knobs(int(np.argmax(self.fractions))))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._begin_episode(seed, options)
        obs = self.clip_observation(self._input_features(self._sample, self._budget_ms), self.obs_size)
        return obs, {"sample_id": self._sample.sample_id, "budget_ms": self._budget_ms}

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int = 0,
                          trajectory=None) -> np.ndarray:
        """The observation of an episode on (sample, budget): its only stage is 0. Pure."""
        return self.request_observation(self.backend.sample(split or self.split, sample_id), budget_ms, stage)

    def request_observation(self, sample, budget_ms: float, stage: int = 0, state=None) -> np.ndarray:
        """The observation of an episode on any ``sample`` (a served request too); ``state`` is unused
        (the one stage comes before the model runs). Pure."""
        del state
        if stage != 0:
            raise ValueError(f"stage={stage} is invalid for TokenBudget-v0; accepted: 0 (one decision per episode)")
        return self.clip_observation(self._input_features(sample, check_budget_ms(budget_ms)), self.obs_size)

    def step(self, action):
        if self._sample is None:
            raise RuntimeError("call reset() before step()")
        knobs = self.action_to_knobs(self.check_action(action))
        outcome = self._run(self._sample, knobs)
        reward, info = self._score(outcome, self._budget_ms)
        info["sample_id"] = self._sample.sample_id
        obs = self.clip_observation(self._input_features(self._sample, self._budget_ms), self.obs_size)
        self._sample = None
        return obs, reward, True, False, info
