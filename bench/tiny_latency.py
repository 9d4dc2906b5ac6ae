"""Batch-1 greedy latency of the tiny reference model under knob configurations.

    python bench/tiny_latency.py [--model DIR] [--samples 20] [--repeats 3] [--threads 1]

Times ``model.generate`` (greedy, batch 1, KV cache) per test sample for the full configuration,
the cheapest one, and each knob reduced on its own; prints the median milliseconds per
configuration, the slowest / fastest ratio and whether 120 ms lies between cheapest and full.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backends.script_args import OneLineArgumentParser, at_least, checkpoint_folder_arg
from backends.knobs import KnobConfig, apply_knobs  # noqa: E402
from backends.tiny import CHECKPOINT_DIR  # noqa: E402
from backends.tiny.evaluate import knob_sweep, load_checkpoint  # noqa: E402
from backends.tiny.model import pixel_values, prompt_ids  # noqa: E402
from backends.tiny.tasks import task_of  # noqa: E402


@torch.no_grad()
def generate_ms(model, tokenizer, space, sample, knobs: KnobConfig, max_new_tokens: int,
                fixed_new_tokens: bool) -> tuple[float, int]:
    """Milliseconds for one greedy ``generate`` call (vision tower included) and tokens produced."""
    ids = torch.tensor([prompt_ids(tokenizer, sample.question, space.vision_tokens(knobs))])
    pixels = pixel_values([sample.image])
    extra = {"min_new_tokens": max_new_tokens} if fixed_new_tokens else {}
    with apply_knobs(model, knobs, space):
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             do_sample=False, max_new_tokens=max_new_tokens, **extra)
        elapsed = (time.perf_counter() - start) * 1000
    return elapsed, out.shape[1] - ids.shape[1]


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(CHECKPOINT_DIR), type=checkpoint_folder_arg)
    p.add_argument("--samples", type=at_least(1), default=20, help="test samples timed per configuration")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed repeats per sample (after one warm-up)")
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--max-new-tokens", type=at_least(1), default=5)
    p.add_argument("--fixed-new-tokens", action="store_true",
                   help="always decode --max-new-tokens tokens (for untrained models)")
    p.add_argument("--experts-implementation", default=None, help="eager, grouped_mm, batched_mm (default: as loaded)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.repeats < 1 or args.threads < 1:
        raise ValueError("--samples, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    model, tokenizer, space = load_checkpoint(args.model, experts_implementation=args.experts_implementation)
    samples = task_of(model.config.knobgym).generate_split("test", args.samples)  # the checkpoint's task
    print(f"model {args.model} | experts {model.config.text_config._experts_implementation} | "
          f"threads {args.threads} | {args.samples} samples x {args.repeats} repeats")
    results = {}
    for name, knobs in knob_sweep(space):
        times, tokens = [], []
        for s in samples:
            generate_ms(model, tokenizer, space, s, knobs, args.max_new_tokens, args.fixed_new_tokens)  # warm-up
            for _ in range(args.repeats):
                ms, n = generate_ms(model, tokenizer, space, s, knobs, args.max_new_tokens, args.fixed_new_tokens)
                times.append(ms)
                tokens.append(n)
        results[name] = statistics.median(times)
        print(f"{name:<22} {str(knobs):<44} median {results[name]:7.1f} ms  "
              f"new tokens {statistics.mean(tokens):.2f}", flush=True)
    slowest, fastest = max(results.values()), min(results.values())
    full, cheapest = results["full"], results["cheapest"]
    print(f"slowest / fastest = {slowest / fastest:.2f}x | cheapest {cheapest:.1f} ms, full {full:.1f} ms | "
          f"120 ms between them: {min(cheapest, full) < 120 < max(cheapest, full)}")


if __name__ == "__main__":
    main()
