"""Env overhead: one MultiKnob-v0 episode versus the bare backend calls for the same configuration.

Two measurements in one run, memoisation cleared so every episode really runs the model:

- instrumented: within each env episode, the time spent inside the backend's stage calls versus
  the whole episode (same run, so machine noise cancels); overhead = episode / backend - 1;
- side by side: the episode versus the bare backend calls for the same (sample, configuration),
  alternating which goes first.

Prints medians of both.

    python bench/env_overhead.py [--episodes 40] [--budget 120ms]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the ids)
from backends.script_args import OneLineArgumentParser, at_least


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=at_least(0), default=40)
    parser.add_argument("--budget", default="120ms")
    parser.add_argument("--seed", type=at_least(0), default=0)
    args = parser.parse_args()

    env = gym.make("MultiKnob-v0", budget=args.budget, split="test").unwrapped
    backend, space = env.backend, env.space
    rng = np.random.default_rng(args.seed)
    n = len(backend.samples("test"))
    for _ in range(3):  # warm-up of both paths
        env.reset(options={"sample_id": 0}); env.step([2, 4, 4]); env.step([2, 4, 4])
        backend.run(backend.sample("test", 0), space.full())
    inside = {"ms": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                inside["ms"] += (time.perf_counter_ns() - t0) / 1e6
        return wrapper

    stage1, stage2 = backend.run_stage1, backend.run_stage2
    env_ms, bare_ms, inner_ratio = [], [], []
    for i in range(args.episodes):
        sid = int(rng.integers(n))
        action = [int(rng.integers(v)) for v in env.action_space.nvec]
        knobs = env.action_to_knobs(action)
        sample = backend.sample("test", sid)

        def run_env():
            env.clear_run_cache()
            inside["ms"] = 0.0
            backend.run_stage1, backend.run_stage2 = timed(stage1), timed(stage2)
            try:
                t0 = time.perf_counter_ns()
                env.reset(options={"sample_id": sid})
                env.step(action)
                env.step(action)
                total = (time.perf_counter_ns() - t0) / 1e6
            finally:
                del backend.run_stage1, backend.run_stage2
            inner_ratio.append(total / inside["ms"])
            return total

        def run_bare():
            t0 = time.perf_counter_ns()
            state = stage1(sample, knobs.tier, knobs.token_budget)
            stage2(state, knobs)
            return (time.perf_counter_ns() - t0) / 1e6

        first, second = (run_env, run_bare) if i % 2 == 0 else (run_bare, run_env)
        a, b = first(), second()
        (env_ms if first is run_env else bare_ms).append(a)
        (bare_ms if first is run_env else env_ms).append(b)
    env_med, bare_med = statistics.median(env_ms), statistics.median(bare_ms)
    ratios = [e / b for e, b in zip(env_ms, bare_ms)]
    print(f"episodes: {args.episodes} (MultiKnob-v0, estimated latency, budget {args.budget})")
    print(f"median episode (env):          {env_med:8.2f} ms")
    print(f"median bare backend calls:     {bare_med:8.2f} ms")
    print(f"overhead, instrumented (episode / backend time in it - 1): "
          f"{100 * (statistics.median(inner_ratio) - 1):+.1f}%  (target < 5%)")
    print(f"overhead, side by side (median of per-pair ratios - 1): {100 * (statistics.median(ratios) - 1):+.1f}%")


if __name__ == "__main__":
    main()
