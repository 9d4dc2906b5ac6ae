"""A fixed-size text feature of a question that every input has: a signed hashed bag of words.

Why: a user's dataset may carry no question types, yet a controller must still condition on the
input (a counting question needs the high tier; a yes/no question may not). Hashing words with a
stable hash (BLAKE2b, not Python's per-process ``hash``) gives the same vector in every process,
needs no vocabulary, and is cheap enough to compute per observation.
"""

from __future__ import annotations

import hashlib

import numpy as np

from backends.scoring import normalize_answer

QUESTION_FEATURE_DIM = 16


def hashed_bag_of_words(text: str, dim: int = QUESTION_FEATURE_DIM) -> np.ndarray:
    """``[dim]`` float32: each normalised word adds +-1 at a hashed index; L2-normalised (zeros for no words)."""
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim={dim!r} is invalid; accepted: an integer >= 1")
    vec = np.zeros(dim, dtype=np.float64)
    for word in normalize_answer(text).split():
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        vec[digest % dim] += 1.0 if (digest >> 63) & 1 else -1.0
    norm = np.linalg.norm(vec)
    return (vec / norm if norm > 0 else vec).astype(np.float32)
