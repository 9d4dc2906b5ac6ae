"""Scaling: trace recording on 1 and 2 Ray workers, Ray's overhead per GRPO group, and group sharing.

1. **Trace recording throughput** (samples/s) of the shipped tiny model over ``--samples`` test
   samples and ``--configs`` configurations of the trace grid: in this process, and sharded over
   Ray actors with 1 and 2 workers (one torch thread each). Steady state: the actors are started
   and have loaded the model before the clock starts (their start-up is printed separately).
2. **Ray overhead per group**: GRPO's group collection (G = ``--group``) on the tiny model with
   this device's cached latency estimator, ``--groups`` groups per update, in this process versus
   one Ray actor. Stage runs are memoised by a first pass on both sides, so the difference is what
   Ray adds (shipping weights and requests, results back), not model time. Median over
   ``--repeats`` updates, per group.
3. **Parallel capacity of this machine** (a control): the throughput ratio of two CPU-bound
   Python processes to one. On a shared VM whose other tenants use a core, this caps item 1.
4. **Group sharing**, batched versus unbatched stage 2: ``evaluate_group`` with G actions versus G
   separate episodes, timed side by side (``bench/group_sharing.py``: :func:`measure_group_sharing`).

    python bench/scale.py [--samples 12] [--configs 12] [--groups 16] [--group 8] [--rounds 15]

Needs the Ray extra (``pip install -e '.[ray]'``); starts a local Ray instance with 2 CPUs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import agents  # noqa: E402
import envs  # noqa: E402,F401
from agents.base import EnvLayout  # noqa: E402
from agents.rollout import GroupRequest, LocalGroupCollector, RayGroupCollector, group_seed  # noqa: E402
from backends.script_args import OneLineArgumentParser, at_least
from backends.registry import load_backend  # noqa: E402
from bench.group_sharing import measure_group_sharing  # noqa: E402
from backends.trace import _DescribeTask, _SampleTask, _trace_work, trace_grid  # noqa: E402
from executors import LocalExecutor  # noqa: E402
from executors.ray import RayExecutor, require_ray  # noqa: E402

SPEC = {"name": "tiny"}


def trace_throughput(executor, samples: int, configs: list, repeats: int = 1) -> tuple[float, float]:
    """(samples per second in steady state, seconds to start the workers and load the model)."""
    start = time.perf_counter()
    pool = executor.pool(functools.partial(load_backend, SPEC), _trace_work, gpus=True)
    list(pool.map([_DescribeTask("test", tuple(configs))]))  # every worker is up once this returns...
    list(pool.map([_SampleTask("test", i, tuple(enumerate(configs))) for i in range(pool.workers)]))  # ...and warm
    startup = time.perf_counter() - start
    tasks = [_SampleTask("test", i, tuple(enumerate(configs))) for i in range(samples)]
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in pool.map(tasks):
            pass
        rates.append(samples / (time.perf_counter() - t0))
    pool.close()
    return statistics.median(rates), startup


def ray_overhead_per_group(groups: int, group: int, repeats: int) -> dict:
    """Median per-group collection time (ms) in this process and on one Ray actor, memoised runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        env = gym.make("MultiKnob-v0", backend="tiny", budget="90ms")
    agent = agents.make_agent("grpo", env, num_generations=group, batch_size=groups, seed=0)
    requests = [GroupRequest(i, 90.0, "train", group_seed(0, 0, i)) for i in range(groups)]
    local = LocalGroupCollector(EnvLayout(env), agent)
    remote = RayGroupCollector(env, agent, RayExecutor(workers=1))
    out = {}
    for name, collector in (("local", local), ("ray, 1 worker", remote)):
        collector.collect(requests)  # memoise every stage run on this side
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            collector.collect(requests)
            times.append((time.perf_counter() - t0) * 1e3 / groups)
        out[name] = statistics.median(times)
        collector.close()
    return out


def _spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def parallel_capacity(n: int = 20_000_000) -> float:
    """Throughput of two busy processes relative to one (2.0: two free cores)."""
    import multiprocessing

    def run(k: int) -> float:
        procs = [multiprocessing.Process(target=_spin, args=(n,)) for _ in range(k)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return time.perf_counter() - t0

    return 2 * run(1) / run(2)


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(1), default=12)
    parser.add_argument("--configs", type=at_least(1), default=12)
    parser.add_argument("--groups", type=at_least(1), default=16)
    parser.add_argument("--group", type=at_least(1), default=8)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--rounds", type=at_least(1), default=15)
    args = parser.parse_args()
    ray = require_ray()
    torch.set_num_threads(1)
    grid = trace_grid(load_backend(SPEC).knob_space)
    configs = grid[:: max(1, len(grid) // args.configs)][: args.configs]

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        print(f"## trace recording: tiny model, {args.samples} test samples x {len(configs)} configurations")
        rates = {}
        for name, executor in (("in process", LocalExecutor()), ("ray, 1 worker", RayExecutor(workers=1)),
                               ("ray, 2 workers", RayExecutor(workers=2))):
            rates[name], startup = trace_throughput(executor, args.samples, configs)
            print(f"{name:16s} {rates[name]:6.2f} samples/s   (start-up {startup:5.1f} s)")
        print(f"speed-up, 2 workers / 1 worker: {rates['ray, 2 workers'] / rates['ray, 1 worker']:.2f}x "
              f"(target >= 1.6x)")
        print(f"control: 2 busy processes / 1 on this machine now: {parallel_capacity():.2f}x")

        print(f"\n## Ray overhead per group: G = {args.group}, {args.groups} groups per update, memoised runs")
        per_group = ray_overhead_per_group(args.groups, args.group, args.repeats)
        for name, ms in per_group.items():
            print(f"{name:16s} {ms:7.2f} ms per group (median of {args.repeats} updates)")
        print(f"overhead:        {per_group['ray, 1 worker'] - per_group['local']:7.2f} ms per group")
    finally:
        ray.shutdown()

    print(f"\n## group sharing: G = {args.group}, {args.rounds} rounds (evaluate_group / {args.group} episodes)")
    print(measure_group_sharing(rounds=args.rounds, group=args.group).report())

if __name__ == "__main__":
    main()
