"""Benchmark: accuracy and latency per decoding strategy on the shipped tiny pair, and the decoding
latency estimator's held-out accuracy.

    python bench/decoding.py [--samples 64] [--repeats 3] [--threads 1] [--backend-preset tiny-decoding]

For every distinct configuration of the backend's decoding space: exact-match accuracy on the
first ``--samples`` test questions, the median over questions of the per-question median of
``--repeats`` timed runs (wall clock, and CPU time of this process, which a shared machine
inflates less), both as a ratio to plain greedy decoding, mean generated tokens, and for
speculative decoding the acceptance rate and accepted draft tokens per target pass. Then the
held-out report of the cached decoding estimator (profiled once if missing: ``$KNOBGYM_CACHE``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.script_args import OneLineArgumentParser, at_least  # noqa: E402  (after the path insert: run as a file)


def time_run(backend, sample, knobs, repeats: int):
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time_ns(), time.perf_counter_ns()
        out = backend.run(sample, knobs)
        wall.append((time.perf_counter_ns() - w0) / 1e6)
        cpu.append((time.process_time_ns() - c0) / 1e6)
    return float(np.median(wall)), float(np.median(cpu)), out


def main(argv: list[str] | None = None) -> None:
    import torch
    import yaml

    from backends.decoding import DecodingBackend
    from backends.registry import load_backend
    from backends.tiny_lm.evaluate import label, uses_draft
    from latency_model.decoding import get_decoding_estimator, held_out_report

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--backend-preset", default="tiny-decoding", help="a conf/backend/*decoding*.yaml name")
    args = parser.parse_args(argv)
    for name in ("samples", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid; accepted: an integer >= 1")
    torch.set_num_threads(args.threads)
    preset = Path(__file__).resolve().parents[1] / "conf" / "backend" / f"{args.backend_preset}.yaml"
    if not preset.is_file():
        raise ValueError(f"--backend-preset={args.backend_preset!r} is invalid; accepted: a file name in conf/backend")
    backend = load_backend(yaml.safe_load(preset.read_text()))
    if not isinstance(backend, DecodingBackend):
        raise ValueError(f"--backend-preset={args.backend_preset!r} is not a decoding backend; accepted: a "
                         f"conf/backend/*decoding*.yaml name")
    samples = list(backend.samples("test")[: args.samples])
    configs = backend.knob_space.configurations()
    for k in configs[:3]:  # warm-up
        backend.run(samples[0], k)
    rows = []
    for k in configs:
        timed = [time_run(backend, s, k, args.repeats) for s in samples]
        outs = [t[2] for t in timed]
        row = {"config": label(k), "accuracy": np.mean([o.score for o in outs]),
               "wall_ms": np.median([t[0] for t in timed]), "cpu_ms": np.median([t[1] for t in timed]),
               "new_tokens": np.mean([o.new_tokens for o in outs]), "target_passes": np.mean([o.target_passes for o in outs])}
        if uses_draft(k):
            row["acceptance"] = np.mean([o.acceptance_rate for o in outs])
            row["accepted_per_pass"] = np.mean([o.accepted_per_pass for o in outs])
        rows.append(row)
        print(f"  {row['config']}: acc {row['accuracy']:.3f} wall {row['wall_ms']:.1f} ms", file=sys.stderr, flush=True)
    base = next(r for r in rows if r["config"] == "greedy")
    print(f"backend {backend.identity().get('name')}, {len(samples)} test questions, {args.repeats} repeats, "
          f"torch threads {args.threads}, device {backend.device}\n")
    print("| configuration | accuracy | wall ms (median) | x greedy | CPU ms (median) | x greedy | new tokens "
          "| target passes | acceptance | accepted / pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        acc = f"{r['acceptance']:.2f}" if "acceptance" in r else ""
        per = f"{r['accepted_per_pass']:.2f}" if "accepted_per_pass" in r else ""
        print(f"| {r['config']} | {r['accuracy']:.3f} | {r['wall_ms']:.1f} | {r['wall_ms'] / base['wall_ms']:.2f} "
              f"| {r['cpu_ms']:.1f} | {r['cpu_ms'] / base['cpu_ms']:.2f} | {r['new_tokens']:.2f} "
              f"| {r['target_passes']:.2f} | {acc} | {per} |")
    estimator = get_decoding_estimator(backend)
    print("\nDecoding latency estimator, held-out questions (profile clock: "
          f"{estimator.profile['clock']}):\n")
    print(held_out_report(estimator.profile).as_markdown())


if __name__ == "__main__":
    main()
