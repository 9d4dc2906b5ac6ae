"""The one definition of the knob space, and how a knob configuration is applied to a model.

A :class:`KnobConfig` says *what* to run (vision tier, vision-token budget, MoE top-k, depth);
a :class:`KnobSpace` says what a loaded model supports; :func:`apply_knobs` applies a config
to a loaded Hugging Face model as a context manager and restores it exactly on exit (no
reload, no copy of weights).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Iterator

TIER_NAMES = ("low", "medium", "high")


class KnobError(ValueError):
    """A knob value outside what the model supports (names the value and the accepted range)."""


@dataclass(frozen=True)
class KnobConfig:
    """One inference configuration.

    Args:
        tier: vision tier name (``"low"``, ``"medium"``, ``"high"``); ``None`` = the model's native
            token count (same as the highest tier).
        token_budget: fraction of the tier's vision tokens kept, ``0 < b <= 1`` (default 1.0).
        top_k: experts per token in every MoE block except the first; ``None`` = the model's own.
        depth: number of decoder blocks executed before the final norm and LM head (early exit);
            ``None`` = all blocks.
    """

    tier: str | None = None
    token_budget: float = 1.0
    top_k: int | None = None
    depth: int | None = None

    def replace(self, **changes) -> "KnobConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {"tier": self.tier, "token_budget": self.token_budget, "top_k": self.top_k, "depth": self.depth}

    def __str__(self) -> str:
        return (f"tier={self.tier or 'native'} budget={self.token_budget:g} "
                f"top_k={self.top_k if self.top_k is not None else 'model'} "
                f"depth={self.depth if self.depth is not None else 'all'}")


def _fmt(values) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


@dataclass(frozen=True)
class KnobSpace:
    """What one loaded model supports, with ranges from its config.

    Args:
        model_class: the model's class name (for error messages).
        tiers: tier name -> number of vision tokens the language model sees at that tier
            (empty for text-only models).
        native_vision_tokens: vision tokens the tower emits before pooling (0 for text-only).
        token_budgets: the discrete vision-token-budget fractions envs offer as actions.
        top_ks: the top-k choices offered as actions (empty if the model has no MoE).
        full_top_k: the model's own experts-per-token.
        num_experts: experts per MoE block.
        depths: depth choices offered as actions.
        num_layers: decoder blocks in the model.
    """

    model_class: str
    tiers: dict = field(default_factory=dict)
    native_vision_tokens: int = 0
    token_budgets: tuple = (0.25, 0.5, 0.75, 1.0)
    top_ks: tuple = ()
    full_top_k: int | None = None
    num_experts: int | None = None
    depths: tuple = ()
    num_layers: int = 0

    # --- the knob families this model supports -------------------------------------------
    @property
    def has_vision(self) -> bool:
        return bool(self.tiers)

    @property
    def has_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def tier_names(self) -> tuple:
        return tuple(self.tiers)

    def validate(self, knobs: KnobConfig) -> KnobConfig:
        """Raise :class:`KnobError` naming the bad value and the accepted range; return knobs."""
        cls = self.model_class
        if knobs.tier is not None:
            if not self.has_vision:
                raise KnobError(f"{cls} has no vision tower: knob 'tier'={knobs.tier!r} is not supported")
            if knobs.tier not in self.tiers:
                raise KnobError(f"unknown vision tier {knobs.tier!r} for {cls}; accepted: {_fmt(self.tiers)}")
        b = knobs.token_budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not (0 < b <= 1):
            raise KnobError(f"token_budget={b!r} is invalid; accepted: a fraction 0 < b <= 1")
        if b < 1 and not self.has_vision:
            raise KnobError(f"{cls} has no vision tower: knob 'token_budget'={b!r} is not supported")
        if knobs.top_k is not None:
            if not self.has_moe:
                raise KnobError(f"{cls} has no MoE blocks: knob 'top_k'={knobs.top_k!r} is not supported")
            if isinstance(knobs.top_k, bool) or not isinstance(knobs.top_k, int) or not (
                    1 <= knobs.top_k <= self.num_experts):
                raise KnobError(f"top_k={knobs.top_k!r} is invalid for {cls}; accepted: an integer in "
                                f"[1, {self.num_experts}] (the number of experts)")
        if knobs.depth is not None:
            if isinstance(knobs.depth, bool) or not isinstance(knobs.depth, int) or not (
                    1 <= knobs.depth <= self.num_layers):
                raise KnobError(f"depth={knobs.depth!r} is invalid for {cls}; accepted: an integer in "
                                f"[1, {self.num_layers}] (the number of decoder blocks)")
        return knobs

    # --- named points of the space --------------------------------------------------------
    def full(self) -> KnobConfig:
        """The most expensive configuration in the action space."""
        return KnobConfig(
            tier=self.tier_names[-1] if self.has_vision else None,
            token_budget=1.0,
            top_k=max(self.top_ks) if self.top_ks else None,
            depth=max(self.depths) if self.depths else None,
        )

    def cheapest(self) -> KnobConfig:
        """The cheapest configuration in the action space."""
        return KnobConfig(
            tier=self.tier_names[0] if self.has_vision else None,
            token_budget=min(self.token_budgets) if self.has_vision else 1.0,
            top_k=min(self.top_ks) if self.top_ks else None,
            depth=min(self.depths) if self.depths else None,
        )

    def vision_tokens(self, knobs: KnobConfig) -> int:
        """Vision tokens the language model sees under ``knobs`` (tier, then budget)."""
        if not self.has_vision:
            return 0
        n = self.tiers[knobs.tier] if knobs.tier is not None else self.native_vision_tokens
        return kept_tokens(n, knobs.token_budget)

    def grid(self, *, token_budgets: bool = False) -> Iterator[KnobConfig]:
        """Every (tier, top_k, depth) combination of the action space; token budgets too if asked."""
        tiers = self.tier_names or (None,)
        budgets = self.token_budgets if (token_budgets and self.has_vision) else (1.0,)
        top_ks = self.top_ks or (None,)
        depths = self.depths or (None,)
        for tier, b, k, d in itertools.product(tiers, budgets, top_ks, depths):
            yield KnobConfig(tier=tier, token_budget=b, top_k=k, depth=d)

    def as_dict(self) -> dict:
        return {"model_class": self.model_class, "tiers": dict(self.tiers),
                "native_vision_tokens": self.native_vision_tokens, "token_budgets": list(self.token_budgets),
                "top_ks": list(self.top_ks), "full_top_k": self.full_top_k, "num_experts": self.num_experts,
                "depths": list(self.depths), "num_layers": self.num_layers}


def kept_tokens(n_tokens: int, token_budget: float) -> int:
    """K of N vision tokens kept under a budget fraction: ``ceil(b * N)``, at least 1."""
    return max(1, min(n_tokens, math.ceil(token_budget * n_tokens - 1e-9)))
