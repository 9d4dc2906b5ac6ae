"""A stand-in backend whose outcomes are a fixed table: the ground truth for learning tests.

Every input has a difficulty (its question type) and a length (tokens it generates); every knob
configuration has a capability and an analytic latency. A configuration answers correctly exactly
when its capability reaches the input's difficulty, so for every (input, budget) the oracle's
choice is known in closed form: the cheapest configuration that answers correctly within the
budget, else the cheapest configuration. The optimum moves with the budget (a tighter budget
forces a lower depth or tier on long inputs), which is what a budget-conditioned controller has
to learn. Runs take microseconds, so a GRPO run of hundreds of updates takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from backends.base import Sample, check_split
from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import Outcome, Stage1State, TokenCounts

TIERS = {"low": 4, "medium": 9, "high": 16}
TOP_KS = (2, 4, 8)
DEPTHS = (4, 6, 8)
QUESTION_TYPES = ("easy", "medium", "hard", "hardest")
#: generated tokens per question type (latency grows with it: each token is a pass through the model)
NEW_TOKENS = {0: 1, 1: 1, 2: 1, 3: 2}
SUMMARY_DIM = 4


def capability(knobs: KnobConfig) -> int:
    """0..6: tier rank + top-k rank + depth rank (each 0..2)."""
    return (list(TIERS).index(knobs.tier) + TOP_KS.index(knobs.top_k) + DEPTHS.index(knobs.depth))


def difficulty(question_type: int) -> int:
    return (1, 2, 4, 5)[question_type]


class TableLatency:
    """The exact latency of the table backend, as a latency-estimator stand-in."""
    noise = None  # a stand-in has no measured profile noise


    def predict(self, knobs: Sequence[KnobConfig], counts: Sequence[TokenCounts]) -> np.ndarray:
        return np.array([self.stage1(c) + k.depth * (0.6 + 0.15 * k.top_k) * (1 + c.new_tokens)
                         for k, c in zip(knobs, counts)], dtype=np.float64)

    def predict_stage1(self, tiers: Sequence[str], counts: Sequence[TokenCounts]) -> np.ndarray:
        return np.array([self.stage1(c) for c in counts], dtype=np.float64)

    @staticmethod
    def stage1(counts: TokenCounts) -> float:
        return 2.0 + 0.5 * counts.vision_tokens


def make_estimator(backend: Any = None) -> TableLatency:
    """The ``estimator=module:callable`` hook train.py accepts."""
    return TableLatency()


@dataclass
class _Payload:
    question_type: int


class TableBackend:
    """Implements the whole :class:`backends.base.Backend` contract from the tables above."""

    knob_space = KnobSpace(model_class="TableModel", tiers=dict(TIERS), native_vision_tokens=16,
                           top_ks=TOP_KS, full_top_k=max(TOP_KS), num_experts=8, depths=DEPTHS,
                           num_layers=max(DEPTHS))
    question_types = QUESTION_TYPES
    summary_dim = SUMMARY_DIM
    question_feature_dim = 0  # the question type already tells the difficulty

    def question_features(self, sample: Sample) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)

    def __init__(self, split_sizes: dict | None = None, seed: int = 0):
        sizes = {"train": 512, "validation": 64, "test": 128, **(split_sizes or {})}
        rng = np.random.default_rng(seed)
        self._splits = {
            split: [Sample(sample_id=i, split=split, question=f"q{i}", reference="yes",
                           image=None, question_type=int(rng.integers(len(QUESTION_TYPES))),
                           meta={"image_size": (32, 32)})
                    for i in range(n)]
            for split, n in sizes.items()}
        self.expected_new_tokens_by_type = {**NEW_TOKENS, None: 2}

    # --- identity and costs ---------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"name": "table", "content_revision": "table-v1"}

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def cost_params(self) -> dict[str, float]:
        return {}

    def recorded_estimator_file(self) -> None:
        return None

    # --- data -----------------------------------------------------------------------------
    def samples(self, split: str) -> Sequence[Sample]:
        return self._splits[check_split(split)]

    def sample(self, split: str, sample_id: int) -> Sample:
        items = self.samples(split)
        if not (isinstance(sample_id, (int, np.integer)) and 0 <= sample_id < len(items)):
            raise ValueError(f"sample_id={sample_id!r} is out of range for split {split!r}; "
                             f"accepted: 0..{len(items) - 1}")
        return items[int(sample_id)]

    def prompt_tokens(self, sample: Sample) -> int:
        return 8

    def expected_token_counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        return TokenCounts(prompt_tokens=8, vision_tokens_full=16,
                           vision_tokens=self.knob_space.vision_tokens(knobs),
                           new_tokens=NEW_TOKENS[sample.question_type])

    # --- runs -----------------------------------------------------------------------------
    def run_stage1(self, sample: Sample, tier: str | None, token_budget: float = 1.0) -> Stage1State:
        tier = tier or self.knob_space.tier_names[-1]
        counts = self.expected_token_counts(sample, KnobConfig(tier=tier, token_budget=token_budget))
        summary = np.zeros(SUMMARY_DIM, dtype=np.float32)
        summary[sample.question_type] = 1.0  # block 1 "recognises" the difficulty
        return Stage1State(sample_id=sample.sample_id, tier=tier, token_counts=counts, summary=summary,
                           measured_ms=TableLatency.stage1(counts), payload=_Payload(sample.question_type))

    def run_stage2(self, state: Stage1State, knobs: KnobConfig) -> Outcome:
        knobs = self.knob_space.resolve(knobs)
        correct = capability(knobs) >= difficulty(state.payload.question_type)
        counts = state.token_counts
        return Outcome(answer="yes" if correct else "no", reference="yes", score=float(correct),
                       token_counts=counts, measured_ms=float(TableLatency().predict([knobs], [counts])[0]),
                       knobs=knobs, stage1_ms=state.measured_ms)

    def run_stage2_batch(self, state: Stage1State, knobs_list) -> list[Outcome]:
        return [self.run_stage2(state, k) for k in knobs_list]

    def run(self, sample: Sample, knobs: KnobConfig) -> Outcome:
        return self.run_stage2(self.run_stage1(sample, knobs.tier, knobs.token_budget), knobs)
