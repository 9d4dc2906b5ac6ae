"""How much can a per-chunk KV controller gain over one fixed setting? StreamingKV's headroom.

    python -m bench.kv_headroom [--model DIR] [--budget auto | 2.7ms] [--episode-tokens 128]
                                [--chunk-tokens 8] [--test-episodes 24] [--validation-episodes 8]

Issue 27 asks GRPO to beat the best baseline on ``StreamingKV-v0``. A controller can only beat the
baselines by what per-episode or per-chunk choices are worth, so this measures that first, on the
env the CLI trains (``StreamingKVEnv.cli_kwargs``: CLI-sized episodes, the SinkWindow grid of 48
settings, estimated TPOT), at one TPOT budget (``auto``: the env's suggested one), scoring every
test episode under:

- ``static``: the one constant setting with the best mean return on the validation episodes, held
  on every test episode (what the ``static`` baseline does);
- ``best constant on test``: the same choice made on the test episodes themselves (no selection noise);
- ``oracle (constant per episode)``: per test episode the best constant setting (the CLI's oracle);
- ``chunk lookahead``: per chunk, every setting is tried for the next chunk from the current cache
  (``evaluate_chunk_group``) and the best chunk reward is taken: a per-chunk controller that knows
  each next chunk's outcome in advance, which no policy from observations can (it is greedy,
  so it is not an upper bound of every schedule, but it is the per-chunk adaptivity the observation
  could buy at most, chunk by chunk).

Prints per scheme the mean episode return, the mean score within budget (the verdict's metric:
the episode's score, 0 when a chunk violated the budget) and its gain over ``static`` with a 95%
paired bootstrap interval over test episodes (:func:`knobgym_cli.margin.paired_bootstrap`), and
the settings each scheme used. Deterministic (estimated latency). Minutes: every chunk of every
test episode is streamed 48 times for the lookahead.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter

import numpy as np

from backends.script_args import OneLineArgumentParser, at_least


def parse_args(argv: list[str] | None):
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a save_pretrained causal LM folder (default: the env's shipped model)")
    p.add_argument("--budget", default="auto", help="one TPOT budget: auto (the env's suggestion), 2.7ms, 50%%")
    p.add_argument("--episode-tokens", type=at_least(1), default=None, help="default: the CLI's (cli_kwargs)")
    p.add_argument("--chunk-tokens", type=at_least(1), default=None, help="default: the CLI's (cli_kwargs)")
    p.add_argument("--test-episodes", type=at_least(1), default=24)
    p.add_argument("--validation-episodes", type=at_least(1), default=8)
    p.add_argument("--threads", type=at_least(1), default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None, env_kwargs: dict | None = None) -> int:
    """``env_kwargs``: more ``StreamingKVEnv`` arguments (a model object, documents, a TPOT estimator)."""
    args = parse_args(argv)
    import torch

    from agents.base import score_in_budget
    from envs.streaming_kv import StreamingKVEnv
    from knobgym_cli.margin import paired_bootstrap

    torch.set_num_threads(args.threads)
    kwargs = dict(StreamingKVEnv.cli_kwargs)
    if args.episode_tokens:
        kwargs["episode_tokens"] = args.episode_tokens
    if args.chunk_tokens:
        kwargs["chunk_tokens"] = args.chunk_tokens
    if args.model:
        kwargs["model_path"] = args.model
    kwargs.update(env_kwargs or {})
    try:
        env = StreamingKVEnv(budget=args.budget, threads=args.threads, split="test", **kwargs)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if env.kv_budget.tpot.is_range:
        print(f"error: --budget={args.budget} is a range; accepted: one TPOT budget (auto, 2.7ms, 50%)", file=sys.stderr)
        return 2
    budget_ms = float(env.kv_budget.tpot.low_ms)
    grid = list(itertools.product(*[range(n) for n in env.action_space.nvec]))
    actions = [np.array(a) for a in grid]
    steps = env.episode_steps
    test = range(min(args.test_episodes, env.num_samples("test")))
    validation = range(min(args.validation_episodes, env.num_samples("validation")))
    print(f"StreamingKV: {len(grid)} settings {env.knob_grid}, {steps} chunks of {env.chunk_tokens} tokens, "
          f"budget {budget_ms:.3f} ms (achievable {env.achievable_range_ms[0]:.3f}-{env.achievable_range_ms[1]:.3f}), "
          f"{len(test)} test / {len(validation)} validation episodes", flush=True)

    def constants(split: str, sample_id: int):
        returns, infos = env.evaluate_episode_group(sample_id, f"{budget_ms}ms", [[a] * steps for a in grid], split)
        return returns, [score_in_budget(chunks[-1]) for chunks in infos]  # the last chunk's info: the episode's

    validation_returns = np.array([constants("validation", i)[0] for i in validation])
    static = int(np.argmax(validation_returns.mean(0)))
    test_returns, test_in_budget = map(np.array, zip(*(constants("test", i) for i in test)))
    best_on_test = int(np.argmax(test_returns.mean(0)))
    oracle = test_returns.argmax(1)

    lookahead_return, lookahead_in_budget, lookahead_used = [], [], Counter()
    for sample_id in test:
        env.reset(options={"sample_id": sample_id, "split": "test", "budget": budget_ms})
        total, info = 0.0, {}
        for _ in range(steps):
            rewards, _ = env.evaluate_chunk_group(actions)
            choice = int(np.argmax(rewards))
            lookahead_used[choice] += 1
            _, reward, _, _, info = env.step(actions[choice])
            total += reward
        lookahead_return.append(total)
        lookahead_in_budget.append(score_in_budget(info))
        print(f"  lookahead episode {sample_id}: return {total:.3f} (oracle {test_returns[sample_id].max():.3f}, "
              f"static {test_returns[sample_id, static]:.3f})", flush=True)

    def named(index: int) -> str:
        return str({knob: env.knob_grid[knob][v] for knob, v in zip(env.knob_grid, grid[index])})

    rows = {
        "static": (test_returns[:, static], test_in_budget[:, static], named(static)),
        "best constant on test": (test_returns[:, best_on_test], test_in_budget[:, best_on_test], named(best_on_test)),
        "oracle (constant per episode)": (test_returns[np.arange(len(test)), oracle],
                                          test_in_budget[np.arange(len(test)), oracle],
                                          f"{len(set(oracle.tolist()))} distinct settings"),
        "chunk lookahead": (np.array(lookahead_return), np.array(lookahead_in_budget),
                            f"{len(lookahead_used)} distinct settings, most used "
                            f"{named(lookahead_used.most_common(1)[0][0])}"),
    }
    print(f"\n| scheme | mean return | score within budget | gain over static [95% CI] | settings |")
    print("|---|---|---|---|---|")
    for name, (returns, in_budget, settings) in rows.items():
        margin, low, high = paired_bootstrap(in_budget, rows["static"][1])
        print(f"| {name} | {returns.mean():.4f} | {in_budget.mean():.4f} | {margin:+.4f} [{low:+.4f}, {high:+.4f}] "
              f"| {settings} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
