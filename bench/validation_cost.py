"""Validation cost: what ``eval.validation_samples`` costs per validation of a GRPO run (MultiKnob-v0, tiny).

One validation runs the policy greedily on the first N validation samples at the run's budget. Its
cost is model runs: a (sample, configuration) pair runs once and is memoised by the env, so a
validation costs a fresh pass only for the configurations the policy newly chooses. This bench
times a fresh pass and a repeated (memoised) pass of the initial policy for each N. The latency
estimator does not change the model-run cost, so the analytic stand-in of the tests is used (no
profiling).

    python bench/validation_cost.py [--samples 24 96]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import torch

# The repository (not bench/, whose agents.py would shadow the package) and tests/ (the stand-in estimator).
REPO = Path(__file__).resolve().parent.parent
sys.path[0:1] = [str(REPO), str(REPO / "tests")]

import envs  # noqa: E402,F401
from agents import eval_sample_ids, evaluate_agent  # noqa: E402
from agents.grpo import GRPOAgent  # noqa: E402
from fake_latency import AnalyticEstimator  # noqa: E402
from backends.script_args import OneLineArgumentParser, at_least


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(1), nargs="+", default=[24, 96])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = gym.make("MultiKnob-v0", budget="1000ms", estimator=AnalyticEstimator())
    budget = probe.unwrapped.suggested_budget_ms
    agent = GRPOAgent.from_env(probe, config={}).freeze()
    for n in args.samples:
        env = gym.make("MultiKnob-v0", budget=f"{budget}ms", estimator=AnalyticEstimator())
        ids = eval_sample_ids(env, "validation", n)
        start = time.perf_counter()
        evaluate_agent(env, agent, ids, budget, "validation")
        fresh = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_agent(env, agent, ids, budget, "validation")
        repeat = time.perf_counter() - start
        print(f"validation_samples={n}: fresh pass {fresh:.1f} s, repeated pass (memoised) {repeat:.2f} s", flush=True)


if __name__ == "__main__":
    main()
