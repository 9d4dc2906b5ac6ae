"""The decoding backend contract: what ``Decoding-v0`` and the decoding latency profiler use.

A decoding backend is not a :class:`backends.base.Backend` (it has no vision stages): it owns a
target causal LM (and optionally a draft sharing its tokenizer), QA data, and ``run(sample,
knobs)`` decoding one answer. :mod:`backends.decoding` registers this protocol with
:func:`backends.registry.register_backend_type`, so ``load_backend`` accepts loaded decoding
backends like any other; callers check ``isinstance(x, DecodingBackend)``, never probe members.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from backends.base import Sample
from backends.decoding.knobs import DecodingKnobs, DecodingSpace


@runtime_checkable
class DecodingBackend(Protocol):
    """Every member envs/decoding.py, latency_model/decoding.py and bench/decoding.py use.

    Members:
        knob_space: the decoding configurations this backend (target, optional draft) can run.
        question_types: names of the data's question types (``Sample.question_type`` indexes them).
        options: the keyword arguments that rebuild this backend with its factory (for pickling an env).
        identity(): name, model ids and revisions, dtype, device (for caches and run logs).
        device: the torch device the target runs on.
        samples(split) / sample(split, sample_id): the fixed QA samples of a split.
        prompt_ids(sample, chat_template): the prompt's token ids (chat template or plain text).
        expected_token_counts(sample, knobs): prompt tokens (exact) and expected generated tokens,
            before running (a :class:`~backends.decoding.backend.DecodingTokenCounts`).
        run(sample, knobs): decode, score and time one answer (a
            :class:`~backends.decoding.backend.DecodingOutcome`); knobs are validated first.
    """

    knob_space: DecodingSpace
    question_types: tuple[str, ...]
    options: dict

    def identity(self) -> dict[str, Any]: ...

    @property
    def device(self) -> Any: ...

    def samples(self, split: str) -> Sequence[Sample]: ...

    def sample(self, split: str, sample_id: int) -> Sample: ...

    def prompt_ids(self, sample: Sample, chat_template: bool) -> list[int]: ...

    def expected_token_counts(self, sample: Sample, knobs: DecodingKnobs) -> Any: ...

    def run(self, sample: Sample, knobs: DecodingKnobs) -> Any: ...
