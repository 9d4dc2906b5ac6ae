"""The Qwen-VL family: Qwen2.5-VL, Qwen3-VL (dense) and Qwen3-VL-MoE, everything the knobs and the
HF backend need to know about it beyond the LLaVA / IDEFICS2 layout.

- **Dynamic resolution.** The processor cuts the image into ``patch`` px patches and the tower
  merges ``merge x merge`` of them into one language-model token, so the pixels given to the
  processor decide the token count. A tier is a square image side in px (a multiple of
  ``patch * merge``): the image is resized to ``side x side`` and the processor is told to keep
  exactly that many pixels, so a tier has ``(side / (patch * merge))**2`` tokens whatever the
  input's aspect ratio. The tier therefore acts before the processor, not on pixel tensors.
- **M-RoPE.** Rotary positions have three rows (time, height, width): an image token sits at its
  grid cell, text after the image continues from the grid's largest index. A token budget keeps
  the kept tokens' own grid positions and the text after the image keeps the positions it has at
  full budget (:func:`mrope_positions`).
- **DeepStack (Qwen3-VL).** Features from intermediate tower layers are added to the hidden states
  at the image positions after decoder blocks ``0 .. n-1``; the budget selects the same tokens
  from them (:func:`backends.knobs.apply_knobs`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FAMILY_CLASSES = ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                  "Qwen3VLMoeForConditionalGeneration")
#: tier name -> image side in units of ``patch * merge`` (Qwen3-VL: 256 / 384 / 512 px -> 64 / 144 /
#: 256 tokens; Qwen2.5-VL: 224 / 336 / 448 px, the same counts)
DEFAULT_TIER_UNITS = {"low": 8, "medium": 12, "high": 16}


def is_qwen_vl(model: nn.Module) -> bool:
    return type(model).__name__ in FAMILY_CLASSES


def token_side(model: nn.Module) -> int:
    """Pixels per language-model token along one edge: ``patch_size * spatial_merge_size``."""
    vc = model.config.vision_config
    return int(vc.patch_size) * int(vc.spatial_merge_size)


def tokens_at(model: nn.Module, side: int) -> int:
    """Language-model tokens of a ``side x side`` image."""
    return (int(side) // token_side(model)) ** 2


def check_tier_sizes(model: nn.Module, sizes: dict) -> None:
    from backends.knobs import KnobError

    unit = token_side(model)
    bad = {k: v for k, v in sizes.items() if int(v) < unit or int(v) % unit}
    if bad:
        raise KnobError(f"tier_sizes {bad} are invalid for {type(model).__name__}; accepted: multiples of "
                        f"patch_size x spatial_merge_size = {unit} px")


def resize_tiers(model: nn.Module, tiers: dict | None, sizes: dict | None) -> tuple[dict, dict]:
    """Token counts and image sides of the tiers, from either (or the defaults)."""
    from backends.knobs import KnobError

    unit = token_side(model)
    if sizes:
        sizes = {str(k): int(v) for k, v in dict(sizes).items()}
    elif tiers:
        sizes = {}
        for k, n in dict(tiers).items():
            grid = int(np.sqrt(int(n)))
            if grid < 1 or grid * grid != int(n):
                raise KnobError(f"tier {k!r} has {n} tokens; accepted for {type(model).__name__}: a square number "
                                f"(the image is square: (side / {unit})**2 tokens)")
            sizes[str(k)] = grid * unit
    else:
        sizes = {k: u * unit for k, u in DEFAULT_TIER_UNITS.items()}
    check_tier_sizes(model, sizes)
    derived = {k: tokens_at(model, v) for k, v in sizes.items()}
    if tiers and {str(k): int(v) for k, v in dict(tiers).items()} != derived:
        raise KnobError(f"tiers {dict(tiers)} do not match tier_sizes {sizes} (which give {derived} tokens); "
                        f"accepted: one of the two, or both consistent")
    return derived, sizes


def image_inputs(image_processor, image, side: int) -> dict:
    """The processor's inputs for ``image`` at a ``side x side`` tier (``pixel_values`` as flattened
    patches, ``image_grid_thw``)."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    picture = picture.convert("RGB").resize((side, side), Image.BICUBIC)
    pixels = side * side
    return image_processor(images=[picture], size={"shortest_edge": pixels, "longest_edge": pixels},
                           return_tensors="pt")


def mrope_positions(n_prefix: int, n_suffix: int, grid_thw, merge: int,
                    kept: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Rotary positions ``[3, 1, T]`` of ``prefix text, image tokens, suffix text`` and the offset
    of the next generated token's position from its index (``rope_delta``).

    The image's ``t x (h / merge) x (w / merge)`` grid sits at ``n_prefix + (t, row, column)``;
    ``kept`` (indices into the grid in raster order) selects the tokens a budget kept. Text after
    the image continues from the full grid's largest index plus one, as at full budget.
    """
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // merge, w // merge
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    if kept is not None:
        grid = grid[:, kept.flatten().cpu()]
    start_after = n_prefix + max(t, h, w)
    prefix = torch.arange(n_prefix).expand(3, -1)
    suffix = torch.arange(start_after, start_after + n_suffix).expand(3, -1)
    positions = torch.cat([prefix, grid + n_prefix, suffix], dim=1).unsqueeze(1)
    total = n_prefix + grid.shape[1] + n_suffix
    return positions, int(start_after + n_suffix - total)


def decode_positions(position: int, rope_delta: int, device) -> torch.Tensor:
    """Rotary positions ``[3, 1, 1]`` of the token generated at sequence index ``position``."""
    return torch.full((3, 1, 1), position + rope_delta, dtype=torch.long, device=device)


def add_deepstack(hidden: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``hidden`` (``[B, T, d]``, every row the same prompt) with ``features`` (``[K, d]``) added at
    the ``K`` image positions of ``image_mask`` (``[T]``), as Qwen3-VL's text model does."""
    hidden = hidden.clone()
    hidden[:, image_mask] = hidden[:, image_mask] + features.to(hidden.dtype).unsqueeze(0)
    return hidden


def _register() -> None:
    """Where the Qwen-VL models keep their parts, through the same call a user's family makes:
    the text decoder at ``model.language_model`` (as LLaVA), the vision tower at ``model.visual``."""
    from backends.knobs import register_model_family

    for class_name in FAMILY_CLASSES:
        register_model_family(class_name, decoder="model.language_model", vision_encoder="visual")


_register()
