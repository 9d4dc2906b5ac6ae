"""Replay throughput: batched trace replay versus live MultiKnob-v0 episodes, on one CPU core.

Records (or reuses) a trace of the tiny backend over ``--samples`` test samples and the whole
knob grid, then times ``BatchedReplay.step`` on batches of random (sample, action, budget)
rows, and live episodes of the same env for the ratio. Pinned to one core.

    python bench/replay_throughput.py [--samples 24] [--batch 100000] [--trace runs/traces/tiny-test.trace]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs  # noqa: F401
from backends.script_args import OneLineArgumentParser, at_least
from backends.registry import load_backend
from backends.trace import TraceBackend, record_trace
from envs.replay import BatchedReplay
from latency_model import get_estimator


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(1), default=24)
    parser.add_argument("--batch", type=at_least(1), default=100_000)
    parser.add_argument("--repeats", type=at_least(1), default=15)
    parser.add_argument("--trace", default="runs/traces/tiny-test.trace")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    backend = load_backend("tiny")
    estimator = get_estimator(backend)
    path = Path(args.trace)
    estimator_file = path.with_suffix(".source-estimator")
    path.parent.mkdir(parents=True, exist_ok=True)
    estimator.save(estimator_file)
    t0 = time.perf_counter()
    record_trace(backend, path, split="test", sample_ids=range(args.samples), estimator_file=estimator_file)
    print(f"trace: {path} ({args.samples} samples x full grid; record/resume took {time.perf_counter() - t0:.1f} s)")

    trace = TraceBackend(path)
    replay = BatchedReplay(trace, split="test")
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("MultiKnob-v0", backend=backend, split="test", budget="[20ms,80ms]").unwrapped
    nvec = env.action_space.nvec
    batch_s = []
    for _ in range(args.repeats):
        rows = rng.integers(replay.num_samples, size=args.batch)
        actions = np.stack([rng.integers(n, size=args.batch) for n in nvec], axis=1)
        budgets = rng.uniform(20, 80, size=args.batch)
        t0 = time.perf_counter_ns()
        replay.step(rows, actions, budgets)
        batch_s.append((time.perf_counter_ns() - t0) / 1e9)
    live_s = []
    for i in range(10):
        env.clear_run_cache()
        action = [int(rng.integers(n)) for n in nvec]
        t0 = time.perf_counter_ns()
        env.reset(options={"sample_id": i % args.samples})
        env.step(action)
        env.step(action)
        live_s.append((time.perf_counter_ns() - t0) / 1e9)
    replay_rate = args.batch / statistics.median(batch_s)
    live_rate = 1 / statistics.median(live_s)
    print(f"batched replay: {replay_rate:,.0f} episodes/s (median of {args.repeats} batches of {args.batch:,}; "
          f"target >= 100,000 on one core)")
    print(f"live episodes:  {live_rate:,.1f} episodes/s (median of 10)")
    print(f"replay / live:  {replay_rate / live_rate:,.0f}x")


if __name__ == "__main__":
    main()
