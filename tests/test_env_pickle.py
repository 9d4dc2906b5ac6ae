"""Envs pickle (multiprocessing, SubprocVecEnv / AsyncVectorEnv, Ray): the loaded backend is dropped
and loaded again from its spec, the episode carries over, and the copy steps like the original."""

from __future__ import annotations

import functools
import pickle

import gymnasium as gym
import numpy as np
import pytest
from fake_latency import AnalyticEstimator

import envs  # noqa: F401  (registers the ids)
from backends.registry import load_backend


@pytest.fixture(scope="module")
def backend_spec(random_tiny_checkpoint) -> dict:
    return {"name": "tiny", "checkpoint": str(random_tiny_checkpoint), "generation": {"max_new_tokens": 2}}


def make(env_id: str, backend, **kwargs) -> gym.Env:
    return gym.make(env_id, backend=backend, estimator=AnalyticEstimator(), budget="80ms", **kwargs)


def test_multiknob_pickles_mid_episode_and_steps_like_the_original(backend_spec):
    env = make("MultiKnob-v0", backend_spec)
    env.reset(seed=3)
    env.step([1, 0, 0])  # stage 1 done: the copy must carry the stage-1 state
    copy = pickle.loads(pickle.dumps(env))
    assert copy.unwrapped.backend is env.unwrapped.backend  # reloaded through load_backend's cache
    a, b = env.step([1, 2, 3]), copy.step([1, 2, 3])
    assert np.array_equal(a[0], b[0]) and a[1:4] == b[1:4] and a[4]["knobs"] == b[4]["knobs"]
    for seed in (5, 6):
        (o1, i1), (o2, i2) = env.reset(seed=seed), copy.reset(seed=seed)
        assert np.array_equal(o1, o2) and i1 == i2
        for action in ([0, 0, 0], [2, 1, 1]):
            s1, s2 = env.step(action), copy.step(action)
            assert np.array_equal(s1[0], s2[0]) and s1[1:4] == s2[1:4]


def test_token_budget_pickles_and_steps(backend_spec):
    env = make("TokenBudget-v0", backend_spec)
    copy = pickle.loads(pickle.dumps(env.unwrapped))
    for seed in (0, 1):
        (o1, _), (o2, _) = env.reset(seed=seed), copy.reset(seed=seed)
        assert np.array_equal(o1, o2)
        assert env.step(2)[1] == copy.step(2)[1]


def test_the_unpickled_copy_has_its_own_run_memo(backend_spec):
    env = make("MultiKnob-v0", backend_spec).unwrapped
    env.reset(seed=0)
    env.step([0, 0, 0])
    env.step([0, 0, 0])
    assert len(env.runner) > 0
    copy = pickle.loads(pickle.dumps(env))
    assert copy.runner is not env.runner and len(copy.runner) == 0  # memos start empty on the other side
    assert copy.runner.memoise_outcomes == env.runner.memoise_outcomes


def test_a_backend_object_that_does_not_pickle_is_one_clear_error(backend_spec):
    env = make("MultiKnob-v0", load_backend(backend_spec))  # an object, not a spec
    with pytest.raises(pickle.PicklingError, match=r"backend=<name> or a dict with 'name'"):
        pickle.dumps(env)


def _same_env(env: gym.Env) -> gym.Env:
    return env


def test_async_vector_env_with_spawned_workers_steps(backend_spec):
    """Two spawned workers, each unpickling an env made here (cloudpickle carries it), step once."""
    env = make("MultiKnob-v0", backend_spec)
    vec = gym.vector.AsyncVectorEnv([functools.partial(_same_env, env)] * 2, context="spawn")
    try:
        obs, infos = vec.reset(seed=[0, 1])
        obs1, rewards1, *_ = vec.step(np.array([[0, 0, 0], [2, 0, 0]]))
        obs2, rewards2, terminated, truncated, _ = vec.step(np.array([[0, 1, 1], [0, 3, 3]]))
    finally:
        vec.close()
    assert obs.shape == (2, env.observation_space.shape[0]) and list(rewards1) == [0.0, 0.0]
    assert terminated.all() and not truncated.any()
    for i, (seed, actions) in enumerate([(0, ([0, 0, 0], [0, 1, 1])), (1, ([2, 0, 0], [0, 3, 3]))]):
        o, _ = env.reset(seed=seed)
        assert np.array_equal(o, obs[i])
        env.step(actions[0])
        assert env.step(actions[1])[1] == pytest.approx(rewards2[i], abs=1e-12)
