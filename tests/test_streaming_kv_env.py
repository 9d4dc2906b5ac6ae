"""StreamingKV-v0 and the per-policy env factory: Gymnasium contract, determinism, plug-in policies."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from backends.kv import KVPolicy, SinkWindow, register_kv_policy
from envs.registry import list_envs
from envs.kv_registration import STREAMING_KV_ID, kv_env_id, register_kv_env, register_kv_envs
from envs.streaming_kv import OBSERVATION_NAMES, StreamingKVEnv
from latency_model.tpot import TpotEstimator, TpotSettings, get_tpot_estimator

VOCAB = 53
TPOT = TpotEstimator(base_ms=2.0, per_slot_ms=0.01, per_prune_ms=0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def documents():
    generator = torch.Generator().manual_seed(3)
    # 64-token episodes: windows of 65 tokens, 6 + 4 of them (train 6, validation 2, test 2).
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (400, 300, 20)]


def small_env(model, documents, **kwargs) -> StreamingKVEnv:
    """A fast env: tiny random model, short episodes, fixed latency coefficients."""
    settings = dict(model=model, documents=documents, chunk_tokens=8, episode_tokens=64, tpot_model=TPOT,
                    budget="2.5ms")
    settings.update(kwargs)
    return StreamingKVEnv(**settings)


@dataclass(frozen=True)
class RecentOnly(KVPolicy):
    """A plug-in policy defined in a test: keep only the newest ``window`` tokens."""

    def score(self, positions, keys, values):
        return positions.float()


def test_registers_streaming_kv_and_one_env_per_policy_idempotently():
    first = register_kv_envs()
    assert register_kv_envs() == first
    assert STREAMING_KV_ID in first and "KV-SinkWindow-v0" in first and "KV-KeyNormWindow-v0" in first
    assert set(first) <= set(list_envs()) and all(env_id in gym.registry for env_id in first)


def test_check_env_passes_for_sink_window(model, documents):
    env = small_env(model, documents)
    check_env(env, skip_render_check=True)
    assert env.action_space.nvec.tolist() == [3, 4, 4]  # n_sink, window, compress_every (the env's grid)
    assert env.observation_space.shape == (len(OBSERVATION_NAMES),) and env.observation_space.dtype == np.float32


def test_registering_a_new_policy_creates_a_working_env(model, documents):
    register_kv_policy(RecentOnly)
    env_id = register_kv_env(RecentOnly, knob_grid={"window": (8, 16), "compress_every": (1, 4)})
    assert env_id == "KV-RecentOnly-v0" and env_id in gym.registry and env_id in register_kv_envs()
    env = gym.make(env_id, model=model, documents=documents, chunk_tokens=8, episode_tokens=64, tpot_model=TPOT,
                   budget="2.5ms", disable_env_checker=True).unwrapped
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0, 0]))  # window=8, compress_every=1
    assert info["knobs"] == {"window": 8, "compress_every": 1}
    assert max(info["cache_length"]) <= 9


def test_episode_streams_the_document_and_reports_chunks(model, documents):
    env = small_env(model, documents)
    obs, info = env.reset(seed=5)
    assert info["budget_ms"] == 2.5 and env.observation_space.contains(obs)
    steps, rewards, pruned = 0, [], 0
    terminated = False
    while not terminated:
        # n_sink=4, window=32, compress_every=1: a prune on every token past 32 tokens.
        obs, reward, terminated, truncated, info = env.step(np.array([1, 0, 0]))
        steps += 1
        rewards.append(reward)
        pruned += len(info["prune_events"])
        assert not truncated and info["nll"].shape == (8,) and info["cache_length"].shape == (8,)
        assert 0.0 <= info["score"] <= 1.0
        expected = TPOT.predict([0 if length <= 32 else 1 for length in info["cache_length"]], info["cache_length"])
        assert info["tpot_ms"] == pytest.approx(float(np.mean(expected)))
    assert steps == 64 // 8 and pruned == 64 - 32
    assert obs[OBSERVATION_NAMES.index("cache_length")] == 32
    assert obs[OBSERVATION_NAMES.index("progress")] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="after the episode ended"):
        env.step(np.array([1, 0, 0]))


def test_same_seed_same_episode_and_budget_range_is_sampled(model, documents):
    env = small_env(model, documents, budget="[2ms,6ms]")
    actions = [np.array([0, 0, 1]), np.array([2, 1, 3])]

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
    full_window = [env.step(np.array([0, 3, 0]))[4]["nll"] for _ in range(6)]  # window=256: never prunes
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
    ({"episode_tokens": 500}, "no train episode of episode_tokens"),
    ({"split": "dev"}, "split='dev'"),
    ({"threads": 0}, "threads=0"),
    ({"policy": "FullCache"}, "policy='FullCache' is invalid"),
    ({"knob_grid": {"windo": (8,)}}, r"unknown knob\(s\) \['windo'\]"),
    ({"knob_grid": {"n_sink": (0, 40)}}, "invalid combination"),
    ({"budget": "3ms+2"}, "cannot parse the KV cap '2'"),
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
    with pytest.raises(ValueError, match=r"action array\(\[0, 5, 0\]\) is outside the action space"):
        env.step(np.array([0, 5, 0]))


def test_default_env_uses_the_committed_tiny_model():
    register_kv_envs()
    env = gym.make(STREAMING_KV_ID, tpot_model=TPOT, episode_tokens=32, chunk_tokens=16).unwrapped
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(env.action_space.sample())
    assert isinstance(env.policy_for(env.action_space.sample()), SinkWindow)
    # A trained model predicts held-out text far better than a uniform guess.
    assert info["mean_nll"] < 0.8 * np.log(env.vocab_size) and np.isfinite(reward)


@pytest.mark.parametrize("action", [[0.9, 0.9, 0.9], [0.5, 1, 1], [np.nan, 0, 0], [0, 0], [[0, 0, 0]], ["a", 0, 0]])
def test_non_integer_or_misshaped_actions_are_rejected(model, documents, action):
    env = small_env(model, documents)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"is outside the action space MultiDiscrete\(\[3 4 4\]\)"):
        env.step(action)
    assert env.step([1.0, 0.0, 2.0])[4]["knobs"] == {"n_sink": 4, "window": 32, "compress_every": 32}


def test_fixed_document_stream_with_splits_and_sample_ids(model, documents):
    env = small_env(model, documents)
    assert env.split_sizes() == {"train": 6, "validation": 2, "test": 2} and env.num_samples() == 6
    assert env.episode_steps == 8
    _, first = env.reset(seed=0, options={"split": "test", "sample_id": 1})
    _, second = env.reset(seed=99, options={"split": "test", "sample_id": 1})
    assert first == second and (first["document"], first["start"]) == (1, 195)
    rewards = [env.step(np.array([0, 0, 0]))[1] for _ in range(3)]
    env.reset(seed=5, options={"split": "test", "sample_id": 1, "budget": "2.2ms"})
    assert env.step(np.array([0, 0, 0]))[4]["budget_ms"] == 2.2
    env.reset(seed=1, options={"split": "test", "sample_id": 1})
    assert [env.step(np.array([0, 0, 0]))[1] for _ in range(3)] == rewards
    for options, message in [({"sample_id": 2, "split": "test"}, r"sample_id=2 is invalid; accepted: .*\[0, 2\)"),
                             ({"sample": 1}, r"unknown reset option\(s\) \['sample'\]"),
                             ({"split": "dev"}, "split='dev'"), ({"budget": "0ms"}, "invalid")]:
        with pytest.raises(ValueError, match=message):
            env.reset(options=options)


def test_kv_cap_is_a_violation_through_the_shared_reward(model, documents):
    from envs.reward import compute_reward

    capped = small_env(model, documents, budget="100ms+40tok")
    free = small_env(model, documents, budget="100ms")
    for env in (capped, free):
        env.reset(seed=0, options={"sample_id": 0})
    # window=64, compress_every=8: the cache peaks at 64 + 8 = 72 tokens, beyond the 40-token cap.
    for _ in range(8):
        obs, r_capped, *_, info = capped.step(np.array([0, 1, 1]))
        _, r_free, *_, free_info = free.step(np.array([0, 1, 1]))
        peak = info["peak_kv_tokens"]
        assert obs[OBSERVATION_NAMES.index("kv_cap_tokens")] == 40
        assert info["kv_violated"] == (peak > 40) and info["violated"] == info["kv_violated"]
        assert r_capped == pytest.approx(r_free + compute_reward(0.0, peak / 40, 1.0)[0])
    assert info["kv_violated"] and info["peak_kv_bytes"] == peak * capped.bytes_per_token
    by_bytes = small_env(model, documents, budget=f"100ms+{72 * capped.bytes_per_token}B")
    by_bytes.reset(seed=0, options={"sample_id": 0})
    assert not any(by_bytes.step(np.array([0, 1, 1]))[4]["kv_violated"] for _ in range(8))


def test_unreachable_budget_warns_once_with_a_budget_that_binds(model, documents):
    env = small_env(model, documents)
    lo, hi = env.achievable_range_ms
    assert lo < env.suggested_budget_ms < hi
    with pytest.warns(UserWarning, match=r"below the cheapest configuration's TPOT: achievable TPOT .*budget="):
        small_env(model, documents, budget=f"{lo / 2}ms")
    with pytest.warns(UserWarning, match="KV cap 10 tokens is below the smallest peak cache"):
        small_env(model, documents, budget=f"{hi}ms+10tok")
    default = small_env(model, documents, budget=None)
    assert default.kv_budget.tpot.low_ms == default.budget.low_ms == pytest.approx(env.suggested_budget_ms, rel=1e-5)


def test_device_relative_budgets_resolve_once_against_the_achievable_tpot_range(model, documents):
    """'auto', '50%' and '[25%,75%]' (with or without a KV cap, as a string or a mapping) mean on a KV
    env what they mean on the knob envs (envs.budget.device_budget), against its TPOT range."""
    reference = small_env(model, documents)
    lo, hi = reference.achievable_range_ms
    at = lambda fraction: lo + fraction * (hi - lo)  # noqa: E731
    half = small_env(model, documents, budget="50%")
    assert half.budget.fixed_ms == pytest.approx(at(0.5)) and not half.kv_budget.has_cap
    capped = small_env(model, documents, budget="[25%,75%]+40tok")
    assert (capped.budget.low_ms, capped.budget.high_ms) == (pytest.approx(at(0.25)), pytest.approx(at(0.75)))
    assert capped.kv_budget.kv_tokens == 40
    assert small_env(model, documents, budget={"tpot": "[25%,75%]", "kv": "40tok"}).kv_budget == capped.kv_budget
    assert small_env(model, documents, budget="auto").kv_budget == small_env(model, documents, budget=None).kv_budget
    assert small_env(model, documents, budget="auto+40tok").kv_budget.kv_tokens == 40
    # at reset too: a fraction of the same range; a form without a cap keeps the env's
    _, info = capped.reset(seed=0, options={"budget": "100%"})
    assert info["budget_ms"] == pytest.approx(hi) and info["kv_cap_tokens"] == 40
    assert capped.kv_budget.tpot.low_ms == pytest.approx(at(0.25))  # the env's own budget is unchanged
    made = gym.make(STREAMING_KV_ID, model=model, documents=documents, chunk_tokens=8, episode_tokens=64,
                    tpot_model=TPOT, budget="50%").unwrapped
    assert made.kv_budget == half.kv_budget


def test_an_episode_budget_is_warned_about_only_for_its_cap(model, documents):
    """Agents draw episode budgets around the env's range (budget_jitter): a TPOT budget at reset is
    not warned about, as on the knob envs; a cap given at reset that no configuration meets is."""
    env = small_env(model, documents)
    lo, _ = env.achievable_range_ms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.reset(seed=0, options={"budget": lo / 2})
    with pytest.warns(UserWarning, match="KV cap 9 tokens is below the smallest peak cache"):
        env.reset(seed=0, options={"budget": f"{lo}ms+9tok"})


@pytest.mark.parametrize("budget, message", [("150%", "between 0% and 100%"), ("[80%,20%]+40tok", "low must be <= high"),
                                             ("50%+40", "cannot parse the KV cap '40'")])
def test_a_bad_device_relative_kv_budget_is_refused_before_the_model_loads(budget, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StreamingKVEnv(budget=budget, model_path="/nonexistent/checkpoint")  # the path is never read


def test_extreme_budgets_are_a_clear_error_and_rewards_stay_bounded(model, documents):
    import envs.budget

    if not hasattr(envs.budget, "MIN_BUDGET_MS"):
        pytest.skip("needs the Budget bounds of issue #13 (envs.budget.MIN_BUDGET_MS), merged separately")
    for budget in ("1e-6ms", "1e-310ms"):
        with pytest.raises(ValueError, match=rf"invalid KV budget '{budget}': its TPOT part is not a budget"):
            small_env(model, documents, budget=budget)
    with pytest.warns(UserWarning, match="below the cheapest"):
        env = small_env(model, documents, budget=f"{envs.budget.MIN_BUDGET_MS}ms+8tok")
    env.reset(seed=0)
    rewards = [env.step(np.array([0, 3, 3]))[1] for _ in range(8)]
    low, high = env.reward_config.reward_range()
    assert all(np.isfinite(r) and 2 * low <= r <= high for r in rewards)  # TPOT and KV penalties


def test_chunk_group_scores_actions_from_one_prefix_without_advancing(model, documents):
    env = small_env(model, documents)
    env.reset(seed=0, options={"sample_id": 2})
    env.step(np.array([0, 0, 0]))
    before = env._streamer.cursor
    actions = [np.array([0, 0, 0]), np.array([2, 3, 3]), np.array([1, 1, 0])]
    rewards, infos = env.evaluate_chunk_group(actions)
    assert env._streamer.cursor == before and len(infos) == 3
    for action, reward in zip(actions, rewards):
        env.reset(seed=0, options={"sample_id": 2})
        env.step(np.array([0, 0, 0]))
        assert env.step(action)[1] == reward


def test_estimated_mode_uses_the_cached_estimator_of_this_device(model, documents, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOBGYM_CACHE", str(tmp_path))
    cached = get_tpot_estimator(model, settings=TpotSettings(lengths=(8, 24), steps=2, repeats=2,
                                                              max_noise_pct=1e9))
    first = small_env(model, documents, tpot_model=None)
    second = small_env(model, documents, tpot_model=None)
    assert first.tpot_model == second.tpot_model == cached
    first.reset(seed=0)
    info = first.step(np.array([0, 0, 0]))[4]
    assert info["tpot_ms"] == pytest.approx(float(np.mean(cached.predict(np.zeros(8), info["cache_length"]))))


def test_env_pickles_mid_episode_and_continues_identically(model, documents):
    import pickle

    env = small_env(model, documents)
    env.reset(seed=0, options={"sample_id": 1})
    env.step(np.array([1, 0, 0]))
    copy = pickle.loads(pickle.dumps(env))
    for action in ([0, 1, 2], [2, 0, 1]):
        mine, theirs = env.step(np.array(action)), copy.step(np.array(action))
        np.testing.assert_array_equal(mine[0], theirs[0])
        assert mine[1] == theirs[1]


def test_episode_group_equals_separate_episodes_and_shares_prefixes(model, documents, monkeypatch):
    env = small_env(model, documents)
    first = [[0, 0, 0]] * 8
    sequences = [first, first[:4] + [[2, 3, 3]] * 4, [[1, 1, 1]] * 8]
    forwards = []
    real = StreamingKVEnv._play_chunk
    monkeypatch.setattr(StreamingKVEnv, "_play_chunk", lambda self, *a: forwards.append(1) or real(self, *a))
    returns, infos = env.evaluate_episode_group(1, "2.4ms+40tok", sequences, split="validation")
    assert len(forwards) == 8 + 4 + 8  # the second sequence shares its first 4 chunks with the first
    monkeypatch.setattr(StreamingKVEnv, "_play_chunk", real)
    for sequence, total, chunk_infos in zip(sequences, returns, infos):
        env.reset(seed=3, options={"sample_id": 1, "split": "validation", "budget": "2.4ms+40tok"})
        rewards = [env.step(np.array(action))[1] for action in sequence]
        assert total == pytest.approx(sum(rewards), abs=1e-12) and len(chunk_infos) == 8
    with pytest.raises(ValueError, match="accepted: one fixed TPOT budget"):
        env.evaluate_episode_group(0, "[2ms,3ms]", sequences)
    with pytest.raises(ValueError, match="has 1 actions; accepted: episode_steps=8"):
        env.evaluate_episode_group(0, "2ms", [[[0, 0, 0]]])
    with pytest.raises(ValueError, match="outside the action space"):
        env.evaluate_episode_group(0, "2ms", [[[0.5, 0, 0]] * 8])


@dataclass(frozen=True)
class EveryFourth(KVPolicy):
    """Prunes on every fourth cached token, even below the window (keeping then all of them)."""

    def score(self, positions, keys, values):
        return positions.float()

    def should_prune(self, cache_length: int) -> bool:
        return cache_length % 4 == 0


def test_a_policy_overriding_should_prune_gets_an_estimate_that_matches_its_stream(model, documents):
    """The estimate steps the policy's own schedule (KVPolicy.schedule_step): the latency an
    episode is charged (estimated from what the cache really did) equals the estimate before it
    ran, for a schedule unlike the base one (prunes below the window keep every token)."""
    env = small_env(model, documents, policy=EveryFourth, knob_grid={"window": (8, 32), "compress_every": (1,)})
    for actions in ([0] * env.episode_steps, [1] * env.episode_steps, [0, 1] * (env.episode_steps // 2)):
        trajectory = np.array([[a, 0] for a in actions]).reshape(-1)
        estimate = env.estimated_latency_ms(0, [trajectory], "train")[0]
        env.reset(options={"sample_id": 0})
        for c in range(env.episode_steps):
            _, _, done, _, info = env.step(env.to_env_action(trajectory, c))
        assert done and info["latency_ms"] == pytest.approx(estimate, rel=1e-12)
