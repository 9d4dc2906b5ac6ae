"""Benchmark: latency-estimator prediction throughput (10,000 configurations) and held-out accuracy.

    python bench/latency_estimator.py --csv PROFILE.csv           # fit on a profile CSV (no model load)
    python bench/latency_estimator.py --backend tiny [--threads 1] # cached estimator of a backend

Prints the median of repeated timings of ``estimator.predict`` on 10,000 random (configuration,
token counts) rows (target: under 50 ms on CPU), the split between feature building and the
regressor, the profile's repeat noise, and the held-out accuracy table of the profile the
estimator came from (the starred method is the one the stated selection rule chose).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.script_args import OneLineArgumentParser, at_least
from backends.knobs import KnobConfig  # noqa: E402
from backends.outcome import TokenCounts  # noqa: E402
from latency_model import cache_entry, fit_estimator, held_out_report, read_profile  # noqa: E402

TARGET_MS = 50.0


def random_rows(estimator, profile, n: int, seed: int) -> tuple[list[KnobConfig], list[TokenCounts]]:
    """``n`` configurations from the knob grid with token counts in the profile's ranges."""
    rng = np.random.default_rng(seed)
    space = estimator.features.knob_space
    grid = list(space.grid(token_budgets=True))
    configs = [grid[i] for i in rng.integers(len(grid), size=n)]
    prompt = profile.column("prompt_tokens")
    new = profile.column("new_tokens")
    full = int(profile.column("vision_tokens_full").max())
    prompts = rng.integers(prompt.min(), prompt.max() + 1, size=n)
    news = rng.integers(new.min(), new.max() + 1, size=n)
    counts = [TokenCounts(int(p), full, space.vision_tokens(c), int(k)) for c, p, k in zip(configs, prompts, news)]
    return configs, counts


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """Medians of (wall, process CPU) milliseconds of ``fn()`` over ``repeats`` calls after a warm-up call.

    CPU time is reported next to the wall clock because on a machine shared with other jobs the
    wall clock also counts time spent waiting for a core.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter_ns(), time.process_time_ns()
        fn()
        wall.append((time.perf_counter_ns() - t0) / 1e6)
        cpu.append((time.process_time_ns() - c0) / 1e6)
    return float(np.median(wall)), float(np.median(cpu))


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", help="profile CSV to fit on (skips loading a backend)")
    parser.add_argument("--backend", default="tiny", help="backend name when no --csv is given")
    parser.add_argument("--cache-dir", default=None, help="estimator cache directory")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads while profiling a backend")
    parser.add_argument("--rows", type=at_least(1), default=10_000, help="configurations per predict call")
    parser.add_argument("--repeats", type=at_least(1), default=21, help="timed predict calls")
    args = parser.parse_args()

    if args.csv:
        profile = read_profile(args.csv)
        estimator = fit_estimator(profile, source=args.csv)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from backends.registry import load_backend

        estimator, profile = cache_entry(load_backend(args.backend), args.cache_dir)
        if profile is None:
            raise SystemExit("error: the cached estimator has no profile beside it; run `python -m latency_model "
                             "profile backend=... force=true`")

    configs, counts = random_rows(estimator, profile, args.rows, seed=0)
    count_array = np.array([[c.prompt_tokens, c.vision_tokens_full, c.vision_tokens, c.new_tokens] for c in counts])
    features = estimator.features.compute(configs, counts)
    whole, whole_cpu = median_ms(lambda: estimator.predict(configs, counts), args.repeats)
    arrays, arrays_cpu = median_ms(lambda: estimator.predict(configs, count_array), args.repeats)
    build, build_cpu = median_ms(lambda: estimator.features.compute(configs, counts), args.repeats)
    regress, regress_cpu = median_ms(lambda: estimator.total.predict(features), args.repeats)
    print(f"estimator: {estimator.method}, fitted on {estimator.profile_rows} rows "
          f"({estimator.fingerprint.get('cpu')}, {estimator.fingerprint.get('torch_threads')} torch threads); "
          f"{estimator.noise.describe() if estimator.noise else 'noise not recorded'}")
    print(f"medians of {args.repeats} calls, wall / process CPU time, {args.rows} configurations per call:")
    print(f"  predict (TokenCounts objects): {whole:.2f} / {whole_cpu:.2f} ms = {1000 * whole / args.rows:.2f} us/row;"
          f" {whole / TARGET_MS:.2f}x of the {TARGET_MS:.0f} ms target (wall)")
    print(f"  predict ([N, 4] count array):  {arrays:.2f} / {arrays_cpu:.2f} ms")
    print(f"  feature building:              {build:.2f} / {build_cpu:.2f} ms")
    print(f"  regressor:                     {regress:.2f} / {regress_cpu:.2f} ms")
    print()
    print(held_out_report(profile).format())


if __name__ == "__main__":
    main()
