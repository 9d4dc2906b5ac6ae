"""Device transfer by re-profiling only: a GRPO controller trained against one device's latency, evaluated
on another's with that device's estimator swapped in, beside a controller trained on the target.

Two devices: the tiny model's latency profile in fp32 (the source, this device's cached estimator)
and in ``--target-precision`` (the target, e.g. bf16 on this CPU: ``python -m latency_model profile
backend=tiny backend.precision=bf16`` caches it). Only the latency moves: every env runs the fp32
model, so answers and scores are the same on both devices and the comparison isolates latency. Trains GRPO twice with the same seed and options, over each device's
suggested budget range: on the source and on the target. Then, at three budgets of the target's
range (its low end, middle and high end), on ``--test`` test samples:

- transferred: the source-trained policy acting with the target's estimator (``evaluate.py
  latency.profile=<target estimator>``), charged the target's latency;
- trained on the target: the target-trained policy, same charging;
- untransferred: the source-trained policy acting with the source's estimator (its observations
  and GRPO's latency features as on the source), charged the target's latency.

Prints each one's reward, score and violations per budget, and transferred / trained-on-target reward.
Both envs share one stage runner (the same model, so the same outcomes): no model run is repeated.

    python -m bench.device_transfer [--test 300] [--updates 40] [--batch 16] [--pool 128] [--target-precision bf16]
"""

from __future__ import annotations

import argparse
import time
import warnings

import gymnasium as gym
import numpy as np

import envs  # noqa: F401
from agents import FitContext, evaluate_agent, make_agent, run_episode
from backends.script_args import OneLineArgumentParser, at_least
from backends.registry import load_backend
from latency_model import get_estimator


def trajectory_of(env, knobs: dict) -> list[int]:
    """The head indices of ``knobs`` in MultiKnob-v0's action layout."""
    base = env.unwrapped
    return [base._tiers.index(knobs["tier"]), *(list(values).index(knobs[name]) for name, values in base._stage2_knobs)]


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=at_least(1), default=300, help="test samples per budget")
    parser.add_argument("--updates", type=at_least(1), default=40, help="GRPO updates per training")
    parser.add_argument("--batch", type=at_least(1), default=16, help="groups per update")
    parser.add_argument("--pool", type=at_least(1), default=128, help="training samples (the train split's first N)")
    parser.add_argument("--target-precision", default="bf16")
    args = parser.parse_args()

    backend = load_backend("tiny")  # fp32: the model every env runs
    source_estimator = get_estimator(backend, profile_if_missing=False)
    target_estimator = get_estimator(load_backend("tiny", precision=args.target_precision), profile_if_missing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = {name: gym.make("MultiKnob-v0", backend=backend, estimator=est, budget="120ms").unwrapped
                 for name, est in (("source", source_estimator), ("target", target_estimator))}
        ranges = {name: env.suggested_budget_range_ms for name, env in probe.items()}
        envs_ = {name: gym.make("MultiKnob-v0", backend=backend, estimator=est,
                                budget=f"[{ranges[name][0]:.1f}ms,{ranges[name][1]:.1f}ms]")
                 for name, est in (("source", source_estimator), ("target", target_estimator))}
    envs_["target"].unwrapped.runner = envs_["source"].unwrapped.runner  # same model: share its memoised runs
    options = {"total_updates": args.updates, "batch_size": args.batch, "num_generations": 8, "seed": 0}
    trained, seconds = {}, {}
    for name, env in envs_.items():
        start = time.perf_counter()
        trained[name] = make_agent("grpo", env, **options)
        trained[name].fit(env, FitContext(split="train", sample_pool=args.pool))
        trained[name] = trained[name].freeze()
        seconds[name] = time.perf_counter() - start
    lo, hi = ranges["target"]
    budgets = [round(lo, 1), round(0.5 * (lo + hi), 1), round(hi, 1)]
    test_ids = list(range(args.test))
    source, target = envs_["source"], envs_["target"]
    print(f"# device_transfer: tiny model, source = fp32 latency, target = {args.target_precision} latency; GRPO "
          f"{args.updates} updates x {args.batch} groups x 8 on {args.pool} training samples; {args.test} test samples")
    print(f"source range {ranges['source'][0]:.1f}..{ranges['source'][1]:.1f}ms, target range {lo:.1f}..{hi:.1f}ms; "
          f"training {seconds['source']:.0f} s (source), {seconds['target']:.0f} s (target)")
    print("| budget (target) | policy | reward | score | violations |")
    print("| --- | --- | --- | --- | --- |")
    for budget in budgets:
        moved = evaluate_agent(target, trained["source"], test_ids, budget, "test")
        native = evaluate_agent(target, trained["target"], test_ids, budget, "test")
        stale = []  # the source policy choosing as on the source, charged the target's latency
        for sid in test_ids:
            info = run_episode(source, trained["source"], sid, budget, "test")
            rewards, infos = target.unwrapped.evaluate_group(sid, budget, [trajectory_of(source, info["knobs"])], "test")
            stale.append({**infos[0], "reward": float(rewards[0])})
        rows = (("transferred (re-profiled)", moved), ("trained on the target", native),
                ("untransferred (source estimator)", {"reward": np.mean([i["reward"] for i in stale]),
                                                      "score": np.mean([i["score"] for i in stale]),
                                                      "violation_rate": np.mean([i["violated"] for i in stale])}))
        for name, row in rows:
            print(f"| {budget:g}ms | {name} | {row['reward']:.3f} | {row['score']:.3f} | {row['violation_rate']:.1%} |")
        print(f"| {budget:g}ms | transferred / trained on the target (reward) | "
              f"{moved['reward'] / native['reward']:.3f} | | |")


if __name__ == "__main__":
    main()
