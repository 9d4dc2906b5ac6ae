"""``grpo_lm`` beside ``grpo`` on the table stand-in backend (tests/table_backend.py).

Trains both agents on ``MultiKnob-v0`` over the table backend (``violation_penalty=1``, exact
latency ``TableLatency``) at a fixed budget and over a budget range, evaluates each on the first 96
test samples at the budget's evaluation points beside the oracle, and prints reward, score,
violation rate, p50 latency, the share of the oracle's reward and the fit's wall-clock seconds.

    PYTHONPATH=tests python -m bench.grpo_lm_table [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import gymnasium as gym
import torch

import agents
import envs  # noqa: F401  (registers the env ids)
from agents import evaluate_agent
from envs.protocols import group_env
from table_backend import TableBackend, TableLatency
from backends.script_args import OneLineArgumentParser, at_least

SETTINGS = (  # (budget, agent, updates)
    ("35ms", "grpo", 100), ("35ms", "grpo_lm", 60),
    ("[20ms,50ms]", "grpo", 400), ("[20ms,50ms]", "grpo_lm", 120),
)


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=at_least(0), nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = list(range(96))
    print(f"{'budget':>12} {'agent':>8} {'seed':>4} {'updates':>7} {'fit s':>6} {'eval ms':>7} {'reward':>7} "
          f"{'score':>6} {'viol%':>6} {'p50 ms':>6} {'% oracle':>8}")
    for budget, name, updates in SETTINGS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            env = gym.make("MultiKnob-v0", backend=TableBackend(), budget=budget, estimator=TableLatency(),
                           violation_penalty=1.0)
        oracle = agents.make_agent("oracle", env)
        print(f"{budget:>12} {'oracle':>8} rewards at " + " / ".join(
            f"{b:g}ms {evaluate_agent(env, oracle, ids, b, 'test')['reward']:.3f}"
            for b in group_env(env).budget.evaluation_budgets()), flush=True)
        for seed in args.seeds:
            agent = agents.make_agent(name, env, total_updates=updates, seed=seed)
            start = time.perf_counter()
            agent.fit(env)
            fit_s = time.perf_counter() - start
            agent.freeze()
            for b in group_env(env).budget.evaluation_budgets():
                mine, best = evaluate_agent(env, agent, ids, b, "test"), evaluate_agent(env, oracle, ids, b, "test")
                print(f"{budget:>12} {name:>8} {seed:>4} {updates:>7} {fit_s:6.1f} {b:7.1f} {mine['reward']:7.3f} "
                      f"{mine['score']:6.3f} {100 * mine['violation_rate']:6.1f} {mine['latency_p50_ms']:6.1f} "
                      f"{100 * mine['reward'] / best['reward']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
