"""StreamingKV-v0 and the per-policy env factory: Gymnasium contract, determinism, plug-in policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from backends.kv import KVPolicy, SinkWindow, register_kv_policy
from backends.kv.latency import TpotModel
from envs.registry import list_envs
from envs.streaming_kv import OBSERVATION_NAMES, STREAMING_KV_ID, StreamingKVEnv, kv_env_id, register_kv_envs

VOCAB = 53
TPOT = TpotModel(base_ms=2.0, per_slot_ms=0.01, per_prune_ms=0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def documents():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (120, 90, 20)]


def small_env(model, documents, **kwargs) -> StreamingKVEnv:
    """A fast env: tiny random model, short episodes, fixed latency coefficients."""
    settings = dict(model=model, documents=documents, chunk_tokens=8, episode_tokens=64, tpot_model=TPOT,
                    budget="3ms")
    settings.update(kwargs)
    return StreamingKVEnv(**settings)


@dataclass(frozen=True)
class RecentOnly(KVPolicy):
    """A plug-in policy defined in a test: keep only the newest ``keep`` tokens."""

    keep: int = 16
    knob_choices: ClassVar[dict] = {"keep": (8, 16), "compress_every": (1, 4)}

    @property
    def budget(self) -> int:
        return self.keep

    def select(self, positions, keys):
        return torch.arange(len(positions) - self.keep, len(positions))


def test_registers_streaming_kv_and_one_env_per_policy_idempotently():
    first = register_kv_envs()
    assert register_kv_envs() == first
    assert STREAMING_KV_ID in first and "KV-SinkWindow-v0" in first and "KV-KeyNormWindow-v0" in first
    assert set(first) <= set(list_envs()) and all(env_id in gym.registry for env_id in first)


def test_check_env_passes_for_sink_window(model, documents):
    env = small_env(model, documents)
    check_env(env, skip_render_check=True)
    assert env.action_space.nvec.tolist() == [4, 3, 4]  # compress_every, n_sink, window
    assert env.observation_space.shape == (len(OBSERVATION_NAMES),) and env.observation_space.dtype == np.float32


def test_registering_a_new_policy_creates_a_working_env(model, documents):
    register_kv_envs()
    register_kv_policy(RecentOnly)
    env_id = kv_env_id(RecentOnly)
    assert env_id == "KV-RecentOnly-v0" and env_id in gym.registry
    env = gym.make(env_id, model=model, documents=documents, chunk_tokens=8, episode_tokens=64, tpot_model=TPOT,
                   disable_env_checker=True).unwrapped
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0, 0]))  # compress_every=1, keep=8
    assert info["knobs"] == {"compress_every": 1, "keep": 8}
    assert max(info["cache_length"]) <= 9


def test_episode_streams_the_document_and_reports_chunks(model, documents):
    env = small_env(model, documents)
    obs, info = env.reset(seed=5)
    assert info["budget_ms"] == 3.0 and env.observation_space.contains(obs)
    steps, rewards, pruned = 0, [], 0
    terminated = False
    while not terminated:
        # compress_every=1, n_sink=4, window=32: a prune on every token past 32 tokens.
        obs, reward, terminated, truncated, info = env.step(np.array([0, 1, 0]))
        steps += 1
        rewards.append(reward)
        pruned += len(info["prune_events"])
        assert not truncated and info["nll"].shape == (8,) and info["cache_length"].shape == (8,)
        assert 0.0 <= info["score"] <= 1.0
        expected = TPOT.predict(info["cache_length"], [0 if length <= 32 else 1 for length in info["cache_length"]])
        assert info["tpot_ms"] == pytest.approx(float(np.mean(expected)))
    assert steps == 64 // 8 and pruned == 64 - 32
    assert obs[OBSERVATION_NAMES.index("cache_length")] == 32
    assert obs[OBSERVATION_NAMES.index("progress")] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="after the episode ended"):
        env.step(np.array([0, 1, 0]))


def test_same_seed_same_episode_and_budget_range_is_sampled(model, documents):
    env = small_env(model, documents, budget="[2ms,6ms]")
    actions = [np.array([1, 0, 0]), np.array([3, 2, 1])]

    def rollout(seed):
        obs, info = env.reset(seed=seed)
        out = [obs]
        for action in actions:
            obs, reward, *_ = env.step(action)
            out += [obs, np.array([reward])]
        return np.concatenate(out), info

    first, info_a = rollout(11)
    second, info_b = rollout(11)
    np.testing.assert_array_equal(first, second)
    assert 2.0 <= info_a["budget_ms"] <= 6.0 and info_a == info_b


def test_window_knob_changes_nll_only_after_eviction(model, documents):
    env = small_env(model, documents)
    env.reset(seed=2)
    small_window = [env.step(np.array([0, 0, 0]))[4]["nll"] for _ in range(6)]  # n_sink=0, window=32
    env.reset(seed=2)
    full_window = [env.step(np.array([0, 0, 3]))[4]["nll"] for _ in range(6)]  # window=256: never prunes
    np.testing.assert_allclose(np.concatenate(small_window[:4]), np.concatenate(full_window[:4]), atol=1e-5)
    assert not np.allclose(np.concatenate(small_window[4:]), np.concatenate(full_window[4:]))


def test_measured_latency_mode_reports_wall_clock(model, documents):
    env = small_env(model, documents, latency="measured")
    env.reset(seed=0)
    info = env.step(np.array([0, 0, 0]))[4]
    assert info["latency_mode"] == "measured" and info["tpot_ms"] == float(np.median(info["step_ms"])) > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"latency": "fast"}, "latency='fast'"),
    ({"chunk_tokens": 0}, "chunk_tokens=0"),
    ({"episode_tokens": 500}, "no document has episode_tokens"),
    ({"budget": "-3ms"}, "invalid budget"),
    ({"policy": "NoSuchPolicy"}, "unknown KV policy"),
    ({"tpot_model": 3.0}, "tpot_model=3.0"),
    ({"documents": None}, "documents=None"),
])
def test_bad_configuration_is_a_clear_value_error(model, documents, kwargs, message):
    settings = {"documents": documents, **kwargs}
    with pytest.raises(ValueError, match=message):
        small_env(model, **settings)


def test_bad_action_is_a_clear_value_error(model, documents):
    env = small_env(model, documents)
    with pytest.raises(ValueError, match="before reset"):
        env.step(np.array([0, 0, 0]))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action=\[0, 5, 0\] is invalid"):
        env.step(np.array([0, 5, 0]))


def test_default_env_uses_the_committed_tiny_model():
    register_kv_envs()
    env = gym.make(STREAMING_KV_ID, tpot_model=TPOT, episode_tokens=32, chunk_tokens=16).unwrapped
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(env.action_space.sample())
    assert isinstance(env.policy_for(env.action_space.sample()), SinkWindow)
    # A trained model predicts held-out text far better than a uniform guess.
    assert info["mean_nll"] < 0.8 * np.log(env.vocab_size) and np.isfinite(reward)


def test_estimated_mode_fits_latency_once_per_model(model, documents):
    first = small_env(model, documents, tpot_model=None)
    second = small_env(model, documents, tpot_model=None)
    assert first.tpot_model is second.tpot_model
    first.reset(seed=0)
    info = first.step(np.array([0, 0, 0]))[4]
    assert info["tpot_ms"] == pytest.approx(float(np.mean(first.tpot_model.predict(info["cache_length"], np.zeros(8)))))
