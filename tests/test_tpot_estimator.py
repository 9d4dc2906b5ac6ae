"""The TPOT estimator (latency_model/tpot.py): fit, cache, noise bound, corrupt files, cross-process determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import latency_model.tpot as tpot
from latency_model.tpot import (TpotEstimator, TpotNoiseWarning, TpotSettings, fit_tpot, get_tpot_estimator,
                                profile_tpot, tpot_cache_paths)

QUICK = TpotSettings(lengths=(8, 24), steps=2, repeats=2, max_noise_pct=1e9)
REPO = Path(__file__).resolve().parents[1]

MODEL_SOURCE = """
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
torch.manual_seed(0)
model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=256)).eval()
"""


@pytest.fixture(scope="module")
def model():
    scope: dict = {}
    exec(MODEL_SOURCE, scope)
    return scope["model"]


def test_fit_is_a_valid_linear_model_and_deterministic_in_the_profile(model):
    profile = profile_tpot(model, QUICK)
    fitted = fit_tpot(profile)
    assert fitted == fit_tpot(json.loads(json.dumps(profile)))
    assert min(fitted.base_ms, fitted.per_slot_ms, fitted.per_prune_ms) >= 0 and fitted.noise_pct >= 0
    assert fitted.fingerprint["torch_threads"] == 1 and fitted.identity["model"] == "GPTNeoXForCausalLM"
    predicted = fitted.predict([0, 0, 1], [10, 20, 20])
    assert predicted.shape == (3,) and predicted[0] <= predicted[1] <= predicted[2]
    batch = fitted.predict(np.array([0, 1] * 50), np.arange(100))
    assert all(fitted.predict([p], [a])[0] == b for p, a, b in zip([0, 1] * 50, range(100), batch))


@pytest.mark.parametrize("make, message", [
    (lambda: TpotSettings(lengths=(8,)), r"lengths=\(8,\)"),
    (lambda: TpotSettings(steps=0), "steps=0"),
    (lambda: TpotSettings(max_noise_pct=0), "max_noise_pct=0"),
    (lambda: TpotSettings(threads=0), "threads=0"),
    (lambda: TpotEstimator(-1.0, 0.0, 0.0), r"base_ms=-1.0"),
    (lambda: TpotEstimator(1.0, float("nan"), 0.0), r"per_slot_ms=nan"),
    (lambda: TpotEstimator(1.0, 0.0, 0.0).predict([0, 1], [3]), "one prune flag per attended length"),
])
def test_bad_settings_and_inputs_are_clear_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_profiled_once_then_read_from_the_cache(model, tmp_path, monkeypatch):
    calls = []
    real = tpot.profile_tpot
    monkeypatch.setattr(tpot, "profile_tpot", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = get_tpot_estimator(model, tmp_path, settings=QUICK)
    second = get_tpot_estimator(model, tmp_path, settings=QUICK)
    assert first == second and len(calls) == 1
    estimator_path, profile_path = tpot_cache_paths(model, tmp_path)
    assert estimator_path.is_file() and profile_path.is_file() and TpotEstimator.load(estimator_path) == first
    get_tpot_estimator(model, tmp_path, settings=QUICK, force=True)
    assert len(calls) == 2
    with pytest.raises(FileNotFoundError, match="no TPOT estimator cached"):
        get_tpot_estimator(model, tmp_path / "empty", profile_if_missing=False)


def test_a_noisy_profile_is_used_but_not_cached(model, tmp_path, monkeypatch):
    calls: dict = {}

    def noisy(model, schedule, length, *rest):  # every point's rounds alternate 1 ms / 3 ms
        calls[schedule, length] = calls.get((schedule, length), 0) + 1
        return 1.0 if calls[schedule, length] % 2 else 3.0

    monkeypatch.setattr(tpot, "_time_point", noisy)
    settings = TpotSettings(lengths=(8, 24), steps=1, repeats=2, remeasure=1, max_noise_pct=50)
    with pytest.warns(TpotNoiseWarning, match=r"noise \d+\.\d% exceeds the bound 50% after re-measuring 4 noisy"):
        estimator = get_tpot_estimator(model, tmp_path, settings=settings)
    assert estimator.noise_pct >= 100.0
    assert not any(path.exists() for path in tpot_cache_paths(model, tmp_path))


def test_a_corrupt_cached_estimator_is_named_and_replaced(model, tmp_path):
    get_tpot_estimator(model, tmp_path, settings=QUICK)
    estimator_path, _ = tpot_cache_paths(model, tmp_path)
    text = estimator_path.read_text()
    estimator_path.write_text(text.replace('"base_ms": ', '"base_ms": 1'))  # edited by hand
    with pytest.raises(ValueError, match=f"{estimator_path.name}.*checksum mismatch"):
        TpotEstimator.load(estimator_path)
    with pytest.warns(TpotNoiseWarning, match="checksum mismatch.*re-profiling TPOT"):
        replaced = get_tpot_estimator(model, tmp_path, settings=QUICK)
    assert TpotEstimator.load(estimator_path) == replaced


EPISODE_SCRIPT = MODEL_SOURCE + """
import json, sys
import numpy as np
from envs.streaming_kv import StreamingKVEnv
generator = torch.Generator().manual_seed(3)
documents = [torch.randint(0, 53, (n,), generator=generator).tolist() for n in (400, 300)]
env = StreamingKVEnv(model=model, documents=documents, chunk_tokens=8, episode_tokens=64, budget="[1ms,50ms]")
env.reset(seed=7)
rewards = [env.step(np.array(a))[1] for a in [[0, 0, 0], [1, 2, 3], [2, 3, 1], [0, 1, 0]] * 2]
print(json.dumps({"rewards": rewards, "coefficients": env.tpot_model.coefficients}))
"""


def test_an_estimated_episode_gives_identical_rewards_in_two_processes(model, tmp_path):
    """Acceptance (#16): profiled once per device (here by this process), read by every later process."""
    cached = get_tpot_estimator(model, tmp_path / "latency", settings=QUICK)
    env = {**os.environ, "KNOBGYM_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    outputs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", EPISODE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert outputs[0]["coefficients"] == cached.coefficients and all(np.isfinite(outputs[0]["rewards"]))


def test_the_tpot_profile_records_the_speed_probe_and_is_compared_when_used(model, tmp_path, monkeypatch):
    """A TPOT profile carries the machine-speed probe as the knob envs' does (issue #29): not cached
    when the probe moved while profiling, a warning naming the cache file when it moved since."""
    from latency_model import speed

    readings = [10.0, 24.0, 10.0, 11.0, 10.5, 30.0]  # moved during; then cached; then two uses
    monkeypatch.setattr(speed, "speed_probe_ms", lambda repeats=speed.REPEATS: readings.pop(0))
    monkeypatch.setenv(speed.BOUND_ENV_VAR, "1.5")
    with pytest.warns(TpotNoiseWarning, match="speed moved while it was measured"):
        get_tpot_estimator(model, tmp_path, settings=QUICK)
    assert not any(p.exists() for p in tpot_cache_paths(model, tmp_path, QUICK.threads))
    fitted = get_tpot_estimator(model, tmp_path, settings=QUICK)
    assert fitted.fingerprint["speed_probe"] == {"before_ms": 10.0, "after_ms": 11.0, "bound": 1.5}
    get_tpot_estimator(model, tmp_path, settings=QUICK)  # 10.5 ms: within the bound, no warning
    with pytest.warns(TpotNoiseWarning, match=r"runs the speed probe in 30.00 ms.*rm .* and rerun"):
        get_tpot_estimator(model, tmp_path, settings=QUICK)
    assert not readings
