"""The KV envs' data: the default documents and the fixed stream of episode windows (the causal LM
and the user's documents come through :mod:`backends.kv.sources`).

The documents are cut into consecutive, non-overlapping windows of ``episode_tokens + 1`` tokens,
numbered in document order; window ``i`` belongs to ``SPLIT_OF_WINDOW[i % 5]`` (train, train,
train, validation, test).

Stream prefix: a tokenizer that puts special tokens before every text (a BOS: Llama's ``<s>``, the
tiny text LM v2's ``<|endoftext|>``) defines how every stream the model was trained on begins, and
these tokens are the attention sink StreamingLLM keeps. Every episode then starts with them, as a
stream of a new document would: the prefix is taken off the documents (:func:`split_stream_prefix`)
and each window is the prefix followed by ``episode_tokens + 1 - len(prefix)`` document tokens
(:func:`episode_ids`), so an episode still predicts ``episode_tokens`` tokens.
"""

from __future__ import annotations

from typing import Sequence

from backends.tiny_text import held_out_token_documents

SPLIT_OF_WINDOW = ("train", "train", "train", "validation", "test")  # window i -> SPLIT_OF_WINDOW[i % 5]


def default_documents(tokenizer) -> list[list[int]]:
    """The tiny reference model's held-out token documents."""
    return list(held_out_token_documents(tokenizer).values())


def stream_prefix(tokenizer) -> list[int]:
    """The token ids ``tokenizer`` puts before every text (its BOS), ``[]`` when it adds none."""
    probe = "stream prefix probe"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if not plain or with_special[-len(plain):] != plain:
        return []
    return with_special[:len(with_special) - len(plain)]


def split_stream_prefix(documents: Sequence[Sequence[int]], prefix: Sequence[int]) -> list[list[int]]:
    """``documents`` without the leading ``prefix`` where they start with it (see module docstring)."""
    n = len(prefix)
    return [list(doc[n:]) if n and list(doc[:n]) == list(prefix) else list(doc) for doc in documents]


def episode_ids(document: Sequence[int], start: int, episode_tokens: int, prefix: Sequence[int] = ()) -> list[int]:
    """The ``episode_tokens + 1`` token ids an episode streams: ``prefix``, then the document from ``start``."""
    return list(prefix) + list(document[start:start + episode_tokens + 1 - len(prefix)])


def episode_windows(documents: Sequence[Sequence[int]], episode_tokens: int,
                    prefix_tokens: int = 0) -> dict[str, list[tuple[int, int]]]:
    """``split -> [(document index, start)]``: the fixed episode stream (see module docstring); each
    window takes ``episode_tokens + 1 - prefix_tokens`` document tokens."""
    windows: dict[str, list[tuple[int, int]]] = {"train": [], "validation": [], "test": []}
    length = episode_tokens + 1 - prefix_tokens
    if length < 2:
        raise ValueError(f"episode_tokens={episode_tokens} leaves no document token after the {prefix_tokens}-token "
                         f"stream prefix; accepted: episode_tokens >= {prefix_tokens + 1}")
    index = 0
    for doc_index, document in enumerate(documents):
        for start in range(0, len(document) - length + 1, length):
            windows[SPLIT_OF_WINDOW[index % len(SPLIT_OF_WINDOW)]].append((doc_index, start))
            index += 1
    return windows
