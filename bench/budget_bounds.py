"""What a controller can reach at each budget of the suggested range, relative to the oracle.

The oracle (``agents.baselines.OracleAgent``) picks, per input, the configuration with the highest
reward *on that very input*: it sees which configurations answer it correctly and how long its
answer turns out to be. A controller sees neither before it chooses. This bench runs every
configuration of ``MultiKnob-v0`` on the first ``--num-samples`` test inputs (the oracle's pass;
estimated latency, this device's cached estimator) and prints, at the low, middle and high
budget of the range the env's warning suggests (or ``--budget``'s range), each reference's mean
reward as a fraction of the oracle's:

- ``best static (hindsight)``: the one configuration with the highest mean reward over these
  inputs at this budget (a per-budget hand-tuned configuration, tuned on the test inputs);
- ``latency-clairvoyant bound``: per input, the configuration with the highest *mean* score over
  these inputs among those whose reward on this input's *actual* latency is best: it knows each
  input's latency exactly (answer length included) but not which configuration answers it
  correctly beyond the average. No controller that cannot see correctness in advance is expected to
  beat it by much;
- ``estimate-aware bound``: the same with the latency the estimator predicts from the input
  before running it (expected answer length), which is what the controller's features see.

    python bench/budget_bounds.py [--num-samples 96] [--budget "[21ms,30ms]"]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs  # noqa: E402,F401
from envs.budget import Budget  # noqa: E402
from envs.reward import compute_rewards  # noqa: E402
from backends.script_args import OneLineArgumentParser, at_least


def outcome_table(env, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[inputs, configurations]`` scores, actual (estimated-mode) latencies and pre-run estimates."""
    actions = np.stack(np.meshgrid(*[np.arange(n) for n in env.action_space.nvec], indexing="ij"), -1)
    actions = actions.reshape(-1, len(env.action_space.nvec))
    scores, latencies, estimates = [], [], []
    for sample_id in range(num_samples):
        _, infos = env.evaluate_group(sample_id, 1000.0, actions, "test")
        scores.append([i["score"] for i in infos])
        latencies.append([i["latency_ms"] for i in infos])
        estimates.append(env.estimated_latency_ms(sample_id, actions, "test"))
    return np.array(scores), np.array(latencies), np.array(estimates, dtype=np.float64)


def bounds(scores: np.ndarray, latencies: np.ndarray, estimates: np.ndarray, budget_ms: float, reward_config) -> dict:
    """Mean rewards of the oracle and of the references in the module docstring at one budget."""
    budgets = np.full_like(latencies, budget_ms)
    rewards, _ = compute_rewards(scores, latencies, budgets, reward_config)
    mean_score = scores.mean(axis=0)
    rows = np.arange(len(scores))

    def per_input(latency_seen: np.ndarray) -> float:
        expected, _ = compute_rewards(np.broadcast_to(mean_score, scores.shape), latency_seen, budgets, reward_config)
        return float(rewards[rows, expected.argmax(axis=1)].mean())

    return {"oracle": float(rewards.max(axis=1).mean()), "best static (hindsight)": float(rewards.mean(axis=0).max()),
            "latency-clairvoyant bound": per_input(latencies), "estimate-aware bound": per_input(estimates),
            "cheapest configuration violates": float((latencies[:, 0] > budget_ms).mean())}


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=at_least(1), default=96)
    parser.add_argument("--budget", default=None, help="a range; default: the env warning's suggested range")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("MultiKnob-v0", budget="1000ms", split="test").unwrapped
    if args.budget is None:
        low, high = env.suggested_budget_range_ms
        budget = Budget.parse(f"[{low:.0f}ms,{high:.0f}ms]")
    else:
        budget = Budget.parse(args.budget)
    scores, latencies, estimates = outcome_table(env, args.num_samples)
    print(f"MultiKnob-v0, tiny backend, {args.num_samples} test inputs x {scores.shape[1]} configurations; "
          f"range {budget}; rewards as a fraction of the oracle's")
    for budget_ms in budget.evaluation_budgets():
        row = bounds(scores, latencies, estimates, budget_ms, env.reward_config)
        oracle = row.pop("oracle")
        violates = row.pop("cheapest configuration violates")
        print(f"{budget_ms:6.1f} ms  oracle reward {oracle:.3f}  " + "  ".join(
            f"{name} {value / oracle:.3f}" for name, value in row.items())
              + f"  (cheapest configuration violates on {violates:.0%} of inputs)")


if __name__ == "__main__":
    main()
