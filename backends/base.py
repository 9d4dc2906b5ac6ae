"""The minimal backend surface every env, the latency profiler and the trace recorder use.

A backend owns one loaded model and its data splits. Implementations: the HF vision-language
backend (``backends.hf``) with the tiny reference model as default (``backends.tiny``), and the
trace backend that replays recorded outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol, Sequence, runtime_checkable

import numpy as np

from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import Outcome, Stage1State, TokenCounts

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Sample:
    """One input: a question (and image) with its reference answer.

    ``question_type`` indexes ``Backend.question_types`` (-1 when the data has none);
    ``image`` is an HxWx3 uint8 array or ``None`` for text-only data.
    """

    sample_id: int
    split: str
    question: str
    reference: str | None
    image: np.ndarray | None = None
    question_type: int = -1
    meta: dict = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width); replayed samples carry it in ``meta`` without the pixels."""
        if self.image is None:
            return tuple(self.meta.get("image_size", (0, 0)))
        return (int(self.image.shape[0]), int(self.image.shape[1]))


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; accepted: {', '.join(SPLITS)}")
    return split


@runtime_checkable
class Backend(Protocol):
    """The whole backend contract: every member envs, latency_model, the trace recorder and the CLI use.

    Nothing outside a backend probes it with ``hasattr`` / ``getattr``: a member a caller needs is
    declared here, and every backend (the HF backend, the tiny reference model, the trace replay,
    test stand-ins) implements all of them. ``run(sample, knobs)`` equals
    ``run_stage2(run_stage1(sample, knobs.tier, knobs.token_budget), knobs)``.
    """

    knob_space: KnobSpace
    question_types: tuple[str, ...]
    summary_dim: int
    #: length of :meth:`question_features`
    question_feature_dim: int
    #: mean generated length per question type index, key ``None`` for all types (training split)
    expected_new_tokens_by_type: dict

    def identity(self) -> dict[str, Any]:
        """Backend name, model id / content revision, dtype, device: for caches and run logs."""

    @property
    def device(self) -> Any:
        """The torch device stage runs use (``torch.device('cpu')`` for replayed backends)."""

    def cost_params(self) -> dict[str, float]:
        """Architecture sizes the analytic latency features scale with (hidden size, experts, ...)."""

    def recorded_estimator_file(self) -> str | None:
        """A latency estimator stored with replayed data (a trace), or ``None`` for live backends."""

    def samples(self, split: str) -> Sequence[Sample]:
        """The fixed samples of a split (``train``, ``validation`` or ``test``)."""

    def sample(self, split: str, sample_id: int) -> Sample:
        """One sample by id; a ``ValueError`` naming the id and the split's size otherwise."""

    def prompt_tokens(self, sample: Sample) -> int:
        """Text tokens of the sample's prompt (image placeholders excluded)."""

    def question_features(self, sample: Sample) -> np.ndarray:
        """``[question_feature_dim]`` float32 text feature of the question that every input has, with or
        without question types (:func:`backends.text_features.hashed_bag_of_words`)."""

    def expected_token_counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        """Token counts of a run before running it (see :func:`backends.outcome.expected_token_counts`)."""

    def run_stage1(self, sample: Sample, tier: str | None, token_budget: float = 1.0) -> Stage1State:
        """Vision tower at ``tier`` with ``token_budget`` of its tokens kept, plus decoder block 1 at
        the model's full top-k."""

    def run_stage2(self, state: Stage1State, knobs: KnobConfig) -> Outcome:
        """The rest of the model under ``knobs`` (tier must match the state), then decode and score."""

    def run_stage2_batch(self, state: Stage1State, knobs_list: Sequence[KnobConfig]) -> list[Outcome]:
        """Stage 2 of each of ``knobs_list`` (all matching the state's tier and token budget) on one
        stage-1 state: equal to ``[run_stage2(state, k) for k in knobs_list]`` up to float rounding
        (a live model runs them as one batch; see :meth:`backends.hf.HFBackend.run_stage2_batch`).
        ``measured_ms`` of batched outcomes is a share of the batch's time, not a run's latency."""

    def run(self, sample: Sample, knobs: KnobConfig) -> Outcome:
        """Both stages."""


@runtime_checkable
class BoundedGeneration(Protocol):
    """A backend that declares the most tokens one run generates (its generation cap), so a run's
    latency can be bounded before it runs, whatever the answer's length turns out to be
    (:class:`serving.guard.BudgetGuard`). Live model backends declare it; :class:`Backend` does not
    require it (a replay or a stand-in need not)."""

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one run generates."""

    def generation_capped(self, max_new_tokens: int) -> ContextManager[None]:
        """Within the block, a run generates at most ``max_new_tokens`` tokens (clamped to the
        backend's ``min_new_tokens .. max_new_tokens``): a serving deadline cuts the answer, not the
        configuration. Not thread-safe: callers serialise runs (the controller holds a lock)."""
