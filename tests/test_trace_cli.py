"""``python -m backends.trace record`` and training / evaluating on the recording (``backend=trace``)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backends.trace import TraceBackend
from backends.trace_cli import parse_args

REPO = Path(__file__).resolve().parent.parent


def run_module(args: list[str], cwd: Path, module: str | None = "backends.trace") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_bad_record_options_are_one_line(tmp_path):
    for args, words in ((["split=dev"], "split='dev' is unknown"), (["samples=0"], "samples=0 is invalid"),
                        (["colour=red"], "unknown override 'colour'"), (["rollout=k8s"], "rollout='k8s' is invalid"),
                        ([f"estimator={tmp_path / 'none.json'}"], "latency estimator")):
        with pytest.raises(ValueError, match=words):
            parse_args(args)
    result = run_module(["record", "split=dev"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: split='dev' is unknown; accepted: train, validation, test"]
    assert run_module(["replay"], tmp_path).returncode == 2


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, random_tiny_checkpoint, tiny_estimator) -> tuple[Path, Path]:
    """A trace of the first 10 test samples of a random tiny model, recorded by the command line."""
    root = tmp_path_factory.mktemp("trace-cli")
    estimator = tiny_estimator.save(root / "estimator.json")
    args = ["record", "backend=tiny", f"backend.checkpoint={random_tiny_checkpoint}",
            'backend.generation={"max_new_tokens": 2}', "split=test", "samples=10", f"estimator={estimator}"]
    result = run_module(args, root)
    assert result.returncode == 0, result.stderr[-3000:]
    path = root / "runs" / "traces" / "tiny-test.trace"
    assert path.is_file() and f"wrote runs/traces/tiny-test.trace" in result.stdout
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
    again = run_module(args, root)  # resumable: everything is recorded, nothing runs again
    assert again.returncode == 0, again.stderr[-3000:]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == rows == 10 * 78
    return root, path


def test_a_one_split_trace_is_served_as_three_splits(recorded):
    _, path = recorded
    as_recorded = TraceBackend(path)
    assert len(as_recorded.samples("test")) == 10 and as_recorded.recorded_estimator_file() is not None
    divided = TraceBackend(path, split_fractions=(0.8, 0.1, 0.1))
    sizes = {s: len(divided.samples(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 8, "validation": 1, "test": 1} and divided.source_splits == ("test",)
    questions = sorted(s.question for split in sizes for s in divided.samples(split))
    assert questions == sorted(s.question for s in as_recorded.samples("test"))
    sample = divided.samples("validation")[0]
    knobs = divided.configs[5]
    assert divided.run(sample, knobs).answer is not None and sample.split == "validation" and sample.sample_id == 0


def test_train_and_evaluate_on_a_recorded_trace(recorded):
    root, path = recorded
    quick = ["agent.total_updates=1", "agent.batch_size=2", "agent.num_generations=2", "eval.every=1",
             "eval.num_samples=1", "eval.validation_samples=1", "baselines.static.calibration_samples=1",
             "baselines.bandit.rounds=2"]
    result = run_module([str(REPO / "train.py"), "env=MultiKnob-v0", "backend=trace", f"backend.path={path}",
                         "budget=auto", *quick], root, module=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "budget=auto -> budget=" in result.stderr
    run = next((root / "runs" / "MultiKnob-v0" / "grpo").iterdir())
    evaluated = run_module([str(REPO / "evaluate.py"), f"run={run}", "num_samples=1", "baselines=[static]"], root,
                           module=None)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert list(run.glob("eval-*/report.md"))
    # another device's latency: its estimator file replaces the recorded one, the policy is not retrained
    moved = run_module([str(REPO / "evaluate.py"), f"run={run}", "num_samples=1", "baselines=[static]",
                        f"latency.profile={root / 'estimator.json'}", f"out={root / 'moved'}"], root, module=None)
    assert moved.returncode == 0, moved.stderr[-3000:]
    notes = json.loads((root / "moved" / "report.json").read_text())["notes"]
    assert any(note.startswith("latency.profile=") for note in notes)
    bad = run_module([str(REPO / "evaluate.py"), f"run={run}", f"latency.profile={path}"], root, module=None)
    assert bad.returncode == 2 and "latency estimator" in bad.stderr and "Traceback" not in bad.stderr
