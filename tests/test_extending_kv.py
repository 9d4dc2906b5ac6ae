"""README "Extending knobgym / A new KV policy": a policy defined in one file gets a working env via gym.make."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

import envs
from backends.kv import KVPolicy, register_kv_policy


# --- the README example, verbatim: one small class that overrides score() ---------------------
@register_kv_policy
@dataclass(frozen=True)
class ValueNormWindow(KVPolicy):
    """Keep the ``n_recent`` newest tokens plus the older tokens with the largest value norms."""

    n_recent: int = 8

    def score(self, positions, keys, values):
        scores = values.float().norm(dim=-1).mean(dim=(0, 1))
        scores[-self.n_recent:] = float("inf")  # the newest tokens always stay
        return scores


def test_a_policy_defined_here_runs_an_episode_through_gym_make():
    ids = envs.register_kv_envs()  # explicit: the registry loop now includes ValueNormWindow
    assert "KV-ValueNormWindow-v0" in ids
    env = gym.make("KV-ValueNormWindow-v0", budget="11ms+100tok", episode_tokens=64, chunk_tokens=16,
                   tpot_model={"base_ms": 10.0, "per_slot_ms": 0.01, "per_prune_ms": 1.0})
    # The grid comes from the env: window and compress_every by default, n_recent fixed at its default.
    assert env.unwrapped.knob_grid == {"window": (32, 64, 128, 256), "compress_every": (1, 8, 32, 64),
                                       "n_recent": (8,)}
    obs, first = env.reset(seed=0, options={"sample_id": 0})
    steps, done = 0, False
    while not done:
        obs, reward, done, truncated, info = env.step(np.array([0, 0, 0]))  # window=32, compress_every=1
        steps += 1
        assert np.isfinite(reward) and env.observation_space.contains(obs) and not truncated
        assert info["knobs"] == {"window": 32, "compress_every": 1, "n_recent": 8}
    assert steps == first["episode_steps"] == 4 and max(info["cache_length"]) == 33


def test_value_norm_window_keeps_recent_and_largest_values():
    values = torch.ones(1, 1, 10, 2)
    values[0, 0, [2, 4]] = 5.0
    assert ValueNormWindow(2, window=4).keep_indices(torch.arange(10), values, values).tolist() == [2, 4, 8, 9]


def test_every_kv_env_id_is_a_cli_option_with_cli_sized_episodes():
    """``train.py env=<KV id>`` needs no conf/env yaml: the CLI's entry for every registered KV id
    (this file's policy included) carries the env class's CLI defaults and makes a working env."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from knobgym_cli.group_configs import register_group_configs

    shipped = ["StreamingKV-v0", "KV-SinkWindow-v0", "KV-KeyNormWindow-v0", "KV-ValueNormWindow-v0"]
    assert set(shipped) <= set(register_group_configs([], "env", []))
    for env_id in shipped:
        conf = OmegaConf.to_container(ConfigStore.instance().load(f"env/{env_id}.yaml").node)
        assert conf["id"] == env_id and set(conf) == {"id", "kwargs"}
        env = gym.make(env_id, budget="11ms", tpot_model={"base_ms": 10.0, "per_slot_ms": 0.01, "per_prune_ms": 1.0},
                       **conf["kwargs"]).unwrapped
        assert env.chunk_tokens == conf["kwargs"]["chunk_tokens"] and env.episode_steps == 16


def test_a_policy_defined_here_trains_and_evaluates_through_the_cli(tmp_path, monkeypatch):
    """``train.py env=test_extending_kv:KV-ValueNormWindow-v0`` imports this module (named on the
    command line), whose policy gets its env id; ``evaluate.py env_id=...`` the same. No other file."""
    import json
    import sys

    import evaluate
    import train

    runs, module_id = tmp_path / "runs", "test_extending_kv:KV-ValueNormWindow-v0"
    monkeypatch.setattr(sys, "argv", [
        "train.py", f"env={module_id}", f"runs_dir={runs}", "env.kwargs.episode_tokens=16",
        "env.kwargs.chunk_tokens=8", "+env.kwargs.knob_grid={window:[4,8],compress_every:[1]}",
        "+env.kwargs.tpot_model={base_ms:2.0,per_slot_ms:0.02,per_prune_ms:0.5}", "budget=2.3ms",
        "agent.total_updates=1", "agent.batch_size=1", "agent.num_generations=2", "eval.every=1",
        "eval.num_samples=1", "eval.validation_samples=1", "eval.baselines=[greedy]"])
    train.cli()
    (run,) = (runs / "KV-ValueNormWindow-v0" / "grpo").iterdir()
    assert {r["agent"] for r in json.loads((run / "report.json").read_text())["rows"]} == {"grpo", "greedy"}
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"run={run}", f"env_id={module_id}", "budgets=[2.3ms]",
                                      "baselines=[greedy]", "num_samples=1", f"out={out}"])
    evaluate.cli()
    assert {r["agent"] for r in json.loads((out / "report.json").read_text())["rows"]} == {"grpo", "greedy"}


def test_a_policy_module_named_in_gym_make_gets_its_env_id():
    """Gymnasium's ``module:Env-v0`` form: importing the policy's module registers its env id (envs
    listen to the policy registry), with no register_kv_envs() call."""
    from backends.kv.policies import registered_kv_policies

    @register_kv_policy
    @dataclass(frozen=True)
    class NewestOnly(KVPolicy):
        def score(self, positions, keys, values):
            return positions.float()

    assert "NewestOnly" in registered_kv_policies() and "KV-NewestOnly-v0" in envs.list_envs()
    env = gym.make("test_extending_kv:KV-ValueNormWindow-v0", budget="11ms", episode_tokens=16, chunk_tokens=8,
                   tpot_model={"base_ms": 10.0, "per_slot_ms": 0.01, "per_prune_ms": 1.0})
    assert env.unwrapped.policy_class.__name__ == "ValueNormWindow"
