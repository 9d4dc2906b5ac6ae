"""The one definition of the knob space, and how a knob configuration is applied to a model.

A :class:`KnobConfig` says *what* to run (vision tier, vision-token budget, MoE top-k, depth);
a :class:`KnobSpace` says what a loaded model supports; :func:`apply_knobs` applies a config
to a loaded Hugging Face model as a context manager and restores it exactly on exit (no
reload, no copy of weights).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from backends.checks import is_int

TIER_NAMES = ("low", "medium", "high")
TIER_MODES = ("resize", "pool")


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

    def __post_init__(self) -> None:
        # numpy scalars from action arrays become plain Python numbers (hashable, JSON-friendly);
        # anything else is left for KnobSpace.validate to reject with a clear message.
        for name in ("top_k", "depth"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        if isinstance(self.token_budget, numbers.Real) and not isinstance(self.token_budget, bool):
            object.__setattr__(self, "token_budget", float(self.token_budget))

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
        tier_mode: how a tier reaches its token count. ``"resize"``: the image is resized *before*
            the vision tower to ``tier_sizes[tier]`` pixels (longest edge), so the encoder computes
            fewer patches at lower tiers (LLaVA's CLIP through position-embedding interpolation,
            IDEFICS2's vision transformer natively; Qwen-VL's processor receives a square image of
            that side, see :mod:`backends.qwen_vl`). ``"pool"``: the tower always sees the full
            image and its output is pooled to the tier's count afterwards (no encoder saving; the
            mode the tiny reference model was trained with).
        tier_sizes: tier name -> the image side (px, longest edge) the encoder sees in resize mode.
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
    tier_mode: str = "pool"
    tier_sizes: dict = field(default_factory=dict)
    # Configurations this space has validated (and resolved): the route from an env's action to
    # the model (runner, backend, apply_knobs) asks again at each layer, and is answered here
    # without checking twice: each value is validated once and trusted after.
    _checked: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tier_mode not in TIER_MODES:
            raise KnobError(f"tier_mode={self.tier_mode!r} is invalid; accepted: {', '.join(TIER_MODES)}")
        if self.tier_mode == "resize" and self.tiers and set(self.tier_sizes) != set(self.tiers):
            raise KnobError(f"tier_mode='resize' needs an image size for every tier; got tier_sizes="
                            f"{dict(self.tier_sizes)} for tiers {list(self.tiers)}")

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
        """Raise :class:`KnobError` naming the bad value and the accepted range; return knobs.

        A configuration is checked once per space; asking again (a later layer of the same run)
        costs a set lookup.
        """
        key = _checked_key(knobs)
        if key in self._checked:
            return knobs
        self._check(knobs)
        self._checked.add(key)
        return knobs

    def _check(self, knobs: KnobConfig) -> None:
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
            if not is_int(knobs.top_k) or not (
                    1 <= knobs.top_k <= self.num_experts):
                raise KnobError(f"top_k={knobs.top_k!r} is invalid for {cls}; accepted: an integer in "
                                f"[1, {self.num_experts}] (the number of experts)")
        if knobs.depth is not None:
            if not is_int(knobs.depth) or not (
                    1 <= knobs.depth <= self.num_layers):
                raise KnobError(f"depth={knobs.depth!r} is invalid for {cls}; accepted: an integer in "
                                f"[1, {self.num_layers}] (the number of decoder blocks)")

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

    def resolve(self, knobs: KnobConfig) -> KnobConfig:
        """The same configuration with every ``None`` made explicit (native tier, own top-k, all blocks).

        Outcomes carry resolved knobs so that latency features and logs never see ``None``.
        """
        self.validate(knobs)
        resolved = KnobConfig(
            tier=knobs.tier if knobs.tier is not None else (self.tier_names[-1] if self.has_vision else None),
            token_budget=float(knobs.token_budget),
            top_k=knobs.top_k if knobs.top_k is not None else self.full_top_k,
            depth=knobs.depth if knobs.depth is not None else self.num_layers,
        )
        self._checked.add(_checked_key(resolved))  # valid by construction: later layers trust it
        return resolved

    def vision_tokens(self, knobs: KnobConfig) -> int:
        """Vision tokens the language model sees under ``knobs`` (tier, then budget)."""
        if not self.has_vision:
            return 0
        n = self.tiers[knobs.tier] if knobs.tier is not None else self.native_vision_tokens
        return kept_tokens(n, knobs.token_budget)

    def tower_tokens(self, tier: str | None) -> int:
        """Vision tokens the tower (with its connector) emits at ``tier``, before the token budget.

        Pool mode: always the native count (pooling comes after the tower). Resize mode: the
        tier's count, since the encoder already ran on the smaller image.
        """
        if not self.has_vision:
            return 0
        if self.tier_mode == "resize" and tier is not None:
            return int(self.tiers[tier])
        return self.native_vision_tokens

    def grid(self, *, token_budgets: bool = False) -> Iterator[KnobConfig]:
        """Every (tier, top_k, depth) combination of the action space; token budgets too if asked."""
        tiers = self.tier_names or (None,)
        budgets = self.token_budgets if (token_budgets and self.has_vision) else (1.0,)
        top_ks = self.top_ks or (None,)
        depths = self.depths or (None,)
        for tier, b, k, d in itertools.product(tiers, budgets, top_ks, depths):
            yield KnobConfig(tier=tier, token_budget=b, top_k=k, depth=d)

    @classmethod
    def from_dict(cls, d: dict) -> "KnobSpace":
        """Inverse of :meth:`as_dict` (tier order kept: cheapest first)."""
        return cls(model_class=d["model_class"], tiers={str(k): int(v) for k, v in d["tiers"].items()},
                   native_vision_tokens=int(d["native_vision_tokens"]),
                   token_budgets=tuple(float(b) for b in d["token_budgets"]),
                   top_ks=tuple(int(k) for k in d["top_ks"]), full_top_k=d["full_top_k"],
                   num_experts=d["num_experts"], depths=tuple(int(x) for x in d["depths"]),
                   num_layers=int(d["num_layers"]), tier_mode=str(d.get("tier_mode", "pool")),
                   tier_sizes={str(k): int(v) for k, v in dict(d.get("tier_sizes") or {}).items()})

    def as_dict(self) -> dict:
        return {"model_class": self.model_class, "tiers": dict(self.tiers),
                "native_vision_tokens": self.native_vision_tokens, "token_budgets": list(self.token_budgets),
                "top_ks": list(self.top_ks), "full_top_k": self.full_top_k, "num_experts": self.num_experts,
                "depths": list(self.depths), "num_layers": self.num_layers, "tier_mode": self.tier_mode,
                "tier_sizes": dict(self.tier_sizes)}


def _checked_key(knobs: KnobConfig) -> tuple:
    """A configuration's identity including each value's type (``True == 1`` must not pass as checked)."""
    return tuple((type(v), v) for v in (knobs.tier, knobs.token_budget, knobs.top_k, knobs.depth))


def kept_tokens(n_tokens: int, token_budget: float) -> int:
    """K of N vision tokens kept under a budget fraction: ``ceil(b * N)``, at least 1."""
    return max(1, min(n_tokens, math.ceil(token_budget * n_tokens - 1e-9)))


# --------------------------------------------------------------------------------------------
# Vision-token transforms (tier pooling, budgeted selection). Pure functions on feature tensors,
# used by the knob context manager and by the tiny model's adaptive training alike.
# --------------------------------------------------------------------------------------------
def pool_vision_tokens(features: torch.Tensor, n_out: int) -> torch.Tensor:
    """Pool ``[B, N, d]`` patch features to ``[B, n_out, d]``.

    Square grids (N and n_out perfect squares) use 2-D adaptive average pooling so that spatial
    neighbours are merged, as LLaVA-style token pooling does; other counts (e.g. a perceiver
    resampler's latents) fall back to 1-D adaptive average pooling over the sequence.
    """
    b, n, d = features.shape
    if not (1 <= n_out <= n):
        raise KnobError(f"cannot pool {n} vision tokens to {n_out}; accepted: 1 <= n_out <= {n}")
    if n_out == n:
        return features
    side, side_out = math.isqrt(n), math.isqrt(n_out)
    if side * side == n and side_out * side_out == n_out:
        grid = features.transpose(1, 2).reshape(b, d, side, side)
        pooled = F.adaptive_avg_pool2d(grid, side_out)
        return pooled.reshape(b, d, n_out).transpose(1, 2)
    return F.adaptive_avg_pool1d(features.transpose(1, 2), n_out).transpose(1, 2)


def vision_token_scores(features: torch.Tensor) -> torch.Tensor:
    """Informativeness of each vision token: L2 distance from the image's mean token, ``[B, N]``.

    Why this score: background patches are near the mean, object patches far from it, and it
    needs no attention weights (so it works with SDPA / flash attention and every tower).
    """
    return (features - features.mean(dim=1, keepdim=True)).float().norm(dim=-1)


def select_vision_tokens(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` most informative of ``N`` tokens (see :func:`vision_token_scores`).

    Returns the kept tokens ``[B, k, d]`` in their original order (so the spatial order the
    language model was trained on is preserved) and their indices ``[B, k]``.
    """
    b, n, d = features.shape
    if not (1 <= k <= n):
        raise KnobError(f"cannot keep {k} of {n} vision tokens; accepted: 1 <= k <= {n}")
    if k == n:
        idx = torch.arange(n, device=features.device).expand(b, n)
        return features, idx
    idx = vision_token_scores(features).topk(k, dim=1).indices.sort(dim=1).values
    return features.gather(1, idx.unsqueeze(-1).expand(b, k, d)), idx


def transform_vision_features(features: torch.Tensor, space: "KnobSpace", knobs: KnobConfig, *,
                              return_indices: bool = False):
    """The tower's features under ``knobs``: ``[B, N, d] -> [B, space.vision_tokens(knobs), d]``.

    Pool mode pools the full image's ``N`` tokens to the tier's count; in resize mode the tower
    already ran at the tier's resolution, so ``N`` is the tier's count. Then the token budget
    keeps the most informative ``K`` (:func:`select_vision_tokens`). The one implementation of
    this step: :func:`apply_knobs` and the HF backend's stage 1 both go through it. With
    ``return_indices``: also the kept tokens' indices ``[B, K]`` among the tier's tokens.
    """
    n_tier = space.tiers[knobs.tier] if knobs.tier is not None else features.shape[1]
    if space.tier_mode == "resize":
        if features.shape[1] != n_tier:
            raise KnobError(f"the vision tower emitted {features.shape[1]} tokens at tier {knobs.tier!r}, expected "
                            f"{n_tier} (tier_mode='resize'); accepted: tiers whose token count matches their "
                            f"image size (tier_sizes)")
    else:
        features = pool_vision_tokens(features, n_tier)
    kept, indices = select_vision_tokens(features, kept_tokens(n_tier, knobs.token_budget))
    return (kept, indices) if return_indices else kept


def resize_for_tier(pixel_values: torch.Tensor, side: int, patch_size: int) -> torch.Tensor:
    """Resize images so their longest edge is ``side`` px (never upscaled), both edges multiples of
    ``patch_size``: ``[..., C, H, W] -> [..., C, H', W']`` (antialiased bilinear).

    Resizing after the processor's normalisation equals resizing the image before it: the
    normalisation is a per-channel affine map and the resize is linear.
    """
    *lead, c, h, w = pixel_values.shape
    scale = min(1.0, side / max(h, w))
    new_h = max(patch_size, int(round(h * scale / patch_size)) * patch_size)
    new_w = max(patch_size, int(round(w * scale / patch_size)) * patch_size)
    if (new_h, new_w) == (h, w):
        return pixel_values
    flat = pixel_values.reshape(-1, c, h, w)
    out = F.interpolate(flat.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    return out.to(pixel_values.dtype).reshape(*lead, c, new_h, new_w)


# --------------------------------------------------------------------------------------------
# Model structure: where the decoder blocks, routers and vision features live per family.
# --------------------------------------------------------------------------------------------
# Searched in order, first match wins; register_model_family adds a family's names in front.
_TEXT_DECODER_PATHS = [
    "model.language_model",  # LLaVA (Llama / OLMoE text model)
    "model.text_model",  # IDEFICS2
    "gpt_neox",  # GPT-NeoX / Pythia
    "model",  # OLMoE, Qwen2-MoE, Mixtral, Llama causal LMs
]
_LM_HEAD_NAMES = ["lm_head", "embed_out"]
_VISION_ENCODER_NAMES = ["vision_tower", "vision_model"]  # LLaVA, IDEFICS2
_FINAL_NORM_NAMES = ["norm", "final_layer_norm"]
# Families whose parts sit where these lists look; a family in a file of its own (backends/qwen_vl.py,
# a user's module) adds itself through register_model_family.
SUPPORTED_FAMILIES = ["LlavaForConditionalGeneration", "Idefics2ForConditionalGeneration",
                      "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                      "GPTNeoXForCausalLM", "LlamaForCausalLM"]


def register_model_family(class_name: str, *, decoder: str | None = None, lm_head: str | None = None,
                          final_norm: str | None = None, vision_encoder: str | None = None) -> None:
    """Teach :func:`model_parts` (and so every knob) where a new model family keeps its parts.

    Args:
        class_name: the model class's name (listed in errors as a supported family).
        decoder: dotted path from the model to the module holding the decoder blocks as ``.layers``.
        lm_head, final_norm: attribute names of the LM head (on the model) and the final norm (on
            the decoder).
        vision_encoder: attribute name of the vision encoder on the multimodal module (the one with
            ``get_image_features``), for a vision-language family.

    Names given are searched before the shipped ones; top-k needs routers carrying an integer
    ``top_k`` (see :meth:`ModelParts.routers`).
    """
    for names, name in ((_TEXT_DECODER_PATHS, decoder), (_LM_HEAD_NAMES, lm_head), (_FINAL_NORM_NAMES, final_norm),
                        (_VISION_ENCODER_NAMES, vision_encoder)):
        if name is not None and name not in names:
            names.insert(0, name)
    if class_name not in SUPPORTED_FAMILIES:
        SUPPORTED_FAMILIES.append(class_name)


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class ModelParts:
    """Handles to the parts of a loaded model that knobs act on."""

    model: nn.Module
    text_decoder: nn.Module  # has .layers (ModuleList) and a final norm
    final_norm: nn.Module
    lm_head: nn.Module
    multimodal: nn.Module | None  # the module whose get_image_features feeds the LM (None: text-only)
    image_token_id: int | None
    vision_encoder: nn.Module | None = None  # the vision transformer (CLIP tower, IDEFICS2 vision model)
    patch_size: int = 0  # the encoder's patch side in pixels

    @property
    def encoder_interpolates(self) -> bool:
        """The encoder needs ``interpolate_pos_encoding=True`` for an input size other than its own
        (CLIP / SigLIP towers); IDEFICS2's vision model takes any size natively."""
        if self.vision_encoder is None:
            return False
        return "interpolate_pos_encoding" in inspect.signature(self.vision_encoder.forward).parameters

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_decoder.layers

    def routers(self, layer_index: int) -> list[nn.Module]:
        """Modules in one block that choose experts (they carry an integer ``top_k``)."""
        return [m for m in self.layers[layer_index].modules()
                if isinstance(getattr(m, "top_k", None), int) and not isinstance(m, nn.ModuleList)]


def model_parts(model: nn.Module) -> ModelParts:
    """Locate decoder blocks, final norm, LM head and the vision merge point of ``model``."""
    cls = type(model).__name__
    decoder = None
    for path in _TEXT_DECODER_PATHS:
        cand = _get_path(model, path)
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            decoder = cand
            break
    if decoder is None:
        raise KnobError(f"unsupported model class {cls}: no decoder blocks found; supported families: "
                        f"{', '.join(SUPPORTED_FAMILIES)}")
    norm = next((getattr(decoder, n) for n in _FINAL_NORM_NAMES if getattr(decoder, n, None) is not None), None)
    head = next((getattr(model, n) for n in _LM_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if norm is None or head is None:
        raise KnobError(f"unsupported model class {cls}: no final norm / LM head found; supported families: "
                        f"{', '.join(SUPPORTED_FAMILIES)}")
    inner = getattr(model, "model", None)
    multimodal = inner if inner is not None and hasattr(inner, "get_image_features") else None
    image_token_id = encoder = None
    patch_size = 0
    if multimodal is not None:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(model.config, "image_token_index", None)
        encoder = next((m for m in (getattr(multimodal, n, None) for n in _VISION_ENCODER_NAMES) if m is not None), None)
        patch_size = int(model.config.vision_config.patch_size)
    return ModelParts(model, decoder, norm, head, multimodal, image_token_id, encoder, patch_size)


def knob_space_from_model(model: nn.Module, *, tiers: dict | None = None, top_ks=None, depths=None,
                          token_budgets=(0.25, 0.5, 0.75, 1.0), tier_mode: str | None = None,
                          tier_sizes: dict | None = None) -> KnobSpace:
    """Derive the knob space from a loaded model's config.

    Defaults mirror the real targets: top-k choices ``full/2 .. full``, depth choices
    ``ceil(0.75 L) .. L``. Vision tiers depend on ``tier_mode`` (default ``resize``):

    * ``resize``: the encoder sees the image at 1/2, 2/3 and all of its native side (LLaVA-1.5:
      168 / 224 / 336 px -> 144 / 256 / 576 tokens; IDEFICS2: the resampler's latents at every
      tier, the encoder's patches falling with the side). ``tiers`` (square token counts) or
      ``tier_sizes`` (px) override them.
    * ``pool``: ``native``, ``native/4``, ``native/16`` tokens pooled from the full image's.

    A config dict ``knobgym`` saved with a checkpoint (``tiers``, ``tier_mode``, ``tier_sizes``,
    ``top_ks``, ``depths``) overrides the defaults; explicit arguments override both.
    """
    parts = model_parts(model)
    saved = getattr(model.config, "knobgym", None) or {}
    num_layers = len(parts.layers)
    routers = [r for i in range(num_layers) for r in parts.routers(i)]
    num_experts = full_k = None
    if routers:
        full_k = routers[0].top_k
        num_experts = next((int(getattr(r, "num_experts")) for r in routers if hasattr(r, "num_experts")), None)
        if num_experts is None:
            text_cfg = getattr(model.config, "text_config", model.config)
            num_experts = int(getattr(text_cfg, "num_experts", None) or getattr(text_cfg, "num_local_experts"))
    if top_ks is None:
        top_ks = saved.get("top_ks") or (tuple(range(max(1, full_k // 2), full_k + 1)) if full_k else ())
    if depths is None:
        depths = saved.get("depths") or tuple(range(max(1, math.ceil(0.75 * num_layers)), num_layers + 1))
    native, sizes, mode = 0, {}, "pool"
    if parts.multimodal is not None:
        native = int(saved.get("native_vision_tokens") or _native_vision_tokens(model))
        mode = tier_mode or saved.get("tier_mode") or "resize"
        if mode not in TIER_MODES:
            raise KnobError(f"tier_mode={mode!r} is invalid; accepted: {', '.join(TIER_MODES)}")
        if tiers is None and tier_sizes is None:
            tiers, tier_sizes = saved.get("tiers"), saved.get("tier_sizes")
        if qwen_vl.is_qwen_vl(model):
            if mode != "resize":
                raise KnobError(f"tier_mode={mode!r} is invalid for {type(model).__name__}; accepted: resize (the "
                                f"tier is the image resolution given to the processor)")
            tiers, sizes = qwen_vl.resize_tiers(model, tiers, tier_sizes)
            native = max(native, *tiers.values())
        elif mode == "resize":
            tiers, sizes = _resize_tiers(model, parts, native, tiers, tier_sizes)
        elif tiers is None:
            tiers = {"low": max(1, native // 16), "medium": max(1, native // 4), "high": native}
        # Cheapest first (saved configs may come back with keys sorted by name); equal token
        # counts (IDEFICS2's resampler in resize mode) are ordered by the image size.
        order = sorted(tiers, key=lambda k: (int(tiers[k]), int(sizes.get(k, 0)), str(k)))
        tiers = {str(k): int(tiers[k]) for k in order}
        sizes = {str(k): int(sizes[k]) for k in order if k in sizes}
    else:
        tiers = {}
    space = KnobSpace(model_class=type(model).__name__, tiers=tiers, native_vision_tokens=native,
                      token_budgets=tuple(float(b) for b in token_budgets), top_ks=tuple(int(k) for k in top_ks),
                      full_top_k=full_k, num_experts=num_experts, depths=tuple(int(d) for d in depths),
                      num_layers=num_layers, tier_mode=mode, tier_sizes=sizes)
    for k in space.top_ks:
        space.validate(KnobConfig(top_k=k))
    for d in space.depths:
        space.validate(KnobConfig(depth=d))
    for name, n in tiers.items():
        if not (1 <= n <= max(native, 1)):
            raise KnobError(f"tier {name!r} has {n} tokens; accepted: 1..{native} (the tower's native count)")
    return space


def _resize_tiers(model: nn.Module, parts: ModelParts, native: int, tiers: dict | None,
                  sizes: dict | None) -> tuple[dict, dict]:
    """Token counts and encoder image sizes of resize-mode tiers (from either, or the defaults)."""
    cfg = model.config
    p = parts.patch_size
    side = int(cfg.vision_config.image_size)
    resampled = hasattr(cfg, "perceiver_config")  # IDEFICS2: a fixed number of latents whatever the size
    extra = 0 if resampled or getattr(cfg, "vision_feature_select_strategy", "default") == "default" else 1

    def tokens_of(px: int) -> int:
        return native if resampled else (px // p) ** 2 + extra

    if sizes:
        sizes = {str(k): int(v) for k, v in dict(sizes).items()}
        bad = {k: v for k, v in sizes.items() if v < p or v % p}
        if bad:
            raise KnobError(f"tier_sizes {bad} are invalid; accepted: multiples of the patch size {p} px")
        derived = {k: tokens_of(v) for k, v in sizes.items()}
        if tiers and {str(k): int(v) for k, v in dict(tiers).items()} != derived:
            raise KnobError(f"tiers {dict(tiers)} do not match tier_sizes {sizes} (which give {derived} tokens); "
                            f"accepted: one of the two, or both consistent")
        return derived, sizes
    if tiers:
        if resampled:
            raise KnobError(f"{type(model).__name__} emits {native} tokens at every image size; accepted: "
                            f"tier_sizes (px) in tier_mode='resize', or tier_mode='pool' with token counts")
        sizes = {}
        for k, n in dict(tiers).items():
            grid = math.isqrt(int(n) - extra) if int(n) > extra else 0
            if grid < 1 or grid * grid + extra != int(n):
                raise KnobError(f"tier {k!r} has {n} tokens; accepted in tier_mode='resize': a square number of "
                                f"patches{' plus the CLS token' if extra else ''} (e.g. 144, 256, 576)")
            sizes[str(k)] = grid * p
        return {str(k): int(v) for k, v in dict(tiers).items()}, sizes
    grid = side // p
    grids = {"low": max(1, round(grid / 2)), "medium": max(1, round(2 * grid / 3)), "high": grid}
    sizes = {k: g * p for k, g in grids.items()}
    return {k: tokens_of(v) for k, v in sizes.items()}, sizes


def _native_vision_tokens(model: nn.Module) -> int:
    cfg = model.config
    if qwen_vl.is_qwen_vl(model):  # dynamic resolution: the highest default tier
        return qwen_vl.tokens_at(model, qwen_vl.DEFAULT_TIER_UNITS["high"] * qwen_vl.token_side(model))
    if hasattr(cfg, "perceiver_config"):  # IDEFICS2: the resampler's latents
        return int(cfg.perceiver_config.resampler_n_latents)
    vc = cfg.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    return n if strategy == "default" else n + 1


# --------------------------------------------------------------------------------------------
# Applying knobs: one context manager, restored exactly on exit.
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def apply_knobs(model: nn.Module, knobs: KnobConfig, space: KnobSpace | None = None):
    """Run ``model`` under ``knobs`` inside the ``with`` block; restore it exactly on exit.

    - top-k: sets ``top_k`` of the expert routers in every block except the first (block 1 keeps
      the model's own top-k, since the stage-2 controller decides after it).
    - depth: swaps the decoder's ``layers`` for a ModuleList of the first D blocks (same module
      objects, so the KV cache layers 0..D-1 stay consistent during generation); the final norm
      and LM head then run on block D's output.
    - tier / token budget: wraps the instance's ``get_image_features``. In resize mode the pixels
      are resized to the tier's size before the vision tower runs (:func:`resize_for_tier`); in
      pool mode the tower's output is pooled to the tier's count; then the K most informative
      tokens are kept (:func:`transform_vision_features`).
      The caller must put exactly ``space.vision_tokens(knobs)`` image placeholders in ``input_ids``.

    Nothing is reloaded or copied: attributes are set and put back in a ``finally`` block.
    """
    space = space or knob_space_from_model(model)
    space.validate(knobs)
    parts = model_parts(model)
    restore: list = []
    try:
        if knobs.top_k is not None:
            for i in range(1, len(parts.layers)):
                for router in parts.routers(i):
                    restore.append((router, "top_k", router.top_k))
                    router.top_k = knobs.top_k
        if knobs.depth is not None and knobs.depth < len(parts.layers):
            decoder = parts.text_decoder
            restore.append((decoder, "layers", decoder.layers))
            # Same module objects: only which ones run changes.
            decoder.layers = nn.ModuleList(list(decoder.layers)[: knobs.depth])
        if parts.multimodal is not None and (knobs.tier is not None or knobs.token_budget < 1):
            mm = parts.multimodal
            original = mm.get_image_features  # bound method of the class (or an earlier wrapper)
            had_instance_attr = "get_image_features" in vars(mm)

            # functools.wraps keeps the signature visible to generate(), which inspects it to
            # decide which kwargs (pixel_values, ...) to route to the image encoder.
            @functools.wraps(original)
            def get_image_features(*args, **kwargs):
                args, kwargs = _tier_inputs(parts, space, knobs.tier, args, kwargs)
                out = original(*args, **kwargs)
                feats = out.pooler_output
                stacked = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
                reduced, kept = transform_vision_features(stacked, space, knobs, return_indices=True)
                out.pooler_output = list(reduced) if isinstance(feats, (list, tuple)) else reduced
                out.kept_token_indices = kept  # [images, K]: which of the tier's tokens the budget kept
                if getattr(out, "deepstack_features", None):  # Qwen3-VL: the same tokens of every level
                    out.deepstack_features = [_take_tokens(level, kept) for level in out.deepstack_features]
                return out

            restore.append((mm, "get_image_features", original if had_instance_attr else _DELETE))
            mm.get_image_features = get_image_features
        yield model
    finally:
        _restore(restore)


_DELETE = object()


def _take_tokens(features, kept: torch.Tensor):
    """``features`` (``[B, N, d]``, or per image ``[N, d]``) at the kept token indices ``[B, K]``."""
    if isinstance(features, (list, tuple)):
        return [f[idx] for f, idx in zip(features, kept)]
    return features.gather(1, kept.unsqueeze(-1).expand(*kept.shape, features.shape[-1]))


def _restore(patches: list) -> None:
    """Undo ``(object, attribute, previous value or _DELETE)`` patches, last first."""
    for obj, name, value in reversed(patches):
        if value is _DELETE:
            delattr(obj, name)
        else:
            setattr(obj, name, value)


#: routers whose forward is "softmax over the experts, top-k, optionally renormalise": class name ->
#: (the attribute saying whether to renormalise, ``None``: always; whether the weights are cast
#: back to the logits' dtype), as their transformers classes compute them
_SOFTMAX_TOP_K_ROUTERS = {"OlmoeTopKRouter": ("norm_topk_prob", True),
                          "Qwen2MoeTopKRouter": ("norm_topk_prob", True),
                          "MixtralTopKRouter": (None, False),
                          "Qwen3VLMoeTextTopKRouter": (None, True)}


class RowTopK:
    """Per-row MoE top-k for one batch of rows that share a prompt (the batched stage 2).

    Row ``r`` of the batch routes each of its tokens to its own ``top_ks[r]`` experts with the
    routing weights the unbatched model computes at that top-k, laid out as ``[tokens, max
    top-k]`` with the unused slots of smaller-k rows marked as dropped (expert index
    ``num_experts``, weight 0: transformers' expert-parallel "sentinel", which the eager experts
    loop skips and the ``grouped_mm`` / ``batched_mm`` implementations mask once told, see
    :func:`row_top_k`). The experts module therefore computes exactly ``top_ks[r]`` experts per
    token of row ``r``.

    Two ways to compute the routing, with the same result up to float rounding:

    - the routers of :data:`_SOFTMAX_TOP_K_ROUTERS` (OLMoE, Qwen2-MoE, Mixtral): one softmax and
      one top-k at the largest k for all tokens, then each token's slots beyond its row's k are
      dropped and the kept weights renormalised as the router's class does (the top ``k`` of a
      sorted top-``k_max`` are the top ``k``; a sum over the kept weights may round differently
      from the unbatched sum in the last bit);
    - any other router (or with :attr:`vectorised` off): the tokens of the rows sharing one
      top-k go through the router's own ``forward`` with ``top_k`` set to that value, so its
      selection and renormalisation are the model's own.

    The caller declares the rows with :meth:`set_rows` and, before each forward, the tokens
    per row (:attr:`tokens_per_row`). A block that runs on fewer rows than were declared runs on
    the leading ones (the batched stage 2 orders its rows by depth, deepest first, so the rows
    still running at block ``i`` are a prefix of the batch).
    """

    def __init__(self, num_experts: int):
        self.num_experts = int(num_experts)
        self.tokens_per_row = 1
        #: use the single-pass routing for the routers of :data:`_SOFTMAX_TOP_K_ROUTERS`
        self.vectorised = True
        self._top_ks: tuple[int, ...] = ()
        self._layouts: dict[tuple[int, int], tuple] = {}

    @property
    def top_ks(self) -> tuple[int, ...]:
        return self._top_ks

    def set_rows(self, top_ks) -> None:
        """The top-k of each row of the batch, in batch order."""
        self._top_ks = tuple(int(k) for k in top_ks)
        self._layouts.clear()

    def layout(self, n_tokens: int, device) -> tuple[list, torch.Tensor | None]:
        """For the leading rows covering ``n_tokens`` tokens: ``[(top_k, token indices)]`` per
        distinct top-k, and the ``[tokens, max top-k]`` mask of dropped slots (``None`` and
        ``[(k, None)]`` when every row has the same top-k)."""
        t = self.tokens_per_row
        n_rows = n_tokens // t
        if n_rows * t != n_tokens or not (1 <= n_rows <= len(self._top_ks)):
            raise KnobError(f"a router received {n_tokens} tokens for rows of {t} tokens; accepted: a multiple "
                            f"of {t} tokens for at most {len(self._top_ks)} rows (RowTopK.set_rows)")
        key = (n_rows, t)
        if key not in self._layouts:
            ks = self._top_ks[:n_rows]
            if len(set(ks)) == 1:
                self._layouts[key] = ([(ks[0], None)], None)
            else:
                by_k: dict[int, list[int]] = {}
                for row, k in enumerate(ks):
                    by_k.setdefault(k, []).extend(range(row * t, (row + 1) * t))
                groups = [(k, torch.tensor(tokens, device=device)) for k, tokens in sorted(by_k.items())]
                token_k = torch.tensor(ks, device=device).repeat_interleave(t)
                dropped = torch.arange(max(ks), device=device).unsqueeze(0) >= token_k.unsqueeze(1)
                self._layouts[key] = (groups, dropped)
        return self._layouts[key]

    def route(self, router: nn.Module, original, experts: list, hidden_states: torch.Tensor, *args, **kwargs):
        """The router's ``(logits, weights, expert indices)`` with each row at its own top-k;
        ``experts`` (the block's experts modules) are told whether dropped slots are present."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        groups, dropped = self.layout(flat.shape[0], flat.device)
        for module in experts:
            module._is_expert_parallel = dropped is not None  # mask the sentinel slots (see row_top_k)
        if dropped is None:
            router.top_k = groups[0][0]
            return original(hidden_states, *args, **kwargs)
        k_max = dropped.shape[1]
        router.top_k = k_max
        known = _SOFTMAX_TOP_K_ROUTERS.get(type(router).__name__)
        if self.vectorised and known is not None:
            norm_attr, cast = known
            logits = F.linear(flat, router.weight)
            values, indices = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), k_max, dim=-1)
            values = values.masked_fill(dropped, 0.0)
            if norm_attr is None or getattr(router, norm_attr):
                values = values / values.sum(dim=-1, keepdim=True)
            if cast:
                values = values.to(logits.dtype)
            return logits, values, indices.masked_fill(dropped, self.num_experts)
        logits = weights = indices = None
        for k, tokens in groups:
            router.top_k = k
            out = original(flat[tokens], *args, **kwargs)
            if not (isinstance(out, tuple) and len(out) == 3):
                raise KnobError(f"{type(router).__name__} does not return (logits, weights, indices); per-row "
                                f"top-k supports the routers of {', '.join(SUPPORTED_FAMILIES)}")
            lg, w, ix = out
            if logits is None:
                logits = lg.new_empty((flat.shape[0], lg.shape[-1]))
                weights = w.new_zeros((flat.shape[0], k_max))
                indices = ix.new_full((flat.shape[0], k_max), self.num_experts)
            logits[tokens] = lg
            weights[tokens, :k] = w
            indices[tokens, :k] = ix
        router.top_k = k_max
        return logits, weights, indices


@contextlib.contextmanager
def row_top_k(model: nn.Module, space: KnobSpace) -> Iterator[RowTopK | None]:
    """Route every MoE block except the first per row (:class:`RowTopK`) inside the ``with`` block.

    Yields the :class:`RowTopK` the caller sets rows on, or ``None`` for a model without MoE
    blocks. Block 1 keeps the model's own top-k, as in :func:`apply_knobs`. The routers'
    ``forward`` is wrapped on the instance and put back, with their ``top_k``, on exit.

    The dropped slots use transformers' sentinel expert index (``num_experts``). Its vectorised
    experts implementations (``grouped_mm``, ``batched_mm``) leave sentinel rows uninitialised
    unless the experts module's ``_is_expert_parallel`` flag is set (then they are masked to
    zero), so the flag of the experts modules of blocks 2.. is set whenever their router hands
    them dropped slots, and restored on exit; the eager loop skips sentinel slots either way.
    """
    if not space.has_moe:
        yield None
        return
    parts = model_parts(model)
    rows = RowTopK(space.num_experts)
    restore: list = []
    try:
        for i in range(1, len(parts.layers)):
            routers = parts.routers(i)
            experts = [m for m in parts.layers[i].modules() if isinstance(vars(m).get("_is_expert_parallel"), bool)]
            restore.extend((m, "_is_expert_parallel", m._is_expert_parallel) for m in experts)
            for router in routers:
                restore.append((router, "top_k", router.top_k))
                # the innermost router computes the routing; a block carrying top_k around it
                # (Mixtral) only records it
                if any(other is not router and any(m is other for m in router.modules()) for other in routers):
                    continue
                original = router.forward
                restore.append((router, "forward", original if "forward" in vars(router) else _DELETE))
                router.forward = functools.partial(rows.route, router, original, experts)
        yield rows
    finally:
        _restore(restore)


def _tier_inputs(parts: ModelParts, space: KnobSpace, tier: str | None, args: tuple, kwargs: dict):
    """The ``get_image_features`` arguments with the pixels at the tier's size (resize mode only)."""
    if space.tier_mode != "resize" or tier is None or qwen_vl.is_qwen_vl(parts.model):
        return args, kwargs  # Qwen-VL: the processor already received the tier's resolution
    kwargs = dict(kwargs)
    pixels = args[0] if args else kwargs.pop("pixel_values")
    resized = resize_for_tier(pixels, space.tier_sizes[tier], parts.patch_size)
    mask = kwargs.get("pixel_attention_mask")
    if mask is not None and resized.shape[-2:] != pixels.shape[-2:]:  # IDEFICS2: padding mask at the new size
        flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
        kwargs["pixel_attention_mask"] = (F.interpolate(flat, size=resized.shape[-2:], mode="nearest") > 0.5) \
            .reshape(*mask.shape[:-2], *resized.shape[-2:])
    if parts.encoder_interpolates:
        kwargs["interpolate_pos_encoding"] = True
    return (resized, *args[1:]), kwargs


# The shipped families kept in files of their own register themselves here (register_model_family),
# as a user's family does; imported last because that file uses this module's definitions.
from backends import qwen_vl  # noqa: E402
