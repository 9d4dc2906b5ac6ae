"""The fused one-token decode step (backends.kv.decode_step): the model's function token for token
under every storage, policy and positions scheme; where it applies and where it refuses; the TPOT
profile keyed by the step it times."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hf_task import checkpoints  # noqa: F401  (module fixture: tiny random HF checkpoints)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from backends.kv import DocumentStreamer, FullCache, KeyNormWindow, SinkWindow, greedy_generate
from backends.kv.decode_step import (GPTNeoXDecodeStep, decode_step_for, fused_step_unsupported,
                                     resolve_decode_step)
from latency_model.tpot import TpotSettings, tpot_cache_paths

VOCAB = 97


def neox(parallel_residual: bool = True, rotary_pct: float = 0.25) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, rotary_pct=rotary_pct, use_parallel_residual=parallel_residual,
                           max_position_embeddings=256)
    return GPTNeoXForCausalLM(config).eval()


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


DOCUMENT = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(1))
POLICIES = [FullCache(), SinkWindow(4, window=24, compress_every=4), SinkWindow(2, window=16, rope_positions="cache"),
            KeyNormWindow(window=20, n_recent=8)]


@pytest.mark.parametrize("parallel_residual,rotary_pct", [(True, 0.25), (False, 1.0)])
@pytest.mark.parametrize("storage", ["slots", "static", "concat"])
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_the_fused_step_computes_the_models_function_token_for_token(parallel_residual, rotary_pct, storage, policy):
    if storage == "concat" and policy.rope_positions == "cache":
        pytest.skip("rope_positions='cache' needs slots or static storage")
    model = neox(parallel_residual, rotary_pct)
    reference = DocumentStreamer(model, DOCUMENT, policy, storage=storage, decode_step="model").advance(200)
    fused = DocumentStreamer(model, DOCUMENT, policy, storage=storage, decode_step="fused").advance(200)
    np.testing.assert_allclose(fused.nll, reference.nll, atol=1e-5)
    np.testing.assert_array_equal(fused.cache_length, reference.cache_length)
    assert [e.seen_tokens for e in fused.prune_events] == [e.seen_tokens for e in reference.prune_events]


def test_greedy_generation_is_the_same_with_either_step():
    model = neox()
    policy = SinkWindow(2, window=8)
    assert (greedy_generate(model, [1, 2, 3], 24, policy, decode_step="fused")
            == greedy_generate(model, [1, 2, 3], 24, policy, decode_step="model"))


def test_auto_takes_the_fused_step_where_the_family_has_one_and_the_model_elsewhere():
    model, other = neox(), llama()
    assert resolve_decode_step(model) == "fused" and isinstance(decode_step_for(model), GPTNeoXDecodeStep)
    assert decode_step_for(model) is decode_step_for(model)  # one fused step per model
    assert resolve_decode_step(other) == "model" and decode_step_for(other) is other
    assert "no fused step for LlamaForCausalLM" in fused_step_unsupported(other)
    with pytest.raises(ValueError, match=r"decode_step='fused' is invalid for this model \(no fused step for "
                                         r"LlamaForCausalLM.*accepted: 'auto' or 'model'"):
        DocumentStreamer(other, DOCUMENT, decode_step="fused")
    trained = neox().train()
    assert resolve_decode_step(trained) == "model"  # dropout: the model's own forward
    with pytest.raises(ValueError, match="decode_step='fast' is invalid; accepted: auto, fused, model"):
        DocumentStreamer(model, DOCUMENT, decode_step="fast")
    with pytest.raises(ValueError, match="compile=true with decode_step='fused' is invalid"):
        DocumentStreamer(model, DOCUMENT, compile=True, decode_step="fused")
    with pytest.raises(ValueError, match="decode_step='warp' is invalid"):
        TpotSettings(decode_step="warp")


def test_a_prefill_and_a_call_without_a_policy_cache_go_to_the_model():
    model = neox()
    step = decode_step_for(model, "fused")
    ids = DOCUMENT[:5][None]
    with torch.inference_mode():
        np.testing.assert_array_equal(step(ids).logits, model(ids).logits)  # no cache: the model's forward


@pytest.mark.parametrize("where", ["dense", "attention", "rotary"])
def test_a_hook_registered_at_any_time_sees_every_token(where):
    """The fused step skips the attention and rotary modules: while any module has a hook, every
    step goes through the model's forward, so the hook runs, even one registered after the step was made."""
    model = neox()
    module = {"dense": model.gpt_neox.layers[1].attention.dense, "attention": model.gpt_neox.layers[0].attention,
              "rotary": model.gpt_neox.rotary_emb}[where]
    reference = DocumentStreamer(model, DOCUMENT, FullCache(), decode_step="model").advance(20)
    streamer = DocumentStreamer(model, DOCUMENT, FullCache(), decode_step="fused")
    streamer.advance(5)
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    try:
        hooked = streamer.advance(10)
    finally:
        handle.remove()
    rest = streamer.advance(5)
    assert len(calls) == 10  # one per token while the hook was there
    np.testing.assert_allclose(np.concatenate([hooked.nll, rest.nll]), reference.nll[5:], atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_the_fused_step_runs_a_quantized_model_with_its_own_kernels(checkpoints, quant_type):  # noqa: F811
    from backends.loading import ModelSpec, QuantizationSpec, load_model

    loaded = load_model(ModelSpec(model=str(checkpoints["gpt_neox"]),
                                  quantization=QuantizationSpec(enabled=True, quant_type=quant_type)))
    ids = list(np.random.default_rng(0).integers(4, 90, 48))
    policy = SinkWindow(4, window=16, compress_every=4)
    reference = DocumentStreamer(loaded.model, ids, policy, decode_step="model").advance(100)
    fused = DocumentStreamer(loaded.model, ids, policy, decode_step="fused").advance(100)
    assert np.all(np.isfinite(fused.nll))
    np.testing.assert_allclose(fused.nll, reference.nll, atol=1e-4)


def test_the_tpot_profile_is_keyed_by_the_step_it_times(tmp_path):
    model = neox()
    fused = tpot_cache_paths(model, tmp_path, 1, "fused")
    assert tpot_cache_paths(model, tmp_path, 1, "auto") == fused
    assert tpot_cache_paths(model, tmp_path, 1, "model") != fused
