"""The fused decode step vs the model's forward, side by side: TPOT, and what eviction saves under each.

Streams ``--tokens`` tokens token by token on one CPU thread under the full cache and
``SinkWindow(4, W)`` for each ``--windows`` value (``--compress-every`` tokens between prunes,
slots storage), once with ``decode_step="model"`` (transformers' forward) and once with ``"fused"``
(:mod:`backends.kv.decode_step`), passes interleaved (repeat -> policy -> step) so background load
hits both alike. Each token's time is its median over ``--repeats`` passes; a window's TPOT is the
median over the tokens after its cache first filled, the full cache's "at ~N" the median of its
last 128 steps. Prints per policy the TPOT of each step and their ratio, then, per step, the full
cache's TPOT at ~N tokens over each window's (the saving eviction buys), and the largest
difference between the two steps' per-token NLL (they compute the same function).

The model: ``--model DIR`` (a causal LM folder; the stream is its tokenizer's longest held-out
document), or by default random weights at the tiny text LM v2 shape (``python -m
backends.tiny_text.train_v2``'s defaults: 6 blocks, hidden 192, vocabulary 4096) on random tokens:
TPOT does not depend on the weights.

Usage: ``python -m bench.kv_decode_step [--tokens 2048] [--windows 64 128 256] [--repeats 3] [--model DIR]``.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from backends.script_args import OneLineArgumentParser, at_least, checkpoint_folder_arg
from backends.kv import DocumentStreamer, FullCache, SinkWindow

STEPS = ("model", "fused")
TAIL = 128  # the full cache's last steps: its TPOT "at ~N tokens"


def v2_shape_model(seed: int = 0):
    """Random weights at the tiny text LM v2 shape (one definition: ``train_v2``'s defaults)."""
    from transformers import GPTNeoXForCausalLM

    from backends.tiny_text.train import build_config
    from backends.tiny_text.train_v2 import parse_args

    args = parse_args([])
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(build_config(args.vocab_size, 0, args)).eval()


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=at_least(2), default=2048, help="tokens streamed")
    parser.add_argument("--windows", type=at_least(2), nargs="+", default=[64, 128, 256], help="SinkWindow(4, W) caches")
    parser.add_argument("--compress-every", type=at_least(1), default=16)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--model", default=None, type=checkpoint_folder_arg, help="a causal LM checkpoint folder (default: random weights at "
                        "the tiny text LM v2 shape)")
    args = parser.parse_args(argv)
    if args.model:
        from backends.tiny_text import held_out_token_documents, load_causal_lm

        model, tokenizer = load_causal_lm(args.model)
        ids = max(held_out_token_documents(tokenizer).values(), key=len)[:args.tokens + 1]
    else:
        model = v2_shape_model()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.tokens + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    policies = [FullCache()] + [SinkWindow(4, window=w, compress_every=args.compress_every) for w in args.windows]
    times = {(i, s): [] for i in range(len(policies)) for s in STEPS}
    nll = {}
    started, load = time.time(), os.getloadavg()[0]
    for _ in range(args.repeats):
        for i, policy in enumerate(policies):
            for step in STEPS:
                streamer = DocumentStreamer(model, ids, policy, decode_step=step)
                trace = streamer.advance(streamer.remaining)
                times[i, step].append(trace.step_ms)
                nll[i, step] = trace.nll
    per_token = {key: np.median(np.stack(runs), axis=0) for key, runs in times.items()}
    print(f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{'random weights' if not args.model else args.model}), {len(ids) - 1} tokens, {args.repeats} interleaved "
          f"repeats, 1 thread, torch {torch.__version__}, {platform.processor() or platform.machine()}, load average "
          f"{load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {time.time() - started:.0f}s")
    print(f"{'policy':52s} {'model ms':>9s} {'fused ms':>9s} {'fused/model':>12s}")
    tpot = {}
    for i, policy in enumerate(policies):
        start = 0 if policy.window is None else policy.window + policy.compress_every
        for step in STEPS:
            series = per_token[i, step]
            tpot[i, step] = float(np.median(series[-TAIL:] if policy.window is None else series[start:]))
        label = f"{policy} (at ~{len(ids) - 1})" if policy.window is None else str(policy)
        print(f"{label:52s} {tpot[i, 'model']:9.3f} {tpot[i, 'fused']:9.3f} {tpot[i, 'fused'] / tpot[i, 'model']:12.2f}")
    for step in STEPS:
        cells = ", ".join(f"{tpot[0, step] / tpot[i, step]:.2f}x SinkWindow(4, {policies[i].window})"
                          for i in range(1, len(policies)))
        print(f"{step} step: full cache at ~{len(ids) - 1} tokens = {cells}")
    difference = max(float(np.max(np.abs(nll[i, 'model'] - nll[i, 'fused']))) for i in range(len(policies)))
    print(f"largest |NLL difference| between the steps, any token, any policy: {difference:.2e} nats")


if __name__ == "__main__":
    main()
