"""Tiny model: test accuracy per vision tier in pool mode (its trained mode) and resize mode.

Resize mode shows the tier to the encoder as a smaller image (12 / 24 / 48 px for 1 / 4 / 16
tokens); pool mode shows the whole 48 px image and pools the tower's 16 tokens. The shipped tiny
model was trained with pooling; this measures whether resize mode would keep its accuracy.

    python bench/tiny_tier_modes.py [--n 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
import sys

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.script_args import OneLineArgumentParser, at_least
from backends.hf import HFBackend  # noqa: E402
from backends.knobs import KnobConfig, knob_space_from_model  # noqa: E402
from backends.registry import load_backend  # noqa: E402


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=at_least(1), default=200, help="first N test samples (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pool = load_backend("tiny")
    tiers = dict(pool.knob_space.tiers)
    resize = HFBackend(pool.loaded, pool.task, pool.generation, name="tiny-resize",
                       knob_space=knob_space_from_model(pool.model, tier_mode="resize", tiers=tiers))
    samples = pool.samples("test")[: args.n]
    print("| mode | tier | tokens | encoder image | accuracy |")
    print("|---|---|---|---|---|")
    for name, backend in (("pool", pool), ("resize", resize)):
        for tier in backend.knob_space.tier_names:
            t0 = time.perf_counter()
            acc = np.mean([backend.run(s, KnobConfig(tier=tier)).score for s in samples])
            side = backend.knob_space.tier_sizes.get(tier, 48)
            print(f"| {name} | {tier} | {tiers[tier]} | {side} px | {100 * acc:.1f}% |  ({time.perf_counter() - t0:.0f}s)",
                  flush=True)


if __name__ == "__main__":
    main()
