"""``train.py backend=hf`` and ``evaluate.py`` on a plain checkpoint and an exported JSON-lines
dataset (the random tiny model and an analytic latency stand-in, so it takes seconds). Bad data
through the API is tested in ``test_hf_task.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_and_evaluate_with_backend_hf(tmp_path, random_tiny_checkpoint):
    from backends.tiny.export_dataset import export_dataset

    data = export_dataset(tmp_path / "data", n=40)
    args = ["env=MultiKnob-v0", "backend=hf", f"backend.model={random_tiny_checkpoint}", f"backend.dataset={data}",
            "backend.generation={max_new_tokens:2}", "estimator=fake_latency:make", "budget=80ms",
            "agent.total_updates=2", "agent.batch_size=2", "agent.num_generations=4", "eval.every=1",
            "eval.num_samples=1", "eval.validation_samples=1", "baselines.static.calibration_samples=1",
            "baselines.bandit.rounds=4"]
    result = run_cli("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "runs" / "MultiKnob-v0" / "grpo").iterdir())
    report = json.loads((run / "report.json").read_text())
    assert report["backend"]["backend"] == "hf" and report["backend"]["content_revision"].startswith("local-")
    evaluated = run_cli("evaluate.py", [f"run={run}", "estimator=fake_latency:make"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
