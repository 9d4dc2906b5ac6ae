"""The scaffolding every env family shares (envs/base.py): reset options, actions, metadata, budgets.

One env of each family (MultiKnob-v0, TokenBudget-v0, Decoding-v0, StreamingKV-v0) with stand-in
latency estimators, so nothing is profiled.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from fake_latency import AnalyticEstimator
from gymnasium.vector import AutoresetMode

import envs
from envs.base import KnobgymEnv
from envs.protocols import GroupEnv

FAMILIES = ("MultiKnob-v0", "TokenBudget-v0", "Decoding-v0", "StreamingKV-v0")
KV_TPOT = {"base_ms": 2.0, "per_slot_ms": 0.01, "per_prune_ms": 0.5}


class DecodingStandIn:
    """A decoding latency estimator stand-in: grows with prompt and generated tokens."""

    noise, identity, fingerprint = None, {"name": "stand-in"}, {}

    def predict(self, configs, token_counts):
        return np.array([5.0 + 0.05 * c.prompt_tokens + 0.5 * c.new_tokens for c in token_counts])


@pytest.fixture(scope="module")
def kv_model_and_documents():
    from model_factories import tiny_kv_stream

    return tiny_kv_stream()


@pytest.fixture(scope="module")
def make(tiny_backend, kv_model_and_documents):
    def _make(env_id: str) -> KnobgymEnv:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # stand-in latencies: the budget need not bind
            if env_id == "Decoding-v0":
                return gym.make(env_id, budget="30ms", estimator=DecodingStandIn()).unwrapped
            if env_id == "StreamingKV-v0":
                model, documents = kv_model_and_documents
                return gym.make(env_id, model=model, documents=documents, chunk_tokens=8, episode_tokens=16,
                                tpot_model=KV_TPOT, budget="2.5ms").unwrapped
            return gym.make(env_id, backend=tiny_backend, estimator=AnalyticEstimator(), budget="80ms").unwrapped
    return _make


def _first_action(env):
    return 0 if isinstance(env.action_space, gym.spaces.Discrete) else np.zeros(env.action_space.shape, np.int64)


def _steps(env, action, n):
    out = []
    for _ in range(n):
        _, reward, terminated, _, info = env.step(action)
        out.append((reward, info.get("sample_id"), info.get("budget_ms")))
        if terminated:
            break
    return out


BAD_OPTIONS = [({"budget": "0ms"}, "invalid"), ({"sample_id": True}, "sample_id=True is invalid"),
               ({"sample_id": 10 ** 9}, "sample_id=1000000000 is invalid"), ({"sample_id": 1.0}, "sample_id=1.0"),
               ({"split": "dev"}, "split='dev'"), ({"nope": 1}, r"unknown reset option\(s\) \['nope'\]")]


@pytest.mark.parametrize("env_id", FAMILIES)
def test_a_failed_reset_leaves_the_env_exactly_as_it_was(make, env_id):
    """A reset that raises changes nothing: the episode in progress goes on with its own sample,
    budget and stage-1 state, and the random generator has not moved (issue #29)."""
    failed, clean = make(env_id), make(env_id)
    action = _first_action(failed)
    for env in (failed, clean):
        env.reset(seed=3, options={"sample_id": 1, "budget": 70.0 if env_id != "StreamingKV-v0" else 2.4})
        env.step(action)  # stage 1 (MultiKnob), chunk 1 (KV); ends a one-step episode
    rng_state = failed.np_random.bit_generator.state
    for options, message in BAD_OPTIONS:
        with pytest.raises(ValueError, match=message):
            failed.reset(seed=99, options=options)
    assert failed.np_random.bit_generator.state == rng_state
    if env_id in ("MultiKnob-v0", "StreamingKV-v0"):  # episodes of several steps: the rest of this one
        assert _steps(failed, action, 4) == _steps(clean, action, 4)
    # and a new episode after the failures draws what it would have drawn without them
    assert failed.reset()[1]["sample_id"] == clean.reset()[1]["sample_id"]


@pytest.mark.parametrize("env_id", FAMILIES)
def test_every_family_takes_the_same_reset_options(make, env_id):
    env = make(env_id)
    _, info = env.reset(seed=0, options={"sample_id": np.int64(2), "split": "validation"})
    assert info["sample_id"] == 2
    with pytest.raises(ValueError, match="sample_id=False is invalid; accepted: an integer in"):
        env.reset(options={"sample_id": False})


@pytest.mark.parametrize("env_id", FAMILIES)
def test_every_family_declares_its_budget_range_and_checks_actions_alike(make, env_id):
    env = make(env_id)
    assert isinstance(env, GroupEnv)
    lo, hi = env.achievable_range_ms
    low, high = env.suggested_budget_range_ms
    assert lo <= env.suggested_budget_ms <= hi and lo <= low <= high <= hi
    env.reset(seed=0)
    bad = np.full(env.action_space.shape or (), 10 ** 6)
    with pytest.raises(ValueError, match=r"is outside the action space .*; accepted: "):
        env.step(bad)


@pytest.mark.parametrize("env_id", ("MultiKnob-v0", "TokenBudget-v0"))
def test_the_achievable_range_is_measured_on_the_env_s_own_actions(make, env_id):
    """Its low end is the cheapest action's latency and its top the dearest action's, on the typical
    inputs: not a knob-space configuration the env cannot choose (MultiKnob-v0 has no token-budget
    head, TokenBudget-v0 keeps the top tier)."""
    env = make(env_id)
    rows = np.indices(env.trajectory_nvec).reshape(len(env.trajectory_nvec), -1).T
    knobs = env.trajectory_knobs(rows)
    latencies = np.array([env.latency.predict_ms(knobs, [env.backend.expected_token_counts(s, k) for k in knobs])
                          for s in env._typical_samples()])
    assert env.achievable_range_ms == pytest.approx((latencies.min(), latencies.max()))


@pytest.mark.parametrize("env_id", envs.list_envs())
def test_every_registered_id_declares_gymnasium_metadata(env_id):
    metadata = gym.spec(env_id).entry_point.metadata
    assert metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP and metadata["render_modes"] == []


def test_a_sync_vector_env_reads_the_declared_autoreset_mode(make, tiny_backend):
    vec = gym.make_vec("TokenBudget-v0", 2, vectorization_mode="sync", backend=tiny_backend,
                       estimator=AnalyticEstimator(), budget="80ms")
    assert vec.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    vec.reset(seed=0)
    _, _, terminated, _, _ = vec.step(np.zeros(2, dtype=np.int64))
    assert terminated.all()
    vec.close()


def test_an_action_s_knobs_are_validated_once_on_the_way_to_the_model(make, monkeypatch):
    """The runner, the backend and apply_knobs all ask the knob space; it checks a configuration once."""
    from backends.knobs import KnobSpace

    env = make("TokenBudget-v0")
    checked = []
    original = KnobSpace._check
    monkeypatch.setattr(KnobSpace, "_check", lambda self, knobs: (checked.append(knobs), original(self, knobs))[1])
    env.space._checked.clear()
    env.reset(seed=0, options={"sample_id": 3})
    knobs = env.action_to_knobs(1)
    env.step(1)
    assert checked.count(knobs) == 1
    env.reset(seed=0, options={"sample_id": 4})
    env.step(1)
    assert checked.count(knobs) == 1


def test_the_three_latency_estimators_share_one_predict_interface():
    import inspect

    from latency_model.decoding import DecodingLatencyEstimator
    from latency_model.estimator import LatencyEstimator
    from latency_model.protocol import LatencyPredictor
    from latency_model.tpot import TpotEstimator

    for cls in (LatencyEstimator, DecodingLatencyEstimator, TpotEstimator):
        assert list(inspect.signature(cls.predict).parameters) == ["self", "configs", "token_counts"], cls
    assert isinstance(TpotEstimator(2.0, 0.01, 0.5), LatencyPredictor)
    assert isinstance(AnalyticEstimator(), LatencyPredictor) and isinstance(DecodingStandIn(), LatencyPredictor)
