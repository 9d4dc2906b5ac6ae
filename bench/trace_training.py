"""Trace training: the same GRPO training online (the live tiny model) and from a trace of the same samples.

Records a trace of the first ``--train`` training samples and ``--test`` test samples (the whole
knob grid, with this device's cached latency estimator), then trains GRPO twice with the same seed
and options, drawing from the same training samples: once on the live backend, once on the trace;
both policies are evaluated on the same test samples (live, and replayed). Prints the recording
time, both training times and their ratio, both policies' test reward and score, and a paired
bootstrap 95% interval of the reward difference (trace minus online, resampling test samples):
an interval holding 0 means the two policies are equal within the test set's noise.

    python -m bench.trace_training [--train 16] [--test 32] [--updates 4] [--batch 8] [--trace runs/traces/bench-tt.trace]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs  # noqa: F401
from agents import FitContext, evaluate_agent, make_agent
from backends.script_args import OneLineArgumentParser, at_least
from backends.registry import load_backend
from backends.trace import TraceBackend, record_trace
from latency_model import get_estimator


def train_and_test(env, options: dict, pool: int, test_ids: list[int], budget_ms: float) -> tuple[float, dict]:
    agent = make_agent("grpo", env, **options)
    start = time.perf_counter()
    agent.fit(env, FitContext(split="train", sample_pool=pool))
    seconds = time.perf_counter() - start
    return seconds, evaluate_agent(env, agent.freeze(), test_ids, budget_ms, "test")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of ``mean(b - a)`` over resamplings of the paired samples."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(len(diff), size=(draws, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=at_least(1), default=16, help="training samples (the split's first N)")
    parser.add_argument("--test", type=at_least(1), default=32, help="test samples")
    parser.add_argument("--updates", type=at_least(1), default=4, help="GRPO updates")
    parser.add_argument("--batch", type=at_least(1), default=8, help="groups per update")
    parser.add_argument("--trace", default="runs/traces/bench-trace-training.trace")
    args = parser.parse_args()

    backend = load_backend("tiny")
    path = Path(args.trace)
    estimator_file = path.with_suffix(".estimator.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    get_estimator(backend).save(estimator_file)
    start = time.perf_counter()
    record_trace(backend, path, split="train", sample_ids=range(args.train), estimator_file=estimator_file)
    record_trace(backend, path, split="test", sample_ids=range(args.test), estimator_file=estimator_file)
    record_seconds = time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = gym.make("MultiKnob-v0", backend="tiny", budget="120ms")
        budget_ms = round(live.unwrapped.suggested_budget_ms, 1)
        live = gym.make("MultiKnob-v0", backend="tiny", budget=f"{budget_ms}ms")
        replay = gym.make("MultiKnob-v0", backend=TraceBackend(path), budget=f"{budget_ms}ms")
    options = {"total_updates": args.updates, "batch_size": args.batch, "num_generations": 8, "seed": 0}
    test_ids = list(range(args.test))
    live_seconds, live_result = train_and_test(live, options, args.train, test_ids, budget_ms)
    trace_seconds, trace_result = train_and_test(replay, options, args.train, test_ids, budget_ms)
    same = [a["knobs"] == b["knobs"] for a, b in zip(live_result["infos"], trace_result["infos"])]
    print(f"# trace_training: GRPO {args.updates} updates x {args.batch} groups x 8, {args.train} training samples, "
          f"{args.test} test samples, budget {budget_ms}ms")
    print(f"record the trace (train + test samples x {len(TraceBackend(path).configs)} configurations): "
          f"{record_seconds:.1f} s")
    print(f"train online: {live_seconds:.1f} s; train from the trace: {trace_seconds:.1f} s; ratio "
          f"{live_seconds / max(trace_seconds, 1e-9):.1f}x")
    for name, result in (("online", live_result), ("trace", trace_result)):
        print(f"{name:7s} policy on the test samples: reward {result['reward']:.3f}, score {result['score']:.3f}, "
              f"violations {result['violation_rate']:.1%}")
    print(f"same test-sample knobs chosen by both policies: {np.mean(same):.0%}")
    rewards = [np.array([i["reward"] for i in result["infos"]]) for result in (live_result, trace_result)]
    low, high = paired_bootstrap(*rewards)
    print(f"test reward, trace minus online: {np.mean(rewards[1] - rewards[0]):+.3f}, paired bootstrap 95% interval "
          f"[{low:+.3f}, {high:+.3f}] ({'holds 0: equal within noise' if low <= 0 <= high else 'excludes 0'})")


if __name__ == "__main__":
    main()
