"""bitsandbytes 4-bit and 8-bit models on the CPU (bitsandbytes >= 0.49 runs them there): every env
family, the knobs, the batched stage 2, the latency estimator, what is quantized in an MoE with fused
experts, bitsandbytes' per-call messages once, and where non-finite logits start.

Runs in CI (nothing skipped): the tiny random checkpoints of ``test_hf_task`` (hidden size 32).
"""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np
import pytest
import torch
from fake_latency import AnalyticEstimator
from test_hf_task import checkpoints, hf, jsonl_data, one_episode  # noqa: F401  (module fixtures)

import envs  # noqa: F401  (registers the env ids)
from backends.knobs import KnobConfig
from backends.loading import ModelSpec, QuantizationSpec, bitsandbytes_devices, load_model
from backends.quantized import _ONCE, quantization_report

QUANT_TYPES = ("nf4", "fp4", "int8")
LINEAR = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def quantized(checkpoints, jsonl_data):  # noqa: F811
    """``{quant_type: backend}``: the tiny LLaVA+OLMoE quantized on the CPU, loaded once each."""
    return {q: hf(checkpoints["llava_olmoe"], jsonl_data["vision"], quantization=q) for q in QUANT_TYPES}


def test_the_installed_bitsandbytes_runs_every_quant_type_on_this_cpu():
    for q in QUANT_TYPES:
        assert "cpu" in bitsandbytes_devices(q)
        ModelSpec(model="org/name", device="cpu", quantization=QuantizationSpec(enabled=True, quant_type=q))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_backend_runs_multiknob_and_tokenbudget(quantized, quant_type):
    backend = quantized[quant_type]
    linear = [m for m in backend.model.modules() if type(m).__name__ == LINEAR[quant_type]]
    assert linear and all(p.device.type == "cpu" for p in backend.model.parameters())
    assert backend.identity()["quantization"]["quant_type"] == quant_type
    info = one_episode("MultiKnob-v0", backend)
    assert 0.0 <= info["score"] <= 1.0 and not info["nonfinite_logits"]
    assert one_episode("TokenBudget-v0", backend)["knobs"]["token_budget"] in (0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_knobs_and_batched_stage2_on_a_quantized_model(quantized, quant_type, probe):
    backend = quantized[quant_type]
    space = backend.knob_space
    sample = backend.samples("test")[0]
    watch = probe(backend.model)
    knobs = space.cheapest()
    outcome = backend.run(sample, knobs)
    assert watch.executed_blocks == list(range(knobs.depth))
    assert watch.experts_per_token[0] == {space.full_top_k}
    assert all(watch.experts_per_token[i] == {knobs.top_k} for i in range(1, knobs.depth))
    assert outcome.token_counts.vision_tokens == space.vision_tokens(knobs)
    state = backend.run_stage1(sample, space.full().tier)
    configs = [space.full().replace(top_k=k, depth=d) for k in space.top_ks for d in space.depths]
    one_by_one = [backend.run_stage2(state, k) for k in configs]
    batched = backend.run_stage2_batch(state, configs)
    assert [o.answer for o in batched] == [o.answer for o in one_by_one]
    assert [o.token_counts for o in batched] == [o.token_counts for o in one_by_one]


def test_latency_estimator_profiles_a_quantized_model(quantized, checkpoints, jsonl_data, tmp_path):  # noqa: F811
    from latency_model import ProfileSettings, get_estimator
    from latency_model.cache import cache_paths

    backend = quantized["nf4"]
    settings = ProfileSettings(points=12, repeats=1, warmup=1, samples=4)
    estimator = get_estimator(backend, cache_dir=tmp_path, settings=settings, progress=False)
    sample = backend.samples("test")[0]
    configs = [backend.knob_space.cheapest(), backend.knob_space.full()]
    ms = estimator.predict([backend.knob_space.resolve(k) for k in configs],
                           [backend.expected_token_counts(sample, k) for k in configs])
    assert np.all(np.isfinite(ms)) and np.all(ms > 0)
    fp32 = hf(checkpoints["llava_olmoe"], jsonl_data["vision"])
    assert cache_paths(backend, tmp_path) != cache_paths(fp32, tmp_path)  # one estimator per quantization


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_kv_env_streams_a_quantized_causal_lm(checkpoints, quant_type):  # noqa: F811
    loaded = load_model(ModelSpec(model=str(checkpoints["gpt_neox"]),
                                  quantization=QuantizationSpec(enabled=True, quant_type=quant_type)))
    assert any(type(m).__name__ == LINEAR[quant_type] for m in loaded.model.modules())
    docs = [list(np.random.default_rng(0).integers(4, 90, 64))]
    env = gym.make("StreamingKV-v0", model=loaded.model, documents=docs, budget="4ms", chunk_tokens=8,
                   episode_tokens=32, tpot_model={"base_ms": 3.0, "per_slot_ms": 0.01, "per_prune_ms": 0.5})
    env.reset(seed=0)
    terminated = truncated = False
    while not (terminated or truncated):
        _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert np.isfinite(reward)


class _FlatDecodingEstimator:
    """20 ms for every decoding configuration: the env's latency is not under test here (profiling
    a quantized pair's strategies takes a minute on two cores)."""

    identity, fingerprint = {"test": "flat"}, {}

    def predict(self, knobs, counts, accepted=None):
        return np.full(len(knobs), 20.0)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_decoding_env_runs_a_quantized_pair(quant_type):
    from backends.registry import load_backend

    pair = load_backend("decoding", quantization=quant_type)
    assert pair.identity()["quantization"]["quant_type"] == quant_type
    assert any(type(m).__name__ == LINEAR[quant_type] for m in pair.model.modules())
    env = gym.make("Decoding-v0", backend=pair, budget="20ms", estimator=_FlatDecodingEstimator())
    env.reset(seed=0)
    for _ in range(3):
        _, reward, _, _, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and isinstance(info["answer"], str)
        env.reset()


def test_fused_experts_are_not_quantized_and_the_report_says_so(quantized):
    report = quantization_report(quantized["nf4"].model)
    assert report.quantized.get("experts", 0) == 0 < report.total["experts"]  # fused 3-D tensors
    attention = quantized["nf4"].parts.layers[0].self_attn
    projections = sum(m.in_features * m.out_features for m in attention.children() if hasattr(m, "in_features"))
    assert report.quantized["attention"] == projections * len(quantized["nf4"].parts.layers)  # nn.Linear weights
    assert 0 < report.share < 1
    assert any("experts" in line and "(  0.0%)" in line for line in report.lines())
    fp32 = quantization_report(load_model(ModelSpec(model=str(quantized["nf4"].loaded.spec.model))).model)
    assert fp32.share == 0 and fp32.total == report.total  # counted as the elements they stand for


def test_int8_cast_message_is_logged_once_per_run(quantized, caplog):
    backend = quantized["int8"]
    _ONCE.seen.clear()
    sample = backend.samples("test")[0]
    with caplog.at_level(logging.WARNING):
        for knobs in (backend.knob_space.full(), backend.knob_space.cheapest()):
            backend.run(sample, knobs)
    assert sum("MatMul8bitLt" in r.getMessage() for r in caplog.records) == 1


def test_nonfinite_logits_name_the_first_module_that_went_nonfinite(checkpoints, jsonl_data):  # noqa: F811
    backend = hf(checkpoints["llava_olmoe"], jsonl_data["vision"], quantization={"quant_type": "nf4",
                                                                                  "double_quant": False})
    norm = backend.parts.layers[2].post_attention_layernorm
    with torch.no_grad():
        norm.weight.fill_(float("inf"))
    sample = backend.samples("test")[0]
    with pytest.warns(RuntimeWarning, match=r"first module whose output went non-finite: "
                                            r"model\.language_model\.layers\.2\.post_attention_layernorm"):
        outcome = backend.run(sample, KnobConfig())
    assert outcome.nonfinite_logits and outcome.score == 0.0
    assert outcome.extras["nonfinite_module"].startswith("model.language_model.layers.2.post_attention_layernorm")


def test_versions_json_records_bitsandbytes_and_accelerate(quantized):
    import accelerate
    import bitsandbytes

    from knobgym_cli.versions import versions

    env = gym.make("MultiKnob-v0", backend=quantized["nf4"], budget="[20ms,80ms]", estimator=AnalyticEstimator())
    record = versions(env)
    assert record["packages"]["bitsandbytes"] == bitsandbytes.__version__
    assert record["packages"]["accelerate"] == accelerate.__version__
    assert record["model"]["quantization"]["quant_type"] == "nf4"


@pytest.mark.parametrize("stored_as", ["nf4", "int8"])
def test_a_checkpoint_stored_quantized_loads_only_under_its_own_quantization(checkpoints, tmp_path,  # noqa: F811
                                                                             stored_as, recwarn):
    """transformers applies a stored checkpoint's own quantization whatever it is asked for, so a spec
    that disagrees (another type, or none) is one error naming both, before the weights load; the
    stored one loads as stored, without transformers' "already has a quantization_config" warning."""
    from backends.loading import SpecError

    source = checkpoints["gpt_neox"]
    loaded = load_model(ModelSpec(model=str(source),
                                  quantization=QuantizationSpec(enabled=True, quant_type=stored_as)))
    folder = tmp_path / f"stored-{stored_as}"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    recwarn.clear()
    again = load_model(ModelSpec(model=str(folder), quantization=QuantizationSpec(enabled=True, quant_type=stored_as)))
    assert any(type(m).__name__ == LINEAR[stored_as] for m in again.model.modules())
    assert not [w for w in recwarn if "quantization_config" in str(w.message)]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, loaded.model(ids).logits)
    other = "int8" if stored_as == "nf4" else "fp4"
    for asked in (QuantizationSpec(), QuantizationSpec(enabled=True, quant_type=other)):
        named = "none" if not asked.enabled else other
        with pytest.raises(SpecError, match=rf"stored quantized by bitsandbytes \({stored_as}.*asked: {named}.*"
                                            rf"accepted: quantization={stored_as}"):
            load_model(ModelSpec(model=str(folder), quantization=asked))
    if stored_as == "nf4":  # the 4-bit settings are part of what is stored
        with pytest.raises(SpecError, match="asked: nf4 with compute_dtype=bf16, double_quant=False; accepted: "
                                            "quantization=nf4 with compute_dtype=bf16, double_quant=True"):
            load_model(ModelSpec(model=str(folder), quantization=QuantizationSpec(enabled=True, double_quant=False)))


def test_4bit_layers_the_avx512_bf16_kernel_cannot_take_run_on_the_generic_path():
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel only when in_features is a multiple
    of the block size and out_features of 32 (other shapes raise inside it); keep_cpu_4bit_layers_runnable
    sends only the other shapes to the generic path. The CPU's flag is forced on, so this runs anywhere."""
    import bitsandbytes as bnb

    from backends.quantized import keep_cpu_4bit_layers_runnable

    model = torch.nn.Sequential(bnb.nn.Linear4bit(32, 48, quant_type="nf4"),
                                bnb.nn.Linear4bit(64, 64, quant_type="nf4")).to("cpu").eval()
    for layer in model:
        layer.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    assert keep_cpu_4bit_layers_runnable(model) == ["0"]
    assert [layer.support_avx512bf16_for_cpu for layer in model] == [False, True]
    with torch.no_grad():
        assert torch.isfinite(model[0](torch.randn(2, 32))).all()  # the generic path
