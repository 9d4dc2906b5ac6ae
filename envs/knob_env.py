"""Shared machinery of the model-executing envs: backend, budget, latency, reward, observations.

Subclasses define the action space, their stages and how an action becomes a
:class:`KnobConfig`; this base turns knob configurations into model runs (through a
:class:`~backends.runner.StageRunner`, which shares stage 1 across a group and memoises outcomes),
latencies, rewards and infos, so every env scores the same way. Knob envs implement the
:class:`~envs.protocols.GroupEnv` protocol agents use.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from backends.checks import is_int
from backends.base import Backend, Sample, check_split
from backends.knobs import KnobConfig
from backends.outcome import Outcome, Stage1State
from backends.registry import load_backend
from backends.runner import StageRunner
from envs.base import KnobgymEnv, LatencyReference
from envs.budget import check_budget_ms, device_budget
from envs.latency import LatencySource
from envs.reward import RewardConfig, compute_reward


class KnobEnv(KnobgymEnv):
    """Base of ``MultiKnob-v0`` and ``TokenBudget-v0``.

    Args:
        backend: backend name (default ``tiny``), dict with ``name`` and options, or a Backend object.
        budget: latency budget in any form :func:`envs.budget.device_budget` accepts: ``None`` or
            ``"auto"`` (the default: :attr:`suggested_budget_ms`, one that binds on this device),
            ``"50%"`` (that point of :attr:`achievable_range_ms`), milliseconds (``"45ms"``); a
            range is sampled uniformly per episode from ``np_random``.
        split: data split episodes draw samples from (default ``train``).
        latency: ``estimated`` (default, deterministic) or ``measured`` (wall clock).
        overshoot_penalty, violation_penalty: reward coefficients (see :mod:`envs.reward`).
        estimator: a latency estimator to use instead of the cached one.
    """

    def __init__(self, backend: Any = "tiny", budget: Any = None, split: str = "train",
                 latency: str = "estimated", overshoot_penalty: float = 1.0, violation_penalty: float = 0.5,
                 estimator=None, backend_options: dict | None = None):
        super().__init__()
        self.split = check_split(split)
        # How to load the backend again in another process (see __getstate__); None: an object was given.
        self._backend_spec = (backend, dict(backend_options or {})) if backend is None or isinstance(
            backend, (str, dict)) else None
        self.backend = load_backend(backend, **(backend_options or {}))
        if not isinstance(self.backend, Backend):
            raise ValueError(f"{type(self).__name__} needs a vision-language backend (backends.base.Backend), got "
                             f"{type(self.backend).__name__}; accepted: backend=tiny, hf or trace")
        self.space = self.backend.knob_space
        device_budget(budget)  # checked before loading the estimator; a device-relative one is resolved below
        self.reward_config = RewardConfig(overshoot_penalty, violation_penalty)
        self.latency = LatencySource(self.backend, latency, estimator=estimator)
        estimated = self.latency.mode == "estimated"
        self.runner = StageRunner(self.backend, memoise_outcomes=estimated, batch_stage2=estimated)
        self.question_types = tuple(self.backend.question_types)
        self._reference = self._typical_latencies()
        self._ref_ms = float(np.median(self._reference.full))  # observation normaliser
        self.budget = device_budget(budget, self.achievable_range_ms, self.suggested_budget_ms)
        self._warn_if_budget_unreachable(self.budget)
        self._sample: Sample | None = None
        self._budget_ms: float = self.budget.low_ms
        self._knobs_memo: dict[tuple, KnobConfig] = {}  # trajectory -> resolved knobs (trajectory_knobs)

    # ---------------------------------------------------------------- latency references
    def _typical_samples(self, n: int = 16) -> Sequence[Sample]:
        # The first n validation samples (the generator's splits are i.i.d.): a trace stores
        # exactly these, so live and replayed envs share the latency normaliser.
        return list(self.backend.samples("validation")[:n])

    def _reference_knobs(self) -> tuple[KnobConfig, KnobConfig]:
        """The cheapest and the full configuration among this env's actions (the achievable range
        and the suggested budgets are measured on them): the knob space's own by default; an env
        whose actions fix a knob (MultiKnob-v0 keeps every vision token) overrides it."""
        return self.space.cheapest(), self.space.full()

    def _typical_latencies(self) -> LatencyReference:
        """Estimated latency of the cheapest and of the full configuration on each typical input."""
        samples = self._typical_samples()
        cheap, full = (self.space.resolve(k) for k in self._reference_knobs())
        lo = self.latency.predict_ms([cheap] * len(samples),
                                     [self.backend.expected_token_counts(s, cheap) for s in samples])
        hi = self.latency.predict_ms([full] * len(samples),
                                     [self.backend.expected_token_counts(s, full) for s in samples])
        return LatencyReference(np.asarray(lo), np.asarray(hi))

    def _reference_latencies(self) -> LatencyReference:
        return self._reference

    def _warning_identity(self) -> str:
        return str(self.backend.identity())

    # ---------------------------------------------------------------- pickling
    # Envs pickle (multiprocessing, SubprocVecEnv, Ray): the loaded backend (a model with hooks) is
    # dropped and loaded again from its spec through ``load_backend`` (cached per process); the
    # stage runner holds only memos of that backend, so the copy gets a new, empty one; everything
    # else, the episode included, is kept.
    _NOT_PICKLED = ("runner",)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}
        state["_memoise_outcomes"] = self.runner.memoise_outcomes
        state["_batch_stage2"] = self.runner.batch_stage2
        if self._backend_spec is not None:
            state["backend"] = None
            spec = state.get("spec")
            if spec is not None and not isinstance(spec.kwargs.get("backend", ""), (str, dict, type(None))):
                state["spec"] = dataclasses.replace(spec, kwargs={**spec.kwargs, "backend": self._backend_spec[0]})
        else:
            try:
                pickle.dumps(self.backend)
            except Exception as exc:
                raise pickle.PicklingError(
                    f"{type(self).__name__} holds a {type(self.backend).__name__} object passed in as backend=, "
                    f"which does not pickle ({exc}); accepted: make the env with backend=<name> or a dict "
                    f"with 'name' and options, so it loads the backend again through load_backend") from None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        memoise_outcomes = state.pop("_memoise_outcomes")
        batch_stage2 = state.pop("_batch_stage2", memoise_outcomes)
        self.__dict__.update(state)
        if self._backend_spec is not None:
            backend, options = self._backend_spec
            self.backend = load_backend(backend, **options)
            self.space = self.backend.knob_space
        self.runner = StageRunner(self.backend, memoise_outcomes=memoise_outcomes, batch_stage2=batch_stage2)

    # ---------------------------------------------------------------- episodes
    def _begin_episode(self, seed: int | None, options: dict | None) -> None:
        """Validate the reset options, then start an episode: its sample and budget (see
        :meth:`envs.base.KnobgymEnv.begin_episode`; a reset that raises changes nothing)."""
        start = self.begin_episode(seed, options)
        self._sample = self.backend.sample(start.split, start.sample_id)
        self._budget_ms = start.budget_ms

    # ---------------------------------------------------------------- scoring
    def _score(self, outcome: Outcome, budget_ms: float, latency_ms: float | None = None) -> tuple[float, dict]:
        latency_ms = self.latency.outcome_ms(outcome) if latency_ms is None else latency_ms
        reward, violated = compute_reward(outcome.score, latency_ms, budget_ms, self.reward_config)
        info = {
            "score": float(outcome.score), "answer": outcome.answer, "reference": outcome.reference,
            "latency_ms": float(latency_ms), "budget_ms": float(budget_ms), "violated": violated,
            "knobs": outcome.knobs.as_dict(), "new_tokens": int(outcome.new_tokens),
            "empty_output": bool(outcome.empty_output), "nonfinite_logits": bool(outcome.nonfinite_logits),
            "vision_tokens": int(outcome.token_counts.vision_tokens),
            "prompt_tokens": int(outcome.token_counts.prompt_tokens),
        }
        if self.latency.mode == "measured":
            info["measured_ms"] = float(outcome.measured_ms)
        return reward, info

    def action_to_knobs(self, action) -> KnobConfig:
        raise NotImplementedError  # defined by each env

    # ---------------------------------------------------------------- model runs
    def clear_run_cache(self) -> None:
        """Forget memoised stage-1 states and outcomes (benchmarks use this to time real runs)."""
        self.runner.clear()

    def _stage1(self, sample: Sample, tier, token_budget: float) -> Stage1State:
        return self.runner.stage1(sample, tier, token_budget)

    def _run(self, sample: Sample, knobs: KnobConfig, state: Stage1State | None = None) -> Outcome:
        return self.runner.run(sample, knobs, state)

    # ---------------------------------------------------------------- GroupEnv protocol
    #: choices per trajectory element and, per stage, the elements it reads (set by each env)
    trajectory_nvec: tuple[int, ...] = ()
    stage_heads: tuple[tuple[int, ...], ...] = ()

    def num_samples(self, split: str) -> int:
        """Samples in ``split`` (ids ``0 .. n-1``)."""
        return len(self.backend.samples(check_split(split)))

    def check_sample_id(self, sample_id: Any, split: str) -> int:
        """:meth:`envs.base.KnobgymEnv.check_sample_id`, also accepting an id the backend holds outside
        ``0 .. n-1`` (a trace's recorded ids are the original split's)."""
        try:
            return super().check_sample_id(sample_id, split)
        except ValueError as error:
            if not is_int(sample_id):
                raise
            try:
                self.backend.sample(check_split(split), int(sample_id))
            except (ValueError, KeyError):
                raise error from None
            return int(sample_id)

    def to_env_action(self, trajectory: Sequence[int], stage: int = 0):
        """The Gymnasium action of ``trajectory`` (the same at every stage; a stage reads its elements)."""
        heads = np.asarray(trajectory, dtype=np.int64).reshape(-1)
        return int(heads[0]) if isinstance(self.action_space, gym.spaces.Discrete) else heads

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int,
                          trajectory: Sequence[int] | None = None) -> np.ndarray:
        raise NotImplementedError  # defined by each env

    def evaluate_group(self, sample_id: int, budget_ms: float, trajectories: Sequence, split: str | None = None):
        """Rewards and infos of ``trajectories`` on one sample and budget, as if each were its own episode.

        Each distinct stage-1 computation (vision tower + block 1, keyed by tier and token budget)
        runs once and is shared by every trajectory that needs it. In estimated-latency mode the
        trajectories sharing a stage-1 state also run their stage 2 as one batch
        (:meth:`backends.runner.StageRunner.run_group`): answers, scores and token counts, hence
        rewards and infos, equal stepping each trajectory (batched logits differ from unbatched ones
        only by float rounding; BENCHMARKS.md states the largest difference seen). In
        measured-latency mode each trajectory runs and is timed alone, since one run's latency
        cannot be measured inside a batch. Returns ``(rewards, infos)``.
        """
        split = check_split(split or self.split)
        sample = self.backend.sample(split, sample_id)
        budget_ms = check_budget_ms(budget_ms)
        knobs = [self.action_to_knobs(self.check_action(self.to_env_action(t))) for t in trajectories]
        outcomes = self.runner.run_group(sample, knobs)
        latencies = self.latency.outcomes_ms(outcomes)
        rewards, infos = [], []
        for outcome, lat in zip(outcomes, latencies):
            r, info = self._score(outcome, budget_ms, float(lat))
            info["sample_id"] = int(sample_id)
            rewards.append(r)
            infos.append(info)
        return np.asarray(rewards, dtype=np.float64), infos

    def estimated_latency_ms(self, sample_id: int, trajectories: Sequence, split: str | None = None) -> np.ndarray:
        """The estimator's latency of each trajectory on this input, from expected token counts."""
        return self.request_latency_ms(self.backend.sample(check_split(split or self.split), sample_id), trajectories)

    def request_latency_ms(self, sample: Sample, trajectories: Sequence) -> np.ndarray:
        """:meth:`estimated_latency_ms` on any ``sample``, a served request outside the backend's splits too."""
        knobs = self.trajectory_knobs(trajectories)
        return self.latency.predict_ms(knobs, [self.backend.expected_token_counts(sample, k) for k in knobs])

    def trajectory_knobs(self, trajectories: Sequence) -> list[KnobConfig]:
        """The resolved knobs of each trajectory (a ``ValueError`` names one outside the action space).

        Each distinct integer trajectory is checked and resolved once, then looked up (the action
        space is finite): GRPO's latency features and a served request's guard ask for every
        option's latency at each stage, and checking each row again cost more than the estimator
        (BENCHMARKS.md, "Serving").
        """
        out = []
        for trajectory in trajectories:
            arr = np.asarray(trajectory)
            key = tuple(arr.reshape(-1).tolist()) if arr.dtype.kind in "iu" else None
            knobs = self._knobs_memo.get(key) if key is not None else None
            if knobs is None:
                knobs = self.space.resolve(self.action_to_knobs(self.check_action(self.to_env_action(trajectory))))
                if key is not None:
                    self._knobs_memo[key] = knobs
            out.append(knobs)
        return out

    def provenance(self) -> dict:
        """Backend identity, latency source and knob space, for run records."""
        return {"model": self.backend.identity(), "latency": self.latency.mode,
                "estimator": self.latency.estimator_record(), "knob_space": self.space.as_dict()}

    # ---------------------------------------------------------------- observations
    @property
    def input_feature_dim(self) -> int:
        """Length of :meth:`_input_features`: budget, prompt length, question-type one-hot, image
        height and width, and the backend's question features."""
        return 2 + len(self.question_types) + 2 + int(self.backend.question_feature_dim)

    def _input_features(self, sample: Sample, budget_ms: float) -> list[float]:
        """Cheap stage-1 features: ``[budget/ref, prompt_tokens/64, question-type one-hot...,
        image_h/256, image_w/256, question features...]``.

        The question features (:meth:`backends.base.Backend.question_features`, a hashed bag of
        words) are there whatever the data holds, so a policy conditions on the input even when
        the dataset has no question types (an empty one-hot).
        """
        qtype = np.zeros(len(self.question_types), dtype=np.float32)
        if 0 <= sample.question_type < len(qtype):
            qtype[sample.question_type] = 1.0
        h, w = sample.image_size
        prompt_tokens = self.backend.expected_token_counts(sample, self.space.full()).prompt_tokens
        text = np.asarray(self.backend.question_features(sample), dtype=np.float32).reshape(-1)
        if text.shape != (self.backend.question_feature_dim,):
            raise ValueError(f"backend question_features returned {text.shape[0]} values; accepted: "
                             f"question_feature_dim={self.backend.question_feature_dim}")
        return [budget_ms / self._ref_ms, prompt_tokens / 64.0, *qtype.tolist(), h / 256.0, w / 256.0,
                *text.tolist()]
