"""What a bitsandbytes-quantized model is: which parameters were quantized, where its logits first
went non-finite, and bitsandbytes' per-call log messages shown once per run.

bitsandbytes replaces ``nn.Linear`` layers only. An MoE whose experts are fused 3-D tensors
(OLMoE, Qwen2/3-MoE, Qwen3-VL-MoE, Mixtral in transformers 5: one ``gate_up_proj`` parameter of
shape ``[experts, 2 * inter, hidden]``) therefore keeps its experts, most of its parameters, at
the load precision: :func:`quantization_report` says how much of each part of a model is quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

#: module-name fragments -> the part of a model they belong to (first match wins, in this order)
_PART_RULES = (
    ("vision", ("vision_tower", "vision_model", "visual", "multi_modal_projector", "connector", "perceiver")),
    ("embeddings and head", ("embed_tokens", "embed_in", "lm_head", "embed_out", "wte")),
    ("router", (".gate.", ".router.")),
    ("experts", ("experts", "shared_expert")),
    ("attention", ("self_attn", "attention")),
    ("dense MLP", ("mlp",)),
)


def _part_of(param_name: str) -> str:
    name = f".{param_name}."
    for part, fragments in _PART_RULES:
        if any(f in name for f in fragments):
            return part
    return "norms and other"


def _is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _logical_numel(module: nn.Module, name: str, param: torch.Tensor) -> int:
    """Elements the parameter stands for (a packed 4-bit weight holds two per byte)."""
    if name == "weight" and _is_quantized_linear(module):
        return int(module.in_features) * int(module.out_features)
    return int(param.numel())


@dataclass
class QuantizationReport:
    """Parameters per part of a model (vision, attention, experts, router, ...), and how many of
    them bitsandbytes quantized (counted as the elements they stand for, not packed bytes)."""

    total: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Fraction of all parameters that are quantized."""
        return sum(self.quantized.values()) / max(1, sum(self.total.values()))

    def lines(self) -> list[str]:
        out = [f"{part:>20}: {self.quantized.get(part, 0) / 1e6:9.2f}M of {n / 1e6:9.2f}M quantized "
               f"({self.quantized.get(part, 0) / max(1, n):6.1%})" for part, n in sorted(self.total.items())]
        return out + [f"{'all':>20}: {self.share:6.1%} of {sum(self.total.values()) / 1e6:.2f}M parameters quantized"]


def quantization_report(model: nn.Module) -> QuantizationReport:
    """Count parameters per part of ``model`` and those held by bitsandbytes layers."""
    report = QuantizationReport()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            part = _part_of(f"{module_name}.{name}")
            n = _logical_numel(module, name, param)
            report.total[part] = report.total.get(part, 0) + n
            if _is_quantized_linear(module) and name == "weight":
                report.quantized[part] = report.quantized.get(part, 0) + n
    return report


def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Call ``run()`` with forward hooks on every module of ``model``; return the name (and class)
    of the first module, in execution order, whose output held a NaN or an infinity, or ``None``.

    A module's hook fires after its children's, so the first hit is the innermost module where the
    values broke (a quantized ``Linear4bit``, an expert block, an attention layer), as the seed's
    INT8 lesson located ``gpt_neox.layers.2`` by hand.
    """
    names = {m: n for n, m in model.named_modules()}
    found: list[str] = []

    def hook(module, args, output):
        if found:
            return
        tensors = output if isinstance(output, (tuple, list)) else (getattr(output, "last_hidden_state", output),)
        for t in tensors:
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(f"{names[module] or '<model>'} ({type(module).__name__})")
                return

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class _OncePerRun(logging.Filter):
    """Let each distinct message template through once (bitsandbytes logs some on every call)."""

    def __init__(self):
        super().__init__("bitsandbytes-once")
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg, record.args if isinstance(record.args, tuple) else None)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = _OncePerRun()


def bitsandbytes_messages_once() -> None:
    """Show each of bitsandbytes' log messages once per process (``MatMul8bitLt: inputs will be
    cast ...`` is logged on every int8 matmul: thousands of lines per run). Idempotent."""
    import bitsandbytes  # noqa: F401  its loggers exist once its modules are imported

    for name in list(logging.root.manager.loggerDict):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            logger = logging.getLogger(name)
            if _ONCE not in logger.filters:
                logger.addFilter(_ONCE)


#: bitsandbytes' CPU repacking groups output rows in blocks of this many (``block_n`` of
#: ``bitsandbytes.functional._convert_weight_packed_for_cpu``)
_CPU_PACK_ROWS = 32


def keep_cpu_4bit_layers_runnable(model: nn.Module) -> list[str]:
    """Send the 4-bit layers that bitsandbytes' AVX512-BF16 CPU kernel cannot take to its generic CPU path.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight for its fast kernel
    at the layer's first inference forward; the repacking needs ``in_features`` divisible by the
    quantization block size and ``out_features`` by 32, and raises inside bitsandbytes for any other
    shape (``shape '[32, 0]' is invalid``). Real models' widths are multiples of 64; small or custom
    ones are not. Those layers get the repacking turned off and run on the path AVX2 CPUs use (same
    results, slower); every other layer keeps the fast kernel. Returns the names of the layers switched
    (none on CPUs without AVX512-BF16, where bitsandbytes never repacks)."""
    switched = []
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit" or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = int(getattr(state, "blocksize", 64) or 64)
        if module.in_features % blocksize or module.in_features % 2 or module.out_features % _CPU_PACK_ROWS:
            module.support_avx512bf16_for_cpu = False
            switched.append(name)
    return switched
