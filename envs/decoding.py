"""``Decoding-v0``: choose how an answer is decoded (greedy, beam, sampling, speculative) and its prompt format.

One step per question. The backend (``backend=decoding``: a target causal LM, optionally a draft
sharing its tokenizer, and QA data; the shipped tiny pair by default) decodes the answer through
``transformers`` ``generate`` under the chosen knobs; the reward is the shared one
(:func:`envs.reward.compute_reward`).

Action:
    ``MultiDiscrete(space.nvec)``, one element per field of the backend's
    :class:`~backends.decoding.DecodingSpace`, in this order: strategy (greedy / beam / sampling /
    speculative; speculative only with a draft), beam width, sampling temperature, draft
    lookahead ``num_assistant_tokens``, and chat template off / on (only when the target's
    tokenizer has one). A strategy ignores the fields that do not apply to it (so several
    actions can name one configuration).

Observation:
    float32 ``Box(-10, 10, (4 + question types,))``: ``[budget / ref, plain prompt tokens / 32,
    expected answer tokens / 16, estimated greedy latency / budget, question-type one-hot...]``
    where ``ref`` is the median estimated latency of the widest beam on typical inputs.

Reward:
    ``score - overshoot_penalty * max(0, latency / budget - 1) - violation_penalty * [latency >
    budget]``; ``score`` is exact match of the answer. Latency is the decoding estimator's
    prediction (:mod:`latency_model.decoding`) from the run's prompt and generated tokens (and,
    for speculative decoding, its measured acceptance): deterministic. ``Decoding-measured-v0``
    charges the wall-clock time of ``generate`` instead (registered ``nondeterministic=True``).

Episode end:
    Every episode is one step (``terminated=True``); there is no truncation.

``info``: ``answer``, ``reference``, ``score``, ``latency_ms`` (and ``measured_ms``),
``budget_ms``, ``violated``, ``knobs``, ``new_tokens``, ``prompt_tokens``, ``empty_output``,
``target_passes``, ``draft_passes``; for beam search ``beam_sources`` (the source beam of each
generated token of the returned answer, from the search's back-pointers); for speculative
decoding ``acceptance_rate`` and ``accepted_per_pass`` (accepted draft tokens per target pass).

Group protocol: :class:`DecodingEnv` implements :class:`envs.protocols.GroupEnv` with one stage
reading every element of the action (``trajectory_nvec`` = the action's ``nvec``, ``stage_heads
= ((0, .., n-1),)``): ``evaluate_group`` scores several actions on one sample and budget as
separate episodes would, ``stage_observation`` is the observation of a (sample, budget) without
stepping, ``estimated_latency_ms`` the estimator's latency of each action on an input (memoised
per (input, configuration): an agent may ask it for every action of the space at every step).
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from backends.base import Sample, check_split
from backends.decoding import DecodingBackend, DecodingKnobs, DecodingOutcome
from backends.registry import load_backend
from envs.base import KnobgymEnv, LatencyReference
from envs.budget import check_budget_ms, device_budget
from envs.latency import DecodingLatency
from envs.reward import RewardConfig, compute_reward


class DecodingEnv(KnobgymEnv):
    """See the module docstring.

    Args:
        backend: ``decoding`` (default: the shipped tiny pair), a dict with ``name`` and options,
            or a loaded :class:`~backends.decoding.DecodingBackend`.
        budget: latency budget in any form :func:`envs.budget.device_budget` accepts; ``None`` or
            ``"auto"``: the :attr:`suggested_budget_ms` of this backend and device; ``"50%"``: that
            point of :attr:`achievable_range_ms`.
        split: data split episodes draw questions from (default ``train``).
        latency: ``estimated`` (default) or ``measured``.
        overshoot_penalty, violation_penalty: reward coefficients (see :mod:`envs.reward`).
        estimator: a decoding latency estimator to use instead of the cached one.
        backend_options: options for a backend given by name.

    Raises:
        ValueError: a backend that is not a :class:`~backends.decoding.DecodingBackend`, a bad
            split, latency mode or budget (one line each).
    """

    def __init__(self, backend: Any = "decoding", budget: Any = None, split: str = "train",
                 latency: str = "estimated", overshoot_penalty: float = 1.0, violation_penalty: float = 0.5,
                 estimator=None, backend_options: dict | None = None):
        super().__init__()
        check_split(split)
        device_budget(budget)  # checked before loading; a device-relative one is resolved below
        loaded = load_backend(backend, **(backend_options or {}))
        if not isinstance(loaded, DecodingBackend):
            raise ValueError(f"Decoding-v0 needs a decoding backend, got {type(loaded).__name__}; accepted: "
                             f"backend=tiny-decoding (the shipped pair) or a conf/backend/*-decoding preset")
        self.backend = loaded
        self.space = loaded.knob_space
        self.split = split
        self.reward_config = RewardConfig(overshoot_penalty, violation_penalty)
        self.latency = DecodingLatency(loaded, latency, estimator)
        self.question_types = tuple(loaded.question_types)
        # memo: (split, sample id, resolved knobs) -> estimated ms; -> outcome (estimated mode only)
        self._estimate_cache: dict[tuple, float] = {}
        self._outcome_cache: dict[tuple, DecodingOutcome] = {}
        self._init_kwargs = dict(backend={"name": "decoding", **loaded.options}, budget=budget, split=split,
                                 latency=latency, overshoot_penalty=overshoot_penalty,
                                 violation_penalty=violation_penalty)
        self._reference = self._typical_latencies()
        self._ref_ms = float(np.median(self._reference.full))
        self.budget = device_budget(budget, self.achievable_range_ms, self.suggested_budget_ms)
        self._warn_if_budget_unreachable(self.budget)
        self.action_space = gym.spaces.MultiDiscrete(self.space.nvec)
        self.trajectory_nvec = tuple(int(n) for n in self.space.nvec)
        self.stage_heads = (tuple(range(len(self.trajectory_nvec))),)
        self.obs_size = 4 + len(self.question_types)
        self.observation_space = self._box(self.obs_size)
        self._sample: Sample | None = None
        self._budget_ms = self.budget.low_ms

    # ---------------------------------------------------------------- pickling: rebuild from the spec
    def __getstate__(self) -> dict:
        state = {"kwargs": self._init_kwargs}
        if self._np_random is not None:
            state["rng"] = self._np_random.bit_generator.state
        return state

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["kwargs"])
        if "rng" in state:
            self._np_random = np.random.default_rng()
            self._np_random.bit_generator.state = state["rng"]

    # ---------------------------------------------------------------- latency references
    def _typical_latencies(self) -> LatencyReference:
        """Per typical input (first 16 validation questions): the estimated latency of the cheapest
        configuration, of the widest beam (:meth:`DecodingSpace.full`) and of the dearest one.

        The widest beam, not the dearest configuration, is the full configuration of the
        suggested-budget rule (:attr:`envs.base.KnobgymEnv.suggested_budget_ms`): speculative
        decoding with a draft that rejects most proposals can be the slowest and buys no accuracy,
        so a budget below it need not bind anything worth having.
        """
        samples = list(self.backend.samples("validation")[:16])
        configs = self.space.configurations()
        est = np.array([self._estimate_ms(s, configs) for s in samples])
        full = configs.index(self.space.resolve(self.space.full()))
        return LatencyReference(cheapest=est.min(axis=1), full=est[:, full], dearest=est.max(axis=1))

    def _reference_latencies(self) -> LatencyReference:
        return self._reference

    def _warning_identity(self) -> str:
        return str(self.backend.identity())

    # ---------------------------------------------------------------- actions
    def _knobs(self, action) -> DecodingKnobs:
        """The resolved configuration of an action (raises ``ValueError`` outside the action space)."""
        return self.space.from_indices(self.check_action(action))

    def _action_help(self) -> str:
        fields = ", ".join(f"{name} 0..{len(values) - 1} {list(values)}" for name, values in self.space.fields)
        return f"one index per field: {fields}"

    # ---------------------------------------------------------------- the GroupEnv protocol
    def num_samples(self, split: str) -> int:
        """Questions in ``split`` (ids ``0 .. n-1``)."""
        return len(self.backend.samples(check_split(split)))

    def to_env_action(self, trajectory: Sequence[int], stage: int = 0) -> np.ndarray:
        """The Gymnasium action of ``trajectory``: the vector itself (one stage reads every element)."""
        if stage != 0:
            raise ValueError(f"stage={stage} is invalid for Decoding-v0; accepted: 0 (one decision per episode)")
        return np.asarray(trajectory, dtype=np.int64).reshape(-1)

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int = 0,
                          trajectory: Sequence[int] | None = None) -> np.ndarray:
        """The observation of an episode on (sample, budget): its only stage is 0. Pure."""
        if stage != 0:
            raise ValueError(f"stage={stage} is invalid for Decoding-v0; accepted: 0 (one decision per episode)")
        sample = self.backend.sample(check_split(split or self.split), sample_id)
        return self._observation(sample, check_budget_ms(budget_ms))

    def estimated_latency_ms(self, sample_id: int, trajectories: Sequence[Sequence[int]],
                             split: str | None = None) -> np.ndarray:
        """The estimator's latency of each action on this input, from expected token counts (no model run)."""
        sample = self.backend.sample(check_split(split or self.split), sample_id)
        return self._estimate_ms(sample, [self._knobs(self.to_env_action(t)) for t in trajectories])

    def provenance(self) -> dict:
        """Backend identity, latency source and estimator, and the knob space, for run records."""
        return {"model": self.backend.identity(), "latency": self.latency.mode,
                "estimator": self.latency.estimator_record(), "knob_space": self.space.as_dict()}

    # ---------------------------------------------------------------- observations
    def _estimate_ms(self, sample: Sample, knobs: Sequence[DecodingKnobs]) -> np.ndarray:
        """Estimated latency of resolved configurations on ``sample``, memoised per (input, configuration)."""
        out = np.empty(len(knobs), dtype=np.float64)
        for i, k in enumerate(knobs):
            key = (sample.split, sample.sample_id, k)
            if key not in self._estimate_cache:
                if len(self._estimate_cache) >= self._CACHE_SIZE:
                    self._estimate_cache.pop(next(iter(self._estimate_cache)))
                self._estimate_cache[key] = self.latency.predict_ms(k, self.backend.expected_token_counts(sample, k))
            out[i] = self._estimate_cache[key]
        return out

    def _observation(self, sample: Sample, budget_ms: float) -> np.ndarray:
        greedy = self.space.cheapest()
        counts = self.backend.expected_token_counts(sample, greedy)
        greedy_ms = float(self._estimate_ms(sample, [greedy])[0])
        qtype = np.zeros(len(self.question_types), dtype=np.float32)
        if 0 <= sample.question_type < len(qtype):
            qtype[sample.question_type] = 1.0
        values = [budget_ms / self._ref_ms, counts.prompt_tokens / 32.0, counts.new_tokens / 16.0,
                  greedy_ms / budget_ms, *qtype.tolist()]
        return self.clip_observation(values)

    # ---------------------------------------------------------------- episodes
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        start = self.begin_episode(seed, options)  # validated first: a reset that raises changes nothing
        self._sample, self._budget_ms = self.backend.sample(start.split, start.sample_id), start.budget_ms
        obs = self._observation(self._sample, self._budget_ms)
        return obs, {"sample_id": self._sample.sample_id, "budget_ms": self._budget_ms}

    def step(self, action):
        if self._sample is None:
            raise RuntimeError("call reset() before step()")
        sample, budget_ms = self._sample, self._budget_ms
        (reward,), (info,) = self._score_group(sample, budget_ms, [self._knobs(action)])
        obs = self._observation(sample, budget_ms)
        self._sample = None
        return obs, float(reward), True, False, info

    # ---------------------------------------------------------------- the group evaluation
    def evaluate_group(self, sample_id: int, budget_ms: float, trajectories: Sequence[Sequence[int]],
                       split: str | None = None) -> tuple[np.ndarray, list[dict]]:
        """Rewards and infos of ``trajectories`` (actions) on one sample and fixed budget (ms), as if
        each were its own episode.

        Actions naming the same configuration share one run (in estimated mode runs are memoised
        per (sample, configuration): greedy, beam and speculative decoding are deterministic, and
        sampling is seeded from the sample and configuration). Returns ``(rewards, infos)``.
        """
        sample = self.backend.sample(check_split(split or self.split), sample_id)
        return self._score_group(sample, check_budget_ms(budget_ms),
                                 [self._knobs(self.to_env_action(t)) for t in trajectories])

    _CACHE_SIZE = 100_000

    def _run(self, sample: Sample, knobs: DecodingKnobs) -> DecodingOutcome:
        if self.latency.mode == "measured":
            return self.backend.run(sample, knobs)
        key = (sample.split, sample.sample_id, knobs)
        if key not in self._outcome_cache:
            if len(self._outcome_cache) >= self._CACHE_SIZE:
                self._outcome_cache.pop(next(iter(self._outcome_cache)))
            self._outcome_cache[key] = self.backend.run(sample, knobs)
        return self._outcome_cache[key]

    def clear_run_cache(self) -> None:
        """Forget memoised runs (benchmarks use this to time real runs)."""
        self._outcome_cache.clear()

    def _score_group(self, sample: Sample, budget_ms: float, knobs: Sequence[DecodingKnobs]):
        outcomes = [self._run(sample, k) for k in knobs]
        latencies = self.latency.outcomes_ms(outcomes)
        rewards, infos = [], []
        for o, lat in zip(outcomes, latencies):
            reward, violated = compute_reward(o.score, float(lat), budget_ms, self.reward_config)
            info = {"sample_id": int(sample.sample_id), "answer": o.answer, "reference": o.reference,
                    "score": float(o.score), "latency_ms": float(lat), "budget_ms": float(budget_ms),
                    "violated": violated, "knobs": o.knobs.as_dict(), "new_tokens": int(o.new_tokens),
                    "prompt_tokens": int(o.token_counts.prompt_tokens), "empty_output": bool(o.empty_output),
                    "target_passes": int(o.target_passes), "draft_passes": int(o.draft_passes),
                    "beam_sources": None if o.beam_sources is None else list(o.beam_sources),
                    "acceptance_rate": o.acceptance_rate, "accepted_per_pass": o.accepted_per_pass}
            if self.latency.mode == "measured":
                info["measured_ms"] = float(o.measured_ms)
            rewards.append(reward)
            infos.append(info)
        return np.asarray(rewards, dtype=np.float64), infos
