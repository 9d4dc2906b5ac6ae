"""What one model run returns: the one ``Outcome`` type every backend produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TokenCounts:
    """Token counts per stage: the latency estimator's size features.

    Args:
        prompt_tokens: text tokens in the prompt (image placeholders excluded).
        vision_tokens_full: vision tokens the tower produced before tier pooling / budget (the
            native count in pool mode; the tier's count in resize mode, where the tower runs on the
            resized image).
        vision_tokens: vision tokens the language model actually saw.
        new_tokens: tokens generated.
    """

    prompt_tokens: int
    vision_tokens_full: int
    vision_tokens: int
    new_tokens: int = 0

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens + self.vision_tokens



def expected_token_counts(backend: Any, sample: Any, knobs: Any) -> TokenCounts:
    """Token counts of a run before running it, for any backend (live or replayed).

    Prompt and vision tokens are exact; the generated length is the training split's mean answer
    length for the sample's question type (``backend.expected_new_tokens_by_type``, key ``None``
    for all types), never this sample's reference, which a controller must not see.
    """
    by_type = backend.expected_new_tokens_by_type
    return TokenCounts(prompt_tokens=backend.prompt_tokens(sample),
                       vision_tokens_full=backend.knob_space.tower_tokens(knobs.tier),
                       vision_tokens=backend.knob_space.vision_tokens(knobs),
                       new_tokens=by_type.get(sample.question_type, by_type[None]))

@dataclass
class Outcome:
    """Result of running one sample under one knob configuration."""

    answer: str
    reference: str | None
    score: float
    token_counts: TokenCounts
    measured_ms: float
    knobs: Any
    empty_output: bool = False
    nonfinite_logits: bool = False
    stage1_ms: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return self.token_counts.new_tokens


@dataclass
class Stage1State:
    """What stage 1 (vision tower at a tier + decoder block 1 at full top-k) leaves behind.

    Reusable across a GRPO group: ``run_stage2`` never mutates it (it copies the cache).
    ``summary`` is a small fixed-size float vector describing block 1's output.
    """

    sample_id: int
    tier: str
    token_counts: TokenCounts
    summary: np.ndarray
    measured_ms: float
    payload: Any = None
