"""Builders for the tiny reference vision-language MoE model and its input format.

The model is built from the same transformers classes as the real targets (a
``LlavaForConditionalGeneration`` with a CLIP vision tower and an OLMoE text model), with a
word-level tokenizer and a CLIP image processor saved next to it, so it loads through the
ordinary ``from_pretrained(local_dir)`` path.

Input format (used by training, evaluation and the backends): the prompt
``config.knobgym["prompt_template"]`` holds ONE ``<image>`` token; it is expanded to K copies,
K = vision tokens the language model sees after tier pooling and token-budget selection
(``KnobSpace.vision_tokens(knobs)``). The answer follows the prompt and ends with ``<eos>``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                          OlmoeConfig, PreTrainedTokenizerFast)

from backends.tiny.data import IMAGE_SIZE, vocabulary

PAD, EOS, BOS, UNK, IMAGE = "<pad>", "<eos>", "<bos>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, IMAGE)
PROMPT_TEMPLATE = "<image>\n{question}\nanswer:"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TinyShape:
    """Architecture of the tiny model (the knob structure mirrors the real targets)."""

    hidden_size: int = 64
    expert_size: int = 64  # intermediate size of each expert
    num_layers: int = 16
    num_heads: int = 4
    num_experts: int = 16
    top_k: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 8  # 48 px / 8 = a 6x6 patch grid: 36 vision tokens at the high tier
    tiers: tuple = (("low", 4), ("medium", 9), ("high", 36))
    top_ks: tuple = (4, 5, 6, 7, 8)
    depths: tuple = (12, 13, 14, 15, 16)
    # "pool": the tower sees the whole image and its tokens are pooled to the tier's count (v1);
    # "resize": the tower sees the image resized to sqrt(tier tokens) patches a side (v2)
    tier_mode: str = "pool"
    task: str = "v1"  # which procedural task (backends.tiny.tasks) the model is trained on

    def __post_init__(self):
        grid = IMAGE_SIZE // self.patch_size
        native = grid * grid
        if IMAGE_SIZE % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide the image size {IMAGE_SIZE}")
        for name, n in self.tiers:
            if not (1 <= n <= native and math.isqrt(n) ** 2 == n):
                raise ValueError(f"tier {name!r} has {n} tokens; accepted: a square number in [1, {native}]")
        if max(self.top_ks) != self.top_k or min(self.top_ks) < 1 or self.top_k > self.num_experts:
            raise ValueError(f"top_ks={self.top_ks} must end at top_k={self.top_k} <= num_experts={self.num_experts}")
        if max(self.depths) != self.num_layers or min(self.depths) < 1:
            raise ValueError(f"depths={self.depths} must lie in [1, {self.num_layers}] and end at num_layers")
        if self.tier_mode not in ("pool", "resize"):
            raise ValueError(f"tier_mode={self.tier_mode!r} is invalid; accepted: pool, resize")

    @property
    def native_vision_tokens(self) -> int:
        return (IMAGE_SIZE // self.patch_size) ** 2


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (default: the v1 generator's vocabulary), whitespace /
    punctuation split, BOS added."""
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + (vocabulary() if words is None else list(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(IMAGE, "isolated"), pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, extra_special_tokens={"image_token": IMAGE})
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    fast.padding_side = "right"
    return fast


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing for the generator's images: no resize or crop, scaled to [-1, 1]."""
    return CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                                 do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                                 do_convert_rgb=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def pixel_values(images) -> torch.Tensor:
    """``[B, 3, H, W]`` float tensor equal to what :func:`build_image_processor` produces (fast path for training)."""
    arr = np.stack([np.asarray(im) for im in images]).astype(np.float32) / 255.0
    arr = (arr - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def build_model(tokenizer: PreTrainedTokenizerFast, shape: TinyShape = TinyShape(), seed: int = 0,
                experts_implementation: str = "eager") -> LlavaForConditionalGeneration:
    """A randomly initialised model of ``shape`` whose config carries the ``knobgym`` knob metadata."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=2 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=IMAGE_SIZE, patch_size=shape.patch_size, projection_dim=shape.vision_hidden)
    text = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.expert_size,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                       num_key_value_heads=shape.num_heads, num_experts=shape.num_experts,
                       num_experts_per_tok=shape.top_k, norm_topk_prob=True, max_position_embeddings=256,
                       pad_token_id=ids[PAD], eos_token_id=ids[EOS], bos_token_id=ids[BOS],
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids[IMAGE],
                         image_seq_length=shape.native_vision_tokens, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         pad_token_id=ids[PAD], eos_token_id=ids[EOS], bos_token_id=ids[BOS])
    config.knobgym = knobgym_metadata(shape)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_experts_implementation({"text_config": experts_implementation})
    model.generation_config.pad_token_id = ids[PAD]
    model.generation_config.eos_token_id = ids[EOS]
    model.generation_config.bos_token_id = ids[BOS]
    return model


def knobgym_metadata(shape: TinyShape) -> dict:
    """The ``config.knobgym`` dict: knob ranges and the prompt format, read by ``knob_space_from_model``."""
    # tier_mode "pool" (v1): the tower sees the whole 48 px image and its tokens are pooled to the
    # tier's count; "resize" (v2): the tower sees the image at the tier's size (model card).
    meta = {"tiers": dict(shape.tiers), "native_vision_tokens": shape.native_vision_tokens,
            "tier_mode": shape.tier_mode, "task": shape.task,
            "top_ks": list(shape.top_ks), "depths": list(shape.depths), "prompt_template": PROMPT_TEMPLATE,
            "shape": {k: (list(map(list, v)) if k == "tiers" else list(v) if isinstance(v, tuple) else v)
                      for k, v in asdict(shape).items()}}
    if shape.tier_mode == "resize":
        meta["tier_sizes"] = {name: math.isqrt(n) * shape.patch_size for name, n in shape.tiers}
    return meta


def prompt_ids(tokenizer: PreTrainedTokenizerFast, question: str, n_vision_tokens: int,
               template: str = PROMPT_TEMPLATE) -> list[int]:
    """Token ids of the prompt with its single ``<image>`` token expanded to ``n_vision_tokens`` copies."""
    if n_vision_tokens < 1:
        raise ValueError(f"n_vision_tokens={n_vision_tokens!r} is invalid; accepted: an integer >= 1")
    ids = tokenizer(template.format(question=question))["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if ids.count(image_id) != 1:
        raise ValueError(f"prompt template {template!r} must contain exactly one {IMAGE} token")
    at = ids.index(image_id)
    return ids[:at] + [image_id] * n_vision_tokens + ids[at + 1:]


def answer_ids(tokenizer: PreTrainedTokenizerFast, answer: str) -> list[int]:
    """Token ids of a reference answer followed by ``<eos>`` (no BOS)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
