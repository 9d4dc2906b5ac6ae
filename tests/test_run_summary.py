"""What a run tells its user: the closing summary, the report's chosen checkpoint, ``budget=auto`` /
``budgets=auto``, the run log, report history on resume, one-line warnings, plots and progress.

The CLI runs use a randomly initialised tiny model and the analytic stand-in estimator
(``tests/fake_latency.py``), with a few samples and two updates, so they take seconds of compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents import read_checkpoint
from knobgym_cli.budgets import auto_budgets, binding, out_of_range_warnings
from knobgym_cli.margin import PER_SAMPLE_KEY
from knobgym_cli.plots import best_within_budget, budget_panels
from knobgym_cli.progress import PlainProgress
from knobgym_cli.summary import archive_previous_report, portable, verdict_lines

REPO = Path(__file__).resolve().parent.parent


def run_cli(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("summary")
    (root / "model").symlink_to(random_tiny_checkpoint, target_is_directory=True)
    return root


def quick(workdir: Path) -> list[str]:
    return [f"backend.checkpoint={workdir / 'model'}", "backend.generation={max_new_tokens:2}",
            "estimator=fake_latency:make", "agent.total_updates=2", "agent.batch_size=2",
            "agent.num_generations=4", "eval.every=1", "eval.num_samples=2", "eval.validation_samples=2",
            "baselines.static.calibration_samples=1", "baselines.bandit.rounds=4", "eval.baselines=[oracle,greedy]"]


@pytest.fixture(scope="module")
def first_run(workdir):
    """``budget=auto`` training run: (run folder, completed process, report.json as first written)."""
    result = run_cli("train.py", ["env=MultiKnob-v0", "budget=auto", *quick(workdir)], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (workdir / "runs" / "MultiKnob-v0" / "grpo").iterdir()
    return run, result, (run / "report.json").read_text()


def test_run_ends_with_verdict_files_and_next_commands(first_run):
    run, result, _ = first_run
    out = result.stdout
    summary = out[out.index("== summary =="):].splitlines()
    verdicts = [line for line in summary if line.startswith("verdict: ")]
    assert len(verdicts) == 1 and verdicts[0].startswith("verdict: grpo ")
    assert "best baseline greedy" in verdicts[0] and "violations" in verdicts[0] and "(oracle " in verdicts[0]
    tail = "; score within budget, 2 test samples"  # then, on a tie, what grpo's p50 latency is at that score
    assert "[95% CI " in verdicts[0] and (verdicts[0].endswith(tail) or f"{tail}; at that score its p50 " in verdicts[0])
    report = json.loads((run / "report.json").read_text())
    assert not any(PER_SAMPLE_KEY in r for r in report["rows"])
    margin = report["margin"]
    (entry,) = margin.values()  # the training budget
    assert entry["agent"] == "grpo" and entry["baseline"] == "greedy" and entry["samples"] == 2
    assert entry["ci95"][0] <= entry["margin"] <= entry["ci95"][1] and "bootstrap" in entry
    assert "Margin of grpo over the best baseline" in (run / "report.md").read_text()
    rel = f"runs/MultiKnob-v0/grpo/{run.name}"
    assert f"  {rel}/report.md: results table and the chosen checkpoint" in summary
    assert f"  {rel}/train.log: this output" in summary
    assert any(line.startswith("checkpoint: checkpoints/best.safetensors (update ") for line in summary)
    assert f"  python evaluate.py run={rel}" in "\n".join(summary)
    assert "  tensorboard --logdir runs" in summary
    assert not out.rstrip().endswith("(pareto.png)")  # the terminal no longer ends with a Markdown image link


def test_budget_auto_resolves_to_the_suggested_budget_and_is_recorded(first_run):
    run, result, _ = first_run
    report = json.loads((run / "report.json").read_text())
    assert report["budget_requested"] == "auto"
    lo, hi = report["achievable_range_ms"]
    assert report["budget"] == f"{round(report['suggested_budget_ms']):g}ms" and lo < report["suggested_budget_ms"] < hi
    ckpt = read_checkpoint(run / "checkpoints" / "latest.safetensors")
    assert ckpt["metadata"]["config"]["budget"] == report["budget"]  # a resumed run keeps the resolved budget
    assert "warning" not in result.stderr.lower()  # auto never picks a budget out of range


def test_tensorboard_test_scalars_sit_at_the_step_training_ended(first_run):
    """``test/<agent>/*`` beside the run's last training and validation points, not at step 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = first_run
    events = EventAccumulator(str(run)).Reload()
    tags = events.Tags()["scalars"]
    last = max(e.step for tag in tags if tag.startswith("train/") for e in events.Scalars(tag))
    test_tags = [tag for tag in tags if tag.startswith("test/")]
    assert last == 2 and {"test/grpo/score", "test/greedy/violation_rate"} <= set(test_tags)  # agent.total_updates=2
    assert {e.step for tag in test_tags for e in events.Scalars(tag)} == {last}


def test_report_names_the_chosen_checkpoint_and_why(first_run):
    run, _, _ = first_run
    report = json.loads((run / "report.json").read_text())
    chosen = report["checkpoint"]
    assert chosen["path"] == "checkpoints/best.safetensors" and chosen["of_updates"] == 2
    assert 0 <= chosen["update"] <= 2 and chosen["validation_samples"] == 2
    assert chosen["validation_split"] == "validation" and isinstance(chosen["validation_reward"], float)
    best = read_checkpoint(run / "checkpoints" / "best.safetensors")
    assert best["metadata"]["step"] == chosen["update"]
    assert "highest mean validation reward" in chosen["why"] and "latest is update 2" in chosen["why"]
    md = (run / "report.md").read_text()
    assert f"- checkpoint: checkpoints/best.safetensors (update {chosen['update']} of 2, validation reward" in md


def test_report_holds_no_absolute_paths_and_the_log_holds_the_run(first_run, workdir):
    run, result, _ = first_run
    for name in ("report.json", "report.md"):
        text = (run / name).read_text()
        assert str(workdir) not in text and str(REPO) not in text, name
    log = (run / "train.log").read_text()
    assert "== summary ==" in log and "grpo MultiKnob-v0" in log and "\r" not in log
    assert "\r" not in result.stderr  # not a terminal: plain lines, no bar states


def test_resume_keeps_the_first_report_and_shows_the_last_validation(first_run, workdir):
    run, _, first_report = first_run
    result = run_cli("train.py", [f"resume={run}", "estimator=fake_latency:make", "agent.total_updates=3"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (kept,) = (run / "reports").iterdir()
    assert (kept / "report.json").read_text() == first_report
    assert (kept / "report.md").is_file() and (kept / "pareto.png").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["resumed"] is True and report["checkpoint"]["of_updates"] == 3
    assert report["previous_reports"].startswith("reports/")
    assert "val=nan" not in result.stderr and "val=" in result.stderr
    assert "resumed at update 2" in (run / "train.log").read_text()


def test_evaluate_budgets_auto_spreads_inside_the_range(first_run, workdir):
    run, _, _ = first_run
    result = run_cli("evaluate.py", [f"run={run}", "estimator=fake_latency:make", "num_samples=2"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "budgets=auto: " in result.stderr and "warning" not in result.stderr.lower()
    (out,) = run.glob("eval-*")
    report = json.loads((out / "report.json").read_text())
    lo, hi = report["achievable_range_ms"]
    assert len(report["budgets_ms"]) >= 4 and all(lo <= b <= hi for b in report["budgets_ms"])
    train_budget = json.loads((run / "report.json").read_text())["budget"]  # e.g. "71ms"
    assert float(train_budget[:-2]) in report["budgets_ms"]
    assert report["checkpoint"].startswith("runs/")


def test_evaluate_warns_in_one_line_about_budgets_outside_the_range(first_run, workdir):
    run, _, _ = first_run
    result = run_cli("evaluate.py", [f"run={run}", "estimator=fake_latency:make", "num_samples=1", "budgets=[1ms,100000ms]", "baselines=[greedy]"],
                     workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("budget 1ms is below the cheapest configuration" in w for w in warnings)
    assert any("budget 100000ms is above the full configuration" in w for w in warnings)
    assert "Warning:" not in result.stderr and ".py:" not in result.stderr  # no source lines


def test_train_help_shows_knobgym_options(workdir):
    result = run_cli("train.py", ["--help"], workdir)
    assert result.returncode == 0
    for text in ("budget=auto", "resume=true", "tensorboard --logdir runs", "agent: bandit, greedy, grpo",
                 "validation_samples: 96"):
        assert text in result.stdout, text
    assert not (workdir / "runs" / "MultiKnob-v0" / "grpo").exists() or len(
        list((workdir / "runs" / "MultiKnob-v0" / "grpo").iterdir())) <= 1


# ------------------------------------------------------------------------------------------------
# the pieces, without the CLI
# ------------------------------------------------------------------------------------------------
def test_auto_budgets_lie_inside_the_range_and_keep_the_training_budget():
    budgets = auto_budgets((40.0, 80.0), [55.5])
    assert budgets == sorted(budgets) and 55.5 in budgets and all(40 < b < 80 for b in budgets)
    assert auto_budgets((40.0, 80.0), [200.0]) == [48.0, 56.0, 64.0, 72.0]  # a budget outside is not added
    assert binding("200ms", (40.0, 80.0)) == "never binds" and binding("10ms", (40.0, 80.0)) == "unreachable"
    assert binding("[30ms,60ms]", (40.0, 80.0)) == "binds"
    messages = out_of_range_warnings([10.0, 60.0, 200.0], (40.0, 80.0), 60.0)
    assert len(messages) == 2 and "10ms" in messages[0] and "200ms" in messages[1]


def row(agent, budget, score, violations, p50=10.0, samples=100):
    """A report row whose per-sample scores within budget are 1 on its first samples, 0 on the rest
    (so two rows' samples pair as nested sets)."""
    in_budget = score * (1 - violations)
    hits = round(in_budget * samples)
    return {"agent": agent, "budget_ms": budget, "score": score, "score_in_budget": in_budget,
            "reward": score, "violation_rate": violations, "latency_p50_ms": p50, "latency_p95_ms": p50,
            PER_SAMPLE_KEY: [1.0] * hits + [0.0] * (samples - hits)}


def test_verdict_names_the_best_baseline_or_says_the_budget_does_not_bind():
    rows = [row("grpo", 50.0, 0.8, 0.0), row("greedy", 50.0, 0.75, 0.0), row("oracle", 50.0, 0.9, 0.0)]
    (line,) = verdict_lines(rows, "grpo", "50ms", (30.0, 70.0), 50.0)
    assert line.startswith("grpo 0.800 beats best baseline greedy 0.750 by +0.050 [95% CI +0.0")
    assert line.endswith("] at 50ms, 0% violations (oracle 0.900); score within budget, 100 test samples")
    (line,) = verdict_lines(rows, "grpo", "120ms", (30.0, 70.0), 50.0)
    assert "never binds here" in line and "nothing to learn" in line and "rerun with budget=50ms" in line
    (line,) = verdict_lines(rows, "grpo", "5ms", (30.0, 70.0), 50.0)
    assert "below the cheapest configuration" in line and "rerun with budget=50ms" in line


def test_a_violating_agent_is_never_best(tmp_path):
    rows = [row("grpo", 40.0, 0.9, 0.5, p50=45.0), row("greedy", 40.0, 0.7, 0.0), row("oracle", 40.0, 0.95, 0.0),
            row("grpo", 60.0, 0.9, 0.0), row("greedy", 60.0, 0.8, 0.04)]
    assert best_within_budget([r for r in rows if r["budget_ms"] == 40.0])["agent"] == "greedy"
    assert best_within_budget([r for r in rows if r["budget_ms"] == 60.0])["agent"] == "grpo"
    assert best_within_budget([row("grpo", 40.0, 0.9, 0.5)]) is None
    assert budget_panels(rows, tmp_path / "p.png", "t").stat().st_size > 0


def test_plain_progress_prints_periodic_lines_and_a_last_one(capsys):
    from knobgym_cli.logs import setup_cli_logging

    setup_cli_logging(None)
    bar = PlainProgress(5, "phase", "step", every_s=0.0)
    for _ in range(5):
        bar.update(1)
    bar.set_postfix(val="0.500")
    bar.close()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "\r" not in err and lines[-1].startswith("phase: 5/5 steps in ") and lines[-1].endswith("(val=0.500)")
    assert len(lines) == 5  # 1..4 periodically, then the last


def test_archive_never_overwrites(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"finished_at": "2026-11-30_10-00-00"}))
    (tmp_path / "report.md").write_text("first")
    first = archive_previous_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"finished_at": "2026-11-30_10-00-00"}))
    second = archive_previous_report(tmp_path)
    assert first.name == "2026-11-30_10-00-00" and second.name == "2026-11-30_10-00-00-1"
    assert (first / "report.md").read_text() == "first" and not (tmp_path / "report.json").exists()
    assert archive_previous_report(tmp_path) is None


def test_portable_paths(tmp_path):
    obj = {"a": str(tmp_path / "x" / "y"), "b": [str(REPO / "backends" / "tiny")], "c": "relative", "d": 3}
    assert portable(obj, tmp_path) == {"a": "x/y", "b": ["backends/tiny"], "c": "relative", "d": 3}


def test_a_terminal_bar_leaves_one_line_in_the_run_log(tmp_path):
    from knobgym_cli.logs import setup_cli_logging
    from knobgym_cli.progress import TerminalProgress, cli_progress

    setup_cli_logging(tmp_path / "train.log")
    bar = cli_progress(3, "updates", "update", plain=False)
    assert isinstance(bar, TerminalProgress)
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(val="0.700")
    bar.close()
    bar.close()
    setup_cli_logging(None)  # closes the file handler
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 1 and "updates: 3/3 updates in " in lines[0] and lines[0].endswith("(val=0.700)")
