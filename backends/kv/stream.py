"""Stream a document through a causal LM token by token under a KV policy (teacher forcing).

Each step feeds one token, scores the next one, and times the forward: the per-token NLL and the
per-token time (TPOT) are what the diagnostics and the StreamingKV env report. Greedy generation
under a policy is here too (used to check policies against the full cache).

Threads: one-token forwards of a small model are dozens of tiny ops, each too small to gain from
intra-op parallelism; with more than one torch thread every op waits for all its threads to be
scheduled, which on a CPU shared with other jobs costs milliseconds per op (see BENCHMARKS.md).
:class:`DocumentStreamer` therefore runs its forwards under :func:`intra_op_threads` (one thread
by default) and restores the process setting afterwards.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from backends.checks import check_int
from backends.kv.cache import DEFAULT_STORAGE, PruneEvent, make_policy_cache
from backends.kv.decode_step import check_decode_step, decode_step_for
from backends.kv.policies import FullCache, KVPolicy
from backends.threads import configured_threads, set_torch_threads


def check_threads(threads: int | None) -> int | None:
    """``threads`` if it is ``None`` or an integer >= 1; a ``ValueError`` naming it otherwise."""
    if threads is not None:
        check_int("threads", threads, 1, where="or None: the process's default")
    return threads


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore (``None``: leave as is)."""
    if check_threads(threads) is None:
        yield
        return
    before = configured_threads()
    set_torch_threads(threads)  # 1 in a child forked from a multi-threaded parent (more would hang there)
    try:
        yield
    finally:
        set_torch_threads(before)


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
        threads: torch intra-op threads during forwards (default 1, see the module docstring;
            ``None`` keeps the process setting, e.g. for a large model on many cores).
        storage: the cache's storage, ``"slots"`` (default), ``"static"`` (fixed shapes; a full cache is
            allocated for the whole document) or ``"concat"`` (see :mod:`backends.kv.cache`).
        compile: decode through ``torch.compile(model)`` (:func:`compiled_forward`; falls back to the
            eager model with one warning where compiling fails); it compiles the model's own forward,
            so it runs with ``decode_step`` ``"auto"`` or ``"model"``.
        decode_step: ``"auto"`` (default: the fused step where the model's family has one), ``"fused"``
            or ``"model"`` (:mod:`backends.kv.decode_step`; equal outputs, the fused one faster).
    """

    def __init__(self, model, token_ids, policy: KVPolicy | None = None, threads: int | None = 1,
                 storage: str = DEFAULT_STORAGE, compile: bool = False, decode_step: str = "auto"):
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if len(ids) < 2:
            raise ValueError(f"a document needs at least 2 tokens to score one; got {len(ids)}")
        self.model = model
        self.threads = check_threads(threads)
        self.token_ids = ids.to(model.device)
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} is invalid; accepted: true or false")
        check_decode_step(decode_step)
        if compile and decode_step == "fused":
            raise ValueError("compile=true with decode_step='fused' is invalid (compiling applies to the model's "
                             "forward); accepted: decode_step='auto' or 'model' with compile=true")
        self.cache = make_policy_cache(model, policy or FullCache(), storage,
                                       static_capacity=len(ids) if storage == "static" else 0)
        self.forward = compiled_forward(model, storage) if compile else decode_step_for(model, decode_step)
        self.cursor = 0  # index of the next token to feed

    def fork(self) -> "DocumentStreamer":
        """An independent streamer at the same point of the same document (see :meth:`KVPolicyCache.fork`):
        evaluate several knob choices for the next chunk from one shared prefix."""
        copy = DocumentStreamer.__new__(DocumentStreamer)
        copy.model, copy.threads, copy.token_ids, copy.cursor = self.model, self.threads, self.token_ids, self.cursor
        copy.forward = self.forward
        copy.cache = self.cache.fork()
        return copy

    @property
    def remaining(self) -> int:
        """Tokens still to predict."""
        return len(self.token_ids) - 1 - self.cursor

    @torch.inference_mode()
    def advance(self, num_tokens: int, policy: KVPolicy | None = None) -> ChunkTrace:
        """Feed up to ``num_tokens`` tokens (fewer at the end of the document) under ``policy``."""
        check_int("num_tokens", num_tokens, 1)
        if policy is not None:
            self.cache.set_policy(policy)
        steps = min(num_tokens, self.remaining)
        nll, step_ms, lengths = np.zeros(steps), np.zeros(steps), np.zeros(steps, dtype=np.int64)
        first_event = len(self.cache.prune_events)
        with intra_op_threads(self.threads):
            self._feed(steps, nll, step_ms, lengths)
            self.cache.settle()
        return ChunkTrace(nll, step_ms, lengths, list(self.cache.prune_events[first_event:]))

    def _feed(self, steps: int, nll: np.ndarray, step_ms: np.ndarray, lengths: np.ndarray) -> None:
        for i in range(steps):
            token = self.token_ids[self.cursor:self.cursor + 1][None]
            lengths[i] = self.cache.cache_length + 1
            start = time.perf_counter()
            logits = self.forward(token, past_key_values=self.cache, use_cache=True,
                                  attention_mask=self.cache.attention_mask(1)).logits[0, -1]
            step_ms[i] = (time.perf_counter() - start) * 1e3
            target = self.token_ids[self.cursor + 1]
            nll[i] = float(torch.logsumexp(logits.float(), -1) - logits[target].float())
            self.cursor += 1


_COMPILED: dict = {}


def compiled_forward(model, storage: str = DEFAULT_STORAGE):
    """``torch.compile(model, dynamic=True)``, compiled once per model and storage in this process and
    tried on a short throwaway stream first; where that fails (no C++ compiler, an unsupported op,
    ...) the eager ``model`` with one warning naming the error."""
    key = (id(model), storage)
    if key in _COMPILED and _COMPILED[key][0] is model:
        return _COMPILED[key][1]
    compiled = torch.compile(model, dynamic=True)
    try:
        with torch.inference_mode():
            cache = make_policy_cache(model, FullCache(), storage, static_capacity=8 if storage == "static" else 0)
            for token in range(3):
                compiled(torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True,
                         attention_mask=cache.attention_mask(1))
    except Exception as error:  # torch.compile raises many types (BackendCompilerFailed, InductorError, ...)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile failed for {type(model).__name__} ({type(error).__name__}: {first_line}); "
                      "decoding runs on the eager model", stacklevel=2)
        compiled = model
    _COMPILED[key] = (model, compiled)
    return compiled


@torch.inference_mode()
def greedy_generate(model, prompt_ids, max_new_tokens: int, policy: KVPolicy | None = None,
                    storage: str = DEFAULT_STORAGE, decode_step: str = "auto") -> list[int]:
    """Greedy decoding under ``policy``: prefill the prompt in one forward, then one token per step
    (``decode_step`` as in :class:`DocumentStreamer`)."""
    check_int("max_new_tokens", max_new_tokens, 1)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if ids.shape[1] < 1:
        raise ValueError("prompt_ids is empty; accepted: at least one token")
    cache = make_policy_cache(model, policy or FullCache(), storage,
                              static_capacity=ids.shape[1] + max_new_tokens if storage == "static" else 0)
    step = decode_step_for(model, decode_step)
    generated: list[int] = []
    inputs = ids
    for _ in range(max_new_tokens):
        logits = step(inputs, past_key_values=cache, use_cache=True,
                       attention_mask=cache.attention_mask(inputs.shape[1])).logits[0, -1]
        next_id = int(torch.argmax(logits))
        generated.append(next_id)
        inputs = torch.tensor([[next_id]], device=ids.device)
    return generated
