"""MultiKnob-v0 and TokenBudget-v0 on the shipped tiny backend (estimated latency unless stated)."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs.base import _WARNED

MODEL_ENVS = ("MultiKnob-v0", "TokenBudget-v0")


@pytest.fixture(scope="module")
def budgets(tiny_backend, tiny_estimator):
    """Budgets relative to this machine's achievable range: tests never assume absolute latencies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lo, hi = gym.make("MultiKnob-v0", backend=tiny_backend, estimator=tiny_estimator).unwrapped.achievable_range_ms
    return {"low": f"{lo * 1.02:.3f}ms", "mid": f"{(lo + hi) / 2:.3f}ms", "high": f"{hi * 0.98:.3f}ms",
            "range": f"[{lo:.3f}ms,{hi:.3f}ms]", "never_binds": f"{hi * 10:.3f}ms"}


@pytest.fixture
def make(tiny_backend, tiny_estimator, budgets):
    def _make(env_id="MultiKnob-v0", **kwargs):
        kwargs.setdefault("budget", budgets["mid"])
        return gym.make(env_id, backend=tiny_backend, estimator=tiny_estimator, **kwargs).unwrapped
    return _make


def _episode(env, action, sample_id, budget):
    env.reset(options={"sample_id": sample_id, "budget": budget})
    reward, info, done = 0.0, {}, False
    while not done:
        _, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return reward, info


def test_import_registers_ids_and_one_call_registers_a_new_env():
    ids = envs.list_envs()
    for env_id in ("MultiKnob-v0", "TokenBudget-v0", "MultiKnob-measured-v0", "TokenBudget-measured-v0"):
        assert env_id in ids and env_id in gym.registry
    assert gym.registry["MultiKnob-measured-v0"].nondeterministic
    assert not gym.registry["MultiKnob-v0"].nondeterministic
    envs.register_env("TinyTokenBudgetHalf-v0", envs.TokenBudgetEnv, fractions=(0.5, 1.0))
    assert "TinyTokenBudgetHalf-v0" in envs.list_envs()
    with pytest.raises(ValueError, match="already registered"):
        envs.register_env("TinyTokenBudgetHalf-v0", envs.MultiKnobEnv)


@pytest.mark.parametrize("env_id", MODEL_ENVS)
def test_check_env_passes_in_estimated_mode(make, env_id):
    env = make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check_env's own warnings count as failures
        check_env(env, skip_render_check=True)


@pytest.mark.parametrize("env_id", MODEL_ENVS)
def test_estimated_mode_is_deterministic_given_the_seed(make, budgets, env_id):
    def rollout(env):
        obs, _ = env.reset(seed=123)
        env.action_space.seed(7)
        trace = [obs]
        done = False
        while not done:
            obs, r, term, trunc, info = env.step(env.action_space.sample())
            trace += [obs, np.array([r, info.get("latency_ms", -1.0)])]
            done = term or trunc
        return trace

    a, b = rollout(make(env_id, budget=budgets["range"])), rollout(make(env_id, budget=budgets["range"]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_info_carries_the_outcome(make, budgets):
    env = make()
    _, info = _episode(env, [2, 4, 4], 0, budgets["mid"])
    for key in ("score", "answer", "reference", "latency_ms", "budget_ms", "violated", "knobs", "new_tokens",
                "empty_output", "nonfinite_logits"):
        assert key in info
    assert info["knobs"] == {"tier": "high", "token_budget": 1.0, "top_k": 8, "depth": 16}
    assert info["budget_ms"] == float(budgets["mid"][:-2]) and info["violated"] == (info["latency_ms"] > info["budget_ms"])
    assert info["new_tokens"] >= 1 and info["answer"] and not info["empty_output"]


def test_measured_mode_reports_wall_clock(tiny_backend, tiny_estimator, budgets):
    env = gym.make("MultiKnob-measured-v0", backend=tiny_backend, estimator=tiny_estimator,
                   budget=budgets["mid"]).unwrapped
    _, info = _episode(env, [0, 0, 0], 1, budgets["mid"])
    assert info["measured_ms"] > 0 and info["latency_ms"] == info["measured_ms"]


def test_two_stage_observation_depends_on_the_input_and_the_budget(make, budgets):
    env = make()
    obs1 = {}
    for sid in (0, 1, 2):
        env.reset(options={"sample_id": sid, "budget": budgets["mid"]})
        obs1[sid], *_ = env.step([2, 0, 0])
        assert obs1[sid][0] == 1.0  # stage indicator
    assert not np.allclose(obs1[0], obs1[1]) and not np.allclose(obs1[1], obs1[2])
    summary = slice(1 + 2 + len(env.question_types) + 2, 1 + 2 + len(env.question_types) + 2 + 16)
    assert not np.allclose(obs1[0][summary], obs1[1][summary])  # what block 1 produced differs
    low, _ = env.reset(options={"sample_id": 0, "budget": budgets["low"]})
    high, _ = env.reset(options={"sample_id": 0, "budget": budgets["high"]})
    assert low[1] < high[1] and np.array_equal(np.delete(low, 1), np.delete(high, 1))
    s2_low, *_ = (env.reset(options={"sample_id": 0, "budget": budgets["low"]}), env.step([2, 0, 0]))[1]
    s2_high, *_ = (env.reset(options={"sample_id": 0, "budget": budgets["high"]}), env.step([2, 0, 0]))[1]
    assert not np.allclose(s2_low[-3:], s2_high[-3:])  # spent / remaining relative to the budget


def test_group_evaluation_equals_separate_episodes_and_shares_the_vision_tower(make, tiny_backend, budgets):
    env = make()
    actions = [[0, 0, 0], [0, 4, 4], [2, 1, 3], [2, 1, 3], [1, 2, 2], [2, 4, 0]]
    tower_calls = []
    handle = tiny_backend.model.model.vision_tower.register_forward_hook(lambda *a: tower_calls.append(1))
    try:
        env.clear_run_cache()
        rewards, infos = env.evaluate_group(5, float(budgets["mid"][:-2]), actions)
        assert len(tower_calls) == 3  # three distinct tiers, one vision-tower call each
        separate = []
        for a in actions:
            fresh = make()
            separate.append(_episode(fresh, a, 5, budgets["mid"]))
    finally:
        handle.remove()
    assert np.array_equal(rewards, [r for r, _ in separate])
    for group_info, (_, info) in zip(infos, separate):
        for key in ("answer", "score", "latency_ms", "knobs", "violated"):
            assert group_info[key] == info[key]


def test_token_budget_env_keeps_the_chosen_fraction(make, budgets):
    env = make("TokenBudget-v0")
    full = env.space.native_vision_tokens
    for action, fraction in enumerate(env.fractions):
        _, info = _episode(env, action, 3, budgets["mid"])
        assert info["vision_tokens"] == int(np.ceil(fraction * full))
        assert info["new_tokens"] >= 1


@pytest.mark.parametrize("bad", [[3, 0, 0], [0, 5, 0], [0, 0, -1], [0, 0], "high", [0.5, 0, 0]])
def test_bad_actions_are_clear_errors(make, bad):
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(bad)


@pytest.mark.parametrize("bad", ["0ms", "-3ms", "soon", float("nan")])
def test_bad_budgets_are_clear_errors(make, bad):
    with pytest.raises(ValueError, match="invalid budget"):
        make(budget=bad)
    env = make()
    with pytest.raises(ValueError, match="invalid budget"):
        env.reset(options={"budget": bad})


def test_unreachable_budget_warns_once_with_the_achievable_range(make, budgets):
    _WARNED.clear()
    with pytest.warns(UserWarning, match="achievable latency range") as record:
        env = make(budget=budgets["never_binds"])
    assert "never binds" in str(record[0].message)
    lo, hi = env.achievable_range_ms
    assert f"{lo:.2f}ms..{hi:.2f}ms" in str(record[0].message)
    assert f"budget={env.suggested_budget_ms:.0f}ms" in str(record[0].message)
    low, high = env.suggested_budget_range_ms
    assert f"budget=[{low:.0f}ms,{high:.0f}ms]" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(budget=budgets["never_binds"])  # once per backend and budget


def test_suggested_budget_binds_the_full_configuration_and_fits_the_cheapest(make):
    """The warning's budget is a real trade-off: the full configuration misses it on a typical
    input while the cheapest one fits most inputs."""
    env = make()
    budget = env.suggested_budget_ms
    lo, hi = env.achievable_range_ms
    assert lo < budget < hi
    ref = env._reference_latencies()  # per typical input
    cheapest, full = ref.cheapest, ref.full
    assert np.median(full) > budget
    assert np.mean(cheapest <= budget) >= 0.5
    if np.percentile(cheapest, 95) < np.median(full):  # the usual case: a gap between the two
        assert np.mean(cheapest <= budget) >= 0.9
    low, high = env.suggested_budget_range_ms  # the range for a budget-conditioned controller
    assert lo <= low <= budget <= high <= hi and low < high


def test_nonfinite_logits_score_zero_and_are_flagged(make, tiny_backend, budgets):
    env = make()
    handle = tiny_backend.model.lm_head.register_forward_hook(lambda m, a, out: torch.full_like(out, float("nan")))
    try:
        env.clear_run_cache()
        _, info = _episode(env, [2, 4, 4], 7, budgets["mid"])
    finally:
        handle.remove()
        env.clear_run_cache()
    assert info["nonfinite_logits"] and info["score"] == 0.0 and info["empty_output"]


def test_stable_baselines3_ppo_trains_and_evaluates(make, budgets):
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make(budget=budgets["range"])
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=0, verbose=0, device="cpu")
    model.learn(total_timesteps=256)
    mean_reward, _ = evaluate_policy(model, env, n_eval_episodes=5, deterministic=True)
    assert np.isfinite(mean_reward)
