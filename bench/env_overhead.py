"""Env overhead: one MultiKnob-v0 episode versus the bare backend calls for the same configuration.

Both arms run the same (sample, configuration) pairs, interleaved in alternating order so drifts
in machine load hit both equally; memoisation is cleared so every episode really runs the
model. Prints per-arm medians and the overhead ratio.

    python bench/env_overhead.py [--episodes 40] [--budget 120ms]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--budget", default="120ms")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = gym.make("MultiKnob-v0", budget=args.budget, split="test").unwrapped
    backend, space = env.backend, env.space
    rng = np.random.default_rng(args.seed)
    n = len(backend.samples("test"))
    for _ in range(3):  # warm-up of both paths
        env.reset(options={"sample_id": 0}); env.step([2, 4, 4]); env.step([2, 4, 4])
        backend.run(backend.sample("test", 0), space.full())
    env_ms, bare_ms = [], []
    for i in range(args.episodes):
        sid = int(rng.integers(n))
        action = [int(rng.integers(v)) for v in env.action_space.nvec]
        knobs = env.action_to_knobs(action)
        sample = backend.sample("test", sid)

        def run_env():
            env.clear_run_cache()
            t0 = time.perf_counter_ns()
            env.reset(options={"sample_id": sid})
            env.step(action)
            env.step(action)
            return (time.perf_counter_ns() - t0) / 1e6

        def run_bare():
            t0 = time.perf_counter_ns()
            state = backend.run_stage1(sample, knobs.tier, knobs.token_budget)
            backend.run_stage2(state, knobs)
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
    print(f"overhead (median of per-pair ratios - 1): {100 * (statistics.median(ratios) - 1):+.1f}%  (target < 5%)")


if __name__ == "__main__":
    main()
