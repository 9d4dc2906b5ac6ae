"""Benchmark KV policies on the held-out documents of the tiny reference model.

Prints two tables (medians over the held-out documents' per-token step times; PPL is
token-weighted over all documents):

1. full cache vs ``SinkWindow(4, W)`` vs window only (``SinkWindow(0, W)``) vs ``KeyNormWindow(W, W/4)``
   for two windows, with NLL-spike metrics after prunes (against the full cache, same tokens);
2. ``compress_every`` sweep of ``SinkWindow(4, W)``: at a fixed window (the cache grows to
   ``W + R`` between prunes) and at a fixed peak cache (``window = M - R``, same KV memory).

Usage: ``python -m bench.kv_policies [--tokens 512] [--windows 64 128] [--repeats 1]``.
Runs on one CPU thread (token-by-token decoding of a tiny model is overhead-bound).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backends.kv import DocumentStreamer, FullCache, KeyNormWindow, KVPolicy, SinkWindow, spike_metrics
from backends.tiny_text import held_out_token_documents, load_tiny_text_model


def run_policy(model, documents: dict[str, list[int]], policy: KVPolicy, repeats: int, baseline=None):
    """Stream every document under ``policy``; return PPL, median TPOT, mean cache, prunes, spikes, NLLs."""
    nll_by_doc, step_ms, cache_lengths, spikes, prunes = {}, [], [], [], 0
    for name, ids in documents.items():
        per_repeat = []
        for _ in range(repeats):
            streamer = DocumentStreamer(model, ids, policy)
            trace = streamer.advance(streamer.remaining)
            per_repeat.append(trace.step_ms)
        step_ms.append(np.median(np.stack(per_repeat), axis=0))
        nll_by_doc[name] = trace.nll
        cache_lengths.append(trace.cache_length)
        prunes += len(trace.prune_events)
        if baseline is not None:
            spikes += spike_metrics(trace.nll, trace.prune_events, baseline[name], before=8, after=32)
    all_nll = np.concatenate(list(nll_by_doc.values()))
    return {
        "ppl": float(np.exp(all_nll.mean())), "tpot_ms": float(np.median(np.concatenate(step_ms))),
        "mean_cache": float(np.concatenate(cache_lengths).mean()), "prunes": prunes,
        "peak": float(np.mean([s.peak for s in spikes])) if spikes else float("nan"),
        "area": float(np.mean([s.area for s in spikes])) if spikes else float("nan"),
        "width": float(np.mean([s.width for s in spikes])) if spikes else float("nan"),
        "nll": nll_by_doc,
    }


def print_row(label: str, result: dict, reference_tpot: float) -> None:
    print(f"| {label:<40} | {result['ppl']:8.2f} | {result['tpot_ms']:7.3f} | {result['tpot_ms'] / reference_tpot:5.2f} "
          f"| {result['mean_cache']:7.1f} | {result['prunes']:6d} | {result['peak']:5.2f} | {result['area']:6.2f} "
          f"| {result['width']:5.1f} |")


HEADER = ("| policy                                   |      PPL | TPOT ms | ratio | mean KV | prunes |  peak |   area | width |\n"
          "|------------------------------------------|----------|---------|-------|---------|--------|-------|--------|-------|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per held-out document (its first ones)")
    parser.add_argument("--windows", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--compress-every", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--peak-cache", type=int, default=128, help="fixed peak cache M of the second sweep")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per document (median per token)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.tokens < 2:
        raise ValueError(f"--repeats={args.repeats} / --tokens={args.tokens} invalid; accepted: >= 1 / >= 2")
    bad = [r for r in args.compress_every if r < 1 or r >= args.peak_cache - 4]
    if bad:
        raise ValueError(f"--compress-every values {bad} invalid; accepted: 1 <= R < peak-cache - 4")

    torch.set_num_threads(1)
    model, tokenizer = load_tiny_text_model()
    documents = held_out_token_documents(tokenizer, max_tokens=args.tokens)
    print(f"held-out documents: {', '.join(f'{k} ({len(v)} tok)' for k, v in documents.items())}; "
          f"TPOT = median per-token forward over {args.repeats} passes; spikes vs full cache, 32 tokens after each prune")

    full = run_policy(model, documents, FullCache(), args.repeats)
    print("\n## Policies at two windows\n")
    print(HEADER)
    print_row("FullCache", full, full["tpot_ms"])
    for window in args.windows:
        for policy in (SinkWindow(4, window), SinkWindow(0, window), KeyNormWindow(window, window // 4)):
            print_row(str(policy).replace("compress_every=1, ", ""), run_policy(
                model, documents, policy, args.repeats, full["nll"]), full["tpot_ms"])

    window = args.windows[0]
    print(f"\n## compress_every at a fixed window (SinkWindow(4, {window}); cache grows to {window} + R)\n")
    print(HEADER)
    for every in args.compress_every:
        print_row(f"R={every}", run_policy(model, documents, SinkWindow(4, window, compress_every=every),
                                           args.repeats, full["nll"]), full["tpot_ms"])
    print(f"\n## compress_every at a fixed peak cache (SinkWindow(4, {args.peak_cache} - R); same KV memory)\n")
    print(HEADER)
    for every in args.compress_every:
        policy = SinkWindow(4, args.peak_cache - every, compress_every=every)
        print_row(f"R={every} window={args.peak_cache - every}",
                  run_policy(model, documents, policy, args.repeats, full["nll"]), full["tpot_ms"])


if __name__ == "__main__":
    main()
