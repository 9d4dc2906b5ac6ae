"""Trace record/replay on the tiny backend: same observations, rewards and infos as live."""

from __future__ import annotations

import sqlite3
import warnings

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from backends.knobs import KnobConfig
from backends.trace import TraceBackend, TraceError, record_trace, trace_grid
from envs.replay import BatchedReplay

SAMPLES = [0, 3]


@pytest.fixture(scope="module")
def trace_path(tiny_backend, tiny_estimator, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "tiny-test.trace"
    estimator_file = tmp_path_factory.mktemp("est") / "tiny.estimator"
    tiny_estimator.save(estimator_file)
    record_trace(tiny_backend, path, split="test", sample_ids=SAMPLES, progress=False, estimator_file=estimator_file)
    return path


def _rollout(env, sample_id, budget, action):
    obs = [env.reset(options={"sample_id": sample_id, "budget": budget})[0]]
    rewards, infos, done = [], [], False
    while not done:
        o, r, term, trunc, info = env.step(action)
        obs.append(o)
        rewards.append(r)
        infos.append(info)
        done = term or trunc
    return obs, rewards, infos


@pytest.mark.parametrize("env_id", ["MultiKnob-v0", "TokenBudget-v0"])
def test_replay_matches_live_for_every_recorded_pair(tiny_backend, tiny_estimator, trace_path, env_id):
    trace = TraceBackend(trace_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budget-range warnings are not under test here
        live = gym.make(env_id, backend=tiny_backend, estimator=tiny_estimator, split="test", budget="30ms").unwrapped
        replay = gym.make(env_id, backend=trace, split="test", budget="30ms").unwrapped
    assert replay.observation_space == live.observation_space and replay.action_space == live.action_space
    if env_id == "MultiKnob-v0":
        actions = [[t, a, d] for t in range(3) for a in (0, 4) for d in (0, 2, 4)]
    else:
        actions = list(range(live.action_space.n))
    for sid in SAMPLES:
        for action in actions:
            lo, lr, li = _rollout(live, sid, "30ms", action)
            ro, rr, ri = _rollout(replay, sid, "30ms", action)
            assert all(np.array_equal(a, b) for a, b in zip(lo, ro))
            assert lr == rr
            for a, b in zip(li, ri):
                a.pop("measured_ms", None), b.pop("measured_ms", None)
                assert a == b


def test_unrecorded_pair_is_a_clear_error(trace_path):
    trace = TraceBackend(trace_path)
    with pytest.raises(TraceError, match="sample 1 of split 'test' is not in trace"):
        trace.sample("test", 1)
    sample = trace.sample("test", 0)
    with pytest.raises(TraceError, match="was not recorded"):
        trace.run(sample, KnobConfig(tier="high", token_budget=0.5, top_k=4, depth=12))


def test_recording_resumes_without_losing_rows(tiny_backend, tmp_path):
    path = tmp_path / "resume.trace"
    configs = trace_grid(tiny_backend.knob_space)[:6]
    record_trace(tiny_backend, path, split="validation", sample_ids=[0], configs=configs, progress=False)
    with sqlite3.connect(path) as conn:
        first = conn.execute("SELECT * FROM outcomes ORDER BY sample_id, config_id").fetchall()
        # Simulate a recording killed half-way through sample 1: only some of its rows committed.
        conn.execute("INSERT INTO outcomes SELECT split, 1, config_id, answer, score, new_tokens, measured_ms, "
                     "empty_output, nonfinite_logits FROM outcomes WHERE config_id < 2")
    calls = []
    original = tiny_backend.run_stage2
    tiny_backend.run_stage2 = lambda state, knobs: calls.append(knobs) or original(state, knobs)
    try:
        record_trace(tiny_backend, path, split="validation", sample_ids=[0, 1], configs=configs, progress=False)
    finally:
        del tiny_backend.run_stage2
    assert len(calls) == len(configs) - 2  # only what was missing ran
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM outcomes ORDER BY sample_id, config_id").fetchall()
    assert rows[: len(first)] == first and len(rows) == 2 * len(configs)


def test_resuming_with_other_configurations_is_refused(tiny_backend, tmp_path):
    path = tmp_path / "other.trace"
    grid = trace_grid(tiny_backend.knob_space)
    record_trace(tiny_backend, path, split="validation", sample_ids=[0], configs=grid[:2], progress=False)
    with pytest.raises(TraceError, match="different configs"):
        record_trace(tiny_backend, path, split="validation", sample_ids=[0], configs=grid[2:4], progress=False)


def test_corrupted_or_missing_trace_names_the_file(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        TraceBackend(tmp_path / "nope.trace")
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TraceError, match="bad.trace"):
        TraceBackend(bad)


def test_batched_replay_gives_the_env_rewards(tiny_backend, trace_path):
    trace = TraceBackend(trace_path)
    replay = BatchedReplay(trace, split="test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("MultiKnob-v0", backend=trace, split="test", budget="30ms").unwrapped
    rng = np.random.default_rng(0)
    rows = rng.integers(replay.num_samples, size=40)
    actions = np.stack([rng.integers(n, size=40) for n in env.action_space.nvec], axis=1)
    budgets = rng.uniform(10, 60, size=40)
    out = replay.step(rows, actions, budgets)
    for i in range(40):
        sid = replay.table.samples[rows[i]].sample_id
        rewards, infos = env.evaluate_group(sid, float(budgets[i]), [actions[i]], split="test")
        # Batched replay predicts the whole table in one estimator call; the trees' sums may then
        # differ from a one-row call in the last bits (the env path itself is exact: see above).
        assert out["reward"][i] == pytest.approx(rewards[0], rel=1e-12, abs=1e-12)
        assert out["latency_ms"][i] == pytest.approx(infos[0]["latency_ms"], rel=1e-12)


# --- validation of recorded rows (issue 13) --------------------------------------------------------
@pytest.mark.parametrize("table,column,value,message", [
    ("outcomes", "score", None, "score=NULL"),
    ("outcomes", "score", float("nan"), "score=NULL"),  # SQLite stores NaN as NULL
    ("outcomes", "measured_ms", float("inf"), "measured_ms=inf"),
    ("outcomes", "score", "abc", "score='abc'"),
    ("outcomes", "new_tokens", None, "new_tokens=NULL"),
    ("stage1", "stage1_ms", float("-inf"), "stage1_ms=-inf"),
    ("stage1", "summary", np.full(4, np.nan, np.float32).tobytes(), "summary=<4 non-finite values>"),
])
def test_non_finite_trace_row_is_an_error_naming_the_row(trace_path, tmp_path, table, column, value, message):
    broken = tmp_path / "broken.trace"
    broken.write_bytes(trace_path.read_bytes())
    with sqlite3.connect(broken) as conn:
        key = conn.execute(f"SELECT split, sample_id FROM {table} ORDER BY sample_id LIMIT 1").fetchone()
        conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid=(SELECT MIN(rowid) FROM {table})", (value,))
    with pytest.raises(TraceError, match=f"{table} row \\(split='{key[0]}', sample_id={key[1]},.*{message}") as info:
        TraceBackend(broken)
    assert str(broken) in str(info.value)


def test_recording_refuses_a_non_finite_outcome(tiny_backend, tmp_path, monkeypatch):
    original = tiny_backend.run_stage2

    def nan_score(state, knobs):
        outcome = original(state, knobs)
        outcome.score = float("nan")
        return outcome

    monkeypatch.setattr(tiny_backend, "run_stage2", nan_score)
    configs = trace_grid(tiny_backend.knob_space)[:2]
    with pytest.raises(TraceError, match="outcomes row \\(split='validation', sample_id=0, config_id=0\\) has score=nan"):
        record_trace(tiny_backend, tmp_path / "nan.trace", split="validation", sample_ids=[0], configs=configs,
                     progress=False)


def test_trace_backend_implements_the_whole_protocol(tiny_backend, trace_path):
    import torch

    from backends.base import Backend

    trace = TraceBackend(trace_path)
    assert isinstance(trace, Backend)
    assert trace.device == torch.device("cpu")
    assert trace.cost_params() == {k: float(v) for k, v in tiny_backend.cost_params().items()}
    assert trace.expected_new_tokens_by_type[None] == tiny_backend.expected_new_tokens_by_type[None]
    assert trace.recorded_estimator_file().endswith(".estimator")
    sample = trace.sample("test", 0)
    assert trace.expected_token_counts(sample, KnobConfig()) == tiny_backend.expected_token_counts(
        tiny_backend.sample("test", 0), KnobConfig())


def test_recording_progress_is_plain_lines_in_a_log(tiny_backend, tmp_path, capsys):
    configs = trace_grid(tiny_backend.knob_space)[:2]
    record_trace(tiny_backend, tmp_path / "p.trace", split="validation", sample_ids=[0, 1], configs=configs)
    err = capsys.readouterr().err
    assert "\r" not in err and "record validation: 2/2 samples (100%)" in err
