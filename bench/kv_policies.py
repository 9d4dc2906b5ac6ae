"""Benchmark KV policies on the held-out documents of the tiny reference model.

Prints two tables (TPOT: median over tokens of each token's median step time across the
interleaved passes; PPL: token-weighted over all documents; "ratio": TPOT / full-cache TPOT
measured in the same interleaved passes):

1. full cache vs ``SinkWindow(4, W)`` vs window only (``SinkWindow(0, W)``) vs ``KeyNormWindow(W, W/4)``
   for two windows, with NLL-spike metrics after prunes (against the full cache, same tokens);
2. ``compress_every`` sweep of ``SinkWindow(4, W)``: at a fixed window (the cache grows to
   ``W + R`` between prunes) and at a fixed peak cache (``window = M - R``, same KV memory).

Usage: ``python -m bench.kv_policies [--tokens 512] [--windows 64 128] [--repeats 3]``.
Runs on one CPU thread (token-by-token decoding of a tiny model is overhead-bound).

``python -m bench.kv_policies --episodes 2`` instead times whole 16-step episodes of every KV env id
(512 tokens, random actions, fixed TPOT coefficients so no profiling is timed) with the streamer on
one torch thread (the env default) and on the process's default thread count (``threads=None``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from backends.script_args import OneLineArgumentParser, at_least, checkpoint_folder_arg
from backends.kv import DocumentStreamer, FullCache, KeyNormWindow, KVPolicy, SinkWindow, spike_metrics
from backends.tiny_text import held_out_token_documents, load_causal_lm, load_tiny_text_model


def run_policies(model, documents: dict[str, list[int]], policies: list[KVPolicy], repeats: int,
                 baseline=None, after: int = 0) -> list[dict]:
    """Stream every document under each policy; per policy: PPL, median TPOT, mean cache, prunes, spikes.

    ``ppl_after`` is the PPL of the tokens predicted from position ``after`` on (the same tokens for
    every policy: with ``after`` past every window, every windowed policy has evicted by then, so
    the column compares policies after their first eviction, which is where StreamingLLM's
    window-only collapse shows; the whole-document PPL dilutes it with the tokens before).

    Passes are interleaved (repeat -> document -> policy) so that background load on a shared
    machine hits every policy alike; each token's time is the median over ``repeats`` passes.
    """
    times = {(i, name): [] for i in range(len(policies)) for name in documents}
    traces = {}
    for _ in range(repeats):
        for name, ids in documents.items():
            for i, policy in enumerate(policies):
                streamer = DocumentStreamer(model, ids, policy)
                trace = streamer.advance(streamer.remaining)
                times[i, name].append(trace.step_ms)
                traces[i, name] = trace  # NLL and prunes are identical across repeats
    results = []
    for i in range(len(policies)):
        doc_traces = [traces[i, name] for name in documents]
        spikes = []
        if baseline is not None:
            for name, trace in zip(documents, doc_traces):
                spikes += spike_metrics(trace.nll, trace.prune_events, baseline[name], before=8, after=32)
        all_nll = np.concatenate([t.nll for t in doc_traces])
        nll_after = np.concatenate([t.nll[after:] for t in doc_traces])
        step_ms = np.concatenate([np.median(np.stack(times[i, name]), axis=0) for name in documents])
        results.append({
            "ppl": float(np.exp(all_nll.mean())), "ppl_after": float(np.exp(nll_after.mean())),
            "tpot_ms": float(np.median(step_ms)),
            "mean_cache": float(np.concatenate([t.cache_length for t in doc_traces]).mean()),
            "prunes": sum(len(t.prune_events) for t in doc_traces),
            "peak": float(np.mean([s.peak for s in spikes])) if spikes else float("nan"),
            "area": float(np.mean([s.area for s in spikes])) if spikes else float("nan"),
            "width": float(np.mean([s.width for s in spikes])) if spikes else float("nan"),
            "nll": {name: t.nll for name, t in zip(documents, doc_traces)},
        })
    return results


def print_row(label: str, result: dict, reference_tpot: float) -> None:
    print(f"| {label:<40} | {result['ppl']:8.2f} | {result['ppl_after']:9.2f} | {result['tpot_ms']:7.3f} "
          f"| {result['tpot_ms'] / reference_tpot:5.2f} "
          f"| {result['mean_cache']:7.1f} | {result['prunes']:6d} | {result['peak']:5.2f} | {result['area']:6.2f} "
          f"| {result['width']:5.1f} |")


HEADER = ("| policy                                   |      PPL | PPL after | TPOT ms | ratio | mean KV | prunes |  peak |   area | width |\n"
          "|------------------------------------------|----------|-----------|---------|-------|---------|--------|-------|--------|-------|")


def time_episodes(episodes: int) -> None:
    """Seconds per 16-step episode of every KV env id, one thread vs the process default."""
    import gymnasium as gym

    import envs

    coefficients = {"base_ms": 1.0, "per_slot_ms": 0.001, "per_prune_ms": 0.1}  # timing only: no profile
    print(f"torch threads by default: {torch.get_num_threads()}; {episodes} episode(s) each, seconds per episode")
    print("| env | threads=1 | threads=default |\n|---|---|---|")
    for env_id in [i for i in envs.list_envs() if i.startswith(("StreamingKV", "KV-"))]:
        cells = []
        for threads in (1, None):
            env = gym.make(env_id, tpot_model=coefficients, threads=threads, budget="2ms").unwrapped
            env.action_space.seed(0)
            seconds = []
            for seed in range(episodes):
                env.reset(seed=seed)
                start, done = time.perf_counter(), False
                while not done:
                    done = env.step(env.action_space.sample())[2]
                seconds.append(time.perf_counter() - start)
            cells.append(f"{np.median(seconds):.1f}")
        print(f"| {env_id} | {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=at_least(2), default=512, help="tokens per held-out document (its first ones)")
    parser.add_argument("--windows", type=at_least(1), nargs=2, default=[64, 128])
    parser.add_argument("--compress-every", type=at_least(1), nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--peak-cache", type=at_least(1), default=128, help="fixed peak cache M of the second sweep")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed passes per document (median per token)")
    parser.add_argument("--model", default=None, type=checkpoint_folder_arg, help="a causal LM checkpoint folder (default: the shipped tiny "
                        "text model), e.g. backends/tiny_text/checkpoint_v2")
    parser.add_argument("--episodes", type=at_least(0), default=0, help="time this many episodes per KV env id instead")
    args = parser.parse_args(argv)
    if args.episodes < 0:
        raise ValueError(f"--episodes={args.episodes} invalid; accepted: >= 0")
    if args.episodes:
        time_episodes(args.episodes)
        return
    if args.repeats < 1 or args.tokens < 2:
        raise ValueError(f"--repeats={args.repeats} / --tokens={args.tokens} invalid; accepted: >= 1 / >= 2")
    bad = [r for r in args.compress_every if r < 1 or r >= args.peak_cache - 4]
    if bad:
        raise ValueError(f"--compress-every values {bad} invalid; accepted: 1 <= R < peak-cache - 4")

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(args.model) if args.model else load_tiny_text_model()
    documents = held_out_token_documents(tokenizer, max_tokens=args.tokens)
    after = max(*args.windows, args.peak_cache) + max(args.compress_every)
    print(f"held-out documents: {', '.join(f'{k} ({len(v)} tok)' for k, v in documents.items())}; "
          f"TPOT = median per-token forward over {args.repeats} passes; spikes vs full cache, 32 tokens after each prune; "
          f"'PPL after' = the tokens from position {after} on (every windowed policy has evicted by then)")

    full_policy = FullCache()
    policies = [p for w in args.windows
                for p in (SinkWindow(4, window=w), SinkWindow(0, window=w), KeyNormWindow(w // 4, window=w))]
    # The full cache runs alone first: its per-token NLL is the spike baseline of the others.
    (full,) = run_policies(model, documents, [full_policy], 1)
    results = run_policies(model, documents, [full_policy] + policies, args.repeats, full["nll"], after)
    reference_tpot = results[0]["tpot_ms"]
    print("\n## Policies at two windows\n")
    print(HEADER)
    for policy, result in zip([full_policy] + policies, results):
        print_row(str(policy).replace("compress_every=1, ", "").replace("(compress_every=1)", ""), result, reference_tpot)

    window = args.windows[0]
    fixed_window = [SinkWindow(4, window=window, compress_every=every) for every in args.compress_every]
    fixed_peak = [SinkWindow(4, window=args.peak_cache - every, compress_every=every) for every in args.compress_every]
    results = run_policies(model, documents, [full_policy] + fixed_window + fixed_peak, args.repeats, full["nll"], after)
    reference_tpot = results[0]["tpot_ms"]
    print(f"\n## compress_every at a fixed window (SinkWindow(4, {window}); cache grows to {window} + R)\n")
    print(HEADER)
    print_row("FullCache", results[0], reference_tpot)
    for policy, result in zip(fixed_window, results[1:]):
        print_row(f"R={policy.compress_every}", result, reference_tpot)
    print(f"\n## compress_every at a fixed peak cache (SinkWindow(4, {args.peak_cache} - R); same KV memory)\n")
    print(HEADER)
    for policy, result in zip(fixed_peak, results[1 + len(fixed_window):]):
        print_row(f"R={policy.compress_every} window={policy.window}", result, reference_tpot)


if __name__ == "__main__":
    main()
