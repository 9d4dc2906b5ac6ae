"""Full-size verification: every supported architecture at its published size, with random weights.

    python -m bench.full_size [--models llava-1.5-7b,idefics2-8b,olmoe-1b-7b,pythia-2.8b] [--keep]
                              [--scale 1.0] [--work-dir DIR] [--max-new-tokens 2]

For each model, in its own process (so memory is returned to the system between models):

1. builds the architecture from its published configuration (``bench/full_size_configs/<model>.json``,
   each naming the Hugging Face repo and file the values come from) on the ``meta`` device, then
   materialises it one safetensors shard at a time with random bf16 weights: the weights are
   never held twice, and at most one shard (2 GiB) of them is in memory while writing;
2. saves it as a local checkpoint with a small word-level tokenizer (the model's vocabulary size)
   and, for vision models, its image processor, plus a JSON-lines dataset (``image`` relative to
   the file, ``question``, ``answer``) with one generated image;
3. loads it through ``backend=hf`` (:func:`load_through_backend_hf`: ``backends.registry.load_backend``);
4. checks the knobs at the real shapes with forward hooks (:mod:`bench._hooks`): vision tokens per
   tier and the patches entering the vision encoder, blocks run per depth, experts per token in
   every MoE block but the first, KV cache sizes per policy, non-empty generated tokens;
5. runs one episode of each env the model supports at the extreme knob values.

It prints one table (model, parameters, build and load seconds, seconds per knob setting, peak
RSS) and deletes the checkpoints unless ``--keep``. ``--scale`` shrinks widths and depths (not
vocabularies, image sizes, experts or latents) for a quick smoke run; the real run uses 1.0.

Why random weights verify anything: latency and knob mechanics (shapes, token counts, which blocks
and experts run, cache sizes) do not depend on weight values; answers do, and are not checked.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from backends.knobs import KnobConfig

CONFIG_DIR = Path(__file__).resolve().parent / "full_size_configs"
MODELS = ("llava-1.5-7b", "idefics2-8b", "olmoe-1b-7b", "pythia-2.8b", "llava-1.5-7b-nf4", "idefics2-8b-nf4",
          "qwen3-vl-2b", "qwen3-vl-30b-a3b-nf4")
DEFAULT_MODELS = MODELS[:4]
SHARD_BYTES = 2 << 30
WEIGHT_STD = 0.02
KV_CHUNK_TOKENS = 17  # two chunks: 34 tokens, past the smallest KV window (32) plus one
QUESTIONS = (("what color is the square ?", "red"), ("what shape is in the picture ?", "square"))
WORDS = ("USER:", "ASSISTANT:", "what", "color", "is", "the", "square", "shape", "in", "picture", "?", "red")


class FullSizeError(ValueError):
    """A bad option (one line, exit 2) or a failed check (one line naming what differed, exit 1)."""


class CheckFailed(AssertionError):
    """A knob check that did not hold at the real shapes."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """One model's published configuration and how the bench exercises it (from its JSON file)."""

    name: str
    source: str
    model_class: str
    config_class: str
    config: dict
    tokens: dict
    image_processor: dict | None
    image_px: int | None
    envs: tuple[str, ...]
    quantization: str | None = None  # bitsandbytes 4-bit type the checkpoint is written in (nf4, fp4)
    max_peak_gb: float | None = None  # build as many decoder blocks as keep the peak RSS under this

    @property
    def has_vision(self) -> bool:
        return self.image_processor is not None


def load_architecture(name: str) -> Architecture:
    path = CONFIG_DIR / f"{name}.json"
    if name not in MODELS or not path.is_file():
        raise FullSizeError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    raw = json.loads(path.read_text())
    if "base" in raw:  # a variant: the base model's file with some keys replaced (e.g. quantization)
        raw = {**json.loads((CONFIG_DIR / f"{raw['base']}.json").read_text()), **raw}
    return Architecture(name=name, source=raw["_source"], model_class=raw["model_class"],
                        config_class=raw["config_class"], config=raw["config"], tokens=raw["tokens"],
                        image_processor=raw["image_processor"], image_px=raw.get("image_px"),
                        envs=tuple(raw["envs"]), quantization=raw.get("quantization"),
                        max_peak_gb=raw.get("max_peak_gb"))


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise FullSizeError(f"--models={text!r} is empty; accepted: a comma-separated subset of {', '.join(MODELS)}")
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise FullSizeError(f"--models has unknown model(s) {bad}; accepted: a comma-separated subset of "
                            f"{', '.join(MODELS)}")
    return list(dict.fromkeys(names))


def _scaled_block(cfg: dict, scale: float) -> dict:
    """Widths and depths times ``scale`` with head counts and head sizes kept consistent."""
    out = dict(cfg)
    heads_key = "num_attention_heads" if "num_attention_heads" in cfg else "num_heads"  # Qwen-VL towers: num_heads
    if heads_key in cfg:
        heads = cfg[heads_key]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        new_heads = max(2, round(heads * math.sqrt(scale)))
        new_head_dim = max(16, 8 * round(head_dim * math.sqrt(scale) / 8))
        out[heads_key] = new_heads
        out["hidden_size"] = new_heads * new_head_dim
        if "head_dim" in cfg:
            out["head_dim"] = new_head_dim
        if "num_key_value_heads" in cfg:  # keep the query heads per key/value head where it divides
            kv_heads = max(1, new_heads // (heads // cfg["num_key_value_heads"]))
            while new_heads % kv_heads:
                kv_heads -= 1
            out["num_key_value_heads"] = kv_heads
    for key in ("intermediate_size", "moe_intermediate_size"):
        if key in cfg:
            out[key] = max(16, 16 * round(cfg[key] * scale / 16))  # grouped_mm needs 16-byte strides
    if "num_hidden_layers" in cfg:
        out["num_hidden_layers"] = max(4, round(cfg["num_hidden_layers"] * scale))
    if "depth" in cfg:  # Qwen-VL towers; DeepStack taps spread over the remaining blocks
        out["depth"] = max(4, round(cfg["depth"] * scale))
        if "deepstack_visual_indexes" in cfg:
            n = len(cfg["deepstack_visual_indexes"])
            out["deepstack_visual_indexes"] = [min(out["depth"] - 1, (i + 1) * out["depth"] // (n + 1)) for i in range(n)]
    if "projection_dim" in cfg:
        out["projection_dim"] = out["hidden_size"]
    return out


def scaled_config(arch: Architecture, scale: float) -> dict:
    """The architecture's config dict, shrunk by ``scale`` (1.0: the published values unchanged)."""
    if scale == 1.0:
        return json.loads(json.dumps(arch.config))
    cfg = json.loads(json.dumps(arch.config))
    if "text_config" in cfg:
        cfg["text_config"] = _scaled_block(cfg["text_config"], scale)
        cfg["vision_config"] = _scaled_block(cfg["vision_config"], scale)
        if "out_hidden_size" in cfg["vision_config"]:  # Qwen-VL: the merger projects onto the text width
            cfg["vision_config"]["out_hidden_size"] = cfg["text_config"]["hidden_size"]
        if "perceiver_config" in cfg:
            p = dict(cfg["perceiver_config"])
            p["hidden_size"] = cfg["text_config"]["hidden_size"]
            p["resampler_head_dim"] = max(16, 8 * round(p["resampler_head_dim"] * math.sqrt(scale) / 8))
            p["resampler_n_heads"] = max(2, round(p["resampler_n_heads"] * math.sqrt(scale)))
            p["num_key_value_heads"] = max(1, p["resampler_n_heads"] // 4)
            while p["resampler_n_heads"] % p["num_key_value_heads"]:
                p["num_key_value_heads"] -= 1
            cfg["perceiver_config"] = p
        return cfg
    return _scaled_block(cfg, scale)


def build_config(arch: Architecture, scale: float = 1.0, blocks: int | None = None):
    import transformers

    cfg = scaled_config(arch, scale)
    if blocks is not None:  # fewer decoder blocks than published (a memory cap; said in the table)
        (cfg["text_config"] if "text_config" in cfg else cfg)["num_hidden_layers"] = int(blocks)
    config = getattr(transformers, arch.config_class)(**cfg)
    config.architectures = [arch.model_class]
    config.dtype = torch.bfloat16
    return config


def meta_model(arch: Architecture, scale: float = 1.0, blocks: int | None = None) -> nn.Module:
    """The model on the ``meta`` device: names, shapes and module types, no storage."""
    import transformers

    config = build_config(arch, scale, blocks)
    with torch.device("meta"):
        return getattr(transformers, arch.model_class)(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Random checkpoint, written shard by shard
# ---------------------------------------------------------------------------------------------
class NoisePool:
    """Random bf16 values N(0, std) drawn once; tensors are filled from it at random offsets.

    Why not ``normal_`` per tensor: drawing 7 billion normals takes minutes on two cores, while
    copying slices of a 16M-value pool at random offsets is a memory copy. Weight values do not
    matter here, only that they are random enough to route tokens to varied experts and keep
    activations finite.
    """

    def __init__(self, seed: int = 0, std: float = WEIGHT_STD, size: int = 1 << 24):
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size, generator=self.gen) * std).to(torch.bfloat16)

    def tensor(self, shape: Sequence[int]) -> torch.Tensor:
        n, size = math.prod(shape), len(self.pool)
        out = torch.empty(n, dtype=torch.bfloat16)
        pos = 0
        while pos < n:
            m = min(n - pos, size)
            offset = int(torch.randint(0, size - m + 1, (1,), generator=self.gen))
            out[pos:pos + m] = self.pool[offset:offset + m]
            pos += m
        return out.view(*shape)


def _init_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> ``ones`` (norm scales), ``zeros`` (biases) or ``noise`` (everything else)."""
    kinds = {}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if pname.endswith("bias"):
                kinds[full] = "zeros"
            elif is_norm:
                kinds[full] = "ones"
            else:
                kinds[full] = "noise"
    return kinds


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (an LM head tied to the
    input embeddings, ``tie_word_embeddings``): a checkpoint stores the tensor once, as
    ``save_pretrained`` does, and loading ties them again."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def quantized_weight_names(model: nn.Module) -> set[str]:
    """The ``nn.Linear`` weights transformers' bitsandbytes loading quantizes in ``model`` (every
    linear layer except the output embeddings, tied and last modules: ``get_keys_to_not_convert``)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = get_keys_to_not_convert(model)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in keep)}


QUANT_BLOCK = 64  # values per 4-bit block (one absmax each), as transformers' bitsandbytes loading uses
NESTED_BLOCK = 256  # absmax values per block of the double quantization


class QuantizedNoisePool:
    """Random linear weights written directly in 4-bit: slices of :class:`NoisePool`'s pool,
    quantized once (bitsandbytes ``quantize_4bit``, blocks of 64, double quantization).

    Quantizing every weight of a 7B model one tensor at a time took about 20 minutes on this
    2-core CPU (45 M values in 9 s under load); copying slices of a pool quantized once is a
    memory copy. A weight of ``n`` values takes the packed codes and the block statistics of ``n``
    consecutive pool values starting at a random offset aligned to one nested block (64 x 256
    values), so each slice is exactly the quantization of those pool values; the double
    quantization's offset is the pool's (the mean of its block maxima, the same for every slice in
    expectation). A tensor longer than the pool is filled slice after slice, as :class:`NoisePool`
    does.
    """

    def __init__(self, pool: NoisePool, quant_type: str):
        import bitsandbytes.functional as bnb_functional

        self.bnb, self.quant_type, self.gen = bnb_functional, quant_type, pool.gen
        self.packed, self.state = bnb_functional.quantize_4bit(
            pool.pool.view(-1, QUANT_BLOCK * NESTED_BLOCK), blocksize=QUANT_BLOCK, compress_statistics=True,
            quant_type=quant_type)
        self.packed = self.packed.flatten()
        self.size = len(pool.pool)

    def entries(self, name: str, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        """The checkpoint entries of one ``shape`` linear weight (packed codes, quantization state),
        as ``save_pretrained`` of a 4-bit model writes them."""
        n = math.prod(shape)
        span = QUANT_BLOCK * NESTED_BLOCK
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        absmax = torch.empty(-(-n // QUANT_BLOCK), dtype=torch.uint8)
        nested = torch.empty(-(-len(absmax) // NESTED_BLOCK), dtype=torch.float32)
        pos = 0
        while pos < n:
            m = min(n - pos, self.size)
            start = int(torch.randint(0, (self.size - m) // span + 1, (1,), generator=self.gen)) * span
            packed[pos // 2:(pos + m + 1) // 2] = self.packed[start // 2:(start + m + 1) // 2]
            a0, a1 = pos // QUANT_BLOCK, -(-(pos + m) // QUANT_BLOCK)
            absmax[a0:a1] = self.state.absmax[start // QUANT_BLOCK:start // QUANT_BLOCK + a1 - a0]
            n0, n1 = a0 // NESTED_BLOCK, -(-a1 // NESTED_BLOCK)
            nested[n0:n1] = self.state.state2.absmax[start // span:start // span + n1 - n0]
            pos += m
        state2 = self.bnb.QuantState(absmax=nested, code=self.state.state2.code, blocksize=NESTED_BLOCK,
                                     dtype=self.state.state2.dtype)
        state = self.bnb.QuantState(absmax=absmax, shape=torch.Size(shape), code=self.state.code,
                                    blocksize=QUANT_BLOCK, quant_type=self.quant_type, dtype=torch.bfloat16,
                                    offset=self.state.offset, state2=state2)
        # copies: the code tables are shared by every weight, and safetensors refuses shared storage
        return {name: packed.view(-1, 1), **{f"{name}.{k}": v.clone() for k, v in state.as_dict(packed=True).items()}}


def write_random_weights(model: nn.Module, out_dir: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                         quantization: str | None = None) -> int:
    """Write random bf16 weights for every entry of ``model.state_dict()`` (a meta model) as
    sharded safetensors plus their index; returns the bytes written. With ``quantization`` (nf4,
    fp4) the linear weights transformers would quantize are written pre-quantized, one tensor at a
    time, so neither the bf16 model nor its bf16 checkpoint ever exists."""
    from safetensors.torch import save_file

    state = model.state_dict()
    kinds = _init_kinds(model)
    tied = tied_aliases(model)
    names = [name for name in state if name not in tied]
    quantized = quantized_weight_names(model) if quantization else set()
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * (2 if state[name].is_floating_point() else state[name].element_size())
        nbytes = nbytes // 4 if name in quantized else nbytes
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    pool = NoisePool(seed)
    quantized_pool = QuantizedNoisePool(pool, quantization) if quantized else None
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            meta = state[name]
            kind = kinds.get(name)
            if kind is None:  # a persistent buffer: only index-like buffers exist in these models
                raise FullSizeError(f"state_dict entry {name!r} is a buffer the bench cannot make up; "
                                    f"accepted: models whose state_dict holds parameters only")
            if name in quantized and kind == "noise":
                entries = quantized_pool.entries(name, meta.shape)
            elif kind == "noise":
                entries = {name: pool.tensor(meta.shape)}
            else:
                entries = {name: (torch.ones if kind == "ones" else torch.zeros)(meta.shape, dtype=torch.bfloat16)}
            for key, tensor in entries.items():
                tensors[key] = tensor
                weight_map[key] = filename
                total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        del tensors
        gc.collect()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def build_tokenizer(arch: Architecture, vocab_size: int):
    """A word-level tokenizer covering every id of the model's vocabulary (``w<id>`` words, the
    model's special tokens at their published ids, and the dataset's words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = arch.tokens
    id_to_token = {i: f"w{i}" for i in range(vocab_size)}
    special = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "image": "<image>"}
    if t["bos"] is not None and t["bos"] == t["eos"]:
        special["bos"] = special["eos"] = "<|endoftext|>"
    for role, token in special.items():
        if t.get(role) is not None:
            id_to_token[t[role]] = token
    if arch.model_class.startswith("Idefics2"):
        id_to_token[t["image"] - 1] = "<fake_token_around_image>"
        id_to_token[t["image"] + 1] = "<end_of_utterance>"
    for offset, word in enumerate(WORDS):
        id_to_token[100 + offset] = word
    vocab = {token: i for i, token in id_to_token.items()}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if t.get("unk") is not None else None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": id_to_token[t["eos"]], "pad_token": id_to_token[t["pad"]]}
    if t.get("unk") is not None:
        kwargs["unk_token"] = "<unk>"
    if t["bos"] is not None:
        kwargs["bos_token"] = id_to_token[t["bos"]]
        bos = id_to_token[t["bos"]]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t["bos"])])
    if t.get("image") is not None:
        kwargs["extra_special_tokens"] = {"image_token": "<image>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def build_image_processor(arch: Architecture):
    import transformers

    spec = arch.image_processor
    return getattr(transformers, spec["class"])(**spec["kwargs"])


def write_checkpoint(arch: Architecture, out_dir: Path, scale: float = 1.0, seed: int = 0,
                     blocks: int | None = None) -> dict:
    """Random-weight checkpoint of ``arch`` in ``out_dir`` (config, sharded weights, tokenizer,
    image processor); returns ``{"parameters", "bytes", "build_s"}``."""
    from transformers import GenerationConfig

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = meta_model(arch, scale, blocks)
    n_params = count_parameters(model)
    written = write_random_weights(model, out_dir, seed, quantization=arch.quantization)
    config = model.config
    if arch.quantization:
        from backends.loading import QuantizationSpec

        config.quantization_config = QuantizationSpec(enabled=True, quant_type=arch.quantization).to_bitsandbytes_config()
    config.save_pretrained(out_dir)
    t = arch.tokens
    GenerationConfig(eos_token_id=t["eos"], pad_token_id=t["pad"], bos_token_id=t["bos"]).save_pretrained(out_dir)
    vocab = config.get_text_config(decoder=True).vocab_size
    del model
    gc.collect()
    build_tokenizer(arch, vocab).save_pretrained(out_dir)
    if arch.has_vision:
        build_image_processor(arch).save_pretrained(out_dir)
    return {"parameters": n_params, "bytes": written, "build_s": time.perf_counter() - start}


def write_dataset(arch: Architecture, out_dir: Path, n_questions: int = 1) -> Path:
    """A JSON-lines dataset (``image`` relative to the file, ``question``, ``answer``) with one
    generated image (a red square on grey) for vision models; returns the file."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    if arch.has_vision:
        px = arch.image_px
        pixels = np.full((px, px, 3), 128, dtype=np.uint8)
        pixels[px // 4: 3 * px // 4, px // 4: 3 * px // 4] = (220, 30, 30)
        Image.fromarray(pixels).save(out_dir / "image.png")
    for i in range(n_questions):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        row = {"question": question, "answer": answer}
        if arch.has_vision:
            row = {"image": "image.png", **row}
        lines.append(json.dumps(row))
    path = out_dir / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Loading: the one place that goes through the backend loading path
# ---------------------------------------------------------------------------------------------
def load_through_backend_hf(checkpoint_dir: str | Path, dataset_file: str | Path, *, precision: str = "bf16",
                            quantization: str | None = None, device: str = "cpu", max_new_tokens: int = 2):
    """Load a checkpoint directory and a JSON-lines dataset through ``backend=hf``.

    The one place the benches load a model: ``backends.registry.load_backend("hf", ...)``, the
    path ``train.py backend=hf`` takes. The one file serves every split (the bench checks knobs on
    its first sample, whatever the split). The knob ranges are the model config's defaults
    (:func:`backends.knobs.knob_space_from_model`: tier before the tower, top-k ``full/2 .. full``,
    depth ``ceil(0.75 L) .. L``), which are the presets' ranges at the published sizes. The
    backend is released from the registry's cache (:func:`backends.registry.release_backend`) so
    that dropping it frees the model when the caller is done. The backend runs with this process's
    torch thread count (the bench's ``--threads``), not the backends' default of one thread.
    """
    from backends.registry import load_backend, release_backend

    data = str(dataset_file)
    backend = load_backend("hf", model=str(checkpoint_dir), dataset={"train": data, "validation": data, "test": data},
                           precision=precision, quantization=quantization, device=device,
                           generation={"max_new_tokens": int(max_new_tokens)}, num_threads=torch.get_num_threads())
    release_backend(backend)
    return backend


def check_loaded_weights(model: nn.Module, checkpoint_dir: Path) -> None:
    """The loaded model holds exactly the checkpoint's tensors: the same names, and the first
    tensor of every shard equal to the file's (a name the loader did not match would otherwise be
    initialised silently)."""
    from safetensors import safe_open

    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tied = tied_aliases(model)
    expect(all(name not in index for name in tied), f"tied parameters {sorted(tied)} were not tied on loading")
    state = {name: value for name, value in model.state_dict().items() if name not in tied}
    expect(set(state) == set(index), f"loaded model and checkpoint differ in tensor names: only loaded "
                                     f"{sorted(set(state) - set(index))[:3]}, only saved {sorted(set(index) - set(state))[:3]}")
    for shard in sorted(set(index.values())):
        with safe_open(str(checkpoint_dir / shard), framework="pt") as fh:
            name = next(iter(fh.keys()))
            expect(torch.equal(state[name].cpu(), fh.get_tensor(name)), f"loaded {name!r} differs from {shard}")


# ---------------------------------------------------------------------------------------------
# Knob checks at the real shapes
# ---------------------------------------------------------------------------------------------
def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def expected_encoder_patches(backend, sample) -> int:
    """Patches of the image at the processor's output size: images x (H / patch) x (W / patch)."""
    from backends import qwen_vl

    cfg = backend.model.config.vision_config
    if qwen_vl.is_qwen_vl(backend.model):  # flattened patches: the grid of the top tier's square image
        top = backend.knob_space.tier_sizes[backend.knob_space.tier_names[-1]]
        return int(qwen_vl.image_inputs(backend.image_processor, sample.image, top)["image_grid_thw"].prod())
    pixels = backend.image_processor(images=[sample.image], return_tensors="pt")["pixel_values"]
    h, w = pixels.shape[-2:]
    images = math.prod(pixels.shape[:-3])
    return int(images * (h // cfg.patch_size) * (w // cfg.patch_size))


def check_tiers(backend, sample, probe) -> list[dict]:
    """Stage 1 (vision encoder + decoder block 1) at every tier: vision tokens the language model
    sees, patches entering the encoder (falling with the tier in ``resize`` mode, the whole
    processed image at every tier in ``pool`` mode), the sequence entering block 1, only block 1 run."""
    space, rows = backend.knob_space, []
    native_patches = expected_encoder_patches(backend, sample)
    patches_by_tier = []
    for tier in space.tier_names:
        probe.reset()
        state, seconds = _timed(backend.run_stage1, sample, tier, 1.0)
        counts = state.token_counts
        expect(counts.vision_tokens == space.tiers[tier],
               f"tier {tier!r}: {counts.vision_tokens} vision tokens reach the language model; expected "
               f"{space.tiers[tier]}")
        expect(probe.first_block_lengths == [counts.prompt_tokens + space.tiers[tier]],
               f"tier {tier!r}: block 1 saw sequences {probe.first_block_lengths}; expected "
               f"[{counts.prompt_tokens} prompt + {space.tiers[tier]} vision tokens]")
        expect(probe.executed_blocks == [0], f"tier {tier!r}: stage 1 ran blocks {probe.executed_blocks}; expected [0]")
        patches = sum(probe.encoder_patches)
        expect(0 < patches <= native_patches,
               f"tier {tier!r}: {patches} patches entered the vision encoder; expected 1..{native_patches}")
        patches_by_tier.append(patches)
        rows.append({"setting": f"stage 1, tier {tier}", "seconds": seconds,
                     "checks": f"{counts.vision_tokens} vision tokens, {patches} encoder patches"})
    expect(patches_by_tier[-1] == native_patches,
           f"top tier: {patches_by_tier[-1]} encoder patches; expected {native_patches} (the processed image)")
    tokens_by_tier = [space.tiers[t] for t in space.tier_names]
    expect(tokens_by_tier == sorted(tokens_by_tier),
           f"vision tokens per tier {tokens_by_tier} grow from a higher tier to a lower one")
    if space.tier_mode == "resize":
        # The tier is decided before the tower: each lower tier feeds the encoder fewer patches.
        expect(all(a < b for a, b in zip(patches_by_tier, patches_by_tier[1:])),
               f"tier_mode resize: encoder patches per tier {patches_by_tier} do not fall with the tier")
    else:
        expect(patches_by_tier == [native_patches] * len(patches_by_tier),
               f"tier_mode pool: encoder patches per tier {patches_by_tier}; expected the processed image's "
               f"{native_patches} at every tier")
    return rows


def check_compute(backend, probe, knobs, what: str) -> None:
    """What the last run computed under ``knobs`` (resolved): blocks per depth, experts per token."""
    space = backend.knob_space
    k = space.resolve(knobs)
    expect(probe.executed_blocks == list(range(k.depth)),
           f"{what}: blocks {probe.executed_blocks[:3]}..{probe.executed_blocks[-3:]} ran "
           f"({len(probe.executed_blocks)}); expected 0..{k.depth - 1} (depth {k.depth})")
    if space.has_moe:
        expect(probe.experts_per_token.get(0) == {space.full_top_k},
               f"{what}: MoE block 1 used {probe.experts_per_token.get(0)} experts per token; expected "
               f"{{{space.full_top_k}}} (the model's own top-k)")
        for i in range(1, k.depth):
            expect(probe.experts_per_token.get(i) == {k.top_k},
                   f"{what}: MoE block {i + 1} used {probe.experts_per_token.get(i)} experts per token; "
                   f"expected {{{k.top_k}}}")


def calibration_configs(space) -> list:
    """The cheapest configuration and the most expensive one at the lowest tier (cheap to run at
    full size: few vision tokens), i.e. both extremes of top-k and depth."""
    cheap = space.cheapest().replace(token_budget=1.0)
    top = KnobConfig(tier=space.tier_names[0] if space.has_vision else None,
                     top_k=max(space.top_ks) if space.top_ks else None,
                     depth=max(space.depths) if space.depths else None)
    return [cheap, top]


def check_runs(backend, sample, probe) -> tuple[list[dict], list]:
    """Whole runs at the extremes of top-k and depth; returns table rows and (knobs, outcome, s)."""
    rows, runs = [], []
    for knobs in calibration_configs(backend.knob_space):
        probe.reset()
        outcome, seconds = _timed(backend.run, sample, knobs)
        what = f"run {knob_label(backend.knob_space, knobs)}"
        check_compute(backend, probe, knobs, what)
        expect(outcome.new_tokens >= 1, f"{what}: no token generated")
        expect(not outcome.nonfinite_logits, f"{what}: non-finite logits")
        expect(outcome.token_counts.vision_tokens == backend.knob_space.vision_tokens(knobs),
               f"{what}: {outcome.token_counts.vision_tokens} vision tokens; expected "
               f"{backend.knob_space.vision_tokens(knobs)}")
        rows.append({"setting": what, "seconds": seconds, "checks": _compute_summary(backend, probe)
                     + f", {outcome.new_tokens} new tokens"})
        runs.append((knobs, outcome, seconds))
    return rows, runs


def knob_label(space, knobs) -> str:
    """The knobs that apply to the model, e.g. ``tier=low depth=24`` or ``top_k=4 depth=12``."""
    k = space.resolve(knobs)
    parts = []
    if space.has_vision:
        parts.append(f"tier={k.tier}" + (f" budget={k.token_budget:g}" if k.token_budget < 1 else ""))
    if space.has_moe:
        parts.append(f"top_k={k.top_k}")
    parts.append(f"depth={k.depth}")
    return " ".join(parts)


def _compute_summary(backend, probe) -> str:
    text = f"{len(probe.executed_blocks)} blocks"
    if backend.knob_space.has_moe and len(probe.executed_blocks) > 1:
        text += f", top-k {sorted(probe.experts_per_token.get(1, set()))}"
    return text


def calibrated_estimator(backend, runs):
    """A FLOPs-linear latency estimator fitted on the bench's own timed runs (whole run and stage 1).

    The envs need an estimator for observations and rewards; profiling a 7B model's knob grid takes
    hours on two cores, so the bench fits ``latency_model``'s FLOPs-only method on its calibration
    runs. It is this CPU's real cost per FLOP, not an accurate estimator; accuracy is not checked here.
    """
    from latency_model import fit_estimator
    from latency_model.profile import ProfileData, device_fingerprint

    rows = []
    for i, (knobs, outcome, seconds) in enumerate(runs):
        k, c = backend.knob_space.resolve(knobs), outcome.token_counts
        rows.append({"point": i, "holdout": False, "tier": k.tier, "token_budget": k.token_budget, "top_k": k.top_k,
                     "depth": k.depth, "split": "validation", "sample_id": 0, "prompt_tokens": c.prompt_tokens,
                     "vision_tokens_full": c.vision_tokens_full, "vision_tokens": c.vision_tokens,
                     "new_tokens": c.new_tokens, "latency_ms": 1e3 * seconds, "latency_runs_ms": f"{1e3 * seconds:.4f}",
                     "backend_ms": outcome.measured_ms, "stage1_ms": outcome.stage1_ms})
    profile = ProfileData(rows=rows, device=device_fingerprint(backend.device), backend=backend.identity(),
                          knob_space=backend.knob_space, cost_params=backend.cost_params(),
                          settings={"source": "bench.full_size calibration runs"})
    return fit_estimator(profile, method="flops_linear", source="bench.full_size calibration runs")


# ---------------------------------------------------------------------------------------------
# Env episodes at the extreme knob values
# ---------------------------------------------------------------------------------------------
def _env_entry_point(env_id: str):
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)

    return gym.spec(env_id).entry_point


def make_knob_env(env_id: str, backend, estimator):
    """The env on ``backend`` (budget: the full configuration's estimate), or the one-line reason
    it refuses this backend (an env that cannot apply raises ``ValueError``)."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)

    full = backend.knob_space.full()
    full_ms = float(estimator.predict([full], [backend.expected_token_counts(backend.samples("validation")[0],
                                                                              full)])[0])
    try:
        with warnings.catch_warnings():
            # The budget does not matter to these checks; a two-run FLOPs fit may rank the
            # extremes either way, and the env then warns that the budget is out of range.
            warnings.filterwarnings("ignore", message="budget .*", category=UserWarning)
            return gym.make(env_id, backend=backend, estimator=estimator, budget=f"{max(1.0, full_ms):.1f}ms",
                            split="validation")
    except ValueError as error:
        return str(error).splitlines()[0]


def extreme_actions(action_space) -> list[tuple[str, Any]]:
    """All-lowest and all-highest indices of a Discrete or MultiDiscrete action space."""
    import gymnasium as gym

    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return [("lowest", np.zeros_like(action_space.nvec)), ("highest", action_space.nvec - 1)]
    return [("lowest", 0), ("highest", int(action_space.n) - 1)]


def knob_env_episode(env, env_id: str, backend, probe, action, label: str) -> dict:
    """One episode repeating ``action`` at every step; checks what the model computed."""
    space = backend.knob_space
    probe.reset()
    start = time.perf_counter()
    env.reset(seed=0, options={"sample_id": 0})
    done, info, reward = False, {}, float("nan")
    while not done:
        _, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    seconds = time.perf_counter() - start
    what = f"{env_id} {label} action {np.asarray(action).tolist()}"
    expect(math.isfinite(reward), f"{what}: reward {reward}")
    knobs = KnobConfig(**info["knobs"])
    check_compute(backend, probe, knobs, what)
    expect(info["new_tokens"] >= 1, f"{what}: no token generated")
    expect(info["vision_tokens"] == space.vision_tokens(knobs),
           f"{what}: {info['vision_tokens']} vision tokens; expected {space.vision_tokens(knobs)}")
    return {"setting": f"{env_id} {label} ({knob_label(space, knobs)})", "seconds": seconds,
            "checks": _compute_summary(backend, probe) + f", {info['vision_tokens']} vision tokens, "
                      f"{info['new_tokens']} new tokens"}


def knob_env_episodes(env_id: str, backend, estimator, probe) -> list[dict]:
    """One episode at each end of the env's action space (all-lowest, all-highest indices)."""
    env = make_knob_env(env_id, backend, estimator)
    if isinstance(env, str):
        return [{"setting": f"{env_id}: not supported", "seconds": None, "checks": env}]
    rows = [knob_env_episode(env, env_id, backend, probe, action, label)
            for label, action in extreme_actions(env.action_space)]
    env.close()
    return rows


#: TPOT coefficients the KV env episodes use instead of a profile (their latency is measured)
KV_TPOT_COEFFICIENTS = {"base_ms": 1.0, "per_slot_ms": 0.001, "per_prune_ms": 0.1}


def kv_env_episode(env_id: str, backend) -> list[dict]:
    """One episode of two chunks: the first at every knob's highest value, the second at every
    knob's lowest (the smallest window), checking the cache sizes each policy allows."""
    import gymnasium as gym

    vocab = backend.model.config.get_text_config(decoder=True).vocab_size
    rng = np.random.default_rng(0)
    document = rng.integers(200, min(vocab, 30000), 2 * KV_CHUNK_TOKENS + 8).tolist()
    # measured latency; fixed TPOT coefficients (only the budget's default and observations read them),
    # so no TPOT profile of each id's model is taken: that profile was most of a smoke run's minutes
    env = gym.make(env_id, chunk_tokens=KV_CHUNK_TOKENS, episode_tokens=2 * KV_CHUNK_TOKENS, latency="measured",
                   tpot_model=KV_TPOT_COEFFICIENTS, model=backend.model, documents=[document])
    nvec = env.action_space.nvec
    start = time.perf_counter()
    env.reset(seed=0)
    steps = []
    for action in (nvec - 1, np.zeros_like(nvec)):
        _, reward, terminated, _, info = env.step(action)
        steps.append((action, info))
        expect(math.isfinite(reward), f"{env_id}: reward {reward}")
    expect(terminated, f"{env_id}: the episode did not end after two chunks")
    seconds = time.perf_counter() - start
    (high_action, high), (low_action, low) = steps
    lengths_high = np.asarray(high["cache_length"])
    expect(lengths_high.tolist() == list(range(1, KV_CHUNK_TOKENS + 1)) and not high["prune_events"],
           f"{env_id} highest knobs {high['knobs']}: attended cache lengths {lengths_high.tolist()}; expected "
           f"1..{KV_CHUNK_TOKENS} with no eviction")
    budget = int(low["knobs"].get("window"))
    every = int(low["knobs"].get("compress_every"))
    lengths_low = np.asarray(low["cache_length"])
    expect(int(lengths_low.max()) <= budget + every,
           f"{env_id} lowest knobs {low['knobs']}: the cache reached {int(lengths_low.max())} tokens; expected "
           f"at most window + compress_every = {budget + every}")
    expect(bool(low["prune_events"]) and all(e["length_after"] == budget for e in low["prune_events"]),
           f"{env_id} lowest knobs {low['knobs']}: prune events {low['prune_events']}; expected at least one, each "
           f"leaving {budget} tokens")
    env.close()
    return [{"setting": f"{env_id} chunks at highest {high['knobs']} then lowest {low['knobs']}",
             "seconds": seconds, "checks": f"cache 1..{int(lengths_high.max())} then <= {int(lengths_low.max())}, "
                                           f"{len(low['prune_events'])} prunes to {budget}"}]


# ---------------------------------------------------------------------------------------------
# One model, end to end
# ---------------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from backends.knobs import model_parts

    return model_parts(model).layers


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def wait_for_memory(needed_gb: float, timeout_s: float = 600.0, log=print) -> None:
    """Wait (up to ``timeout_s``) until ``needed_gb`` is available: the machine is shared."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = mem_available_gb()
        if not free < needed_gb:
            return
        if time.monotonic() > deadline:
            raise FullSizeError(f"{needed_gb:.1f} GB of memory are needed but {free:.1f} GB are available after "
                                f"waiting {timeout_s:.0f} s; accepted: run when other jobs have finished")
        log(f"  waiting for memory: {free:.1f} GB available, {needed_gb:.1f} GB needed")
        time.sleep(15)


def checkpoint_gb(model: nn.Module, quantization: str | None) -> tuple[float, float]:
    """``(whole checkpoint, one decoder block)`` in GB as :func:`write_random_weights` writes them
    (bf16, a quantized linear weight at about a quarter of that)."""
    from backends.knobs import model_parts

    quantized = quantized_weight_names(model) if quantization else set()
    sizes = {n: p.numel() * 2 / (4 if n in quantized else 1) / 2**30 for n, p in model.named_parameters()}
    layers = model_parts(model).layers
    prefix = next(n for n, m in model.named_modules() if m is layers[0]) + "."
    return sum(sizes.values()), sum(v for n, v in sizes.items() if n.startswith(prefix))


def blocks_under(arch: Architecture, scale: float, cap_gb: float, log=print) -> int | None:
    """Decoder blocks to build so the peak RSS (about the mapped checkpoint plus 3 GB of work
    memory) stays under ``cap_gb`` and the memory available now; ``None``: all of them fit."""
    meta = meta_model(arch, scale)
    total, block = checkpoint_gb(meta, arch.quantization)
    layers = meta.config.get_text_config(decoder=True).num_hidden_layers
    cap = min(cap_gb, mem_available_gb() - 1.0)
    fit = int((cap - 3.0 - (total - layers * block)) // block)
    log(f"[{arch.name}] {total:.1f} GB checkpoint at {layers} blocks ({block:.2f} GB each); "
        f"{min(fit, layers)} blocks fit under {cap:.1f} GB")
    if fit < 1:
        raise FullSizeError(f"{arch.name}: not one decoder block fits under {cap:.1f} GB; accepted: run when "
                            f"more memory is available")
    return None if fit >= layers else fit


def run_model(name: str, work_dir: Path, *, scale: float = 1.0, keep: bool = False, max_new_tokens: int = 2,
              log=print) -> dict:
    """Build, save, load, check and run envs for one model; returns its table entry."""
    arch = load_architecture(name)
    ckpt, data_dir = work_dir / name, work_dir / f"{name}-data"
    result: dict[str, Any] = {"model": name, "scale": scale, "source": arch.source, "rows": []}
    start = time.perf_counter()
    try:
        blocks = blocks_under(arch, scale, arch.max_peak_gb, log) if arch.max_peak_gb else None
        meta = meta_model(arch, scale, blocks)
        needed = checkpoint_gb(meta, arch.quantization)[0] * 1.1 + 1.0
        result.update(blocks=len(_decoder_layers(meta)),
                      published_blocks=build_config(arch, scale).get_text_config(decoder=True).num_hidden_layers)
        del meta
        wait_for_memory(needed, log=log)
        log(f"[{name}] building ({needed - 1.0:.1f} GB of {arch.quantization or 'bf16'} weights) in {ckpt}")
        built = write_checkpoint(arch, ckpt, scale, blocks=blocks)
        result.update(parameters=built["parameters"], build_s=built["build_s"], checkpoint_gb=built["bytes"] / 2**30)
        dataset = write_dataset(arch, data_dir)
        log(f"[{name}] built in {built['build_s']:.0f} s; loading through the backend")
        backend, result["load_s"] = _timed(load_through_backend_hf, ckpt, dataset, max_new_tokens=max_new_tokens,
                                           quantization=arch.quantization)
        check_loaded_weights(backend.model, ckpt)
        space = backend.knob_space
        result["knob_space"] = space.as_dict()
        sample = backend.samples("validation")[0]
        from bench._hooks import ComputeProbe

        with ComputeProbe(backend.model) as probe:
            if space.has_vision:
                log(f"[{name}] stage 1 at every tier")
                result["rows"] += check_tiers(backend, sample, probe)
            log(f"[{name}] runs at the extremes of top-k and depth")
            rows, runs = check_runs(backend, sample, probe)
            result["rows"] += rows
            estimator = None
            for env_id in arch.envs:
                from envs.streaming_kv import StreamingKVEnv

                log(f"[{name}] {env_id}")
                if _env_entry_point(env_id) is StreamingKVEnv:
                    result["rows"] += kv_env_episode(env_id, backend)
                else:
                    estimator = estimator or calibrated_estimator(backend, runs)
                    result["rows"] += knob_env_episodes(env_id, backend, estimator, probe)
        result["ok"] = True
    except CheckFailed as failure:
        result.update(ok=False, error=f"check failed: {failure}")
    finally:
        result["peak_rss_gb"] = peak_rss_gb()
        result["total_s"] = time.perf_counter() - start
        if not keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# Table and command line
# ---------------------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    header = ("model", "params", "total s", "build s", "load s", "knob setting", "s", "checked at the real shapes",
              "peak RSS")
    lines = []
    for r in results:
        first = True
        rows = r.get("rows") or [{"setting": "-", "seconds": None, "checks": "-"}]
        if not r.get("ok"):
            rows = rows + [{"setting": "FAILED", "seconds": None, "checks": r.get("error", "")}]
        for row in rows:
            blocks = ("" if r.get("blocks", 0) == r.get("published_blocks", 0)
                      else f" ({r['blocks']} of {r['published_blocks']} blocks)")
            cells = [r["model"] + ("" if r.get("scale", 1.0) == 1.0 else f" x{r['scale']:g}") + blocks,
                     f"{r['parameters'] / 1e9:.2f} B" if "parameters" in r else "-",
                     f"{r['total_s']:.0f}" if "total_s" in r else "-",
                     f"{r['build_s']:.0f}" if "build_s" in r else "-",
                     f"{r['load_s']:.1f}" if "load_s" in r else "-"] if first else ["", "", "", "", ""]
            cells += [row["setting"], f"{row['seconds']:.1f}" if row["seconds"] is not None else "-", row["checks"],
                      f"{r['peak_rss_gb']:.1f} GB" if first and "peak_rss_gb" in r else ""]
            lines.append(cells)
            first = False
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(c) + " |" for c in lines])


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`FullSizeError` line (no usage block), for exit 2."""

    def error(self, message: str):
        raise FullSizeError(f"{message}; see {self.prog} --help")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m bench.full_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)} (default: the first four)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and datasets in --work-dir")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="width/depth factor in (0, 1] (1.0: published sizes; e.g. 0.05 for a smoke run)")
    parser.add_argument("--work-dir", default=None, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("--max-new-tokens", type=int, default=2, help="tokens generated per run (1..4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 when --scale < 1, torch's default at full size)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--in-process", action="store_true",
                        help="run every model in this process (default: one child process per model)")
    parser.add_argument("--_child-result", dest="child_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model_list = parse_models(args.models)
    if not (0 < args.scale <= 1):
        raise FullSizeError(f"--scale={args.scale!r} is invalid; accepted: 0 < scale <= 1")
    if args.threads is not None and args.threads < 1:
        raise FullSizeError(f"--threads={args.threads!r} is invalid; accepted: an integer >= 1")
    if not (1 <= args.max_new_tokens <= 4):
        raise FullSizeError(f"--max-new-tokens={args.max_new_tokens!r} is invalid; accepted: 1..4")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_child(name: str, args: argparse.Namespace, work_dir: Path) -> dict:
    """One model in a child process: its memory is returned to the system when it exits."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_file = Path(tmp.name)
    cmd = [sys.executable, "-m", "bench.full_size", "--models", name, "--scale", repr(args.scale),
           "--work-dir", str(work_dir), "--max-new-tokens", str(args.max_new_tokens), "--in-process",
           *(["--threads", str(args.threads)] if args.threads else []),
           "--_child-result", str(result_file)] + (["--keep"] if args.keep else [])
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    try:
        proc.wait()
        text = result_file.read_text()
        result = json.loads(text)[0] if text else None
    finally:  # interrupted (Ctrl-C, SIGTERM): stop the child before the work dir is removed
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        result_file.unlink(missing_ok=True)
    if result is None:
        result = {"model": name, "scale": args.scale, "ok": False, "rows": [],
                  "error": f"child process exited with status {proc.returncode} before writing a result"}
    return result


def _exit_on_signal(signum, frame) -> None:
    """SIGTERM / SIGHUP / Ctrl-C as ``SystemExit``: the ``finally`` blocks stop the child and remove the
    temporary folder, and the run ends with one line instead of a traceback."""
    print(f"interrupted ({signal.Signals(signum).name}): stopped; temporary files removed", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except FullSizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, _exit_on_signal)
    threads = args.threads or (1 if args.scale < 1 else None)
    if threads:
        # Tiny shapes gain nothing from intra-op threads, and on busy shared cores threads waiting
        # for each other make them many times slower (as tests/conftest.py notes).
        torch.set_num_threads(threads)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="knobgym-full-size-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.model_list:
            if args.in_process:
                results.append(run_model(name, work_dir, scale=args.scale, keep=args.keep,
                                         max_new_tokens=args.max_new_tokens, log=_log))
                gc.collect()
            else:
                results.append(_run_child(name, args, work_dir))
    except FullSizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    if args.child_result:
        Path(args.child_result).write_text(json.dumps(results))
        return 0 if all(r.get("ok") for r in results) else 1
    print(format_table(results))
    if args.keep:
        print(f"checkpoints kept in {work_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = [r for r in results if not r.get("ok")]
    for r in failed:
        print(f"error: {r['model']}: {r.get('error')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
