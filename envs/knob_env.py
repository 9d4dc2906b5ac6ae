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
import warnings
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from backends.base import Backend, Sample, check_split
from backends.knobs import KnobConfig
from backends.outcome import Outcome, Stage1State
from backends.registry import load_backend
from backends.runner import StageRunner
from envs.budget import Budget, check_budget_ms
from envs.latency import LatencySource
from envs.reward import RewardConfig, compute_reward

OBS_CLIP = 10.0
_WARNED: set = set()


class KnobEnv(gym.Env):
    """Base of ``MultiKnob-v0`` and ``TokenBudget-v0``.

    Args:
        backend: backend name (default ``tiny``), dict with ``name`` and options, or a Backend object.
        budget: latency budget in any form :meth:`Budget.parse` accepts (default ``120ms``); a
            range is sampled uniformly per episode from ``np_random``.
        split: data split episodes draw samples from (default ``train``).
        latency: ``estimated`` (default, deterministic) or ``measured`` (wall clock).
        overshoot_penalty, violation_penalty: reward coefficients (see :mod:`envs.reward`).
        estimator: a latency estimator to use instead of the cached one.
    """

    metadata = {"render_modes": []}

    def __init__(self, backend: Any = "tiny", budget: Any = "120ms", split: str = "train",
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
        self.budget = Budget.parse(budget)
        self.reward_config = RewardConfig(overshoot_penalty, violation_penalty)
        self.latency = LatencySource(self.backend, latency, estimator=estimator)
        estimated = self.latency.mode == "estimated"
        self.runner = StageRunner(self.backend, memoise_outcomes=estimated, batch_stage2=estimated)
        self.question_types = tuple(self.backend.question_types)
        self._typical_cheapest_ms, self._typical_full_ms = self._typical_latencies()
        self._ref_ms = float(np.median(self._typical_full_ms))  # observation normaliser
        self._warn_if_budget_unreachable()
        self._sample: Sample | None = None
        self._budget_ms: float = self.budget.low_ms

    # ---------------------------------------------------------------- latency references
    def _typical_samples(self, n: int = 16) -> Sequence[Sample]:
        # The first n validation samples (the generator's splits are i.i.d.): a trace stores
        # exactly these, so live and replayed envs share the latency normaliser.
        return list(self.backend.samples("validation")[:n])

    def _typical_latencies(self) -> tuple[np.ndarray, np.ndarray]:
        """Estimated latency of the cheapest and of the full configuration on each typical input."""
        samples = self._typical_samples()
        cheap, full = self.space.cheapest(), self.space.full()
        lo = self.latency.predict_ms([cheap] * len(samples),
                                     [self.backend.expected_token_counts(s, cheap) for s in samples])
        hi = self.latency.predict_ms([full] * len(samples),
                                     [self.backend.expected_token_counts(s, full) for s in samples])
        return np.asarray(lo), np.asarray(hi)

    @property
    def achievable_range_ms(self) -> tuple[float, float]:
        """Estimated latency of the cheapest and the most expensive configuration on this device."""
        return float(np.min(self._typical_cheapest_ms)), float(np.max(self._typical_full_ms))

    @property
    def suggested_budget_ms(self) -> float:
        """A budget that binds on this backend and device: the one the out-of-range warning names.

        Halfway between the cheapest configuration's 95th-percentile latency and the full
        configuration's median latency over typical inputs: the full configuration does not fit a
        typical input, so a controller must give something up, while the cheapest still fits
        about 95% of inputs, so a budget-aware controller can keep violations rare. Not the
        middle of :attr:`achievable_range_ms`: its top is the full configuration on the longest
        answers, so its middle can sit above what the full configuration needs on most inputs,
        where no knob needs to be turned down (BENCHMARKS.md, "Agents", has the tiny model's figures). When
        the two do not leave a gap (long answers cost more than the whole knob range saves), the
        middle of the cheapest and the full configuration's medians.
        """
        cheap, full = self._typical_cheapest_ms, self._typical_full_ms
        low, high = float(np.percentile(cheap, 95)), float(np.median(full))
        if low >= high:
            low = float(np.median(cheap))
        return 0.5 * (low + high)

    @property
    def suggested_budget_range_ms(self) -> tuple[float, float]:
        """A budget range for training one budget-conditioned controller on this backend and device.

        From the cheapest configuration's 75th-percentile latency over typical inputs (below it,
        a quarter of the inputs have no configuration that fits) to the full configuration's
        median (above it, most inputs need no knob turned down), so every budget inside binds on
        typical inputs. Not the cheapest configuration's 95th percentile as for
        :attr:`suggested_budget_ms`: inputs with long answers form a tail that can reach the full
        configuration's median and close the range. When even the 75th percentile does, the range
        starts at the cheapest configuration's median. :attr:`suggested_budget_ms` lies inside.
        """
        cheap, full = self._typical_cheapest_ms, self._typical_full_ms
        low, high = float(np.percentile(cheap, 75)), float(np.median(full))
        if low >= high:
            low = float(np.median(cheap))
        return low, high

    def _warn_if_budget_unreachable(self) -> None:
        lo, hi = self.achievable_range_ms
        key = (str(self.backend.identity()), str(self.budget), type(self).__name__)
        if key in _WARNED:
            return
        msg = None
        if self.budget.high_ms < lo:
            msg = f"budget {self.budget} is below the cheapest configuration's latency"
        elif self.budget.low_ms > hi:
            msg = f"budget {self.budget} is above the most expensive configuration's latency (it never binds)"
        if msg:
            _WARNED.add(key)
            warnings.warn(f"{msg}: achievable range on this backend and device is "
                          f"{lo:.1f}ms..{hi:.1f}ms; choose a budget inside it, e.g. "
                          f"budget={self.suggested_budget_ms:.0f}ms (one the full configuration does not fit "
                          f"on a typical input), or a range to train one controller for all of them, "
                          f"budget=[{self.suggested_budget_range_ms[0]:.0f}ms,{self.suggested_budget_range_ms[1]:.0f}ms]"
                          + (f"; latency estimator {noise}" if (noise := self.latency.noise_description()) else ""),
                          stacklevel=3)

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
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"sample_id", "budget", "split"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; accepted: sample_id, budget, split")
        split = check_split(options.get("split", self.split))
        items = self.backend.samples(split)
        if "sample_id" in options:
            self._sample = self.backend.sample(split, options["sample_id"])
        else:
            self._sample = items[int(self.np_random.integers(len(items)))]
        budget = Budget.parse(options["budget"]) if "budget" in options else self.budget  # reset's boundary
        self._budget_ms = budget.sample(self.np_random)

    def _check_action(self, action) -> np.ndarray:
        """The action as int64, or a ValueError naming it and the accepted space."""
        arr = np.asarray(action)
        ok = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(np.isfinite(arr))
                                          and np.all(arr == np.round(arr)))
        if ok:
            ints = arr.astype(np.int64)
            ok = ints.shape == self.action_space.shape and self.action_space.contains(
                ints.astype(self.action_space.dtype))
        if not ok:
            raise ValueError(f"action {action!r} is outside the action space {self.action_space}; accepted: "
                             f"{self._action_help()}")
        return ints

    def _action_help(self) -> str:
        return str(self.action_space)

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
        knobs = [self.action_to_knobs(self._check_action(self.to_env_action(t))) for t in trajectories]
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
        knobs = [self.space.resolve(self.action_to_knobs(self._check_action(self.to_env_action(t))))
                 for t in trajectories]
        return self.latency.predict_ms(knobs, [self.backend.expected_token_counts(sample, k) for k in knobs])

    def provenance(self) -> dict:
        """Backend identity, latency source and knob space, for run records."""
        try:
            from latency_model.cache import describe

            estimator = describe(self.latency.estimator)
        except AttributeError:  # a stand-in estimator without the fields a fitted one records
            estimator = {"class": type(self.latency.estimator).__name__}
        return {"model": self.backend.identity(), "latency": self.latency.mode, "estimator": estimator,
                "knob_space": self.space.as_dict()}

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

    @staticmethod
    def _finish_obs(values: list[float], size: int) -> np.ndarray:
        obs = np.zeros(size, dtype=np.float32)
        obs[: len(values)] = np.clip(np.asarray(values, dtype=np.float32), -OBS_CLIP, OBS_CLIP)
        return obs

    def _box(self, size: int) -> gym.spaces.Box:
        return gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(size,), dtype=np.float32)
