"""``train.py`` and ``evaluate.py`` end to end in a temporary directory (small step counts).

The runs use a randomly initialised tiny model built in code and an analytic stand-in for the
latency estimator (passed as ``estimator=module:callable``), so they exercise the real CLI,
env and backend paths in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.checkpoint import read_checkpoint
from backends.text_features import QUESTION_FEATURE_DIM

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_tiny_checkpoint) -> Path:
    """A working directory for the CLI runs, with the session's random tiny model as ``model/``."""
    root = tmp_path_factory.mktemp("cli")
    (root / "model").symlink_to(random_tiny_checkpoint, target_is_directory=True)
    return root


def run_cli(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # tests/ on the path: train.py's estimator=fake_latency:make hook imports tests/fake_latency.py.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def quick(workdir: Path) -> list[str]:
    """Overrides for a run of seconds: random tiny model, 2-token answers, one sample per evaluation."""
    return [f"backend.checkpoint={workdir / 'model'}", "backend.generation={max_new_tokens:2}",
            "estimator=fake_latency:make", "budget=80ms", "agent.total_updates=2", "agent.batch_size=2",
            "agent.num_generations=4", "eval.every=1", "eval.num_samples=1", "eval.validation_samples=1",
            "baselines.static.calibration_samples=1", "baselines.bandit.rounds=4"]


@pytest.fixture(scope="module")
def trained_run(workdir) -> Path:
    result = run_cli("train.py", ["env=MultiKnob-v0", *quick(workdir)], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((workdir / "runs" / "MultiKnob-v0" / "grpo").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_train_writes_the_run_folder(trained_run):
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "versions.json", "checkpoints/latest.safetensors",
                 "checkpoints/best.safetensors", "report.md", "report.json", "pareto.png",
                 "baselines/static.safetensors"):
        assert (trained_run / name).is_file(), name
    assert list(trained_run.glob("events.out.tfevents.*"))
    import json

    versions = json.loads((trained_run / "versions.json").read_text())
    assert torch.__version__.startswith(versions["packages"]["torch"].split("+")[0])
    assert versions["model"]["backend"] == "tiny" and "revision" in versions["model"] and versions["device"]
    assert versions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the kernels that ran
    report = json.loads((trained_run / "report.json").read_text())
    assert {r["agent"] for r in report["rows"]} == {"grpo", "oracle", "static", "greedy", "bandit", "random"}
    assert "80ms" in report["oracle_gap"]
    ckpt = read_checkpoint(trained_run / "checkpoints" / "latest.safetensors")
    # the 32 features of before #14 plus the question features (hashed bag of words)
    assert ckpt["metadata"]["step"] == 2 and ckpt["env_id"] == "MultiKnob-v0" and ckpt["metadata"]["obs_shape"] == [32 + QUESTION_FEATURE_DIM]
    assert ckpt["agent"] == "grpo" and {"policy", "optimizer", "rng"} <= set(ckpt["state"])
    assert "| grpo | 80ms |" in (trained_run / "report.md").read_text()


def test_a_second_run_gets_its_own_folder(workdir, trained_run):
    result = run_cli("train.py", [*quick(workdir), "agent.total_updates=0", "eval.baselines=[greedy]"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((workdir / "runs" / "MultiKnob-v0" / "grpo").iterdir())
    assert len(runs) == 2 and trained_run in runs and (trained_run / "report.md").exists()
    for run in runs:
        if run != trained_run:
            import shutil

            shutil.rmtree(run)  # keep resume=true pointing at the first run for the test below


def test_resume_continues_the_step_count(workdir, trained_run):
    result = run_cli("train.py", [f"resume={trained_run}", "estimator=fake_latency:make", "agent.total_updates=3", "eval.baselines=[greedy]"],
                     workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = read_checkpoint(trained_run / "checkpoints" / "latest.safetensors")
    assert ckpt["metadata"]["step"] == 3 and ckpt["state"]["step"] == 3
    assert ckpt["metadata"]["config"]["agent"]["batch_size"] == 2  # the run's own settings, not the defaults
    assert list((trained_run / ".hydra").glob("resume-*/overrides.yaml"))
    assert (trained_run / ".hydra" / "config.yaml").read_text().count("total_updates: 2") == 1


def test_evaluate_writes_its_table(workdir, trained_run):
    result = run_cli("evaluate.py", [f"run={trained_run}", "estimator=fake_latency:make", "budgets=[60ms,80ms]", "baselines=[static,greedy]"],
                     workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (trained_run / "eval-60-80ms" / "report.md").read_text()
    for row in ("| grpo | 60ms |", "| grpo | 80ms |", "| static | 60ms |", "| greedy | 80ms |"):
        assert row in table
    assert (trained_run / "eval-60-80ms" / "pareto.png").stat().st_size > 0
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("verdict: grpo ")]
    assert [v.split(" at ")[1].split(",")[0] for v in verdicts] == ["60ms", "80ms"]  # one per budget
    assert all("best baseline " in v and "[95% CI " in v for v in verdicts)
    assert "Margin of grpo over the best baseline" in table


def test_evaluate_rejects_a_checkpoint_of_another_env(workdir, trained_run):
    result = run_cli("evaluate.py", [f"run={trained_run}", "estimator=fake_latency:make", "env_id=TokenBudget-v0"], workdir)
    assert result.returncode == 2
    assert "trained on env 'MultiKnob-v0', not 'TokenBudget-v0'" in result.stderr


@pytest.mark.parametrize("override,accepted", [
    ("env=Nope-v0", "accepted: Decoding-measured-v0, Decoding-v0, KV-KeyNormWindow-v0, KV-SinkWindow-v0, "
                    "MultiKnob-measured-v0, MultiKnob-v0"),
    ("agent=nope", "accepted: bandit, greedy, grpo, grpo_lm, ppo, random, static"),
    ("budget=fast", "accepted: a positive number of milliseconds"),
    ("budgte=80ms", "accepted: agent, backend, baselines, budget"),
])
def test_bad_overrides_exit_with_one_line(workdir, override, accepted):
    result = run_cli("train.py", [override], workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and accepted in lines[0], result.stderr
    assert not (workdir / "runs" / "Nope-v0").exists()
