"""The KV envs as GroupEnvs: agents train and evaluate on them, through the API and through train.py.

The env checks use the committed tiny reference LM with fixed TPOT coefficients (no profiling);
the CLI run uses short episodes and a two-setting grid so the whole run (GRPO, the baselines,
report) takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers the ids)
from agents import FitContext
from agents.base import EnvLayout, EpisodeContext, evaluate_agent, run_episode
from agents.baselines import MAX_SEARCH_TRAJECTORIES, search_space
from agents.grpo import GRPOAgent
from envs.protocols import GroupEnv

REPO = Path(__file__).resolve().parent.parent
TPOT = {"base_ms": 2.0, "per_slot_ms": 0.01, "per_prune_ms": 0.5}
GRID = {"n_sink": (0,), "window": (4, 8), "compress_every": (1, 4)}


@pytest.fixture(scope="module")
def env():
    """4 chunks of 8 tokens, 4 settings per chunk (256 trajectories)."""
    return gym.make("StreamingKV-v0", budget="2.3ms", episode_tokens=32, chunk_tokens=8, knob_grid=GRID,
                    tpot_model=TPOT)


def test_kv_env_declares_one_stage_per_chunk(env):
    genv = env.unwrapped
    assert isinstance(genv, GroupEnv)
    assert genv.trajectory_nvec == (1, 2, 2) * 4
    assert genv.stage_heads == ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))
    trajectory = np.array([0, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(genv.to_env_action(trajectory, 2), [0, 1, 1])
    assert genv.num_samples("test") == len(genv.windows["test"]) and genv.budget.fixed_ms == 2.3
    assert genv.provenance()["knob_space"]["grid"] == {k: list(v) for k, v in GRID.items()}


def test_stage_observation_and_group_equal_stepping_the_episode(env):
    genv = env.unwrapped
    trajectory = np.array([0, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0])
    obs, _ = env.reset(options={"sample_id": 1, "split": "test", "budget": 2.35})
    total = 0.0
    for stage in range(4):
        np.testing.assert_allclose(genv.stage_observation(1, 2.35, "test", stage, trajectory), obs, rtol=1e-6)
        obs, reward, done, _, info = env.step(trajectory)  # a whole trajectory: the env reads this chunk's slice
        total += reward
    assert done
    rewards, infos = genv.evaluate_group(1, 2.35, [trajectory, np.zeros(12, dtype=np.int64)], "test")
    assert rewards[0] == pytest.approx(total, abs=1e-12) and infos[0]["reward"] == rewards[0]
    for key in ("score", "latency_ms", "violated", "violated_chunks", "knobs"):
        assert infos[0][key] == info[key], key
    assert info["latency_ms"] == pytest.approx(genv.estimated_latency_ms(1, [trajectory], "test")[0])


def test_baselines_search_constant_sequences_of_a_many_stage_env():
    layout = SimpleNamespace(nvec=[3, 4, 4] * 16, stage_heads=[[3 * c, 3 * c + 1, 3 * c + 2] for c in range(16)])
    space = search_space(layout)
    assert space.shape == (48, 48) and 48 ** 16 > MAX_SEARCH_TRAJECTORIES
    np.testing.assert_array_equal(space[:, :3], space[:, 45:])  # one setting held every chunk
    assert len({tuple(row[:3]) for row in space}) == 48


def test_grpo_latency_features_stay_cheap_for_16_stages():
    env = gym.make("StreamingKV-v0", budget="2.3ms", episode_tokens=128, chunk_tokens=8, tpot_model=TPOT)
    agent = GRPOAgent.from_env(env, total_updates=0)
    layout, calls = EnvLayout(env), []
    real = layout.estimated_latency_ms
    layout.estimated_latency_ms = lambda *a: calls.append(len(a[1])) or real(*a)
    trajectory = np.zeros(len(agent.nvec), dtype=np.int64)
    features = agent.latency_features(layout, 0, 2.3, "train", 5, trajectory)
    assert calls == [48 * 2]  # every option with the all-cheapest and all-dearest completion
    assert features.shape == (48, 2) and np.all(features[:, 0] <= features[:, 1])


def test_grpo_and_baselines_train_and_evaluate_on_a_kv_env(env):
    agent = GRPOAgent.from_env(env, total_updates=1, batch_size=1, num_generations=3)
    assert agent.fit(env, FitContext(split="train")) == {"updates": 1}
    result = evaluate_agent(env, agent.freeze(), [0], 2.3, "test")
    assert result["episodes"] == 1 and np.isfinite(result["reward"]) and "latency_p50_ms" in result
    info = run_episode(env, agent, 0, 2.3, "test")
    assert info["reward"] == pytest.approx(result["reward"])  # deterministic, the episode's return


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


def quick_kv() -> list[str]:
    """A KV run of seconds: 2 chunks of 8 tokens, two settings per chunk, fixed TPOT coefficients."""
    return ["env.kwargs.episode_tokens=16", "env.kwargs.chunk_tokens=8",
            "+env.kwargs.knob_grid={n_sink:[0],window:[4,8],compress_every:[1]}",
            f"+env.kwargs.tpot_model={{base_ms:{TPOT['base_ms']},per_slot_ms:{TPOT['per_slot_ms']},"
            f"per_prune_ms:{TPOT['per_prune_ms']}}}",
            "budget=2.3ms", "agent.total_updates=2", "agent.batch_size=1", "agent.num_generations=2",
            "eval.every=1", "eval.num_samples=1", "eval.validation_samples=1",
            "baselines.static.calibration_samples=1", "baselines.bandit.rounds=2"]


@pytest.mark.slow  # two CLI processes: ~1 min on a quiet 2-core VM, ~2 min under load (mostly imports)
def test_train_cli_runs_grpo_on_streaming_kv(tmp_path):
    result = run_cli(["env=StreamingKV-v0", *quick_kv()], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "StreamingKV-v0" / "grpo").iterdir()
    report = json.loads((run / "report.json").read_text())
    agents = {row["agent"] for row in report["rows"]}
    assert agents == {"grpo", "oracle", "static", "greedy", "bandit", "random"}
    assert report["budget"] == "2.3ms" and "2.3ms" in report["oracle_gap"]
    assert all(0.0 <= row["violation_rate"] <= 1.0 and row["latency_p50_ms"] > 0 for row in report["rows"])
    assert (run / "pareto.png").is_file() and (run / "checkpoints" / "best.safetensors").is_file()
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    evaluated = subprocess.run([sys.executable, str(REPO / "evaluate.py"), f"run={run}", "budgets=[2.2ms,2.4ms]",
                                "baselines=[greedy]"], cwd=tmp_path, env=environ, capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = json.loads((run / "eval-2.2-2.4ms" / "report.json").read_text())["rows"]
    assert {(row["agent"], row["budget_ms"]) for row in rows} == {(a, b) for a in ("grpo", "greedy") for b in (2.2, 2.4)}


def test_train_cli_kv_env_rejects_an_estimator_in_one_line(tmp_path):
    """KV envs take no backend or vision estimator: one error line, no traceback, no run folder."""
    result = run_cli(["env=KV-SinkWindow-v0", "estimator=fake_latency:make", *quick_kv()], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "estimator='fake_latency:make' is invalid for env KV-SinkWindow-v0" in result.stderr
    assert not (tmp_path / "runs" / "KV-SinkWindow-v0").exists() or not any(
        (tmp_path / "runs" / "KV-SinkWindow-v0").rglob("*.json"))


def test_kv_env_ids_are_cli_options_without_a_yaml():
    """No conf/env entry is needed (or shipped) for a KV env id: the CLI stores one per registered id."""
    from knobgym_cli.errors import CONF_DIR, group_options
    from knobgym_cli.group_configs import register_group_configs

    options = register_group_configs([], "env", group_options("env", [CONF_DIR]))
    for env_id in ("StreamingKV-v0", "KV-SinkWindow-v0", "KV-KeyNormWindow-v0"):
        assert env_id in options and not (CONF_DIR / "env" / f"{env_id}.yaml").exists()


def test_every_baseline_and_ppo_fit_and_evaluate_on_a_kv_env():
    from agents import agent_class

    env = gym.make("StreamingKV-v0", budget="2.3ms", episode_tokens=32, chunk_tokens=8,
                   knob_grid={"n_sink": (0,), "window": (4, 8), "compress_every": (1,)}, tpot_model=TPOT)
    options = {"static": {"calibration_samples": 1}, "bandit": {"rounds": 2},
               "ppo": {"total_timesteps": 8, "n_steps": 4, "batch_size": 4}}
    results = {}
    for name in ("oracle", "static", "greedy", "bandit", "random", "ppo"):
        agent = agent_class(name).from_env(env, **options.get(name, {}))
        agent.fit(env, FitContext(split="train", budgets_ms=[2.3]))
        results[name] = evaluate_agent(env, agent, [0], 2.3, "test")
        assert np.isfinite(results[name]["reward"]), name
    assert all(r["reward"] <= results["oracle"]["reward"] + 1e-9 for r in results.values())  # 16 trajectories: exact


def test_budget_auto_builds_a_kv_env_as_the_run_does_and_keeps_sub_millisecond_budgets():
    """budget=auto builds the env through the CLI's make_env (a KV env takes no backend) and rounds a
    TPOT budget of a fraction of a millisecond to three significant digits, not to 0 or 1 ms."""
    from knobgym_cli.budgets import auto_budgets, probe_suggested_budget, round_budget_ms

    env_cfg = {"id": "StreamingKV-v0", "kwargs": {"episode_tokens": 16, "chunk_tokens": 8, "knob_grid": GRID,
                                                  "tpot_model": {"base_ms": 0.5, "per_slot_ms": 0.01,
                                                                 "per_prune_ms": 0.1}}}
    suggested = probe_suggested_budget(env_cfg, {"name": "tiny"}, None)
    env = gym.make("StreamingKV-v0", budget=f"{suggested}ms", **env_cfg["kwargs"]).unwrapped
    lo, hi = env.achievable_range_ms
    assert lo <= suggested <= hi and suggested == round_budget_ms(suggested) and suggested < 1
    assert round_budget_ms(0.72149) == 0.721 and round_budget_ms(28.47) == 28.0
    points = auto_budgets((0.63, 0.81))
    assert len(set(points)) == len(points) and all(0.63 <= p <= 0.81 for p in points)


def test_cli_budget_fractions_reach_a_kv_env_and_are_recorded_resolved():
    """train.py's ``budget=`` on a KV env: a fraction of the TPOT range (and a cap after it, also as a
    Hydra mapping) passes the CLI's boundary as given, the env resolves it once, and the run records
    the resolved budget, cap included (:func:`knobgym_cli.budgets.recorded_budget`)."""
    from omegaconf import OmegaConf

    from knobgym_cli.budgets import recorded_budget, run_budget
    from knobgym_cli.phases import build_run_env

    env_cfg = {"id": "StreamingKV-v0", "kwargs": {"episode_tokens": 16, "chunk_tokens": 8, "knob_grid": GRID,
                                                  "tpot_model": TPOT}}
    recorded = {}
    for given in ("[25%,75%]+40tok", OmegaConf.create({"tpot": "[25%,75%]", "kv": "40tok"}), "50%"):
        assert run_budget(given) is given  # device-relative: only the env knows its range
        env, _, (lo, hi), _ = build_run_env(env_cfg, {"name": "tiny"}, run_budget(given), None)
        recorded[str(given)] = recorded_budget(env)
    quarter, three_quarters = (f"{lo + f * (hi - lo):g}ms" for f in (0.25, 0.75))
    assert list(recorded.values()) == [f"[{quarter[:-2]}ms,{three_quarters[:-2]}ms]+40tok"] * 2 + [
        f"{lo + 0.5 * (hi - lo):g}ms"]
    assert str(run_budget(recorded["50%"])) == recorded["50%"]  # a resumed run reads the record back


def test_train_cli_bad_kv_budget_fraction_is_one_line_before_any_work(tmp_path):
    result = run_cli(["env=StreamingKV-v0", "budget=150%+40tok"], tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "150%" in result.stderr and "between 0% and 100%" in result.stderr
    assert not (tmp_path / "runs").exists()
