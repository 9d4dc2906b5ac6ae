"""The one-token decode step the KV streams run: the model's own forward, or a fused step.

A one-token forward of a small model through transformers spends much of its time on bookkeeping
that does not depend on the cache: the causal-mask builder, the rotary module, position ids,
attention-interface dispatch, output dataclasses (BENCHMARKS "Decode step" measures it). That
fixed cost hides what the KV policies trade: the share of a step spent attending over the cache. A fused step does the same arithmetic
with only the model's own modules and one ``scaled_dot_product_attention`` per layer, so a step's
time is the weights it reads plus the cache it attends to, as in a serving engine.

Steps (:data:`DECODE_STEPS`, the ``decode_step`` option of :class:`~backends.kv.stream.DocumentStreamer`):

* ``"model"``: ``model(input_ids, past_key_values=cache, use_cache=True)``, any causal LM;
* ``"fused"``: the family's fused step (:data:`FUSED_STEPS`; GPT-NeoX / Pythia today), a
  ``ValueError`` naming why for a model it does not support;
* ``"auto"`` (default): ``"fused"`` where supported, else ``"model"``.

Contract of a fused step: called like the model (``step(input_ids, past_key_values=cache,
use_cache=True, attention_mask=...)``, returns an object with ``.logits``), equal outputs to the
model's forward up to float rounding (tested token for token under every storage, policy and
``rope_positions``), and the same cache updates (it calls each cache layer's ``update``, so
pruning, positions inside the cache and storage behave exactly as under the model's forward).
Anything but one new token on a :class:`~backends.kv.cache.KVPolicyCache` (a prefill, no cache)
goes to the model's forward, and so does every call while any module of the model has a forward
hook or pre-hook (or a global one is registered): the fused step skips modules (the attention, the
rotary embedding, the decoder layers) whose hooks would otherwise not run. Linear layers and norms are called as the model's modules, so
quantized (bitsandbytes) and dispatched models keep their own kernels and hooks.

A new family is one class here with a ``supports(model)`` that names what it cannot run, and an
entry in :data:`FUSED_STEPS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

DECODE_STEPS = ("auto", "fused", "model")


def direct_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as a function: a plain ``nn.Linear`` / ``nn.LayerNorm`` goes straight to its functional
    op (a module call costs microseconds of dispatch, dozens of times per token); anything else (a
    bitsandbytes layer, a module whose ``forward`` was wrapped, as accelerate's device hooks do) is
    called as the module."""
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return module
    if type(module) is nn.Linear:
        return lambda x: F.linear(x, module.weight, module.bias)
    if type(module) is nn.LayerNorm:
        return lambda x: F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return module


@dataclass
class StepOutput:
    """What a fused step returns: the next-token ``logits`` ``(batch, 1, vocab)``."""

    logits: torch.Tensor


class GPTNeoXDecodeStep:
    """Fused one-token step of a ``GPTNeoXForCausalLM`` (Pythia) with default RoPE, in eval mode.

    Per layer: input norm, fused QKV projection, rotary on the first ``rotary_ndims`` of each head
    (queries and keys in one pass), the cache layer's ``update``, SDPA of the one query over every
    token the layer returns (all kept tokens are older than the query, so no mask), output
    projection and the MLP, parallel or sequential residual as the config says.
    """

    family = "GPTNeoXForCausalLM"

    @staticmethod
    def supports(model) -> str | None:
        """``None`` if this step runs ``model``, else why not (one phrase)."""
        if type(model).__name__ != "GPTNeoXForCausalLM":
            return f"{type(model).__name__} is not GPTNeoXForCausalLM"
        rope = getattr(model.config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            return f"rope_type {rope.get('rope_type')!r} is not the default RoPE"
        if model.training:
            return "the model is in training mode (dropout)"
        return None

    def __init__(self, model):
        reason = self.supports(model)
        if reason is not None:
            raise ValueError(f"decode_step='fused' is invalid for this model ({reason}); accepted: decode_step='model'")
        self.model = model
        self.body = model.gpt_neox
        self.head = model.get_output_embeddings()
        config = model.config
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.heads
        self.parallel_residual = config.use_parallel_residual
        self.inv_freq = self.body.rotary_emb.inv_freq.detach().float()
        self.rope_scale = float(getattr(self.body.rotary_emb, "attention_scaling", 1.0))
        self.rotary_ndims = 2 * len(self.inv_freq)
        self.scaling = self.head_size ** -0.5
        # Per layer: (input norm, QKV, output projection, post-attention norm, MLP in, activation, MLP out).
        self.layers = [tuple(direct_call(m) for m in (layer.input_layernorm, layer.attention.query_key_value,
                                                       layer.attention.dense, layer.post_attention_layernorm,
                                                       layer.mlp.dense_h_to_4h, layer.mlp.act, layer.mlp.dense_4h_to_h))
                       for layer in self.body.layers]
        self.final_norm = direct_call(self.body.final_layer_norm)
        self.head_call = direct_call(self.head)
        # Hook registries are dicts changed in place: checking them on every call is cheap.
        self.hook_dicts = [hooks for module in model.modules()
                           for hooks in (module._forward_hooks, module._forward_pre_hooks)]

    def hooked(self) -> bool:
        """Whether a forward hook is registered on any module of the model, or globally."""
        return (any(self.hook_dicts) or bool(nn.modules.module._global_forward_hooks)
                or bool(nn.modules.module._global_forward_pre_hooks))

    def __reduce__(self):  # pickled as its model (an env pickles its streamer mid-episode); rebuilt on load
        return type(self), (self.model,)

    def __call__(self, input_ids, past_key_values=None, use_cache: bool = True, attention_mask=None, **kwargs):
        from backends.kv.cache import KVPolicyCache  # the cache module imports nothing of this one

        if (input_ids.shape[-1] != 1 or not isinstance(past_key_values, KVPolicyCache) or not use_cache
                or kwargs or self.model.training or self.hooked()):
            return self.model(input_ids, past_key_values=past_key_values, use_cache=use_cache,
                              attention_mask=attention_mask, **kwargs)
        return StepOutput(self._step(input_ids, past_key_values))

    def _rotary(self, position: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = float(position) * self.inv_freq.to(like.device)
        angles = torch.cat((angles, angles))
        return ((angles.cos() * self.rope_scale).to(like.dtype), (angles.sin() * self.rope_scale).to(like.dtype))

    def _step(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.body.embed_in(input_ids)  # (batch, 1, hidden)
        batch = hidden.shape[0]
        # The cache reports the position the new token takes: tokens seen (original positions) or kept
        # ("cache" positions), as it does to the model's forward.
        cos, sin = self._rotary(cache.get_seq_length(), hidden)
        rot, half = self.rotary_ndims, self.rotary_ndims // 2
        static = cache.storage == "static"
        for layer_idx, (calls, cache_layer) in enumerate(zip(self.layers, cache.layers)):
            input_norm, query_key_value, dense, post_norm, mlp_in, act, mlp_out = calls
            qkv = query_key_value(input_norm(hidden))
            qkv = qkv.view(batch, 1, self.heads, 3 * self.head_size).transpose(1, 2)
            qk, value = qkv[..., :2 * self.head_size], qkv[..., 2 * self.head_size:]
            qk = qk.unflatten(-1, (2, self.head_size))  # (batch, heads, 1, q|k, head_size)
            turned, kept = qk[..., :rot], qk[..., rot:]
            rotated_half = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)
            qk = torch.cat((turned * cos + rotated_half * sin, kept), dim=-1)
            keys, values = cache_layer.update(qk[..., 1, :], value, layer_idx)
            if static:  # the whole storage comes back; attend to the used slots
                keys, values = keys[:, :, :cache_layer.length], values[:, :, :cache_layer.length]
            attended = F.scaled_dot_product_attention(qk[..., 0, :], keys, values, scale=self.scaling)
            attended = dense(attended.transpose(1, 2).reshape(batch, 1, -1))
            # The sums in transformers' order: in half precision the order changes the rounding.
            if self.parallel_residual:
                hidden = mlp_out(act(mlp_in(post_norm(hidden)))) + attended + hidden
            else:
                hidden = attended + hidden
                hidden = mlp_out(act(mlp_in(post_norm(hidden)))) + hidden
        return self.head_call(self.final_norm(hidden))


#: Fused steps by model class name (a new family: its class above and an entry here).
FUSED_STEPS = {GPTNeoXDecodeStep.family: GPTNeoXDecodeStep}


def fused_step_unsupported(model) -> str | None:
    """``None`` if a fused step runs ``model``, else why not (one phrase)."""
    step_class = FUSED_STEPS.get(type(model).__name__)
    if step_class is None:
        return f"no fused step for {type(model).__name__} (fused: {', '.join(FUSED_STEPS)})"
    return step_class.supports(model)


def check_decode_step(step: str) -> str:
    """``step`` if it is one of :data:`DECODE_STEPS`; a ``ValueError`` naming it otherwise."""
    if step not in DECODE_STEPS:
        raise ValueError(f"decode_step={step!r} is invalid; accepted: {', '.join(DECODE_STEPS)}")
    return step


def resolve_decode_step(model, step: str = "auto") -> str:
    """``"fused"`` or ``"model"``: what ``step`` runs on ``model`` (``"auto"``: fused where supported)."""
    check_decode_step(step)
    reason = fused_step_unsupported(model)
    if step == "fused" and reason is not None:
        raise ValueError(f"decode_step='fused' is invalid for this model ({reason}); accepted: 'auto' or 'model'")
    if step == "auto":
        return "model" if reason is not None else "fused"
    return step


_FUSED: dict = {}


def decode_step_for(model, step: str = "auto"):
    """The callable a stream decodes ``model`` with under ``step`` (one fused step per model)."""
    if resolve_decode_step(model, step) == "model":
        return model
    cached = _FUSED.get(id(model))
    if cached is None or cached.model is not model:
        cached = FUSED_STEPS[type(model).__name__](model)
        _FUSED[id(model)] = cached
    return cached
