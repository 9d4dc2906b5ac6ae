"""Run an env in this process with two torch threads, then the same env under
``gymnasium.make_vec(..., vectorization_mode="async")`` with the given start methods: reset and one
step must complete. Prints ``ok <id> <context>`` per case; a worker that hangs fails the case
(``reset_wait`` / ``step_wait`` time out) instead of hanging the caller.

    python tests/vector_probe.py <timeout_s> <id>:<context>[,<context>] ...

Used by ``tests/test_entry_points.py``; the stand-in latency models keep it free of profiling.
"""

from __future__ import annotations

import sys

import gymnasium as gym
import torch

import envs
from fake_latency import AnalyticEstimator, DecodingAnalyticEstimator

TPOT = {"base_ms": 2.0, "per_slot_ms": 0.01, "per_prune_ms": 0.5}


def env_kwargs(env_id: str) -> dict:
    """Fast settings of each family (no latency profiling)."""
    entry = gym.spec(env_id).entry_point
    if entry is envs.DecodingEnv:
        return {"estimator": DecodingAnalyticEstimator(), "budget": "30ms"}
    if entry is envs.StreamingKVEnv:
        return {"tpot_model": TPOT, "chunk_tokens": 8, "episode_tokens": 16, "budget": "2.5ms"}
    return {"estimator": AnalyticEstimator(), "budget": "80ms"}


def run_in_parent(env_id: str, kwargs: dict) -> None:
    """What a user did before vectorising: ran the env, with two intra-op threads (OpenMP's pool started)."""
    env = gym.make(env_id, **kwargs)
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()


def run_async(env_id: str, context: str, kwargs: dict, timeout: float) -> None:
    vec = gym.make_vec(env_id, 2, vectorization_mode="async", vector_kwargs={"context": context}, **kwargs)
    try:
        vec.reset_async(seed=0)
        vec.reset_wait(timeout=timeout)
        vec.step_async(vec.action_space.sample())
        vec.step_wait(timeout=timeout)
    finally:
        vec.close(terminate=True)


def main(argv: list[str]) -> None:
    timeout = float(argv[0])
    for case in argv[1:]:
        env_id, contexts = case.split(":")
        kwargs = env_kwargs(env_id)
        run_in_parent(env_id, kwargs)
        for context in contexts.split(","):
            run_async(env_id, context, kwargs, timeout)
            print(f"ok {env_id} {context}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
