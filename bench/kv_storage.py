"""KV cache storage side by side: preallocated slots (default) vs the seed's ``torch.cat`` per token.

Streams the first ``--tokens`` tokens of the longest held-out document of the tiny reference model
token by token (one CPU thread) under the full cache and ``SinkWindow(4, W)`` for each ``--windows``
value, with both storages, passes interleaved (repeat -> policy -> storage) so background load hits
both alike. Each token's time is its median over ``--repeats`` passes; a policy's TPOT is the median
over the tokens after its cache first filled (``W + compress_every`` tokens), the full cache's over all
tokens. Prints per policy: TPOT with each storage, their ratio, the slots TPOT relative to the full
cache's, and whether slots TPOT falls monotonically with the cache size.

Attention's share at full cache: in the same full-cache passes, the median step time of the last
128 tokens (cache about ``--tokens``) against that of tokens 16..143 (cache < 144): the part of a step
that grows with the cache (attention over it, plus, for concat, copying it) is
``1 - short / long``.

Usage: ``python -m bench.kv_storage [--tokens 2048] [--windows 32 64 128 256 512 1024] [--compress-every 1]
[--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--compress-every", type=int, default=1)
    parser.add_argument("--model", default=None, help="a causal LM checkpoint folder (default: the shipped tiny "
                        "text model), e.g. backends/tiny_text/checkpoint_v2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model, tokenizer = load_causal_lm(args.model) if args.model else load_tiny_text_model()
    ids = max(held_out_token_documents(tokenizer).values(), key=len)[:args.tokens + 1]
    policies = [FullCache()] + [SinkWindow(4, window=w, compress_every=args.compress_every) for w in args.windows]
    started = time.time()
    load = os.getloadavg()[0]
    times = stream_times(model, ids, policies, STORAGES, args.repeats)
    print(f"{len(ids) - 1} tokens, {args.repeats} interleaved repeats, 1 thread, load average {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {time.time() - started:.0f}s")
    print(f"{'policy':44s} {'concat ms':>10s} {'slots ms':>9s} {'concat/slots':>13s} {'slots/full':>11s}")
    full_slots = float(np.median(times[0, "slots"]))
    slots_tpot = []
    for i, policy in enumerate(policies):
        start = 0 if policy.window is None else policy.window + policy.compress_every
        row = {s: float(np.median(times[i, s][start:])) for s in STORAGES}
        if i:
            slots_tpot.append(row["slots"])
        print(f"{str(policy):44s} {row['concat']:10.3f} {row['slots']:9.3f} {row['concat'] / row['slots']:13.2f} "
              f"{row['slots'] / full_slots:11.2f}")
    falls = all(a < b for a, b in zip(slots_tpot, slots_tpot[1:]))
    print(f"slots TPOT rises with the window (falls with cache size) monotonically: {falls}")
    for storage in STORAGES:
        short = float(np.median(times[0, storage][16:16 + TAIL]))
        long = float(np.median(times[0, storage][-TAIL:]))
        print(f"full cache ({storage}): step at cache < {16 + TAIL} {short:.3f} ms, at cache ~{len(ids) - 1} "
              f"{long:.3f} ms: the cache-dependent share of TPOT at full cache is {1 - short / long:.0%}")


if __name__ == "__main__":
    main()
