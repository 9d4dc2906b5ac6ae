"""GPU-only: bitsandbytes 4-bit / 8-bit loading of a tiny saved model, CUDA placement, knob runs on CUDA.

Skipped, with the reason, where ``torch.cuda.is_available()`` is False. Run them on a CUDA machine
with ``python -m pytest tests/test_gpu.py -m gpu -q -rs``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, build_word_tokenizer
from model_factories import IMAGE_TOKEN_ID, make
from test_hf_backend import WordTask, hf_generate, image_processor

from backends.hf import HFBackend
from backends.knobs import KnobConfig, apply_knobs
from backends.loading import GenerationSettings, ModelSpec, QuantizationSpec, load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA (bitsandbytes quantization, CUDA placement); torch.cuda.is_available() is False"),
]

NUM_LAYERS, OWN_TOP_K = 4, 4


def save_checkpoint(name: str, directory):
    make(name).save_pretrained(directory)
    build_word_tokenizer().save_pretrained(directory)
    processor = image_processor(name)
    if processor is not None:
        processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    return save_checkpoint("olmoe", tmp_path_factory.mktemp("tiny-olmoe"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_checkpoint("llava_olmoe", tmp_path_factory.mktemp("tiny-llava-olmoe"))


def on_cuda_0(model) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.device for t in tensors} == {torch.device("cuda", 0)}


@torch.no_grad()
def generate_under(model, knobs: KnobConfig) -> torch.Tensor:
    ids = torch.tensor([[2, 10, 11, 12, 13]], device="cuda")
    with apply_knobs(model, knobs):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             eos_token_id=EOS_ID, pad_token_id=0)
    return out[0, ids.shape[1]:]


def check_knob_run(model, probe):
    """top-k 1 and depth 2 on the loaded model: counted with hooks, and real tokens come out."""
    counter = probe(model)
    new = generate_under(model, KnobConfig(top_k=1, depth=2))
    assert len(new) >= 1
    assert counter.executed_blocks == [0, 1]
    assert counter.experts_per_token[0] == {OWN_TOP_K} and counter.experts_per_token[1] == {1}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 11]], device="cuda")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_loading(olmoe_dir, probe, quant_type):
    import bitsandbytes as bnb

    quantization = QuantizationSpec(enabled=True, quant_type=quant_type, compute_dtype="bf16")
    loaded = load_model(ModelSpec(model=str(olmoe_dir), device="cuda", quantization=quantization))
    linear4 = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "no layer was quantized to 4 bits"
    assert {m.weight.quant_type for m in linear4} == {quant_type}
    assert all(p.device.type == "cuda" for p in loaded.model.parameters())
    assert loaded.identity["quantization"]["quant_type"] == quant_type
    check_knob_run(loaded.model, probe)


def test_8bit_loading(olmoe_dir, probe):
    import bitsandbytes as bnb

    quantization = QuantizationSpec(enabled=True, quant_type="int8")
    loaded = load_model(ModelSpec(model=str(olmoe_dir), device="cuda", quantization=quantization))
    linear8 = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert linear8, "no layer was quantized to 8 bits"
    assert all(m.weight.dtype == torch.int8 for m in linear8)
    check_knob_run(loaded.model, probe)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_placement_puts_every_tensor_on_one_device(olmoe_dir, probe, precision):
    loaded = load_model(ModelSpec(model=str(olmoe_dir), device="cuda", precision=precision))
    assert on_cuda_0(loaded.model)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, {"fp32": "float32",
                                                                            "bf16": "bfloat16"}[precision])}
    check_knob_run(loaded.model, probe)


def test_two_stage_knob_run_on_cuda_equals_hf_generate(llava_dir, probe):
    loaded = load_model(ModelSpec(model=str(llava_dir), device="cuda"))
    assert on_cuda_0(loaded.model)
    backend = HFBackend(loaded, WordTask(), GenerationSettings(max_new_tokens=4),
                        prompt_template="<image> {question}", name="test")
    assert backend.parts.image_token_id == IMAGE_TOKEN_ID
    sample = backend.samples("test")[1]
    counter = probe(loaded.model)
    for knobs in (KnobConfig(tier="high"), KnobConfig(tier="medium", token_budget=0.5, top_k=1, depth=2)):
        state = backend.run_stage1(sample, knobs.tier, knobs.token_budget)
        outcome = backend.run_stage2(state, knobs)
        reference = hf_generate(backend, sample, knobs)
        assert outcome.new_tokens == len(reference) >= 1
        assert outcome.answer == backend.tokenizer.decode(reference, skip_special_tokens=True).strip()
        assert outcome.token_counts.vision_tokens == backend.knob_space.vision_tokens(knobs)
        assert state.summary.shape == (backend.summary_dim,)
    assert counter.experts_per_token[0] == {OWN_TOP_K}
    assert counter.experts_per_token[1] == {OWN_TOP_K, 1}  # full top-k, then the cheap run's one expert

