"""Latency features: knob values, token counts per stage, and analytic cost terms.

The analytic terms (FLOPs, weight elements read, expert calls, block calls) are linear in what a
forward pass actually does, so a model fitted on them extrapolates to input sizes it has not seen;
the learned part only corrects them. They are computed from the :class:`KnobSpace` plus a small
``cost_params`` dict the backend exposes (``backend.cost_params()``), whose keys are
:data:`COST_PARAM_KEYS`.

Counting conventions (per forward, ``T`` = prefill tokens = prompt + vision tokens seen, ``D`` =
depth, ``k`` = top-k, ``k0`` = the model's own top-k, used by block 1 which the knobs leave alone,
``n`` = generated tokens, each of which costs one decode step of ``D`` blocks):

- dense projections per token per block: ``2 * 4 h^2`` FLOPs (Q, K, V, O);
- experts per token per block: ``k * 2 * 3 h e`` FLOPs (gated MLP: gate, up, down) plus the
  router ``2 h E``; a dense model counts one "expert" of the dense MLP width;
- attention: ``4 h`` FLOPs per (query, key) pair, so ``2 h T^2`` per block in prefill (causal half)
  and ``4 h (T + i)`` for decode step ``i``;
- expert calls = tokens x top-k x blocks; distinct experts run in a prefill block =
  ``E (1 - (1 - k/E)^T)`` (what an expert loop launches);
- vision tower: ``vision_layers`` blocks of ``2 (4 + 2 r) v^2`` FLOPs per token (``r`` = MLP ratio)
  plus ``4 v N^2`` attention, on all ``N`` native tokens (tiers pool *after* the tower).
"""

from __future__ import annotations

import itertools
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import TokenCounts

COST_PARAM_KEYS = {
    "hidden_size": "text model hidden size h",
    "intermediate_size": "dense MLP width (used when the model has no experts)",
    "expert_intermediate_size": "width e of one expert's MLP",
    "num_layers": "decoder blocks L",
    "num_experts": "experts per MoE block E (0 for a dense model)",
    "full_top_k": "the model's own experts per token k0 (0 for a dense model)",
    "vocab_size": "LM-head output size V",
    "vision_layers": "vision tower blocks (0 for text-only)",
    "vision_hidden": "vision tower hidden size v",
    "vision_intermediate_size": "vision tower MLP width (optional; default 4 v)",
    "native_vision_tokens": "tokens the tower emits before pooling",
}
"""Keys of ``backend.cost_params()`` and what they mean (all numbers)."""

KNOB_FEATURES = ("tier_index", "tier_tokens", "token_budget", "top_k", "depth")
COUNT_FEATURES = ("prompt_tokens", "vision_tokens_full", "vision_tokens", "new_tokens", "prefill_tokens")
ANALYTIC_FEATURES = (
    "vision_flops", "prefill_linear_flops", "prefill_attention_flops", "prefill_expert_calls",
    "prefill_active_experts", "decode_linear_flops", "decode_attention_flops", "decode_expert_calls",
    "block_calls", "lm_head_flops", "weight_elements_read", "total_flops",
)
FEATURE_NAMES = KNOB_FEATURES + COUNT_FEATURES + ANALYTIC_FEATURES
"""Columns of :meth:`CostFeatures.compute`, in order."""

STAGE1_FEATURE_NAMES = (
    "tier_index", "tier_tokens", "prompt_tokens", "vision_tokens_full", "vision_tokens", "prefill_tokens",
    "vision_flops", "block1_linear_flops", "block1_attention_flops", "block1_expert_calls",
    "block1_active_experts", "total_flops",
)
"""Columns of :meth:`CostFeatures.compute_stage1` (vision tower + decoder block 1)."""

COUNT_COLUMNS = ("prompt_tokens", "vision_tokens_full", "vision_tokens", "new_tokens")
"""Column order of a token-count array accepted in place of :class:`TokenCounts` objects."""


_KNOB_GETTER = operator.attrgetter("tier", "token_budget", "top_k", "depth")
_COUNT_GETTER = operator.attrgetter(*COUNT_COLUMNS)


def _as_list(items, kind: type) -> list:
    if isinstance(items, kind):
        return [items]
    return list(items)


def token_count_array(token_counts) -> np.ndarray:
    """``[N, 4]`` float array (columns :data:`COUNT_COLUMNS`) from TokenCounts objects or an array."""
    if isinstance(token_counts, np.ndarray):
        arr = np.asarray(token_counts, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(COUNT_COLUMNS):
            raise ValueError(f"token_counts array has shape {arr.shape}; accepted: [N, {len(COUNT_COLUMNS)}] "
                             f"with columns {COUNT_COLUMNS}")
    else:
        items = _as_list(token_counts, TokenCounts)
        if items and not isinstance(items[0], TokenCounts):
            raise ValueError(f"token_counts item {items[0]!r} is invalid; accepted: TokenCounts objects or an "
                             f"[N, 4] array with columns {COUNT_COLUMNS}")
        flat = itertools.chain.from_iterable(map(_COUNT_GETTER, items))
        arr = np.fromiter(flat, np.float64, len(COUNT_COLUMNS) * len(items)).reshape(len(items), len(COUNT_COLUMNS))
    if arr.size and (not np.isfinite(arr).all() or (arr < 0).any()):
        raise ValueError("token_counts must be finite and >= 0; got "
                         f"min={np.nanmin(arr)!r}, non-finite={int((~np.isfinite(arr)).sum())}")
    return arr


@dataclass(frozen=True)
class CostFeatures:
    """Turns (knob configs, token counts) into feature rows for one model.

    Args:
        knob_space: the backend's knob space (tiers, top-k and depth ranges).
        cost_params: architecture numbers, keys :data:`COST_PARAM_KEYS`; missing keys fall back
            to the knob space (layers, experts, top-k, native tokens) or to 1.0 (widths), with a
            warning, so the FLOP terms stay proportional to token counts.
    """

    knob_space: KnobSpace
    cost_params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.cost_params) - set(COST_PARAM_KEYS))
        if unknown:
            raise ValueError(f"unknown cost_params keys {unknown}; accepted: {', '.join(COST_PARAM_KEYS)}")
        for key, value in self.cost_params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost_params[{key!r}]={value!r} is invalid; accepted: a finite number >= 0")
        space = self.knob_space
        fallback = {
            "num_layers": space.num_layers, "num_experts": space.num_experts or 0,
            "full_top_k": space.full_top_k or 0, "native_vision_tokens": space.native_vision_tokens,
            "hidden_size": 1.0, "intermediate_size": 1.0, "expert_intermediate_size": 1.0, "vocab_size": 1.0,
            "vision_layers": 1.0 if space.has_vision else 0.0, "vision_hidden": 1.0 if space.has_vision else 0.0,
        }
        missing = sorted(k for k in fallback if k not in self.cost_params)
        if missing:
            warnings.warn(f"backend cost_params lack {missing}; using knob-space values or 1.0 for them, so the "
                          f"analytic latency terms only scale with token counts for those parts", stacklevel=3)
        params = {**fallback, **{k: float(v) for k, v in self.cost_params.items()}}
        params.setdefault("vision_intermediate_size", 4.0 * params["vision_hidden"])
        object.__setattr__(self, "_params", params)
        tier_names = space.tier_names
        object.__setattr__(self, "_tier_index", {name: i for i, name in enumerate(tier_names)})
        object.__setattr__(self, "_tier_tokens", {name: space.tiers[name] for name in tier_names})

    @classmethod
    def from_backend(cls, backend) -> "CostFeatures":
        """Features for ``backend`` (its knob space and ``cost_params()``)."""
        return cls(backend.knob_space, dict(backend.cost_params()))

    @property
    def params(self) -> dict[str, float]:
        """Cost parameters after fallbacks."""
        return dict(self._params)

    # --- knob and count columns ------------------------------------------------------------
    def _tier_columns(self, tiers: Sequence) -> tuple[np.ndarray, np.ndarray]:
        space = self.knob_space
        if not space.has_vision:
            bad = next((t for t in tiers if t is not None), None)
            if bad is not None:
                raise ValueError(f"tier={bad!r} is invalid: {space.model_class} has no vision tower; accepted: None")
            zeros = np.zeros(len(tiers))
            return zeros, zeros
        # None is the native token count, the same as the highest tier.
        native = space.tier_names[-1]
        index = {**self._tier_index, None: self._tier_index[native]}
        tokens = {**self._tier_tokens, None: space.native_vision_tokens}
        try:
            return (np.fromiter(map(index.__getitem__, tiers), np.float64, len(tiers)),
                    np.fromiter(map(tokens.__getitem__, tiers), np.float64, len(tiers)))
        except (KeyError, TypeError):
            bad = next(t for t in tiers if t is not None and not (isinstance(t, str) and t in index))
            raise ValueError(f"unknown vision tier {bad!r}; accepted: {', '.join(space.tier_names)} or None") from None

    def knob_arrays(self, configs: Sequence[KnobConfig]) -> dict[str, np.ndarray]:
        """Columns :data:`KNOB_FEATURES` of ``configs`` (``None`` knobs resolved to the model's own)."""
        configs = _as_list(configs, KnobConfig)
        if configs and not isinstance(configs[0], KnobConfig):
            raise ValueError(f"config {configs[0]!r} is invalid; accepted: KnobConfig objects")
        p, space, n = self._params, self.knob_space, len(configs)
        # One attribute pass over the objects (this is the hot loop of a 10,000-row predict).
        tiers, budgets, top_ks, depths = zip(*map(_KNOB_GETTER, configs)) if n else ((), (), (), ())
        tier_index, tier_tokens = self._tier_columns(tiers)
        budget = np.fromiter(budgets, np.float64, n)
        top_k = np.fromiter((p["full_top_k"] if k is None else k for k in top_ks), np.float64, n)
        depth = np.fromiter((p["num_layers"] if d is None else d for d in depths), np.float64, n)
        if n and not ((budget > 0) & (budget <= 1)).all():
            raise ValueError(f"token_budget={budget[~((budget > 0) & (budget <= 1))][0]!r} is invalid; "
                             f"accepted: a fraction 0 < b <= 1")
        if space.has_moe and n and not ((top_k >= 1) & (top_k <= p["num_experts"])).all():
            raise ValueError(f"top_k={top_k[(top_k < 1) | (top_k > p['num_experts'])][0]:g} is invalid; "
                             f"accepted: an integer in [1, {p['num_experts']:g}]")
        if n and not ((depth >= 1) & (depth <= p["num_layers"])).all():
            raise ValueError(f"depth={depth[(depth < 1) | (depth > p['num_layers'])][0]:g} is invalid; "
                             f"accepted: an integer in [1, {p['num_layers']:g}]")
        return {"tier_index": tier_index, "tier_tokens": tier_tokens, "token_budget": budget, "top_k": top_k,
                "depth": depth}

    # --- cost terms --------------------------------------------------------------------------
    def _vision_flops(self, n_full: np.ndarray) -> np.ndarray:
        p = self._params
        v, vi = p["vision_hidden"], p["vision_intermediate_size"]
        return p["vision_layers"] * (n_full * 2.0 * (4.0 * v * v + 2.0 * v * vi) + 4.0 * v * n_full ** 2)

    def _expert_terms(self) -> tuple[float, float, float]:
        """(FLOPs per expert call, router FLOPs per token-block, weight elements per expert)."""
        p = self._params
        h = p["hidden_size"]
        if p["num_experts"] > 0:
            e = p["expert_intermediate_size"]
            return 6.0 * h * e, 2.0 * h * p["num_experts"], 3.0 * h * e
        return 6.0 * h * p["intermediate_size"], 0.0, 3.0 * h * p["intermediate_size"]

    def _active_experts(self, tokens: np.ndarray, k: np.ndarray) -> np.ndarray:
        experts = self._params["num_experts"]
        if experts <= 0:
            return np.ones_like(tokens)
        return experts * (1.0 - np.power(1.0 - np.minimum(k, experts) / experts, tokens))

    def compute_arrays(self, knobs: Mapping[str, np.ndarray], counts: np.ndarray) -> np.ndarray:
        """``[N, len(FEATURE_NAMES)]`` features from knob columns and a ``[N, 4]`` count array."""
        p = self._params
        h, vocab = p["hidden_size"], p["vocab_size"]
        k0 = p["full_top_k"] if p["num_experts"] > 0 else 1.0
        prompt, n_full, n_vis, new = (counts[:, i] for i in range(4))
        k = knobs["top_k"] if p["num_experts"] > 0 else np.ones_like(prompt)
        depth = knobs["depth"]
        tokens = prompt + n_vis
        expert_flops, router_flops, expert_elements = self._expert_terms()
        dense_flops = 8.0 * h * h
        # Block 1 keeps the model's own top-k; blocks 2..D run the knob's.
        calls_per_token = k0 + (depth - 1.0) * k
        vision = self._vision_flops(n_full)
        prefill_linear = tokens * (depth * (dense_flops + router_flops) + calls_per_token * expert_flops)
        prefill_attention = depth * 2.0 * h * tokens ** 2
        prefill_calls = tokens * calls_per_token
        prefill_active = self._active_experts(tokens, np.full_like(tokens, k0)) + (depth - 1.0) * self._active_experts(
            tokens, k)
        decode_linear = new * (depth * (dense_flops + router_flops) + calls_per_token * expert_flops)
        decode_attention = depth * 4.0 * h * (new * tokens + new * (new - 1.0) / 2.0)
        decode_calls = new * calls_per_token
        block_calls = depth * (1.0 + new)
        lm_head = (1.0 + new) * 2.0 * h * vocab
        per_block_weights = 4.0 * h * h + h * p["num_experts"]
        weights = (depth * per_block_weights + prefill_active * expert_elements + h * vocab
                   + new * (depth * per_block_weights + calls_per_token * expert_elements + h * vocab))
        total = vision + prefill_linear + prefill_attention + decode_linear + decode_attention + lm_head
        columns = (knobs["tier_index"], knobs["tier_tokens"], knobs["token_budget"], k, depth,
                   prompt, n_full, n_vis, new, tokens,
                   vision, prefill_linear, prefill_attention, prefill_calls, prefill_active, decode_linear,
                   decode_attention, decode_calls, block_calls, lm_head, weights, total)
        return np.column_stack(columns) if len(prompt) else np.zeros((0, len(FEATURE_NAMES)))

    def compute(self, configs: Sequence[KnobConfig], token_counts) -> np.ndarray:
        """``[N, len(FEATURE_NAMES)]`` features of whole runs (stage 1 + stage 2 + decoding)."""
        knobs = self.knob_arrays(configs)
        counts = token_count_array(token_counts)
        if len(counts) != len(knobs["depth"]):
            raise ValueError(f"got {len(knobs['depth'])} configs but {len(counts)} token counts; accepted: one "
                             f"TokenCounts per config")
        return self.compute_arrays(knobs, counts)

    def compute_stage1(self, tiers: Sequence[Any], token_counts) -> np.ndarray:
        """``[N, len(STAGE1_FEATURE_NAMES)]`` features of stage 1 (vision tower + block 1 at full top-k).

        ``tiers`` holds tier names (or ``None``) or KnobConfigs (their tier is used).
        """
        tiers = [t.tier if isinstance(t, KnobConfig) else t for t in (tiers if isinstance(tiers, (list, tuple))
                                                                       else list(tiers))]
        counts = token_count_array(token_counts)
        if len(counts) != len(tiers):
            raise ValueError(f"got {len(tiers)} tiers but {len(counts)} token counts; accepted: one TokenCounts "
                             f"per tier")
        p = self._params
        tier_index, tier_tokens = self._tier_columns(tiers)
        prompt, n_full, n_vis = counts[:, 0], counts[:, 1], counts[:, 2]
        tokens = prompt + n_vis
        expert_flops, router_flops, _ = self._expert_terms()
        k0 = p["full_top_k"] if p["num_experts"] > 0 else 1.0
        h = p["hidden_size"]
        vision = self._vision_flops(n_full)
        linear = tokens * (8.0 * h * h + router_flops + k0 * expert_flops)
        attention = 2.0 * h * tokens ** 2
        calls = tokens * k0
        active = self._active_experts(tokens, np.full_like(tokens, k0))
        columns = (tier_index, tier_tokens, prompt, n_full, n_vis, tokens, vision, linear, attention, calls, active,
                   vision + linear + attention)
        return np.column_stack(columns) if len(prompt) else np.zeros((0, len(STAGE1_FEATURE_NAMES)))
