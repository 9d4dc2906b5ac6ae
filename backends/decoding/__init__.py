"""Decoding knobs, strategies, the decoding backend contract and its ``transformers`` implementation.

``import backends.decoding`` registers the :class:`DecodingBackend` protocol with
:func:`backends.registry.register_backend_type` (``backend=decoding`` is in the registry's name
table), so :func:`backends.registry.load_backend` accepts loaded decoding backends.
"""

from backends.decoding.backend import (DecodingOutcome, DecodingTokenCounts, DraftTokenizerMismatchError,
                                       HFDecodingBackend, QAData, check_same_tokenizer,
                                       load_decoding_backend)
from backends.decoding.base import DecodingBackend
from backends.decoding.knobs import STRATEGIES, DecodingKnobError, DecodingKnobs, DecodingSpace
from backends.decoding.strategies import DECODING_STRATEGIES, DecodingStrategy, beam_sources, strategy
from backends.registry import register_backend_type

register_backend_type(DecodingBackend)

__all__ = ["DecodingBackend", "HFDecodingBackend", "DecodingOutcome", "DecodingTokenCounts",
           "DraftTokenizerMismatchError", "QAData", "beam_sources", "check_same_tokenizer", "load_decoding_backend",
           "STRATEGIES", "DecodingKnobError", "DecodingKnobs", "DecodingSpace", "DECODING_STRATEGIES",
           "DecodingStrategy", "strategy"]
