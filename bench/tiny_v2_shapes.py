"""Where the tiny v2 model's batch-1 latency comes from: FLOPs or per-op overhead.

    python bench/tiny_v2_shapes.py [--samples 6] [--repeats 5] [--threads 1]

Builds the v2 architecture (untrained: timing does not depend on the weights; every call decodes
exactly two tokens, the answer and ``<eos>``, as the trained model does on v2's one-word answers),
saves it to a temporary checkpoint and times it through the tiny backend's ``run`` (the latency
an env step measures: vision tower, prefill and decode, batch 1) for the full and the cheapest
configuration and each knob alone at its cheapest. Next to it the same architecture with every
width set to 8 (same blocks, experts and tokens, hence the same ops, almost no FLOPs): its time
is the per-op overhead, and ``overhead share`` = narrow / real time of the same configuration.
Medians over samples x repeats, all configurations and both models interleaved in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backends.script_args import OneLineArgumentParser, at_least
from backends.tiny import data_v2  # noqa: E402
from backends.tiny.backend import load_tiny_backend  # noqa: E402
from backends.tiny.evaluate import target_configs  # noqa: E402
from backends.tiny.model import build_image_processor, build_model, build_tokenizer  # noqa: E402
from backends.tiny.train_v2 import V2_SHAPE  # noqa: E402


def save_untrained(shape, out: Path, experts_implementation: str) -> Path:
    tokenizer = build_tokenizer(data_v2.vocabulary())
    model = build_model(tokenizer, shape, experts_implementation=experts_implementation)
    for part in (model, tokenizer, build_image_processor()):
        part.save_pretrained(out)
    return out


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=at_least(1), default=6)
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--experts-implementation", default="grouped_mm")
    args = p.parse_args(argv)
    if min(args.samples, args.repeats, args.threads) < 1:
        print("--samples, --repeats and --threads must be >= 1", file=sys.stderr)
        sys.exit(2)
    narrow = dataclasses.replace(V2_SHAPE, hidden_size=8, expert_size=8, vision_hidden=8, num_heads=2, vision_heads=2)
    with tempfile.TemporaryDirectory() as tmp:
        backends = {name: load_tiny_backend(str(save_untrained(shape, Path(tmp) / name, args.experts_implementation)),
                                            generation={"max_new_tokens": 2, "min_new_tokens": 2},
                                            num_threads=args.threads)
                    for name, shape in (("real", V2_SHAPE), ("narrow", narrow))}
        space = backends["real"].knob_space
        rows = target_configs(space)
        samples = list(backends["real"].samples("test")[:args.samples])
        times = {(m, name): [] for m in backends for name, _ in rows}
        with torch.no_grad():
            for _ in range(args.repeats + 1):  # the first round warms up
                for s in samples:
                    for m, backend in backends.items():
                        for name, knobs in rows:
                            times[(m, name)].append(backend.run(s, knobs).measured_ms)
    print(f"shape {V2_SHAPE}\nexperts {args.experts_implementation} | threads {args.threads} | "
          f"{args.samples} samples x {args.repeats} repeats (+1 warm-up round)")
    med = {k: statistics.median(v[len(samples):]) for k, v in times.items()}
    for name, knobs in rows:
        print(f"{name:14s} {str(knobs):40s} tokens {space.vision_tokens(knobs):3d}  median {med[('real', name)]:7.2f} ms"
              f"  narrow {med[('narrow', name)]:6.2f} ms  overhead share {med[('narrow', name)] / med[('real', name)]:.2f}")
    print(f"full / cheapest = {med[('real', 'full')] / med[('real', 'cheapest')]:.2f}x")


if __name__ == "__main__":
    main()
