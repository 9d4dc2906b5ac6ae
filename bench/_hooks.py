"""Forward hooks that record what a model actually computes (shared by the full-size benches).

Knob checks count the computation (decoder blocks executed, experts per token in every MoE block,
patches entering the vision encoder, the sequence entering decoder block 1) instead of reading back
the attribute a knob sets. ``tests/conftest.py``'s ``ComputeProbe`` extends this one with what
the tests compare tensor by tensor.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn

from backends.knobs import model_parts


def _is_experts(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Experts") and isinstance(getattr(module, "num_experts", None), int)


def patch_embeddings(model: nn.Module) -> list[nn.Module]:
    """The vision encoders' patch-embedding convolutions (one per tower; none for text-only models):
    CLIP / SigLIP's ``patch_embedding`` (2-D), Qwen-VL's ``patch_embed.proj`` (3-D, over a batch of
    flattened patches, so its output has one row per patch)."""
    return [m for name, m in model.named_modules()
            if (isinstance(m, nn.Conv2d) and name.endswith("patch_embedding"))
            or (isinstance(m, nn.Conv3d) and name.endswith("patch_embed.proj"))]


class ComputeProbe:
    """Forward hooks on one model; :meth:`reset` between runs, :meth:`remove` when done.

    Attributes:
        block_calls: decoder block index -> forwards it ran.
        experts_per_token: MoE block index -> set of expert counts per token the experts module
            computed (from the routing indices passed to it; an index equal to ``num_experts``
            marks a dropped slot).
        expert_pairs: MoE block index -> (token, expert) pairs computed.
        first_block_lengths: sequence length entering decoder block 1, one entry per forward.
        encoder_patches: patches entering the vision encoder, one entry per encoder forward
            (images x patch rows x patch columns of the patch-embedding output).
    """

    def __init__(self, model: nn.Module):
        parts = model_parts(model)
        self._handles = []
        for index, layer in enumerate(parts.layers):
            self._handles.append(layer.register_forward_pre_hook(
                functools.partial(self._on_block, index), with_kwargs=True))
            for module in layer.modules():
                if _is_experts(module):
                    self._handles.append(module.register_forward_hook(
                        functools.partial(self._on_experts, index, module.num_experts)))
        for conv in patch_embeddings(model):
            self._handles.append(conv.register_forward_hook(self._on_patches))
        self.reset()

    def __enter__(self) -> "ComputeProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def reset(self) -> None:
        self.block_calls: dict[int, int] = defaultdict(int)
        self.experts_per_token: dict[int, set[int]] = defaultdict(set)
        self.expert_pairs: dict[int, int] = defaultdict(int)
        self.first_block_lengths: list[int] = []
        self.encoder_patches: list[int] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def executed_blocks(self) -> list[int]:
        return sorted(self.block_calls)

    def _on_block(self, index, module, args, kwargs):
        self.block_calls[index] += 1
        if index == 0:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.first_block_lengths.append(int(hidden.shape[1]))

    def _on_experts(self, index, num_experts, module, args, output):
        top_k_index = args[1]  # [tokens, k]
        used = (top_k_index < num_experts).sum(dim=-1)
        self.experts_per_token[index].update(int(k) for k in used.unique())
        self.expert_pairs[index] += int(used.sum())

    def _on_patches(self, module, args, output: torch.Tensor):
        self.encoder_patches.append(int(output.shape[0] * output.shape[-2] * output.shape[-1]))
