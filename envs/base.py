"""The scaffolding every knobgym env family shares: actions, reset options, observations, budgets.

:class:`KnobgymEnv` is the base of the knob envs (``MultiKnob-v0``, ``TokenBudget-v0``), of
``Decoding-v0`` and of the KV envs (``StreamingKV-v0``, ``KV-<Policy>-v0``). Each family defines
its spaces, stages and scoring; this base owns, once for all of them:

* **actions**: :meth:`KnobgymEnv.check_action`, integer vectors inside the action space (an
  integral float such as ``2.0`` counts as the integer), else one ``ValueError`` naming the action
  and what each element means (:meth:`KnobgymEnv._action_help`);
* **reset options** (``sample_id``, ``budget``, ``split``): :meth:`KnobgymEnv.begin_episode`
  validates every option before anything changes (``sample_id`` a non-boolean integer in range),
  so a reset that raises leaves the env exactly as it was: the episode in progress, its sample and
  the random generator;
* **observations**: :meth:`KnobgymEnv.clip_observation` and the ``Box`` they live in;
* **budgets**: the achievable range, the suggested (binding) budget and budget range, all from the
  same reference latencies (:meth:`KnobgymEnv._reference_latencies`), and the one warning for a
  budget outside the achievable range;
* **latency**: ``self.latency`` is an :class:`envs.latency.EnvLatency` in every family;
* **metadata**: the render modes (none) and Gymnasium 1.x's ``autoreset_mode`` (next step), which
  the vector envs read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from backends.base import check_split
from backends.checks import check_int
from envs.budget import Budget, device_budget
from envs.latency import EnvLatency

#: observations of the knob and decoding envs are clipped to [-OBS_CLIP, OBS_CLIP]
OBS_CLIP = 10.0
#: what ``reset(options=...)`` accepts in every env family
RESET_OPTIONS = ("sample_id", "budget", "split")
_WARNED: set = set()


@dataclass(frozen=True)
class LatencyReference:
    """Estimated latency over typical inputs (or chunks), one value per input: the cheapest
    configuration's, the full configuration's, and (when it differs from the full one) the dearest's."""

    cheapest: np.ndarray
    full: np.ndarray
    dearest: np.ndarray | None = None


@dataclass(frozen=True)
class EpisodeStart:
    """A validated reset: the split, the sample drawn or named, the episode's budget and its ms."""

    split: str
    sample_id: int
    budget: Any
    budget_ms: float


def _format_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.3g}"


class KnobgymEnv(gym.Env):
    """Base of every knobgym env family (see the module docstring).

    Subclasses set ``action_space``, ``observation_space``, ``budget`` (a
    :class:`~envs.budget.Budget`, the one agents draw from) and ``latency`` (an
    :class:`~envs.latency.EnvLatency`), and define :meth:`num_samples` and
    :meth:`_reference_latencies`.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}
    #: the keyword arguments ``train.py env=<id>`` passes when no ``conf/env/<id>.yaml`` says otherwise
    #: (knobgym_cli.group_configs); ``gym.make`` keeps the constructor's own defaults
    cli_kwargs: ClassVar[dict] = {}
    budget: Budget
    latency: EnvLatency

    # ---------------------------------------------------------------- actions
    def check_action(self, action) -> np.ndarray:
        """The action as int64 if it lies in the action space, else a ValueError naming it and the space."""
        arr = np.asarray(action)
        ok = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr)))
                                          and bool(np.all(arr == np.round(arr))))
        if ok:
            ints = arr.astype(np.int64)
            ok = ints.shape == self.action_space.shape and self.action_space.contains(
                ints.astype(self.action_space.dtype))
        if not ok:
            raise ValueError(f"action {action!r} is outside the action space {self.action_space}; accepted: "
                             f"{self._action_help()}")
        return ints

    def _action_help(self) -> str:
        """What each action element means (the accepted part of the action error)."""
        return str(self.action_space)

    # ---------------------------------------------------------------- reset options
    def num_samples(self, split: str) -> int:
        raise NotImplementedError  # defined by each env

    def check_sample_id(self, sample_id: Any, split: str) -> int:
        """``sample_id`` as an int if it is a non-boolean integer naming a sample of ``split``."""
        return check_int("sample_id", sample_id, 0, self.num_samples(split), where=f"samples in split {split!r}")

    def _episode_budget(self, value: Any):
        """The budget a ``budget`` reset option asks for (parsed here: reset's boundary), in any form
        :func:`envs.budget.device_budget` accepts (``auto`` and fractions of this device's range too)."""
        return device_budget(value, self.achievable_range_ms, self.suggested_budget_ms)

    def _time_budget(self, budget) -> Budget:
        """The latency part of an episode budget (a KV budget also carries a cache cap)."""
        return budget

    def begin_episode(self, seed: int | None, options: dict | None, default_budget=None) -> EpisodeStart:
        """Validate ``options``, then seed and draw the episode's sample and budget.

        Every option is checked before the random generator or any episode state changes, so a
        reset that raises leaves the env as it was. Without ``sample_id`` a sample of the split is
        drawn from ``np_random``, then the budget (``default_budget``, the env's own by default) is
        sampled from it, in that order.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; accepted: {', '.join(RESET_OPTIONS)}")
        split = check_split(options.get("split", self.split))
        size = self.num_samples(split)
        sample_id = self.check_sample_id(options["sample_id"], split) if "sample_id" in options else None
        budget = self._episode_budget(options["budget"]) if "budget" in options else (
            self.budget if default_budget is None else default_budget)
        super().reset(seed=seed)
        if sample_id is None:
            sample_id = int(self.np_random.integers(size))
        return EpisodeStart(split, sample_id, budget, self._time_budget(budget).sample(self.np_random))

    # ---------------------------------------------------------------- observations
    @staticmethod
    def clip_observation(values, size: int | None = None, low=-OBS_CLIP, high=OBS_CLIP) -> np.ndarray:
        """``values`` as float32 clipped to ``[low, high]``, zero-padded to ``size`` when given."""
        values = np.clip(np.asarray(values, dtype=np.float32), low, high)
        if size is None:
            return values
        obs = np.zeros(size, dtype=np.float32)
        obs[: len(values)] = values
        return obs

    @staticmethod
    def _box(size: int) -> gym.spaces.Box:
        return gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(size,), dtype=np.float32)

    # ---------------------------------------------------------------- budgets
    def _reference_latencies(self) -> LatencyReference:
        raise NotImplementedError  # defined by each env

    @property
    def achievable_range_ms(self) -> tuple[float, float]:
        """Estimated latency of the cheapest configuration on the easiest typical input and of the
        dearest configuration on the hardest one, on this device."""
        ref = self._reference_latencies()
        top = ref.full if ref.dearest is None else ref.dearest
        return float(np.min(ref.cheapest)), float(np.max(top))

    @property
    def suggested_budget_ms(self) -> float:
        """A budget that binds on this backend and device: the one the out-of-range warning names.

        Halfway between the cheapest configuration's 95th-percentile latency and the full
        configuration's median latency over typical inputs: the full configuration does not fit a
        typical input, so a controller must give something up, while the cheapest still fits
        about 95% of inputs, so a budget-aware controller can keep violations rare. Not the
        middle of :attr:`achievable_range_ms`: its top is the dearest configuration on the hardest
        input, so its middle can sit above what the full configuration needs on most inputs,
        where no knob needs to be turned down (BENCHMARKS.md, "Agents", has the tiny model's
        figures). When the two leave no gap (long answers cost more than the whole knob range
        saves), the middle of the cheapest and the full configuration's medians.
        """
        ref = self._reference_latencies()
        low, high = float(np.percentile(ref.cheapest, 95)), float(np.median(ref.full))
        if low >= high:
            low = float(np.median(ref.cheapest))
        return 0.5 * (low + high)

    @property
    def suggested_budget_range_ms(self) -> tuple[float, float]:
        """A budget range for training one budget-conditioned controller on this backend and device.

        From the cheapest configuration's 75th-percentile latency over typical inputs (below it,
        a quarter of the inputs have no configuration that fits) to the full configuration's
        median (above it, most inputs need no knob turned down), so every budget inside binds on
        typical inputs. Not the 95th percentile as for :attr:`suggested_budget_ms`: inputs with
        long answers form a tail that can reach the full configuration's median and close the
        range. When even the 75th percentile does, the range starts at the cheapest
        configuration's median. :attr:`suggested_budget_ms` lies inside.
        """
        ref = self._reference_latencies()
        low, high = float(np.percentile(ref.cheapest, 75)), float(np.median(ref.full))
        if low >= high:
            low = float(np.median(ref.cheapest))
        return low, high

    def _budget_problems(self, budget) -> list[str]:
        """Further reasons ``budget`` cannot be met (a KV env checks its cache cap)."""
        return []

    def _warning_identity(self) -> str:
        """What makes two envs' budget warnings the same one (warned once per process)."""
        return ""

    def _warn_if_budget_unreachable(self, budget) -> None:
        """One warning per (env family, identity, budget) when ``budget`` lies outside the achievable range."""
        key = (type(self).__name__, self._warning_identity(), str(budget))
        if key in _WARNED:
            return
        lo, hi = self.achievable_range_ms
        time, measure = self._time_budget(budget), self.latency.measure
        prefix = "" if measure == "latency" else f"{measure} "
        problems = []
        if time.high_ms < lo:
            problems.append(f"{prefix}budget {time} is below the cheapest configuration's {measure}")
        elif time.low_ms > hi:
            problems.append(f"{prefix}budget {time} is above the most expensive configuration's {measure} "
                            "(it never binds)")
        problems += self._budget_problems(budget)
        if not problems:
            return
        _WARNED.add(key)
        low, high = self.suggested_budget_range_ms
        noise = self.latency.noise_description()
        warnings.warn(f"{'; '.join(problems)}: achievable {measure} range on this backend and device is "
                      f"{lo:.2f}ms..{hi:.2f}ms; choose a budget inside it, e.g. "
                      f"budget={_format_ms(self.suggested_budget_ms)}ms (one the full configuration misses on a "
                      f"typical input)"
                      + (f", or a range to train one controller for all of them, "
                         f"budget=[{_format_ms(low)}ms,{_format_ms(high)}ms]" if low < high else "")
                      + (f"; latency estimator {noise}" if noise else ""), stacklevel=3)
