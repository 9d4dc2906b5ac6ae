"""``MultiKnob-v0``: a two-stage episode per input sample.

Stage 1 observes the budget and cheap input features and chooses the vision tier; the backend
runs the vision tower at that tier and decoder block 1 at the model's full top-k. Stage 2
observes what block 1 produced and chooses MoE top-k and depth; the rest of the model runs,
the answer is decoded and scored, and the episode ends.

Action: one ``MultiDiscrete([n_tiers, n_top_k, n_depth])`` vector in both stages, with the knobs
the backend's knob space offers: a dense model has no top-k element (``[n_tiers, n_depth]``), a
text-only model one tier choice (no vision tower). Stage 1 reads only element 0 (tier) and
ignores the others; stage 2 reads the rest (top-k index into ``space.top_ks``, depth index into
``space.depths``) and ignores element 0 (the tier is already fixed).

Observation (float32, same size in both stages, clipped to [-10, 10]):
``[stage, budget/ref, prompt_tokens/64, question-type one-hot..., image_h/256, image_w/256,
question features (Backend.question_feature_dim)..., block-1 summary (16)..., vision_tokens/native,
spent/budget, cheapest_total/budget, full_total/budget]``; the stage-2 part is zero in stage 1.
The question features (a hashed bag of words of the question) let a policy condition on the
input when the data has no question types. ``ref`` is the estimated latency of
the full configuration on a typical input; the last two entries are the estimated end-to-end
latency of the cheapest and the most expensive stage-2 choice for this input and tier.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from backends.knobs import KnobConfig
from envs.budget import check_budget_ms
from envs.knob_env import KnobEnv


class MultiKnobEnv(KnobEnv):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        sp = self.space
        # The knobs that apply to this model: a dense model has no top-k head, a text-only model
        # one tier choice (None: no vision tower), so element 0 is always the stage-1 choice.
        self._tiers = sp.tier_names or (None,)
        self._stage2_knobs = tuple((name, values) for name, values in (("top_k", sp.top_ks), ("depth", sp.depths))
                                   if values)
        if not self._stage2_knobs:
            raise ValueError(f"MultiKnob-v0 needs a backend with top-k or depth choices; {sp.model_class} "
                             f"offers top_ks={sp.top_ks}, depths={sp.depths}")
        self.action_space = gym.spaces.MultiDiscrete([len(self._tiers), *(len(v) for _, v in self._stage2_knobs)])
        # The GroupEnv layout follows the action space: stage 1 reads element 0 (the tier; one
        # value, None, for a text-only model), stage 2 the rest (top-k and/or depth).
        self.trajectory_nvec = tuple(int(n) for n in self.action_space.nvec)
        self.stage_heads = ((0,), tuple(range(1, len(self.trajectory_nvec))))
        self._n_input = self.input_feature_dim
        self.obs_size = 1 + self._n_input + self.backend.summary_dim + 4
        self.observation_space = self._box(self.obs_size)
        self._stage = 0
        self._state = None
        self._input_obs: list[float] = []

    def _reference_knobs(self) -> tuple[KnobConfig, KnobConfig]:
        return self.space.cheapest().replace(token_budget=1.0), self.space.full()  # no token-budget head

    def _action_help(self) -> str:
        heads = [f"tier index into {list(self._tiers)}"] + [f"{n} index into {list(v)}" for n, v in self._stage2_knobs]
        return f"MultiDiscrete{list(self.action_space.nvec)}: [{', '.join(heads)}]"

    def action_to_knobs(self, action) -> KnobConfig:
        chosen = {name: int(values[int(action[1 + i])]) for i, (name, values) in enumerate(self._stage2_knobs)}
        return KnobConfig(tier=self._tiers[int(action[0])], token_budget=1.0, **chosen)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._begin_episode(seed, options)
        self._stage, self._state = 0, None
        self._input_obs = self._input_features(self._sample, self._budget_ms)
        return self.clip_observation([0.0, *self._input_obs], self.obs_size), {
            "sample_id": self._sample.sample_id, "budget_ms": self._budget_ms, "stage": 0}

    def step(self, action):
        if self._sample is None:
            raise RuntimeError("call reset() before step()")
        if self._stage == 2:
            raise RuntimeError("episode is over; call reset()")
        action = self.check_action(action)
        if self._stage == 0:
            tier = self._tiers[int(action[0])]
            self._state = self._stage1(self._sample, tier, 1.0)
            self._stage = 1
            return self._stage2_obs(self._sample, self._budget_ms, self._input_obs, self._state), 0.0, False, False, {
                "sample_id": self._sample.sample_id, "budget_ms": self._budget_ms, "stage": 1, "tier": tier,
                "vision_tokens": self._state.token_counts.vision_tokens}
        knobs = self.action_to_knobs([self._tiers.index(self._state.tier), *action[1:]])
        outcome = self._run(self._sample, knobs, self._state)
        reward, info = self._score(outcome, self._budget_ms)
        info.update(sample_id=self._sample.sample_id, stage=2)
        self._stage = 2
        obs = self._stage2_obs(self._sample, self._budget_ms, self._input_obs, self._state)
        return obs, reward, True, False, info

    def _stage2_obs(self, sample, budget_ms: float, input_obs: list[float], state) -> np.ndarray:
        """The stage-2 observation of ``sample`` under ``budget_ms`` after stage 1 left ``state``."""
        sp = self.space
        counts = state.token_counts
        cheap = sp.cheapest().replace(tier=state.tier, token_budget=1.0)
        full = sp.full().replace(tier=state.tier)
        expected = self.backend.expected_token_counts(sample, full)
        totals = self.latency.predict_ms([cheap, full], [expected, expected])
        values = [1.0, *input_obs, *state.summary.tolist(),
                  counts.vision_tokens / max(1, sp.native_vision_tokens),
                  self.latency.stage1_ms(state) / budget_ms, totals[0] / budget_ms, totals[1] / budget_ms]
        return self.clip_observation(values, self.obs_size)

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int,
                          trajectory=None) -> np.ndarray:
        """The observation before ``stage`` (0: tier, 1: top-k and depth after ``trajectory[0]``'s tier).

        Pure: the episode in progress is untouched (stage 1 runs through the memoising runner).
        """
        sample = self.backend.sample(split or self.split, sample_id)
        if stage != 1:
            return self.request_observation(sample, budget_ms, stage)
        if trajectory is None:
            raise ValueError(f"stage={stage} is invalid for MultiKnob-v0 without a trajectory; accepted: 0, or 1 "
                             f"with the trajectory whose element 0 chose the tier")
        tier = self._tiers[int(np.asarray(trajectory).reshape(-1)[0])]
        return self.request_observation(sample, budget_ms, stage, self._stage1(sample, tier, 1.0))

    def request_observation(self, sample, budget_ms: float, stage: int, state=None) -> np.ndarray:
        """The observation before ``stage`` of an episode on any ``sample``, a served request outside
        the backend's splits included (:class:`serving.Controller`); stage 1 reads ``state``, the
        stage-1 state of the tier stage 0 chose. Pure: nothing runs and nothing is memoised."""
        budget_ms = check_budget_ms(budget_ms)
        input_obs = self._input_features(sample, budget_ms)
        if stage == 0:
            return self.clip_observation([0.0, *input_obs], self.obs_size)
        if stage != 1 or state is None:
            raise ValueError(f"stage={stage} is invalid for MultiKnob-v0; accepted: 0, or 1 with the stage-1 state "
                             f"of the tier stage 0 chose")
        return self._stage2_obs(sample, budget_ms, input_obs, state)
