"""KV cache storage side by side: preallocated slots (default) vs the seed's ``torch.cat`` per token.

Streams the first ``--tokens`` tokens of the longest held-out document of the tiny reference model
token by token (one CPU thread) under the full cache and ``SinkWindow(4, W)`` for each ``--windows``
value, with both storages, passes interleaved (repeat -> policy -> storage) so background load hits
both alike. Each token's time is its median over ``--repeats`` passes; a policy's TPOT is the median
over the tokens after its cache first filled (``W + compress_every`` tokens), the full cache's over all
tokens. Prints per policy: TPOT with each storage, their ratio, the slots TPOT relative to the full
cache's, whether slots TPOT grows with the window at every step, and the full cache's TPOT over the
stream (its mean step, and its step once the cache holds ``--tokens`` tokens) against each window's.

Attention's share at full cache: in the same full-cache passes, the median step time of the last
128 tokens (cache about ``--tokens``) against that of tokens 16..143 (cache < 144): the part of a step
that grows with the cache (attention over it, plus, for concat, copying it) is
``1 - short / long``.

Usage: ``python -m bench.kv_storage [--tokens 2048] [--windows 32 64 128 256 512 1024] [--compress-every 1]
[--repeats 3] [--storages slots static concat]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from backends.script_args import OneLineArgumentParser, at_least, checkpoint_folder_arg
from backends.kv import DocumentStreamer, FullCache, KVPolicy, SinkWindow
from backends.kv.cache import STORAGES
from backends.tiny_text import held_out_token_documents, load_causal_lm, load_tiny_text_model

TAIL = 128  # tokens at the end of the full-cache stream whose step time is "TPOT at full cache"


def stream_times(model, ids, policies: list[KVPolicy], storages, repeats: int) -> dict:
    """``(policy index, storage) -> per-token step ms`` (median over interleaved repeats)."""
    times = {(i, s): [] for i in range(len(policies)) for s in storages}
    for _ in range(repeats):
        for i, policy in enumerate(policies):
            for storage in storages:
                streamer = DocumentStreamer(model, ids, policy, storage=storage)
                times[i, storage].append(streamer.advance(streamer.remaining).step_ms)
    return {key: np.median(np.stack(runs), axis=0) for key, runs in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=at_least(2), default=2048)
    parser.add_argument("--windows", type=at_least(1), nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--compress-every", type=at_least(1), default=1)
    parser.add_argument("--model", default=None, type=checkpoint_folder_arg, help="a causal LM checkpoint folder (default: the shipped tiny "
                        "text model), e.g. backends/tiny_text/checkpoint_v2")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--storages", nargs="+", choices=STORAGES, default=list(STORAGES),
                        help="storages to time (default all; 'slots' alone for the policies' TPOT)")
    args = parser.parse_args(argv)
    model, tokenizer = load_causal_lm(args.model) if args.model else load_tiny_text_model()
    ids = max(held_out_token_documents(tokenizer).values(), key=len)[:args.tokens + 1]
    policies = [FullCache()] + [SinkWindow(4, window=w, compress_every=args.compress_every) for w in args.windows]
    storages = [s for s in STORAGES if s in args.storages]
    started = time.time()
    load = os.getloadavg()[0]
    times = stream_times(model, ids, policies, storages, args.repeats)
    print(f"{len(ids) - 1} tokens, {args.repeats} interleaved repeats, 1 thread, load average {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {time.time() - started:.0f}s")
    both = "concat" in storages and "slots" in storages
    print(f"{'policy':52s}" + "".join(f" {s + ' ms':>10s}" for s in storages)
          + (f" {'concat/slots':>13s}" if both else "") + f" {'/ full':>7s}")
    main_storage = "slots" if "slots" in storages else storages[0]
    full_mean = float(np.mean(times[0, main_storage]))
    full_median = float(np.median(times[0, main_storage]))
    windowed = {}
    for i, policy in enumerate(policies):
        start = 0 if policy.window is None else policy.window + policy.compress_every
        row = {s: float(np.median(times[i, s][start:])) for s in storages}
        if i:
            windowed[policy.window] = row[main_storage]
        print(f"{str(policy):52s}" + "".join(f" {row[s]:10.3f}" for s in storages)
              + (f" {row['concat'] / row['slots']:13.2f}" if both else "")
              + f" {row[main_storage] / full_median:7.2f}")
    values = list(windowed.values())
    rises = all(a < b for a, b in zip(values, values[1:]))
    print(f"{main_storage} TPOT grows with the window at every step (a smaller cache decodes faster): {rises}")
    full_tail = float(np.median(times[0, main_storage][-TAIL:]))
    for window, tpot in windowed.items():
        print(f"full cache ({main_storage}) over {len(ids) - 1} tokens: mean step {full_mean:.3f} ms = "
              f"{full_mean / tpot:.2f}x, at cache ~{len(ids) - 1} {full_tail:.3f} ms = {full_tail / tpot:.2f}x "
              f"SinkWindow(4, {window})'s {tpot:.3f} ms")
    for storage in storages:
        short = float(np.median(times[0, storage][16:16 + TAIL]))
        long = float(np.median(times[0, storage][-TAIL:]))
        print(f"full cache ({storage}): step at cache < {16 + TAIL} {short:.3f} ms, at cache ~{len(ids) - 1} "
              f"{long:.3f} ms: the cache-dependent share of TPOT at full cache is {1 - short / long:.0%}")


if __name__ == "__main__":
    main()
