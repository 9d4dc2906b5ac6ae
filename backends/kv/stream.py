"""Stream a document through a causal LM token by token under a KV policy (teacher forcing).

Each step feeds one token, scores the next one, and times the forward: the per-token NLL and the
per-token time (TPOT) are what the diagnostics and the StreamingKV env report. Greedy generation
under a policy is here too (used to check policies against the full cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from backends.kv.cache import KVPolicyCache, PruneEvent, num_decoder_layers
from backends.kv.policies import FullCache, KVPolicy


@dataclass
class ChunkTrace:
    """What streaming ``n`` tokens produced.

    Args:
        nll: per-token negative log-likelihood (nats) of each predicted token.
        step_ms: wall-clock milliseconds of each forward.
        cache_length: tokens attended by each forward (cache before the step plus the new token).
        prune_events: prunes that happened during the chunk.
    """

    nll: np.ndarray
    step_ms: np.ndarray
    cache_length: np.ndarray
    prune_events: list[PruneEvent] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.nll)


class DocumentStreamer:
    """Teacher-forced token-by-token pass over ``token_ids`` with a changeable KV policy.

    Args:
        model: a loaded causal LM (``model(input_ids, past_key_values=..., use_cache=True)``).
        token_ids: the document, 1-D sequence of token ids (at least 2).
        policy: initial policy (default :class:`FullCache`).
    """

    def __init__(self, model, token_ids, policy: KVPolicy | None = None):
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if len(ids) < 2:
            raise ValueError(f"a document needs at least 2 tokens to score one; got {len(ids)}")
        self.model = model
        self.token_ids = ids.to(model.device)
        self.cache = KVPolicyCache(policy or FullCache(), num_decoder_layers(model))
        self.cursor = 0  # index of the next token to feed

    @property
    def remaining(self) -> int:
        """Tokens still to predict."""
        return len(self.token_ids) - 1 - self.cursor

    @torch.inference_mode()
    def advance(self, num_tokens: int, policy: KVPolicy | None = None) -> ChunkTrace:
        """Feed up to ``num_tokens`` tokens (fewer at the end of the document) under ``policy``."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens!r} is invalid; accepted: an integer >= 1")
        if policy is not None:
            self.cache.set_policy(policy)
        steps = min(num_tokens, self.remaining)
        nll, step_ms, lengths = np.zeros(steps), np.zeros(steps), np.zeros(steps, dtype=np.int64)
        first_event = len(self.cache.prune_events)
        for i in range(steps):
            token = self.token_ids[self.cursor:self.cursor + 1][None]
            lengths[i] = self.cache.cache_length + 1
            start = time.perf_counter()
            logits = self.model(token, past_key_values=self.cache, use_cache=True).logits[0, -1]
            step_ms[i] = (time.perf_counter() - start) * 1e3
            target = self.token_ids[self.cursor + 1]
            nll[i] = float(torch.logsumexp(logits.float(), -1) - logits[target].float())
            self.cursor += 1
        return ChunkTrace(nll, step_ms, lengths, list(self.cache.prune_events[first_event:]))


@torch.inference_mode()
def greedy_generate(model, prompt_ids, max_new_tokens: int, policy: KVPolicy | None = None) -> list[int]:
    """Greedy decoding under ``policy``: prefill the prompt in one forward, then one token per step."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; accepted: an integer >= 1")
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if ids.shape[1] < 1:
        raise ValueError("prompt_ids is empty; accepted: at least one token")
    cache = KVPolicyCache(policy or FullCache(), num_decoder_layers(model))
    generated: list[int] = []
    inputs = ids
    for _ in range(max_new_tokens):
        logits = model(inputs, past_key_values=cache, use_cache=True).logits[0, -1]
        next_id = int(torch.argmax(logits))
        generated.append(next_id)
        inputs = torch.tensor([[next_id]], device=ids.device)
    return generated
