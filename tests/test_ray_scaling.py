"""Ray: GRPO groups and trace samples on actors equal the single-process results, and survive a killed actor.

One local Ray instance (2 CPUs, no dashboard) serves the module. The GRPO tests run on the table
stand-in backend (microsecond runs, slowed down where a test needs a task in flight); the trace
tests record the random tiny model from its spec (each actor loads it once), on a few
configurations. Skipped cleanly without Ray (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

import agents  # noqa: E402
import envs  # noqa: E402,F401  (registers the env ids)
from agents.base import EnvLayout, FitContext, FitHooks  # noqa: E402
from agents.rollout import GroupRequest, LocalGroupCollector, RayGroupCollector  # noqa: E402
from backends.registry import load_backend  # noqa: E402
from backends.trace import record_trace, trace_grid  # noqa: E402
from executors.ray import RayExecutor  # noqa: E402
from table_backend import TableBackend, TableLatency  # noqa: E402

#: columns that are wall-clock measurements, different in every recording
TIMING_COLUMNS = {"outcomes": ("measured_ms",), "stage1": ("stage1_ms",)}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    # the actors import the stand-ins of tests/ (table_backend, fake_latency) like the driver does
    path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent)])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


class SlowTable(TableBackend):
    """The table backend with every stage-1 run taking ``delay`` seconds (a task stays in flight)."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def run_stage1(self, sample, tier, token_budget=1.0):
        time.sleep(self.delay)
        return super().run_stage1(sample, tier, token_budget)


def table_env(backend=None) -> gym.Env:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return gym.make("MultiKnob-v0", backend=backend or TableBackend(), budget="[20ms,50ms]",
                        estimator=TableLatency(), violation_penalty=1.0)


class RecordRewards(FitHooks):
    def __init__(self):
        self.rewards = []

    def on_update(self, agent, step, infos, stats):
        self.rewards.append([i["reward"] for i in infos])


def train(env, executor, updates: int = 2):
    agent = agents.make_agent("grpo", env, total_updates=updates, batch_size=4, num_generations=4, seed=7)
    hooks = RecordRewards()
    agent.fit(env, FitContext(hooks=hooks, executor=executor))
    return agent, hooks.rewards


# --------------------------------------------------------------------------------------------- GRPO
def test_grpo_on_ray_actors_trains_exactly_like_the_local_loop():
    env = table_env()
    local, local_rewards = train(env, None)
    executor = RayExecutor(workers=2)
    remote, remote_rewards = train(env, executor)
    assert remote_rewards == local_rewards and len(remote_rewards) == 2
    for (name, a), b in zip(local.policy.state_dict().items(), remote.policy.state_dict().values()):
        assert torch.equal(a, b), name
    assert executor.pools[-1].actors == []  # fit closed its pool


def test_a_group_whose_actor_is_killed_is_sampled_again_and_nothing_is_lost_or_doubled():
    env = table_env(SlowTable(delay=0.15))
    agent = agents.make_agent("grpo", env, num_generations=4, seed=3)
    requests = [GroupRequest(sid, 35.0, "train", seed) for seed, sid in enumerate([1, 4, 9, 16, 25, 36])]
    expected = LocalGroupCollector(EnvLayout(env), agent).collect(requests)
    executor = RayExecutor(workers=2)
    collector = RayGroupCollector(env, agent, executor)
    pool = collector.pool
    pool.start()
    ray.get([a.__ray_ready__.remote() for a in pool.actors])  # setup done: the kill lands mid-group
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("groups", collector.collect(requests)))
    thread.start()
    time.sleep(0.3)  # both actors are inside their first group (each group sleeps >= 0.15 s per tier)
    ray.kill(pool.actors[0])
    thread.join(timeout=120)
    collector.close()
    groups = out["groups"]
    assert pool.retried, "the killed actor's group was not retried"
    assert len(groups) == len(requests)
    for got, want in zip(groups, expected):
        np.testing.assert_array_equal(got.actions, want.actions)
        np.testing.assert_array_equal(got.rewards, want.rewards)
        np.testing.assert_array_equal(got.obs, want.obs)
        assert [i["sample_id"] for i in got.infos] == [i["sample_id"] for i in want.infos]


# --------------------------------------------------------------------------------------------- traces
@pytest.fixture(scope="module")
def tiny_spec(random_tiny_checkpoint) -> dict:
    return {"name": "tiny", "checkpoint": str(random_tiny_checkpoint), "generation": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def configs(tiny_spec):
    grid = trace_grid(load_backend(tiny_spec).knob_space)
    return grid[:: max(1, len(grid) // 6)][:6]


def rows(path) -> dict:
    conn = sqlite3.connect(str(path))
    try:
        out = {}
        for table in ("samples", "stage1", "outcomes"):
            names = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            keep = [n for n in names if n not in TIMING_COLUMNS.get(table, ())]
            out[table] = sorted(conn.execute(f"SELECT {', '.join(keep)} FROM {table}"))
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key != 'created'"))
        return {**out, "meta": meta}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def local_trace(tiny_spec, configs, tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "local.trace"
    return record_trace(tiny_spec, path, split="test", sample_ids=range(8), configs=configs, progress=False)


def test_a_trace_sharded_over_ray_actors_holds_the_single_process_rows_even_when_an_actor_is_killed(
        tiny_spec, configs, local_trace, tmp_path):
    """Each actor loads the model from the spec; one is killed once the first sample is written: its
    sample runs again elsewhere, and the file holds exactly the rows of the single-process recording."""
    executor = RayExecutor(workers=2)
    path = tmp_path / "killed.trace"
    errors: list = []

    def record():
        try:
            record_trace(tiny_spec, path, split="test", sample_ids=range(8), configs=configs, progress=False,
                         executor=executor)
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    thread = threading.Thread(target=record)
    thread.start()
    written = 0
    deadline = time.monotonic() + 120
    while written == 0 and time.monotonic() < deadline:  # the first sample is in: both actors are busy
        time.sleep(0.05)
        try:
            with sqlite3.connect(str(path)) as conn:
                written = conn.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet, or locked by the writer
            pass
    pool = executor.pools[-1]
    victim = pool.actors[0]
    ray.kill(victim)
    thread.join(timeout=180)
    assert not errors, errors
    assert pool.retried, "the killed actor's sample was not retried"
    got, want = rows(path), rows(local_trace)
    assert len(got["outcomes"]) == len(set(r[:3] for r in got["outcomes"])) == 8 * len(configs)
    assert got == want
    assert pool.actors == []  # record_trace closed its pool


# --------------------------------------------------------------------------------------------- CLI
def test_the_cli_rollout_executor_uses_a_running_ray_and_leaves_it_running():
    from omegaconf import OmegaConf

    from knobgym_cli.rollout import rollout_executor

    with rollout_executor(OmegaConf.create({"name": "ray", "workers": 2, "address": "auto"}), threads=1) as executor:
        assert isinstance(executor, RayExecutor) and executor.workers == 2 and executor.threads == 1
    assert ray.is_initialized()  # initialised by someone else (this module): not this block's to stop
    with rollout_executor(OmegaConf.create({"name": "local", "workers": 1, "address": "auto"})) as executor:
        assert executor.in_process


def test_more_gpu_workers_than_the_cluster_has_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the driver "sees CUDA"; the cluster has none
    pool = RayExecutor(workers=2).pool(TableBackend, lambda state, shared, task: task, gpus=True)
    with pytest.raises(ValueError, match=r"rollout.workers=2 is invalid here: each worker takes one GPU and the "
                                         r"Ray cluster has 0"):
        list(pool.map([1, 2]))
    assert pool.actors == []
