"""KV cache storage (preallocated slots vs the seed's torch.cat) and positions inside the cache (StreamingLLM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from backends.kv import (DocumentStreamer, FullCache, KeyNormWindow, KeyRotator, KVPolicyCache, SinkWindow,
                         greedy_generate, make_policy_cache)
from backends.tiny_text import held_out_token_documents, load_tiny_text_model

VOCAB = 61
POLICIES = [FullCache(), SinkWindow(4, window=24), SinkWindow(0, window=16, compress_every=8),
            SinkWindow(2, window=9, compress_every=3), KeyNormWindow(8, window=24, compress_every=4)]


def random_neox(max_positions: int = 256) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=max_positions, rotary_pct=0.5)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return random_neox()


@pytest.fixture(scope="module")
def document():
    return torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_tiny_text_model()
    return model, next(iter(held_out_token_documents(tokenizer, max_tokens=300).values()))


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_slots_equal_concat_token_for_token_on_a_random_neox(model, document, policy):
    slots = DocumentStreamer(model, document, policy, storage="slots").advance(1000)
    concat = DocumentStreamer(model, document, policy, storage="concat").advance(1000)
    np.testing.assert_array_equal(slots.nll, concat.nll)
    np.testing.assert_array_equal(slots.cache_length, concat.cache_length)
    assert slots.prune_events == concat.prune_events
    static = DocumentStreamer(model, document, policy, storage="static").advance(1000)  # masked unused slots
    np.testing.assert_allclose(static.nll, slots.nll, atol=1e-5)
    assert static.prune_events == slots.prune_events
    prompt = document[:5]
    assert greedy_generate(model, prompt, 60, policy, "slots") == greedy_generate(model, prompt, 60, policy, "concat")


@pytest.mark.parametrize("policy", [SinkWindow(4, window=64), SinkWindow(4, window=64, compress_every=16),
                                    KeyNormWindow(16, window=64, compress_every=8)], ids=str)
def test_slots_equal_concat_token_for_token_on_the_shipped_tiny_model(shipped, policy):
    model, ids = shipped
    slots = DocumentStreamer(model, ids, policy, storage="slots").advance(1000)
    concat = DocumentStreamer(model, ids, policy, storage="concat").advance(1000)
    assert slots.prune_events and slots.prune_events == concat.prune_events
    np.testing.assert_array_equal(slots.nll, concat.nll)
    assert greedy_generate(model, ids[:8], 120, policy, "slots") == greedy_generate(model, ids[:8], 120, policy,
                                                                                     "concat")


def test_slots_equal_concat_across_policy_switches_and_forks(model, document):
    plan = [SinkWindow(0, window=8), SinkWindow(4, window=32), SinkWindow(4, window=8, compress_every=4),
            KeyNormWindow(4, window=12, compress_every=2)]
    streams = {s: DocumentStreamer(model, document, plan[0], storage=s) for s in ("slots", "concat")}
    forks = {}
    for i, policy in enumerate(plan):
        traces = {s: streamer.advance(20, policy) for s, streamer in streams.items()}
        np.testing.assert_array_equal(traces["slots"].nll, traces["concat"].nll)
        if i == 1:
            forks = {s: streamer.fork() for s, streamer in streams.items()}
    traces = {s: fork.advance(30, SinkWindow(1, window=6)) for s, fork in forks.items()}  # the fork writes last
    np.testing.assert_array_equal(traces["slots"].nll, traces["concat"].nll)
    assert streams["slots"].cache.positions().tolist() == streams["concat"].cache.positions().tolist()


def test_slots_are_preallocated_and_written_in_place(model, document):
    """Decoding under a window writes into one storage (no per-token reallocation), sized for the policy's peak."""
    policy = SinkWindow(4, window=16, compress_every=4)
    streamer = DocumentStreamer(model, document, policy)
    streamer.advance(3)
    layer = streamer.cache.layers[0]
    pointer, capacity = layer.key_slots.data_ptr(), layer.key_slots.shape[-2]
    assert capacity == policy.window + policy.compress_every
    for _ in range(60):
        streamer.advance(1)
        assert layer.key_slots.data_ptr() == pointer and layer.keys.data_ptr() == pointer  # a view, not a copy
    assert layer.keys.shape[-2] == streamer.cache.cache_length <= 16 + 3


def test_a_fork_copies_its_slots_on_first_write_only(model, document):
    streamer = DocumentStreamer(model, document, SinkWindow(2, window=12, compress_every=4))
    streamer.advance(30)
    fork = streamer.fork()
    assert fork.cache.layers[0].key_slots.data_ptr() == streamer.cache.layers[0].key_slots.data_ptr()
    fork.advance(5)
    assert fork.cache.layers[0].key_slots.data_ptr() != streamer.cache.layers[0].key_slots.data_ptr()
    again = DocumentStreamer(model, document, SinkWindow(2, window=12, compress_every=4))
    again.advance(30)
    np.testing.assert_array_equal(again.advance(10).nll, streamer.advance(10).nll)  # the original was not disturbed


# --- positions inside the cache (StreamingLLM) --------------------------------------------------
def test_rotating_a_rotated_key_by_delta_equals_rotating_it_at_the_sum(model):
    rotator = KeyRotator.from_model(model)
    rotary = model.gpt_neox.rotary_emb
    keys = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    start, delta = torch.tensor([0, 3, 7, 100, 5000, 9]), torch.tensor([5, -3, 2, -99, 17, 0])

    def at(positions):
        cos, sin = rotary(keys, positions[None])
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    torch.testing.assert_close(rotator.rotate(at(start), delta), at(start + delta), atol=1e-4, rtol=1e-4)


def test_window_only_cache_positions_equal_original_positions(model, document):
    """Without sinks the kept tokens are contiguous, so every relative distance is the same in both schemes."""
    for every in (1, 5):
        original = DocumentStreamer(model, document, SinkWindow(0, window=16, compress_every=every)).advance(1000)
        cache = DocumentStreamer(model, document, SinkWindow(0, window=16, compress_every=every,
                                                             rope_positions="cache")).advance(1000)
        np.testing.assert_allclose(cache.nll, original.nll, atol=1e-4)
    full = DocumentStreamer(model, document, FullCache(rope_positions="cache")).advance(1000)
    np.testing.assert_allclose(full.nll, DocumentStreamer(model, document).advance(1000).nll, atol=1e-5)


def test_cache_positions_renumber_the_kept_keys(model, document):
    """Layer 0's kept keys equal a fresh full-cache prefill's keys at positions 0..kept-1 of the kept tokens
    (layer 0's keys depend on the token and its rotation only)."""
    policy = SinkWindow(3, window=12, compress_every=2, rope_positions="cache")
    streamer = DocumentStreamer(model, document[:41], policy)
    streamer.advance(40)
    layer = streamer.cache.layers[0]
    kept = layer.positions
    assert kept.tolist() == [0, 1, 2] + list(range(31, 40)) and streamer.cache.get_seq_length() == 12
    full = make_policy_cache(model, FullCache())
    with torch.no_grad():
        model(document[None, kept], past_key_values=full, use_cache=True)
    torch.testing.assert_close(layer.keys, full.layers[0].keys, atol=1e-4, rtol=1e-4)


def test_a_stream_past_the_models_positions_stays_finite_with_cache_positions(document):
    model = random_neox(max_positions=32)
    long_doc = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(3))
    seen = []
    hook = model.gpt_neox.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(int(kwargs["position_ids"].max())), with_kwargs=True)
    try:
        # The model's own forward, whose rotary module the hook watches (the fused step, equal below,
        # takes its position from the cache without calling that module).
        trace = DocumentStreamer(model, long_doc, SinkWindow(4, window=24, compress_every=4, rope_positions="cache"),
                                 decode_step="model").advance(1000)
        assert max(seen) < 24 + 4 <= model.config.max_position_embeddings
        seen.clear()
        original = DocumentStreamer(model, long_doc, SinkWindow(4, window=24, compress_every=4),
                                    decode_step="model").advance(1000)
        assert max(seen) == len(long_doc) - 2  # original positions run far past the model's 32
    finally:
        hook.remove()
    assert trace.num_tokens == len(long_doc) - 1 and np.all(np.isfinite(trace.nll))
    # Sensible: about as good as a uniform guess or better (a random model), and not identical to original.
    assert trace.nll.mean() < np.log(VOCAB) + 1.0 and not np.allclose(trace.nll, original.nll)
    fused = DocumentStreamer(model, long_doc, SinkWindow(4, window=24, compress_every=4, rope_positions="cache"),
                             decode_step="fused").advance(1000)
    np.testing.assert_allclose(fused.nll, trace.nll, atol=1e-4)


def test_switching_rope_positions_mid_stream_realigns_the_keys(model, document):
    policy = SinkWindow(0, window=16, compress_every=3)
    switched = DocumentStreamer(model, document, policy)
    switched.advance(40)
    part = switched.advance(40, SinkWindow(0, window=16, compress_every=3, rope_positions="cache"))
    plain = DocumentStreamer(model, document, policy)
    plain.advance(40)
    np.testing.assert_allclose(part.nll, plain.advance(40).nll, atol=1e-4)  # window only: same distances


def test_cache_positions_need_slots_and_a_rope_model(model):
    policy = SinkWindow(4, window=16, rope_positions="cache")
    with pytest.raises(ValueError, match="rope_positions='cache' needs storage='slots'"):
        make_policy_cache(model, policy, "concat")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="needs the model's rotary embedding"):
        make_policy_cache(gpt2, policy)
    with pytest.raises(ValueError, match="rope_positions='middle' is invalid; accepted: original, cache"):
        SinkWindow(4, window=16, rope_positions="middle")
    with pytest.raises(ValueError, match="storage='ring' is invalid; accepted: slots, static, concat"):
        KVPolicyCache(policy, 2, "ring")
    assert str(policy) == "SinkWindow(window=16, compress_every=1, rope_positions=cache, n_sink=4)"
    assert str(SinkWindow(4, window=16)) == "SinkWindow(window=16, compress_every=1, n_sink=4)"  # as before the option


def test_compile_falls_back_to_the_eager_model_with_one_warning(model, document, monkeypatch):
    import backends.kv.stream as stream

    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(stream.torch, "compile", broken_compile)
    monkeypatch.setattr(stream, "_COMPILED", {})
    with pytest.warns(UserWarning, match=r"torch.compile failed for GPTNeoXForCausalLM \(RuntimeError: no C\+\+ "
                                         r"compiler found\); decoding runs on the eager model") as caught:
        compiled = DocumentStreamer(model, document, SinkWindow(4, window=24), compile=True)
        DocumentStreamer(model, document, SinkWindow(4, window=24), compile=True)  # cached: no second warning
    assert len(caught) == 1 and compiled.forward is model
    np.testing.assert_array_equal(compiled.advance(1000).nll, DocumentStreamer(
        model, document, SinkWindow(4, window=24), decode_step="model").advance(1000).nll)


def test_a_recency_policy_chooses_one_keep_per_prune_for_every_layer(model, document):
    """SinkWindow's keep depends only on the cache length (``scores_read_cache = False``): the cache asks
    the policy once per prune, not once per layer, and moves the window down as one slice; a policy
    that reads the keys (KeyNormWindow) is asked in every layer, its keep moved by indices."""
    calls = []

    class CountingSinkWindow(SinkWindow):
        def keep_indices(self, positions, keys, values):
            calls.append(len(positions))
            return super().keep_indices(positions, keys, values)

    policy = CountingSinkWindow(2, window=9, compress_every=3)
    layers = model.config.num_hidden_layers
    streamer = DocumentStreamer(model, document, policy)
    trace = streamer.advance(60)
    assert len(trace.prune_events) > 3 and len(calls) == len(trace.prune_events)
    reference = DocumentStreamer(model, document, SinkWindow(2, window=9, compress_every=3), storage="concat")
    np.testing.assert_array_equal(trace.nll, reference.advance(60).nll)

    cache = KVPolicyCache(SinkWindow(2, window=9), layers)
    start, source = cache.compaction_plan(torch.tensor([0, 1, 5, 6, 7, 8, 9, 10, 11]))
    assert (start, source) == (2, slice(5, 12))
    start, source = cache.compaction_plan(torch.tensor([0, 3, 4, 9]))
    assert start == 1 and source.tolist() == [3, 4, 9]
    assert cache.compaction_plan(torch.arange(5))[0] == 5  # nothing moves

    key_calls = []

    class CountingKeyNorm(KeyNormWindow):
        def keep_indices(self, positions, keys, values):
            key_calls.append(len(positions))
            return super().keep_indices(positions, keys, values)

    trace = DocumentStreamer(model, document, CountingKeyNorm(4, window=16, compress_every=4)).advance(60)
    assert len(key_calls) == layers * len(trace.prune_events)
