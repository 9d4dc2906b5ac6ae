"""Group sharing: ``evaluate_group`` with G actions versus G separate episodes.

Each round draws a sample and G random actions (tiers drawn like a policy early in training:
uniformly), times the group call and the G separate episodes on fresh caches, alternating
which goes first. Prints medians and the ratio (target: at most 0.6).

    python bench/group_sharing.py [--rounds 15] [--group 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

import envs  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--budget", default="120ms")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = gym.make("MultiKnob-v0", budget=args.budget, split="test").unwrapped
    rng = np.random.default_rng(args.seed)
    n = len(env.backend.samples("test"))
    budget_ms = env.budget.fixed_ms
    env.evaluate_group(0, budget_ms, [[2, 4, 4]] * 2)  # warm-up
    group_ms, separate_ms = [], []
    for r in range(args.rounds):
        sid = int(rng.integers(n))
        actions = [[int(rng.integers(v)) for v in env.action_space.nvec] for _ in range(args.group)]

        def grouped():
            env.clear_run_cache()
            t0 = time.perf_counter_ns()
            rewards, _ = env.evaluate_group(sid, budget_ms, actions)
            return (time.perf_counter_ns() - t0) / 1e6, rewards

        def separate():
            rewards = []
            t0 = time.perf_counter_ns()
            for a in actions:
                env.clear_run_cache()
                env.reset(options={"sample_id": sid, "budget": args.budget})
                env.step(a)
                rewards.append(env.step(a)[1])
            return (time.perf_counter_ns() - t0) / 1e6, np.array(rewards)

        if r % 2 == 0:
            (g, rg), (s, rs) = grouped(), separate()
        else:
            (s, rs), (g, rg) = separate(), grouped()
        assert np.allclose(rg, rs), "group rewards must equal separate episodes"
        group_ms.append(g)
        separate_ms.append(s)
    ratio = statistics.median(g / s for g, s in zip(group_ms, separate_ms))
    print(f"rounds: {args.rounds}, G = {args.group} (MultiKnob-v0, uniform random actions)")
    print(f"median evaluate_group:       {statistics.median(group_ms):8.1f} ms")
    print(f"median {args.group} separate episodes: {statistics.median(separate_ms):8.1f} ms")
    print(f"ratio (median per round):    {ratio:.2f}  (target <= 0.6)")


if __name__ == "__main__":
    main()
