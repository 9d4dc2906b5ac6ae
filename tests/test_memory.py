"""Memory stays flat over a long estimated-latency run (``bench/memory.py``: RSS over 20,000 env steps).

The bench replaces the model with a stand-in whose stage runs return at once, so what it measures
is what the env, the runner and the data keep. The bound is on memory only: no timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from backends.base import Backend

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import memory  # noqa: E402  (bench/memory.py)


def test_the_stand_in_backend_satisfies_the_contract_and_steps(random_tiny_checkpoint):
    inner = memory.load_backend({"name": "tiny", "checkpoint": str(random_tiny_checkpoint)})
    backend = memory.FastBackend(inner)
    assert isinstance(backend, Backend)
    env = gym.make("MultiKnob-v0", backend=backend, estimator=memory.AnalyticEstimator(), budget="80ms")
    env.reset(seed=0)
    env.step([1, 0, 0])
    _, reward, terminated, _, info = env.step([1, 2, 2])
    assert terminated and np.isfinite(reward) and info["knobs"]["tier"] == inner.knob_space.tier_names[1]
    sample = inner.sample("train", 3)
    knobs = inner.knob_space.full()
    assert backend.run(sample, knobs).answer == backend.run(sample, knobs).answer  # deterministic


def test_rss_is_flat_within_50_mb_over_20000_estimated_steps(tmp_path):
    out = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--steps", "20000", "--warmup",
                             "2000", "--max-growth-mb", "50", "--json", str(out)], capture_output=True, text=True,
                            timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.exists(), result.stderr[-2000:]
    measured = json.loads(out.read_text())
    assert measured["steps"] == 20000 and len(measured["rss_mb"]) >= 19
    assert measured["growth_after_warmup_mb"] <= 50.0, result.stdout
