"""The KV envs' data: the default documents and the fixed stream of episode windows (the causal LM
and the user's documents come through :mod:`backends.kv.sources`).

The documents are cut into consecutive, non-overlapping windows of ``episode_tokens + 1`` tokens,
numbered in document order; window ``i`` belongs to ``SPLIT_OF_WINDOW[i % 5]`` (train, train,
train, validation, test).
"""

from __future__ import annotations

from typing import Sequence

from backends.tiny_text import held_out_token_documents

SPLIT_OF_WINDOW = ("train", "train", "train", "validation", "test")  # window i -> SPLIT_OF_WINDOW[i % 5]


def default_documents(tokenizer) -> list[list[int]]:
    """The tiny reference model's held-out token documents."""
    return list(held_out_token_documents(tokenizer).values())


def episode_windows(documents: Sequence[Sequence[int]], episode_tokens: int) -> dict[str, list[tuple[int, int]]]:
    """``split -> [(document index, start)]``: the fixed episode stream (see module docstring)."""
    windows: dict[str, list[tuple[int, int]]] = {"train": [], "validation": [], "test": []}
    index = 0
    for doc_index, document in enumerate(documents):
        for start in range(0, len(document) - episode_tokens, episode_tokens + 1):
            windows[SPLIT_OF_WINDOW[index % len(SPLIT_OF_WINDOW)]].append((doc_index, start))
            index += 1
    return windows
