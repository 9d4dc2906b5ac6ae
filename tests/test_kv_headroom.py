"""bench.kv_headroom: static, the constant oracle and the chunk lookahead on a small StreamingKV env."""

from __future__ import annotations

import re

import pytest
from model_factories import tiny_kv_stream

from bench import kv_headroom
from latency_model.tpot import TpotEstimator


@pytest.fixture(scope="module")
def env_kwargs():
    model, documents = tiny_kv_stream()
    return {"model": model, "documents": documents,
            "tpot_model": TpotEstimator(base_ms=2.0, per_slot_ms=0.01, per_prune_ms=0.5),
            "knob_grid": {"n_sink": (0, 4), "window": (8, 32), "compress_every": (1, 8)}}


def test_the_schemes_are_ordered_as_their_definitions_say(env_kwargs, capsys):
    argv = ["--episode-tokens", "48", "--chunk-tokens", "8", "--budget", "2.2ms", "--test-episodes", "2",
            "--validation-episodes", "1"]
    assert kv_headroom.main(argv, env_kwargs) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| ([a-z][^|]+?) \| ([-\d.]+) \| ([-\d.]+) \|", out, re.M)}
    assert set(rows) == {"static", "best constant on test", "oracle (constant per episode)", "chunk lookahead"}
    returns = {name: ret for name, (ret, _) in rows.items()}
    # the oracle picks per episode among the constants static and best-on-test pick from
    assert returns["oracle (constant per episode)"] >= returns["best constant on test"] >= returns["static"] - 1e-9
    assert "budget 2.200 ms" in out and "8 settings" in out
    assert "| static | " in out and "+0.0000 [+0.0000, +0.0000]" in out  # static against itself


@pytest.mark.parametrize("budget", ["fast", "[2ms,3ms]"])
def test_a_budget_it_cannot_use_is_one_line(budget, env_kwargs, capsys):
    assert kv_headroom.main(["--budget", budget, "--episode-tokens", "48"], env_kwargs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and budget in err[0]
