"""Static cache and torch.compile for KV decoding, side by side: TPOT with and without.

Streams the first ``--tokens`` tokens of the longest held-out document of the tiny reference model
(or ``--model``) token by token on one CPU thread, under the full cache and ``SinkWindow(4, W)``,
with each of: ``slots`` eager, ``static`` eager, ``slots`` compiled, ``static`` compiled
(``DocumentStreamer(storage=..., compile=..., decode_step="model")``: the model's forward, which is
what compiling applies to), and, for reference, ``slots`` with the fused step
(``decode_step="fused"``, :mod:`backends.kv.decode_step`). Compiling happens once per storage before the
timed passes (its wall time is printed); passes are interleaved (repeat -> policy -> variant) and
each token's time is its median over ``--repeats`` passes; a variant's TPOT is the median over the
tokens after the cache first filled. Prints TPOT per variant and its ratio to ``slots`` eager.

Usage: ``python -m bench.kv_compile [--tokens 512] [--window 128] [--repeats 3] [--model DIR]``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from backends.script_args import OneLineArgumentParser, at_least, checkpoint_folder_arg
from backends.kv import DocumentStreamer, FullCache, SinkWindow
from backends.kv.stream import compiled_forward, intra_op_threads
from backends.tiny_text import held_out_token_documents, load_causal_lm, load_tiny_text_model

# (storage, compile, decode step)
VARIANTS = (("slots", False, "model"), ("static", False, "model"), ("slots", True, "model"), ("static", True, "model"),
            ("slots", False, "fused"))


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=at_least(2), default=512)
    parser.add_argument("--window", type=at_least(1), default=128)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--model", default=None, type=checkpoint_folder_arg, help="a causal LM checkpoint folder (default: the tiny text model)")
    args = parser.parse_args(argv)
    model, tokenizer = load_causal_lm(args.model) if args.model else load_tiny_text_model()
    ids = max(held_out_token_documents(tokenizer).values(), key=len)[:args.tokens + 1]
    load = os.getloadavg()[0]
    for storage in ("slots", "static"):
        started = time.perf_counter()
        with intra_op_threads(1), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = compiled_forward(model, storage)
        status = "fell back to eager: " + str(caught[0].message) if compiled is model else "compiled"
        print(f"torch.compile ({storage}): {time.perf_counter() - started:.1f}s, {status}")
    policies = [FullCache(), SinkWindow(4, window=args.window)]
    times = {(p, v): [] for p in range(len(policies)) for v in VARIANTS}
    for _ in range(args.repeats):
        for p, policy in enumerate(policies):
            for storage, compile_, step in VARIANTS:
                streamer = DocumentStreamer(model, ids, policy, storage=storage, compile=compile_, decode_step=step)
                times[p, (storage, compile_, step)].append(streamer.advance(streamer.remaining).step_ms)
    print(f"{len(ids) - 1} tokens, {args.repeats} interleaved repeats, 1 thread, torch {torch.__version__}, load "
          f"average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for p, policy in enumerate(policies):
        start = 0 if policy.window is None else policy.window + policy.compress_every
        tpot = {v: float(np.median(np.median(np.stack(times[p, v]), axis=0)[start:])) for v in VARIANTS}
        base = tpot[VARIANTS[0]]
        cells = ", ".join(f"{s}{' compiled' if c else ''}{' fused' if d == 'fused' else ''} {t:.3f} ms ({t / base:.2f}x)"
                          for (s, c, d), t in tpot.items())
        print(f"{policy}: {cells}")


if __name__ == "__main__":
    main()
