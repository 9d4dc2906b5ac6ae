"""Model loading: specs, legacy keys, bitsandbytes configs, placement, offline errors, round trips."""

from __future__ import annotations

import warnings

import huggingface_hub.constants
import pytest
import torch
import transformers
from conftest import build_word_tokenizer
from model_factories import make
from transformers import OlmoeForCausalLM

from backends.loading import (GenerationSettings, ModelNotAvailableError, ModelSpec, QuantizationSpec, SpecError,
                              generation_settings_from_dict, load_model, model_spec_from_dict, resolve_model_path)

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_checkpoint(model, directory):
    """``save_pretrained`` a model and the word-level tokenizer into ``directory``."""
    model.save_pretrained(directory)
    build_word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    return save_checkpoint(make("olmoe"), tmp_path_factory.mktemp("tiny-olmoe"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode (environment and the hub client's constants)."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub client reads these once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# ---------------------------------------------------------------------------------------------
# Specs from dicts: unknown keys, legacy keys
# ---------------------------------------------------------------------------------------------
def test_unknown_spec_key_names_the_key_and_lists_the_accepted_ones():
    with pytest.raises(SpecError) as err:
        model_spec_from_dict({"model": "org/name", "lod_in_4bit": True})
    message = str(err.value)
    assert "lod_in_4bit" in message
    for accepted in ("model", "revision", "local_files_only", "precision", "attn_implementation", "device",
                     "device_map", "trust_remote_code", "quantization"):
        assert accepted in message


def test_unknown_quantization_key_is_an_error():
    with pytest.raises(SpecError, match="bits.*accepted: enabled, quant_type, compute_dtype, double_quant"):
        model_spec_from_dict({"model": "org/name", "quantization": {"bits": 4}})


def test_missing_model_is_an_error():
    with pytest.raises(SpecError, match="needs 'model'"):
        model_spec_from_dict({"precision": "bf16"})


@pytest.mark.parametrize("options, expected", [
    ({"load_in_4bit": True}, {"quantization": QuantizationSpec(enabled=True, quant_type="nf4")}),
    ({"load_in_8bit": True}, {"quantization": QuantizationSpec(enabled=True, quant_type="int8")}),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
     {"quantization": QuantizationSpec(enabled=True, quant_type="fp4")}),
    ({"bnb_4bit_quant_type": "fp4", "load_in_4bit": True},
     {"quantization": QuantizationSpec(enabled=True, quant_type="fp4")}),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float16, "bnb_4bit_use_double_quant": False},
     {"quantization": QuantizationSpec(enabled=True, compute_dtype="fp16", double_quant=False)}),
    ({"torch_dtype": "bfloat16"}, {"precision": "bf16"}),
    ({"torch_dtype": torch.float16}, {"precision": "fp16"}),
    ({"torch_dtype": "float32"}, {"precision": "fp32"}),
    ({"dtype": "torch.bfloat16"}, {"precision": "bf16"}),
])
def test_legacy_keys_are_normalised_with_a_deprecation_warning(options, expected):
    with pytest.warns(DeprecationWarning) as caught:
        spec = model_spec_from_dict({"model": "org/name", "device": "cuda", **options})
    warned = " ".join(str(w.message) for w in caught)
    assert all(repr(key) in warned for key in options)
    for name, value in expected.items():
        assert getattr(spec, name) == value


def test_legacy_model_path_key():
    with pytest.warns(DeprecationWarning, match="model_name_or_path"):
        spec = model_spec_from_dict({"model_name_or_path": "org/name"})
    assert spec.model == "org/name"


def test_new_keys_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = model_spec_from_dict({"model": "org/name", "precision": "bf16", "device": "cuda:1",
                                     "quantization": {"enabled": True, "quant_type": "int8"}})
    assert spec.precision == "bf16" and spec.quantization.quant_type == "int8"


def test_conflicting_legacy_quantization_keys_are_an_error():
    with pytest.raises(SpecError, match="load_in_4bit.*load_in_8bit"):
        model_spec_from_dict({"model": "org/name", "device": "cuda", "load_in_4bit": True, "load_in_8bit": True})


# ---------------------------------------------------------------------------------------------
# Spec values, placement, bitsandbytes configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragments", [
    ({"precision": "fp8"}, ["precision='fp8'", "fp32, fp16, bf16"]),
    ({"attn_implementation": "flash"}, ["attn_implementation='flash'", "sdpa"]),
    ({"device": "tpu"}, ["device='tpu'", "cuda:N"]),
    ({"device_map": "balanced"}, ["device_map='balanced'", "'auto'"]),
    ({"quantization": QuantizationSpec(enabled=True), "device": "cuda", "device_map": {"a": "cpu", "b": 0}},
     ["mixes the CPU", "one kind of device"]),
    ({"model": ""}, ["model=''", "hub id"]),
])
def test_bad_model_spec_values_name_the_value_and_what_is_accepted(kwargs, fragments):
    with pytest.raises(SpecError) as err:
        ModelSpec(**{"model": "org/name", **kwargs})
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"quant_type": "int4"}, "quant_type='int4'"),
    ({"compute_dtype": "fp8"}, "compute_dtype='fp8'"),
])
def test_bad_quantization_values(kwargs, fragment):
    with pytest.raises(SpecError, match=fragment):
        QuantizationSpec(**kwargs)


@pytest.mark.parametrize("kwargs, device_map", [
    ({}, {"": "cpu"}),
    ({"device": "cuda"}, {"": "cuda"}),
    ({"device": "cuda:1"}, {"": "cuda:1"}),
    ({"device_map": "auto"}, "auto"),
    ({"device_map": {"model": 0, "lm_head": "cpu"}}, {"model": 0, "lm_head": "cpu"}),
])
def test_placement_is_one_device_unless_a_map_is_asked_for(kwargs, device_map):
    assert ModelSpec(model="org/name", **kwargs).resolved_device_map == device_map


def test_quantization_spec_becomes_the_bitsandbytes_config():
    assert QuantizationSpec().to_bitsandbytes_config() is None  # disabled by default
    nf4 = QuantizationSpec(enabled=True).to_bitsandbytes_config()
    assert isinstance(nf4, transformers.BitsAndBytesConfig)
    assert (nf4.load_in_4bit, nf4.load_in_8bit) == (True, False)
    assert nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert nf4.bnb_4bit_use_double_quant is True
    fp4 = QuantizationSpec(enabled=True, quant_type="fp4", compute_dtype="fp16", double_quant=False)
    fp4 = fp4.to_bitsandbytes_config()
    assert (fp4.bnb_4bit_quant_type, fp4.bnb_4bit_compute_dtype, fp4.bnb_4bit_use_double_quant) == (
        "fp4", torch.float16, False)
    int8 = QuantizationSpec(enabled=True, quant_type="int8").to_bitsandbytes_config()
    assert (int8.load_in_8bit, int8.load_in_4bit) == (True, False)


# ---------------------------------------------------------------------------------------------
# Generation settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens=5"),
    ({"min_new_tokens": -1}, "min_new_tokens=-1"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
])
def test_bad_generation_settings(kwargs, fragment):
    with pytest.raises(SpecError, match=fragment):
        GenerationSettings(**kwargs)


def test_generation_settings_from_dict():
    assert generation_settings_from_dict({"do_sample": True, "seed": 3}) == GenerationSettings(do_sample=True, seed=3)
    with pytest.raises(SpecError, match="greedy.*accepted: max_new_tokens"):
        generation_settings_from_dict({"greedy": True})


# ---------------------------------------------------------------------------------------------
# Offline: one clear error that says how to make the model available
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", [False, True])
def test_missing_local_path_is_one_clear_error(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    missing = "./no-such-model" if relative else str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(ModelSpec(model=missing))
    message = str(err.value)
    assert "no-such-model" in message and "does not exist" in message
    assert "save_pretrained" in message


def test_directory_without_a_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_model(ModelSpec(model=str(tmp_path)))


def test_uncached_hub_id_is_one_clear_error(empty_hf_cache):
    spec = ModelSpec(model="knobgym-test/no-such-model", revision="v1")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(spec)
    message = str(err.value)
    assert "'knobgym-test/no-such-model'" in message and "'v1'" in message
    assert str(empty_hf_cache) in message  # where it looked
    assert "hf download knobgym-test/no-such-model --revision v1" in message  # how to fix it
    # One error, not a chain from deep inside the hub client.
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_cached_hub_id_records_the_commit_it_resolved_to(empty_hf_cache):
    repo = empty_hf_cache / "models--knobgym-test--tiny-olmoe"
    save_checkpoint(make("olmoe"), repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    loaded = load_model(ModelSpec(model="knobgym-test/tiny-olmoe", revision="main"))
    assert loaded.revision_loaded == FAKE_COMMIT
    assert loaded.identity["revision"] == FAKE_COMMIT
    assert type(loaded.model) is OlmoeForCausalLM


# ---------------------------------------------------------------------------------------------
# Round trip through save_pretrained / load_model
# ---------------------------------------------------------------------------------------------
def test_round_trip_loads_the_same_model_and_tokenizer(olmoe_dir):
    loaded = load_model(ModelSpec(model=str(olmoe_dir)))
    original = make("olmoe")
    assert type(loaded.model) is OlmoeForCausalLM and not loaded.model.training
    assert loaded.image_processor is None
    ids = loaded.tokenizer("w10 w11 w12", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 10, 11, 12]]
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert all(p.device == torch.device("cpu") for p in loaded.model.parameters())


def test_round_trip_records_a_stable_content_revision(olmoe_dir, tmp_path):
    first = load_model(ModelSpec(model=str(olmoe_dir)))
    again = load_model(ModelSpec(model=str(olmoe_dir)))
    assert first.revision_loaded.startswith("local-")
    assert first.revision_loaded == again.revision_loaded == first.identity["revision"]
    copy = save_checkpoint(make("olmoe"), tmp_path / "same-weights")
    assert resolve_model_path(ModelSpec(model=str(copy)))[1] == first.revision_loaded
    other = make("olmoe")
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)  # same shapes, different weights
    changed = save_checkpoint(other, tmp_path / "other-weights")
    assert resolve_model_path(ModelSpec(model=str(changed)))[1] != first.revision_loaded


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("fp32", torch.float32)])
def test_round_trip_honours_precision(olmoe_dir, precision, dtype):
    loaded = load_model(ModelSpec(model=str(olmoe_dir), precision=precision))
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    assert loaded.identity["precision"] == precision


def test_load_passes_deterministic_placement_and_attention(olmoe_dir, monkeypatch):
    seen = {}
    original = OlmoeForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(OlmoeForCausalLM, "from_pretrained", spy)
    loaded = load_model(ModelSpec(model=str(olmoe_dir), attn_implementation="eager"))
    assert seen["device_map"] == {"": "cpu"}
    assert seen["local_files_only"] is True and seen["trust_remote_code"] is False
    assert loaded.model.config._attn_implementation == "eager"


def test_round_trip_of_a_vision_language_model_loads_its_image_processor(tmp_path):
    from transformers import CLIPImageProcessorPil

    directory = save_checkpoint(make("llava_olmoe"), tmp_path / "tiny-llava")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    loaded = load_model(ModelSpec(model=str(directory)))
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    pixels = loaded.image_processor(images=[torch.zeros(3, 40, 40, dtype=torch.uint8)], return_tensors="pt")
    assert pixels["pixel_values"].shape == (1, 3, 32, 32)


def test_write_directory_atomically_replaces_whole_and_keeps_the_old_one_on_failure(tmp_path):
    from backends.loading import write_directory_atomically

    target = tmp_path / "checkpoint"
    write_directory_atomically(target, lambda d: (d / "weights").write_text("v1"))
    write_directory_atomically(target, lambda d: (d / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"

    def broken(d):
        (d / "weights").write_text("half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        write_directory_atomically(target, broken)
    assert (target / "weights").read_text() == "v2"  # the previous checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no staging or .old left
