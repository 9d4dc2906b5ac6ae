"""KV policies on a tiny random GPT-NeoX: kept tokens, positions, equivalence with the full cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from backends.kv import (DocumentStreamer, FullCache, KeyNormWindow, KVPolicyCache, SinkWindow, apply_kv_policy,
                         document_report, greedy_generate, kv_bytes_per_token, nll_around_events, register_kv_policy,
                         registered_kv_policies, spike_metrics)
from backends.kv.cache import PruneEvent
from backends.kv.policies import KVPolicy, kv_policy_class
from envs.kv_grid import kv_action_grid

VOCAB = 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.5)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def document():
    return torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(1))


SHIPPED = [SinkWindow(4, window=24), SinkWindow(0, window=24, compress_every=8),
           KeyNormWindow(8, window=24, compress_every=4)]


def every_registered_policy(window: int = 24, compress_every: int = 1) -> list[KVPolicy]:
    """One instance of every registered policy with knobs: the first value of each other knob in its env's grid."""
    policies = []
    for cls in registered_kv_policies().values():
        if cls is FullCache:
            continue
        grid = kv_action_grid(cls)
        knobs = {name: values[0] for name, values in grid.items()}
        knobs.update(window=window, compress_every=compress_every)
        knobs = {k: min(v, window - 1) if k != "window" and k != "compress_every" else v for k, v in knobs.items()}
        policies.append(cls(**knobs))
    return policies


@pytest.mark.parametrize("policy", every_registered_policy(), ids=str)
def test_every_registered_policy_keeps_window_tokens_in_position_order(model, document, policy):
    short = document[:policy.window]  # never reaches window + compress_every: no prune, same NLL as full
    np.testing.assert_allclose(DocumentStreamer(model, short, policy).advance(1000).nll,
                               DocumentStreamer(model, short).advance(1000).nll, atol=1e-5)
    streamer = DocumentStreamer(model, document, policy)
    for _ in range(3):
        streamer.advance(20)
        assert streamer.cache.cache_length <= policy.window + policy.compress_every - 1
        for layer in range(len(streamer.cache.layers)):
            positions = streamer.cache.positions(layer)
            assert torch.all(positions[1:] > positions[:-1]) and int(positions[-1]) == streamer.cache.seen_tokens - 1
    keys = torch.randn(1, 2, 40, 4, generator=torch.Generator().manual_seed(0))
    kept = policy.keep_indices(torch.arange(40), keys, keys)
    assert len(kept) == policy.window and torch.all(kept[1:] > kept[:-1]) and int(kept[-1]) == 39


def test_streaming_with_full_cache_matches_one_full_forward(model, document):
    trace = DocumentStreamer(model, document).advance(1000)
    with torch.no_grad():
        logits = model(document[None]).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, document[1:], reduction="none").numpy()
    np.testing.assert_allclose(trace.nll, reference, atol=1e-4)
    assert trace.prune_events == []


@pytest.mark.parametrize("policy", SHIPPED, ids=str)
def test_policy_matches_full_cache_while_shorter_than_window(model, document, policy):
    short = document[:policy.budget]  # never reaches budget + compress_every: no prune
    full = DocumentStreamer(model, short).advance(1000)
    under_policy = DocumentStreamer(model, short, policy).advance(1000)
    np.testing.assert_allclose(under_policy.nll, full.nll, atol=1e-5)
    assert under_policy.prune_events == []
    prompt = document[:6]
    new_tokens = policy.budget - len(prompt)
    assert greedy_generate(model, prompt, new_tokens, policy) == greedy_generate(model, prompt, new_tokens)


def test_hf_generate_accepts_policy_cache(model, document):
    prompt = document[:5][None]
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    reference = model.generate(prompt, **kwargs)
    with apply_kv_policy(model, SinkWindow(4, window=32)) as cache:
        under_policy = model.generate(prompt, past_key_values=cache, **kwargs)
        assert cache.seen_tokens == reference.shape[1] - 1
    assert torch.equal(reference, under_policy)


@pytest.mark.parametrize("n_sink,window,every", [(4, 16, 1), (0, 16, 1), (4, 16, 5), (2, 9, 3)])
def test_sink_window_keeps_exactly_sinks_and_recent_tokens(model, document, n_sink, window, every):
    policy = SinkWindow(n_sink, window=window, compress_every=every)
    streamer = DocumentStreamer(model, document, policy)
    for _ in range(len(document) - 1):
        streamer.advance(1)
        seen = streamer.cache.seen_tokens
        length = streamer.cache.cache_length
        # Lazy schedule: below budget + R the cache only grows; it is cut back to exactly the budget.
        assert length < window + every
        for layer in range(len(streamer.cache.layers)):
            positions = streamer.cache.positions(layer).tolist()
            assert len(positions) == length == streamer.cache.layers[layer].keys.shape[-2]
            if seen < window + every:
                assert positions == list(range(seen))
            else:
                recent = list(range(seen - (length - n_sink), seen))
                assert positions == list(range(n_sink)) + recent
    events = streamer.cache.prune_events
    assert events and all(e.length_after == window and e.length_before == window + every for e in events)


def test_cache_contents_are_the_kept_tokens_keys(model, document):
    """Layer 0's stored keys are exactly the full-cache keys at the kept positions (original rotation).

    Only layer 0 is comparable: its keys depend on the token and its position alone, while deeper
    layers' keys depend on what earlier layers could still attend to.
    """
    policy = SinkWindow(3, window=12, compress_every=2)
    with apply_kv_policy(model, FullCache()) as full, torch.no_grad():
        model(document[None, :40], past_key_values=full, use_cache=True)
        full_keys = full.layers[0].keys.clone()
    streamer = DocumentStreamer(model, document[:41], policy)
    streamer.advance(40)
    layer = streamer.cache.layers[0]
    assert layer.positions.tolist() == [0, 1, 2] + list(range(31, 40))
    torch.testing.assert_close(layer.keys, full_keys[:, :, layer.positions], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", SHIPPED + [SinkWindow(2, window=10, compress_every=64)], ids=str)
def test_positions_stay_monotone_and_original(model, document, policy):
    streamer = DocumentStreamer(model, document, policy)
    for _ in range(4):
        streamer.advance(19)
        for layer in range(len(streamer.cache.layers)):
            positions = streamer.cache.positions(layer)
            assert torch.all(positions[1:] > positions[:-1])
            assert int(positions[-1]) == streamer.cache.seen_tokens - 1
        # New tokens get their true absolute position: the cache reports tokens seen, not kept.
        assert streamer.cache.get_seq_length() == streamer.cursor


def test_prefill_longer_than_window_then_decode_is_consistent(model, document):
    """A multi-token prefill attends causally before eviction; decoding then continues at true positions."""
    policy = SinkWindow(2, window=12)
    with apply_kv_policy(model, policy) as cache, torch.no_grad():
        prefill_logits = model(document[None, :30], past_key_values=cache, use_cache=True).logits
        assert cache.cache_length == 12 and cache.positions().tolist() == [0, 1] + list(range(20, 30))
        model(document[None, 30:31], past_key_values=cache, use_cache=True)
        assert cache.positions().tolist() == [0, 1] + list(range(21, 31))
    with torch.no_grad():
        torch.testing.assert_close(prefill_logits, model(document[None, :30]).logits, atol=1e-4, rtol=1e-4)


def test_key_norm_keeps_recent_and_lowest_norm_keys(model, document):
    policy = KeyNormWindow(4, window=12, compress_every=1)
    streamer = DocumentStreamer(model, document[:41], policy)
    streamer.advance(40)
    seen = streamer.cache.seen_tokens
    for layer in streamer.cache.layers:
        positions = layer.positions.tolist()
        assert len(positions) == 12 and positions[-4:] == list(range(seen - 4, seen))
    # Selection on its own: the lowest-norm old keys win, ties broken towards older tokens.
    keys = torch.ones(1, 1, 10, 2)
    keys[0, 0, [1, 5]] = 0.1
    chosen = KeyNormWindow(2, window=5).keep_indices(torch.arange(10), keys, keys).tolist()
    assert chosen == [0, 1, 5, 8, 9]


def test_policy_changes_mid_stream_never_restore_evicted_tokens(model, document):
    streamer = DocumentStreamer(model, document, SinkWindow(0, window=8))
    streamer.advance(20)
    evicted_before = set(range(streamer.cache.seen_tokens)) - set(streamer.cache.positions().tolist())
    streamer.advance(20, SinkWindow(4, window=32))
    assert not evicted_before & set(streamer.cache.positions().tolist())
    streamer.advance(20, SinkWindow(4, window=8, compress_every=4))
    assert streamer.cache.cache_length <= 8 + 3


@pytest.mark.parametrize("make, message", [
    (lambda: SinkWindow(4, window=-1), "window=-1"),
    (lambda: SinkWindow(8, window=8), "n_sink=8 must be < window=8"),
    (lambda: SinkWindow(-1, window=8), "n_sink=-1"),
    (lambda: SinkWindow(4, window=16, compress_every=0), "compress_every=0"),
    (lambda: SinkWindow(4, window=16, compress_every=2.5), "compress_every=2.5"),
    (lambda: KeyNormWindow(9, window=8), "n_recent=9 must be <= window=8"),
    (lambda: KeyNormWindow(0, window=0), "window=0"),
    (lambda: KVPolicyCache("SinkWindow", 2), "accepted: a KVPolicy instance"),
    (lambda: kv_policy_class("NoSuchPolicy"), "unknown KV policy 'NoSuchPolicy'"),
    (lambda: DocumentStreamer(None, [1, 2, 3], threads=0), "threads=0"),
])
def test_bad_knobs_are_clear_value_errors(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_register_rejects_what_is_not_a_scoring_policy():
    @dataclass(frozen=True)
    class NoScore(KVPolicy):
        pass

    with pytest.raises(ValueError, match="NoScore does not define score"):
        register_kv_policy(NoScore)
    with pytest.raises(ValueError, match="not a KV policy"):
        register_kv_policy(int)
    assert issubclass(SinkWindow, KVPolicy) and register_kv_policy(SinkWindow) is SinkWindow


def test_a_score_of_the_wrong_shape_is_a_clear_error():
    @dataclass(frozen=True)
    class BadShape(KVPolicy):
        def score(self, positions, keys, values):
            return positions[:-1].float()

    keys = torch.zeros(1, 1, 10, 2)
    with pytest.raises(ValueError, match=r"BadShape.score returned shape \(9,\); accepted: .*shape \(10,\)"):
        BadShape(window=4).keep_indices(torch.arange(10), keys, keys)


def test_diagnostics_report_and_spikes(model, document):
    full = document_report(model, document, FullCache())
    pruned = document_report(model, document, SinkWindow(0, window=8, compress_every=16))
    assert full.num_tokens == pruned.num_tokens == len(document) - 1
    assert full.num_prunes == 0 and pruned.num_prunes == len(pruned.prune_events) > 0
    assert np.isclose(full.ppl, np.exp(full.nll.mean())) and full.tpot_ms > 0
    spikes = pruned.spikes(full, after=8, threshold=0.0)
    assert len(spikes) == pruned.num_prunes
    assert all(s.evicted == 16 and s.area >= 0 and 0 <= s.width <= 8 and s.area >= max(s.peak, 0) for s in spikes)


def test_spike_metrics_on_a_known_curve():
    nll = np.full(40, 1.0)
    nll[20:23] = [3.0, 2.0, 1.5]  # spike right after an eviction recorded at seen_tokens=20
    event = PruneEvent(seen_tokens=20, length_before=30, length_after=20)
    (metrics,) = spike_metrics(nll, [event], before=5, after=10, threshold=0.25)
    assert metrics.peak == pytest.approx(2.0)
    assert metrics.area == pytest.approx(2.0 + 1.0 + 0.5)
    assert metrics.width == 3
    aligned = nll_around_events(nll, [event], before=5, after=10)
    assert aligned.shape == (1, 15) and aligned[0, 5] == 3.0
    (against_baseline,) = spike_metrics(nll, [event], baseline_nll=np.full(40, 1.5), before=5, after=10)
    assert against_baseline.peak == pytest.approx(1.5) and against_baseline.width == 2


def test_fork_evolves_apart_from_the_original(model, document):
    streamer = DocumentStreamer(model, document, SinkWindow(2, window=12, compress_every=4))
    streamer.advance(30)
    fork = streamer.fork()
    first = fork.advance(10, SinkWindow(0, window=8))
    second = streamer.advance(10)
    assert fork.cursor == streamer.cursor == 40
    assert fork.cache.positions().tolist() != streamer.cache.positions().tolist()
    again = DocumentStreamer(model, document, SinkWindow(2, window=12, compress_every=4))
    again.advance(30)
    np.testing.assert_allclose(again.advance(10).nll, second.nll, atol=1e-6)  # the original was not disturbed
    assert not np.allclose(first.nll, second.nll)


def test_streaming_restores_the_process_thread_setting(model, document):
    before = torch.get_num_threads()
    DocumentStreamer(model, document[:10], threads=1).advance(5)
    assert torch.get_num_threads() == before


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer(model):
    # 2 (K, V) * 2 layers * 4 heads * head_dim 8 * 4 bytes (float32)
    assert kv_bytes_per_token(model) == 2 * 2 * 4 * 8 * 4


def test_apply_kv_policy_restores_the_model_and_empties_the_cache(model, document):
    model.train()
    with apply_kv_policy(model, SinkWindow(2, window=8)) as cache:
        assert not model.training
        with torch.no_grad():
            model(document[None, :20], past_key_values=cache, use_cache=True)
        assert cache.cache_length == 8 and cache.prune_events
    assert model.training and cache.cache_length == 0 and cache.prune_events == [] and cache.seen_tokens == 0
    model.eval()


def test_text_model_training_never_replaces_the_shipped_checkpoint_by_accident():
    from backends.tiny_text.train import main as train_text

    with pytest.raises(ValueError, match="already holds files.*--overwrite"):
        train_text([])  # the default --out is the shipped checkpoint


def test_the_policies_bench_scores_the_same_tokens_after_every_window_s_first_eviction(model, document):
    from bench.kv_policies import run_policies

    documents = {"a": document[:80].tolist(), "b": document[10:90].tolist()}
    policies = [FullCache(), SinkWindow(4, window=16), SinkWindow(0, window=16)]
    results = run_policies(model, documents, policies, repeats=1, after=24)
    for policy, result in zip(policies, results):
        nll = [DocumentStreamer(model, ids, policy).advance(1000).nll for ids in documents.values()]
        assert result["ppl"] == pytest.approx(float(np.exp(np.concatenate(nll).mean())))
        assert result["ppl_after"] == pytest.approx(float(np.exp(np.concatenate([n[24:] for n in nll]).mean())))
    assert results[0]["ppl_after"] != results[0]["ppl"]
