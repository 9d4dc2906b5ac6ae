"""Memory of a long estimated-latency run: resident set size (RSS) over many env steps.

Steps ``MultiKnob-v0`` in estimated-latency mode with random actions on random training samples,
so nearly every (sample, configuration) pair is new and every memo an env or backend keeps grows
as fast as it can. The model itself is replaced by a stand-in (:class:`FastBackend`): the tiny
backend's real data, tokenizer, knob space and token counts, with stage runs that return
outcomes of the real types at once (stage-1 states carry a block-1-sized payload). Only the
memory the env, the runner and the data keep is measured, at thousands of steps per second.

Prints RSS every ``--every`` steps and the growth after ``--warmup`` steps; exits with status 1
when that growth exceeds ``--max-growth-mb``.

    python bench/memory.py [--steps 20000] [--warmup 2000] [--max-growth-mb 50] [--checkpoint DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import gymnasium as gym  # noqa: E402

import envs  # noqa: E402,F401  (registers the ids)
from backends.script_args import OneLineArgumentParser, at_least
from backends.base import Sample  # noqa: E402
from backends.knobs import KnobConfig  # noqa: E402
from backends.outcome import Outcome, Stage1State, TokenCounts  # noqa: E402
from backends.registry import load_backend  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise OSError("no VmRSS in /proc/self/status; accepted: Linux")


def _digest(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class FastBackend:
    """A :class:`~backends.base.Backend` over a real backend's data with instant, deterministic stage runs.

    Samples, prompts, token counts, knob space and identity come from ``inner``; ``run_stage1``
    returns a state whose payload is the size of a block-1 hidden state plus its keys and values;
    ``run_stage2`` returns an outcome whose answer is a deterministic function of (sample, knobs).
    """

    def __init__(self, inner):
        self.inner = inner
        self.knob_space = inner.knob_space
        self.question_types = tuple(inner.question_types)
        self.summary_dim = inner.summary_dim
        self.question_feature_dim = inner.question_feature_dim
        self.expected_new_tokens_by_type = dict(inner.expected_new_tokens_by_type)
        self._hidden = int(inner.cost_params()["hidden_size"])

    def identity(self) -> dict[str, Any]:
        return {**self.inner.identity(), "backend": "fast-stand-in"}

    @property
    def device(self):
        return self.inner.device

    def cost_params(self) -> dict[str, float]:
        return self.inner.cost_params()

    def recorded_estimator_file(self) -> str | None:
        return None

    def samples(self, split: str) -> Sequence[Sample]:
        return self.inner.samples(split)

    def sample(self, split: str, sample_id: int) -> Sample:
        return self.inner.sample(split, sample_id)

    def question_features(self, sample: Sample) -> np.ndarray:
        return self.inner.question_features(sample)

    def prompt_tokens(self, sample: Sample) -> int:
        return self.inner.prompt_tokens(sample)

    def expected_token_counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        return self.inner.expected_token_counts(sample, knobs)

    def run_stage1(self, sample: Sample, tier: str | None, token_budget: float = 1.0) -> Stage1State:
        knobs = self.knob_space.resolve(KnobConfig(tier=tier, token_budget=token_budget))
        counts = TokenCounts(prompt_tokens=self.prompt_tokens(sample),
                             vision_tokens_full=self.knob_space.native_vision_tokens,
                             vision_tokens=self.knob_space.vision_tokens(knobs))
        rng = np.random.default_rng(_digest(sample.split, sample.sample_id, knobs.tier, token_budget))
        summary = rng.standard_normal(self.summary_dim).astype(np.float32)
        payload = np.zeros((3, counts.prefill_tokens, self._hidden), dtype=np.float32)  # hidden, keys, values
        return Stage1State(sample_id=sample.sample_id, tier=knobs.tier, token_counts=counts, summary=summary,
                           measured_ms=0.0, payload=(sample, token_budget, payload))

    def run_stage2(self, state: Stage1State, knobs: KnobConfig) -> Outcome:
        sample, token_budget, _ = state.payload
        knobs = self.knob_space.resolve(knobs)
        words = (sample.reference or "").split() or ["none"]
        answer = words[0] if _digest(sample.split, sample.sample_id, knobs) % 3 else "no"
        new_tokens = self.expected_new_tokens_by_type.get(sample.question_type, self.expected_new_tokens_by_type[None])
        counts = TokenCounts(**{**state.token_counts.__dict__, "new_tokens": int(new_tokens)})
        return Outcome(answer=answer, reference=sample.reference, score=float(answer == sample.reference),
                       token_counts=counts, measured_ms=0.0, stage1_ms=0.0, knobs=knobs,
                       empty_output=False, nonfinite_logits=False)

    def run_stage2_batch(self, state: Stage1State, knobs_list) -> list[Outcome]:
        return [self.run_stage2(state, k) for k in knobs_list]

    def run(self, sample: Sample, knobs: KnobConfig) -> Outcome:
        return self.run_stage2(self.run_stage1(sample, knobs.tier, knobs.token_budget), knobs)


class AnalyticEstimator:
    """A latency stand-in: grows with vision tokens, top-k x depth and generated tokens."""

    noise = None  # a stand-in has no measured profile noise

    def predict(self, knobs, counts) -> np.ndarray:
        return np.array([20 + 0.5 * c.vision_tokens + (k.top_k or 8) * (k.depth or 16) * 0.4 + 8 * c.new_tokens
                         for k, c in zip(knobs, counts)], dtype=np.float64)

    def predict_stage1(self, tiers, counts) -> np.ndarray:
        return np.array([5 + 0.2 * c.vision_tokens for c in counts], dtype=np.float64)


def measure(steps: int = 20_000, warmup: int = 2_000, every: int = 1_000, checkpoint: str | None = None,
            seed: int = 0) -> dict:
    """Run ``steps`` env steps; RSS (MiB) every ``every`` steps and the growth after ``warmup``."""
    inner = load_backend({"name": "tiny", **({"checkpoint": checkpoint} if checkpoint else {})})
    env = gym.make("MultiKnob-v0", backend=FastBackend(inner), estimator=AnalyticEstimator(), budget="80ms")
    rng = np.random.default_rng(seed)
    nvec = env.action_space.nvec
    env.reset(seed=seed)
    done, samples, start = False, [], time.perf_counter()
    for step in range(1, steps + 1):
        if done:
            env.reset()
        _, _, terminated, truncated, _ = env.step(rng.integers(nvec))
        done = terminated or truncated
        if step % every == 0 or step == warmup:
            samples.append((step, round(rss_mb(), 1)))
    after_warmup = [mb for step, mb in samples if step >= warmup]
    return {"steps": steps, "warmup": warmup, "rss_mb": samples,
            "growth_after_warmup_mb": round(max(after_warmup) - after_warmup[0], 1),
            "steps_per_s": round(steps / (time.perf_counter() - start), 1)}


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=at_least(1), default=20_000)
    parser.add_argument("--warmup", type=at_least(0), default=2_000)
    parser.add_argument("--every", type=at_least(1), default=1_000)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--checkpoint", default=None, help="tiny model folder (default: the shipped one)")
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    if not (1 <= args.warmup <= args.steps):
        parser.error(f"--warmup={args.warmup} is invalid; accepted: 1 <= warmup <= steps ({args.steps})")
    result = measure(args.steps, args.warmup, args.every, args.checkpoint, args.seed)
    for step, mb in result["rss_mb"]:
        print(f"step {step:>7}: RSS {mb:8.1f} MiB")
    verdict = "ok" if result["growth_after_warmup_mb"] <= args.max_growth_mb else "FAIL"
    print(f"growth after step {args.warmup}: {result['growth_after_warmup_mb']} MiB "
          f"(bound {args.max_growth_mb:g}) {verdict}; {result['steps_per_s']} steps/s")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "max_growth_mb": args.max_growth_mb}, indent=1))
    sys.exit(0 if verdict == "ok" else 1)


if __name__ == "__main__":
    main()
