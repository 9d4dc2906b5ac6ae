"""Tiny random-weight configs of every supported transformers class, built in the test (no download)."""

from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, GPTNeoXConfig, GPTNeoXForCausalLM, Idefics2Config,
                          Idefics2ForConditionalGeneration, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration)

VOCAB = 96
IMAGE_TOKEN_ID = VOCAB - 1


def _olmoe_cfg(**kw):
    return OlmoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
                       max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)


def tiny_olmoe():
    return OlmoeForCausalLM(_olmoe_cfg())


def tiny_qwen2_moe():
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1))


def tiny_mixtral():
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=4, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1))


def tiny_gpt_neox():
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=1))


def tiny_kv_stream(vocab: int = 53) -> tuple[GPTNeoXForCausalLM, list[list[int]]]:
    """A small random GPT-NeoX and two random documents (400 and 300 tokens): a fast StreamingKV env's inputs."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256)
    generator = torch.Generator().manual_seed(3)
    documents = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (400, 300)]
    return GPTNeoXForCausalLM(config).eval(), documents


def _clip_cfg():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)


def tiny_llava(text: str = "olmoe"):
    if text == "olmoe":
        text_cfg = _olmoe_cfg()
    else:
        text_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                               pad_token_id=0, eos_token_id=1)
    cfg = LlavaConfig(vision_config=_clip_cfg(), text_config=text_cfg, image_token_id=IMAGE_TOKEN_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg)


def tiny_idefics2():
    cfg = Idefics2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        perceiver_config={"hidden_size": 32, "resampler_n_latents": 16, "resampler_depth": 1,
                          "resampler_n_heads": 2, "resampler_head_dim": 8, "num_key_value_heads": 2},
        text_config={"model_type": "mistral", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "max_position_embeddings": 256, "pad_token_id": 0, "eos_token_id": 1},
        image_token_id=IMAGE_TOKEN_ID)
    return Idefics2ForConditionalGeneration(cfg)


_QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                  tie_word_embeddings=False)


def _qwen_vision(**kw):
    # patch 8, merge 2: one language-model token per 16 x 16 px
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                temporal_patch_size=2, out_hidden_size=32, **kw)


def tiny_qwen2_5_vl():
    cfg = Qwen2_5_VLConfig(text_config={**_QWEN_TEXT, "rope_parameters": {
                               "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}},
                           vision_config=_qwen_vision(window_size=32, fullatt_block_indexes=[1]),
                           image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=93, vision_end_token_id=94)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def tiny_qwen3_vl():
    cfg = Qwen3VLConfig(text_config={**_QWEN_TEXT, "rope_parameters": {
                            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                            "mrope_interleaved": True}},
                        vision_config=_qwen_vision(num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
                        image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=93, vision_end_token_id=94)
    return Qwen3VLForConditionalGeneration(cfg)


def tiny_qwen3_vl_moe():
    cfg = Qwen3VLMoeConfig(text_config={**_QWEN_TEXT, "moe_intermediate_size": 16, "num_experts": 8,
                                        "num_experts_per_tok": 4, "decoder_sparse_step": 1, "rope_parameters": {
                                            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                            "mrope_interleaved": True}},
                           vision_config=_qwen_vision(num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
                           image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=93, vision_end_token_id=94)
    return Qwen3VLMoeForConditionalGeneration(cfg)


def make(name: str):
    torch.manual_seed(0)
    model = {"olmoe": tiny_olmoe, "qwen2_moe": tiny_qwen2_moe, "mixtral": tiny_mixtral, "gpt_neox": tiny_gpt_neox,
             "llava_olmoe": lambda: tiny_llava("olmoe"), "llava_llama": lambda: tiny_llava("llama"),
             "idefics2": tiny_idefics2, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl,
             "qwen3_vl_moe": tiny_qwen3_vl_moe}[name]()
    return model.eval()
