"""The backend-side runner: stage 1 shared, outcomes memoised, both memos bounded (flat memory)."""

from __future__ import annotations

import numpy as np
import pytest

from backends.base import Backend, Sample
from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import Outcome, Stage1State, TokenCounts
from backends.registry import load_backend
from backends.runner import LRUCache, StageRunner


class CountingBackend:
    """A stand-in implementing the whole Backend protocol; counts stage runs."""

    knob_space = KnobSpace(model_class="Fake", tiers={"low": 1, "high": 4}, native_vision_tokens=4,
                           top_ks=(1, 2), full_top_k=2, num_experts=2, depths=(1, 2), num_layers=2)
    question_types = ("q",)
    summary_dim = 2
    question_feature_dim = 3
    expected_new_tokens_by_type = {None: 1}
    device = "cpu"

    def __init__(self):
        self.stage1_calls = self.stage2_calls = 0
        self.batch_calls: list[list] = []

    def identity(self):
        return {"backend": "counting"}

    def cost_params(self):
        return {}

    def recorded_estimator_file(self):
        return None

    def samples(self, split):
        return [Sample(i, split, "q", "a") for i in range(10_000)]

    def sample(self, split, sample_id):
        return Sample(int(sample_id), split, "q", "a")

    def prompt_tokens(self, sample):
        return 3

    def question_features(self, sample):
        return np.zeros(self.question_feature_dim, np.float32)

    def expected_token_counts(self, sample, knobs):
        return TokenCounts(3, 4, self.knob_space.vision_tokens(knobs), 1)

    def run_stage1(self, sample, tier, token_budget=1.0):
        self.stage1_calls += 1
        counts = TokenCounts(3, 4, self.knob_space.vision_tokens(KnobConfig(tier=tier, token_budget=token_budget)))
        return Stage1State(sample.sample_id, tier, counts, np.zeros(2, np.float32), 1.0)

    def run_stage2(self, state, knobs):
        self.stage2_calls += 1
        return Outcome("a", "a", 1.0, state.token_counts, 2.0, knobs)

    def run_stage2_batch(self, state, knobs_list):
        self.batch_calls.append(list(knobs_list))
        return [self.run_stage2(state, k) for k in knobs_list]

    def run(self, sample, knobs):
        return self.run_stage2(self.run_stage1(sample, knobs.tier, knobs.token_budget), knobs)


def test_the_stand_in_satisfies_the_protocol_and_the_registry_accepts_it_without_probing():
    backend = CountingBackend()
    assert isinstance(backend, Backend)
    assert load_backend(backend) is backend
    with pytest.raises(ValueError, match="accepted: a backend name"):
        load_backend(object())
    with pytest.raises(ValueError, match="accepted: an object implementing backends.base.Backend"):
        StageRunner(object(), memoise_outcomes=True)


def test_stage1_is_shared_and_outcomes_are_memoised_only_when_asked():
    knobs = KnobConfig(tier="high", top_k=1, depth=2)
    for memoise, stage2_calls in ((True, 1), (False, 3)):
        backend = CountingBackend()
        runner = StageRunner(backend, memoise_outcomes=memoise)
        sample = backend.sample("test", 0)
        outcomes = [runner.run(sample, knobs) for _ in range(3)]
        runner.run(sample, knobs.replace(top_k=2))
        assert backend.stage1_calls == 1 and backend.stage2_calls == stage2_calls + 1
        assert all(o.knobs == knobs for o in outcomes)
        runner.clear()
        runner.run(sample, knobs)
        assert backend.stage1_calls == 2


def test_memos_are_bounded_so_memory_stays_flat():
    backend = CountingBackend()
    runner = StageRunner(backend, memoise_outcomes=True, stage1_cache_size=4, outcome_cache_size=50)
    sizes = []
    for i in range(2_000):
        runner.run(backend.sample("train", i % 500), KnobConfig(tier="low", top_k=1 + i % 2, depth=1))
        sizes.append(len(runner))
    assert max(sizes) <= 54 and sizes[-1] == 54


def test_lru_forgets_the_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and len(cache) == 2
    assert cache.get_or_compute("d", lambda: 4) == 4 and "a" not in cache
    with pytest.raises(ValueError, match="max_size=0"):
        LRUCache(0)
