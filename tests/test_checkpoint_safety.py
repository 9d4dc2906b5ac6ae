"""Checkpoints and reports are data only, checked, and recoverable.

- Security: a pickle placed where a checkpoint belongs is refused with one error naming the file,
  and its code never runs (a planted pickle would create a marker file if it were unpickled);
  no code path of the project unpickles; remote code stays off by default.
- Corruption: a cut-short or edited checkpoint is a ``CorruptFileError`` naming it; a run falls
  back to the last valid checkpoint (``latest.prev``, ``best``...) and says so in one warning
  line; ``evaluate.py`` on a damaged checkpoint is one error naming it, exit status 2.
- ``report.json`` is written atomically with its own checksum.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from cli_output import failure_lines
from fake_latency import AnalyticEstimator

import envs  # noqa: F401  (registers the ids)
from agents import agent_class
from agents.checkpoint import read_checkpoint, write_checkpoint
from backends.io import CorruptFileError
from knobgym_cli.checkpoints import previous_file, read_with_fallback, save_run_checkpoint
from knobgym_cli.report import read_report, write_report_json

REPO = Path(__file__).resolve().parent.parent


class Planted:
    """Unpickling this creates ``path``: the marker that code from a checkpoint ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, marker: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"policy": Planted(marker)}))
    else:  # torch.save's zip format, the old best.pt
        buffer = io.BytesIO()
        torch.save({"policy": Planted(marker)}, buffer)
        path.write_bytes(buffer.getvalue())
    return path


def run_cli(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return failure_lines(result.stderr)


# ------------------------------------------------------------------------------------------------
# security
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_planted_pickle_is_refused_naming_the_file_and_never_run(tmp_path, kind):
    marker = tmp_path / "code-ran"
    path = plant(tmp_path / "checkpoints" / "best.safetensors", marker, kind)
    with pytest.raises(CorruptFileError, match=re.escape(str(path))):
        read_checkpoint(path)
    with pytest.raises(CorruptFileError):
        read_with_fallback(tmp_path, "best")
    assert not marker.exists()


def test_no_code_path_unpickles():
    """No module of the project calls pickle.load(s), torch.load without weights_only=True, or
    np.load with allow_pickle=True (tests pickle their own objects in-process only)."""
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".git") or "site-packages" in rel.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(r"(pickle\.loads?\(|cloudpickle\.loads?\(|dill\.loads?\(|torch\.load\(|"
                                 r"allow_pickle\s*=\s*True|weights_only\s*=\s*False)", text):
            call = text[match.start():text.find(")", match.end()) + 1]
            if call.startswith("torch.load(") and "weights_only=True" in call:
                continue
            offenders.append(f"{rel}: {call[:80]}")
    assert not offenders, offenders


def test_remote_code_is_off_by_default():
    from backends.loading import ModelSpec

    assert ModelSpec(model="x").trust_remote_code is False
    for yaml in (REPO / "conf").rglob("*.yaml"):
        assert not re.search(r"trust_remote_code:\s*true", yaml.read_text(), re.I), yaml


# ------------------------------------------------------------------------------------------------
# corrupt checkpoints: rotation and fallback
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(random_tiny_checkpoint) -> gym.Env:
    spec = {"name": "tiny", "checkpoint": str(random_tiny_checkpoint), "generation": {"max_new_tokens": 2}}
    return gym.make("MultiKnob-v0", backend=spec, estimator=AnalyticEstimator(), budget="80ms")


def test_each_write_keeps_the_previous_checkpoint_and_a_damaged_latest_falls_back(tmp_path, env, capsys):
    agent = agent_class("bandit").from_env(env, rounds=1)
    latest = tmp_path / "checkpoints" / "latest.safetensors"
    for step in (1, 2, 3):
        save_run_checkpoint(latest, agent, env, {"seed": 0}, step)
    assert read_checkpoint(latest)["metadata"]["step"] == 3
    assert read_checkpoint(previous_file(latest))["metadata"]["step"] == 2
    latest.write_bytes(latest.read_bytes()[:-7])  # cut short
    ckpt, used = read_with_fallback(tmp_path, "latest")
    assert used == previous_file(latest) and ckpt["metadata"]["step"] == 2
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and str(latest) in warnings[0] and "cut short" in warnings[0]
    assert "latest.prev.safetensors" in warnings[1] and "damaged" in warnings[1]
    # a damaged latest is not rotated over the valid previous one
    save_run_checkpoint(latest, agent, env, {"seed": 0}, 4)
    assert read_checkpoint(previous_file(latest))["metadata"]["step"] == 2
    assert read_checkpoint(latest)["metadata"]["step"] == 4


def test_a_damaged_best_falls_back_to_latest_and_none_valid_names_the_file(tmp_path, env, capsys):
    agent = agent_class("bandit").from_env(env, rounds=1)
    folder = tmp_path / "checkpoints"
    save_run_checkpoint(folder / "best.safetensors", agent, env, {}, 1)
    save_run_checkpoint(folder / "latest.safetensors", agent, env, {}, 5)
    (folder / "best.safetensors").write_bytes(b"\x00" * 10)
    ckpt, used = read_with_fallback(tmp_path, "best")
    assert used.name == "latest.safetensors" and ckpt["metadata"]["step"] == 5
    assert "best.safetensors" in capsys.readouterr().err
    (folder / "latest.safetensors").write_bytes(b"{}")
    with pytest.raises(CorruptFileError, match="best.safetensors"):
        read_with_fallback(tmp_path, "best")


def test_a_checkpoint_of_another_agent_or_env_is_not_skipped_silently(tmp_path):
    path = tmp_path / "checkpoints" / "best.safetensors"
    write_checkpoint(path, "static", "TokenBudget-v0", {"x": 1})
    with pytest.raises(ValueError, match="trained on env 'TokenBudget-v0', not 'MultiKnob-v0'"):
        read_with_fallback(tmp_path, "best", lambda p: read_checkpoint(p, env_id="MultiKnob-v0"))


def test_report_json_carries_a_checksum(tmp_path):
    path = write_report_json(tmp_path / "report.json", {"rows": [{"agent": "grpo", "score": 0.5}], "env": "x"})
    assert read_report(path) == {"rows": [{"agent": "grpo", "score": 0.5}], "env": "x"}
    path.write_text(path.read_text().replace("0.5", "0.9"))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        read_report(path)
    path.write_text(path.read_text()[:20])
    with pytest.raises(CorruptFileError, match="cut short"):
        read_report(path)


# ------------------------------------------------------------------------------------------------
# through the CLI: one trained run, then damaged copies of it
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, random_tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("safety")
    args = [f"backend.checkpoint={random_tiny_checkpoint}", "backend.generation={max_new_tokens:2}",
            "estimator=fake_latency:make", "budget=80ms", "agent.total_updates=2", "agent.batch_size=2",
            "agent.num_generations=4", "eval.every=1", "eval.num_samples=1", "eval.validation_samples=1",
            "checkpoint_every=1", "eval.baselines=[greedy]"]
    result = run_cli("train.py", args, root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (root / "runs" / "MultiKnob-v0" / "grpo").iterdir()
    assert (run / "checkpoints" / "latest.prev.safetensors").is_file()
    read_report(run / "report.json")
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_evaluate_refuses_a_planted_pickle_with_one_line(trained_run, tmp_path, kind):
    run = copy_of(trained_run, tmp_path)
    marker = tmp_path / "code-ran"
    path = plant(run / "checkpoints" / "best.safetensors", marker, kind)
    result = run_cli("evaluate.py", [f"run={run}", "estimator=fake_latency:make"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
    assert not marker.exists()


def test_evaluate_on_a_cut_short_checkpoint_is_one_error_naming_it(trained_run, tmp_path):
    run = copy_of(trained_run, tmp_path)
    path = run / "checkpoints" / "latest.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_cli("evaluate.py", [f"run={run}", "estimator=fake_latency:make", "checkpoint=latest"], tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and str(path) in lines[0] and "not a valid knobgym file" in lines[0], result.stderr


def test_resume_with_a_damaged_latest_and_best_recovers_and_says_so(trained_run, tmp_path):
    run = copy_of(trained_run, tmp_path)
    latest, best = run / "checkpoints" / "latest.safetensors", run / "checkpoints" / "best.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    best.write_bytes(best.read_bytes()[:-1])
    (run / "report.json").unlink()
    result = run_cli("train.py", [f"resume={run}", "estimator=fake_latency:make", "agent.total_updates=3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any(str(latest) in line and "not a valid knobgym file" in line for line in warnings), result.stderr
    assert any("latest.prev.safetensors" in line for line in warnings), result.stderr
    assert read_checkpoint(latest)["metadata"]["step"] == 3  # continued from latest.prev (step 2)
    report = read_report(run / "report.json")  # written afresh, checksum valid
    assert report["checkpoint"]["path"].startswith("checkpoints/") and {r["agent"] for r in report["rows"]} >= {"grpo"}


def test_evaluate_refuses_a_checkpoint_of_another_agent(trained_run, tmp_path):
    run = copy_of(trained_run, tmp_path)
    path = run / "checkpoints" / "best.safetensors"
    ckpt = read_checkpoint(path)
    write_checkpoint(path, "bandit", ckpt["env_id"], {"weights": torch.zeros(2)}, ckpt["metadata"])
    result = run_cli("evaluate.py", [f"run={run}", "estimator=fake_latency:make"], tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "holds a 'bandit' agent but the run's config names 'grpo'" in lines[0], result.stderr
