"""Group sharing: ``evaluate_group`` with G actions versus G separate episodes, batched and unbatched.

Each round draws a sample and G random actions (tiers drawn like a policy early in training:
uniformly) and times, on fresh caches and in a rotating order, three things on the same env:

- ``batched``: ``evaluate_group`` as envs run it in estimated-latency mode (stage 1 once per
  tier, each tier's stage 2 as one batch: ``StageRunner.run_group``);
- ``unbatched``: the same call with stage-2 batching off (stage 1 shared, stage 2 one action at a
  time: what ``evaluate_group`` did before batching, and what measured-latency mode does);
- ``separate``: G separate episodes (reset + two steps each, caches cleared before each).

Rewards of the three are compared (the count that differ is printed). Prints medians, spreads and the per-round ratios
(target for ``batched / separate``: at most 0.6).

    python bench/group_sharing.py [--rounds 15] [--group 8] [--budget 120ms] [--seed 0] [--compare N]

``--compare N`` also runs batched and unbatched stage 2 side by side on N test inputs and prints
how many outcomes differ and the largest logit difference (:func:`compare_batched`).

Other benches import :func:`measure_group_sharing` (it returns the numbers printed here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.script_args import OneLineArgumentParser, at_least  # noqa: E402  (after the path insert: run as a file)


@dataclass
class GroupSharing:
    """Per-round wall times (ms) of the three ways of scoring one group, and their ratios."""

    group: int
    batched_ms: list[float] = field(default_factory=list)
    unbatched_ms: list[float] = field(default_factory=list)
    separate_ms: list[float] = field(default_factory=list)
    #: rewards of the batched call that differ from the unbatched call's or the separate episodes'
    differing_rewards: int = 0

    @staticmethod
    def _spread(values: list[float]) -> tuple[float, float, float]:
        """(median, 10th, 90th percentile)."""
        return (float(statistics.median(values)), float(np.percentile(values, 10)), float(np.percentile(values, 90)))

    @property
    def batched_ratios(self) -> list[float]:
        return [b / s for b, s in zip(self.batched_ms, self.separate_ms)]

    @property
    def unbatched_ratios(self) -> list[float]:
        return [u / s for u, s in zip(self.unbatched_ms, self.separate_ms)]

    @property
    def ratio(self) -> float:
        """Median per-round ``batched / separate``: the number the target applies to."""
        return float(statistics.median(self.batched_ratios))

    @property
    def unbatched_ratio(self) -> float:
        """Median per-round ``unbatched / separate`` (group sharing before stage-2 batching)."""
        return float(statistics.median(self.unbatched_ratios))

    def report(self) -> str:
        g = self.group
        lines = [f"{'':32s}{'median':>9s}{'p10':>9s}{'p90':>9s}"]
        for name, values in (("evaluate_group, batched", self.batched_ms),
                             ("evaluate_group, unbatched", self.unbatched_ms),
                             (f"{g} separate episodes", self.separate_ms)):
            lines.append(f"{name + ' (ms)':32s}" + "".join(f"{v:9.1f}" for v in self._spread(values)))
        for name, values in (("ratio batched/separate", self.batched_ratios),
                             ("ratio unbatched/separate", self.unbatched_ratios)):
            lines.append(f"{name:32s}" + "".join(f"{v:9.2f}" for v in self._spread(values)))
        lines.append(f"ratio (median per round): batched {self.ratio:.2f} (target <= 0.6), "
                     f"unbatched {self.unbatched_ratio:.2f}")
        lines.append(f"rewards differing from the batched call's: {self.differing_rewards} of "
                     f"{2 * self.group * len(self.batched_ms)}")
        return "\n".join(lines)


def measure_group_sharing(env=None, *, rounds: int = 15, group: int = 8, budget: str = "120ms", seed: int = 0,
                          env_id: str = "MultiKnob-v0") -> GroupSharing:
    """Time ``rounds`` groups of ``group`` uniform random actions three ways (see the module doc).

    Args:
        env: an estimated-latency knob env (its unwrapped base is used); default
            ``gym.make(env_id, budget=budget, split="test")`` on the tiny backend.
        rounds, group, budget, seed: rounds timed, actions per group, the episodes' budget, and
            the seed of the samples and actions drawn.
    """
    import gymnasium as gym

    import envs  # noqa: F401
    from envs.budget import Budget

    env = (env or gym.make(env_id, budget=budget, split="test")).unwrapped
    if not env.runner.batch_stage2:
        raise ValueError(f"env {type(env).__name__} does not batch stage 2 (latency={env.latency.mode!r}); "
                         f"accepted: an env in estimated-latency mode")
    rng = np.random.default_rng(seed)
    n = env.num_samples("test")
    budget_ms = Budget.parse(budget).fixed_ms
    runner = env.runner
    warm = [[int(v) - 1 for v in env.action_space.nvec]] * 2
    env.evaluate_group(0, budget_ms, warm, split="test")  # warm-up
    result = GroupSharing(group)
    for r in range(rounds):
        sid = int(rng.integers(n))
        actions = [[int(rng.integers(v)) for v in env.action_space.nvec] for _ in range(group)]

        def grouped(batched: bool):
            env.clear_run_cache()
            runner.batch_stage2 = batched
            try:
                t0 = time.perf_counter_ns()
                rewards, _ = env.evaluate_group(sid, budget_ms, actions, split="test")
                return (time.perf_counter_ns() - t0) / 1e6, rewards
            finally:
                runner.batch_stage2 = True

        def separate():
            rewards = []
            t0 = time.perf_counter_ns()
            for a in actions:
                env.clear_run_cache()
                env.reset(options={"sample_id": sid, "budget": f"{budget_ms}ms", "split": "test"})
                done, reward = False, 0.0
                while not done:
                    _, reward, terminated, truncated, _ = env.step(env.to_env_action(a))
                    done = terminated or truncated
                rewards.append(reward)
            return (time.perf_counter_ns() - t0) / 1e6, np.array(rewards)

        runs = {"batched": lambda: grouped(True), "unbatched": lambda: grouped(False), "separate": separate}
        names = list(runs)
        order = names[r % 3:] + names[:r % 3]  # rotate which goes first
        timed = {name: runs[name]() for name in order}
        for name in ("unbatched", "separate"):
            result.differing_rewards += int(np.sum(timed["batched"][1] != timed[name][1]))
        result.batched_ms.append(timed["batched"][0])
        result.unbatched_ms.append(timed["unbatched"][0])
        result.separate_ms.append(timed["separate"][0])
    env.clear_run_cache()
    return result


def compare_batched(backend, *, inputs: int = 40, rows: int = 8, seed: int = 0) -> tuple[int, int, float]:
    """Batched versus unbatched stage 2 on ``backend``'s first ``inputs`` test samples, every tier,
    ``rows`` uniform random (top-k, depth) rows per stage-1 state.

    Returns ``(rows compared, rows whose outcome differs, largest |logit difference|)``; the
    logits are compared over the decoding steps where every row was still in the batch (rows sit
    in the batch deepest first).
    """
    import torch

    from backends.knobs import KnobConfig

    space = backend.knob_space
    rng = np.random.default_rng(seed)
    calls: list = []
    handle = backend.parts.lm_head.register_forward_hook(
        lambda module, args, out: calls.append(out[:, -1].detach().float().clone()))

    def key(o):
        return (o.answer, o.score, o.token_counts, o.knobs, o.empty_output, o.nonfinite_logits)

    compared = differing = 0
    worst = 0.0
    try:
        for sample in backend.samples("test")[:inputs]:
            for tier in space.tier_names or (None,):
                state = backend.run_stage1(sample, tier)
                knobs = [space.resolve(KnobConfig(
                    tier=tier, top_k=int(rng.choice(space.top_ks)) if space.top_ks else None,
                    depth=int(rng.choice(space.depths)) if space.depths else None)) for _ in range(rows)]
                calls.clear()
                batched = backend.run_stage2_batch(state, knobs)
                batch_logits = list(calls)
                singles = []
                for k in knobs:
                    calls.clear()
                    singles.append((backend.run_stage2(state, k), list(calls)))
                order = sorted(range(rows), key=lambda r: -knobs[r].depth)
                for step, logits in enumerate(batch_logits):
                    if logits.shape[0] != rows:
                        break
                    for position, r in enumerate(order):
                        worst = max(worst, float((logits[position] - singles[r][1][step][0]).abs().max()))
                compared += rows
                differing += sum(key(b) != key(u) for b, (u, _) in zip(batched, singles))
    finally:
        handle.remove()
    return compared, differing, worst


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=at_least(1), default=15)
    parser.add_argument("--group", type=at_least(1), default=8)
    parser.add_argument("--budget", default="120ms")
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--compare", type=at_least(0), default=0, metavar="N",
                        help="also compare batched and unbatched outcomes and logits on N test inputs")
    args = parser.parse_args()
    if args.compare:
        from backends.registry import load_backend

        compared, differing, worst = compare_batched(load_backend("tiny"), inputs=args.compare, seed=args.seed)
        print(f"batched vs unbatched stage 2 (tiny model, {args.compare} test inputs x every tier x 8 random "
              f"rows): {differing} of {compared} outcomes differ; largest |logit difference| {worst:.2e}")
    result = measure_group_sharing(rounds=args.rounds, group=args.group, budget=args.budget, seed=args.seed)
    print(f"rounds: {args.rounds}, G = {args.group} (MultiKnob-v0, uniform random actions)")
    print(result.report())


if __name__ == "__main__":
    main()
