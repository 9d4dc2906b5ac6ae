"""Decoding knobs and the decoding backend (target + optional draft, QA data, ``generate``).

``import backends.decoding`` registers ``backend=decoding`` with :mod:`backends.registry`.
"""

from backends.decoding.backend import (DecodingBackend, DecodingOutcome, DecodingTokenCounts,
                                       DraftTokenizerMismatchError, QAData, beam_sources, check_same_tokenizer,
                                       load_decoding_backend)
from backends.decoding.knobs import STRATEGIES, DecodingKnobError, DecodingKnobs, DecodingSpace
from backends.registry import register_backend

register_backend("decoding", load_decoding_backend)

__all__ = ["DecodingBackend", "DecodingOutcome", "DecodingTokenCounts", "DraftTokenizerMismatchError", "QAData",
           "beam_sources", "check_same_tokenizer", "load_decoding_backend", "STRATEGIES", "DecodingKnobError",
           "DecodingKnobs", "DecodingSpace"]
