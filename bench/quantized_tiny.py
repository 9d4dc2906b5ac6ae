"""fp32 / bf16 / nf4 / int8 on the shipped tiny model through ``backend=hf``: accuracy and latency at
the cheapest and the full configuration, the model's memory, and what bitsandbytes quantized.

    python -m bench.quantized_tiny [--samples 40] [--threads 1] [--data DIR]

Exports ``--samples`` test samples of the tiny task (``backends.tiny.export_dataset``), loads the
shipped checkpoint once per precision, and runs every sample under both configurations with the
precisions interleaved sample by sample (so a busy machine slows them alike). Latency is the
backend's measured wall clock of one run (stage 1 + stage 2, batch 1), median over samples; memory is
``model.get_memory_footprint()`` (parameters and buffers as stored). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from backends.script_args import OneLineArgumentParser, at_least

PRECISIONS = (("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"}),
              ("nf4", {"quantization": "nf4"}), ("int8", {"quantization": "int8"}))
CHECKPOINT = Path(__file__).resolve().parent.parent / "backends" / "tiny" / "checkpoint"


def load(data: Path, options: dict):
    from backends.registry import load_backend, release_backend

    file = str(data)
    backend = load_backend("hf", model=str(CHECKPOINT), dataset={"train": file, "validation": file, "test": file},
                           **options)
    release_backend(backend)
    return backend


def main(argv=None) -> int:
    parser = OneLineArgumentParser(prog="python -m bench.quantized_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=at_least(1), default=40, help="test samples exported and run (default 40)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--data", default=None, help="export folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.threads < 1:
        print(f"error: --samples={args.samples} / --threads={args.threads} are invalid; accepted: integers >= 1",
              file=sys.stderr)
        return 2
    from backends.quantized import quantization_report
    from backends.tiny.export_dataset import export_dataset

    torch.set_num_threads(args.threads)
    data = export_dataset(Path(args.data or tempfile.mkdtemp(prefix="knobgym-quant-")), n=args.samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backends = {name: load(data, options) for name, options in PRECISIONS}
    space = backends["fp32"].knob_space
    configs = {"cheapest": space.cheapest(), "full": space.full()}
    scores = {(p, c): [] for p in backends for c in configs}
    times = {(p, c): [] for p in backends for c in configs}
    samples = backends["fp32"].samples("test")
    for backend in backends.values():  # one warm-up run each (first-call allocations, bitsandbytes setup)
        backend.run(samples[0], configs["full"])
    for sample in samples:
        for p, backend in backends.items():
            for c, knobs in configs.items():
                outcome = backend.run(sample, knobs)
                scores[p, c].append(outcome.score)
                times[p, c].append(outcome.measured_ms)
    print(f"{len(samples)} test samples of the tiny task, {args.threads} torch thread(s); cheapest = {configs['cheapest']},"
          f" full = {configs['full']}")
    print("| precision | accuracy cheapest | accuracy full | median ms cheapest | median ms full | ms full / fp32 "
          "| model memory | parameters quantized |")
    print("|---|---|---|---|---|---|---|---|")
    base = float(np.median(times["fp32", "full"]))
    for p, backend in backends.items():
        report = quantization_report(backend.model)
        print(f"| {p} | {100 * np.mean(scores[p, 'cheapest']):.1f}% | {100 * np.mean(scores[p, 'full']):.1f}% "
              f"| {np.median(times[p, 'cheapest']):.0f} | {np.median(times[p, 'full']):.0f} "
              f"| {np.median(times[p, 'full']) / base:.2f} | {backend.model.get_memory_footprint() / 2**20:.1f} MiB "
              f"| {100 * report.share:.0f}% |")
    print()
    print("what bitsandbytes quantized (nf4):")
    print("\n".join(quantization_report(backends["nf4"].model).lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
