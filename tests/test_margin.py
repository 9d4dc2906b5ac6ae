"""The verdict's uncertainty: the paired bootstrap interval of the trained agent's margin over the
best baseline (:mod:`knobgym_cli.margin`), the word it supports, and how the verdict and the report
files say it (synthetic rows; no model runs)."""

from __future__ import annotations

import numpy as np
import pytest

from knobgym_cli.margin import PER_SAMPLE_KEY, margins, paired_bootstrap, verdict_word
from knobgym_cli.report import read_report, write_report
from knobgym_cli.summary import verdict_lines

N = 300


def test_identical_arrays_give_a_zero_interval_and_a_tie():
    scores = np.random.default_rng(0).integers(0, 2, N).astype(float)
    assert paired_bootstrap(scores, scores) == (0.0, 0.0, 0.0)
    assert verdict_word(0.0, 0.0) == "ties"


def test_a_clear_shift_beats_and_its_reverse_trails():
    rng = np.random.default_rng(1)
    base = rng.random(N)
    margin, low, high = paired_bootstrap(base + 0.05 + rng.normal(0, 0.05, N), base)
    assert 0 < low < margin < high and abs(margin - 0.05) < 0.02
    assert verdict_word(low, high) == "beats"
    assert verdict_word(*paired_bootstrap(base, base + 0.05 + rng.normal(0, 0.05, N))[1:]) == "trails"


def test_noise_around_zero_ties_and_the_interval_is_reproducible():
    rng = np.random.default_rng(2)
    mine, theirs = rng.integers(0, 2, N).astype(float), rng.integers(0, 2, N).astype(float)
    margin, low, high = paired_bootstrap(mine, theirs)
    assert low < 0 < high and low <= margin <= high and verdict_word(low, high) == "ties"
    assert paired_bootstrap(mine, theirs) == (margin, low, high)  # fixed seed: the same report twice


def test_the_pairing_is_by_sample():
    """A small gain on every sample is certain when paired, though the samples' spread dwarfs it."""
    base = np.linspace(0.0, 1.0, N)
    _, low, _ = paired_bootstrap(base + 0.01, base)
    assert low == pytest.approx(0.01)


@pytest.mark.parametrize("mine, theirs", [([], []), ([1.0, 0.0], [1.0]), ([[1.0]], [[1.0]])])
def test_unpaired_or_empty_arrays_are_refused(mine, theirs):
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_bootstrap(mine, theirs)


def row(agent, per_sample, p50, budget=76.0, violations=0.0):
    return {"agent": agent, "budget_ms": budget, "score": float(np.mean(per_sample)),
            "score_in_budget": float(np.mean(per_sample)), "reward": float(np.mean(per_sample)),
            "violation_rate": violations, "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.2,
            PER_SAMPLE_KEY: [float(v) for v in per_sample]}


def tie_rows():
    """grpo answers the same samples as greedy and bandit, faster; of those two, greedy is the faster
    (the one a tie is said against); the oracle is the ceiling."""
    scores = (np.arange(N) % 5 != 0).astype(float)  # 0.800
    return [row("grpo", scores, 56.0), row("bandit", scores, 90.0), row("greedy", scores, 76.0),
            row("static", scores * 0.5, 60.0),
            row("oracle", np.ones(N), 50.0)]


def test_a_tie_says_what_the_trained_agent_saves_in_latency():
    (line,) = verdict_lines(tie_rows(), "grpo", "76ms", (50.0, 100.0), 76.0)
    assert line == ("grpo 0.800 ties best baseline greedy 0.800 by +0.000 [95% CI +0.000, +0.000] at 76ms, "
                    "0% violations (oracle 1.000); score within budget, 300 test samples; at that score its p50 "
                    "latency is 56ms against greedy's 76ms (-26%)")


def test_beats_only_when_the_interval_excludes_zero():
    base = (np.arange(N) % 5 != 0).astype(float)
    one_more = base.copy()
    one_more[0] = 1.0  # one sample of 300 better: a higher mean, not a win
    (line,) = verdict_lines([row("grpo", one_more, 70.0), row("greedy", base, 76.0)], "grpo", "76ms",
                            (50.0, 100.0), 76.0)
    assert line.startswith("grpo 0.803 ties best baseline greedy 0.800 by +0.003 [95% CI +0.000, +0.0")
    assert line.endswith("its p50 latency is 70ms against greedy's 76ms (-8%)")
    better = np.where(np.arange(N) % 5 == 0, 1.0, base)  # every sample greedy misses
    (line,) = verdict_lines([row("grpo", better, 70.0), row("greedy", base, 76.0)], "grpo", "76ms",
                            (50.0, 100.0), 76.0, split="validation")
    assert line.startswith("grpo 1.000 beats best baseline greedy 0.800 by +0.200 [95% CI +0.1")
    assert line.endswith("; score within budget, 300 validation samples") and "p50" not in line


def test_the_budget_cases_stay_as_they_were():
    rows = tie_rows()
    (line,) = verdict_lines(rows, "grpo", "120ms", (50.0, 100.0), 76.0)
    assert "never binds here" in line and "rerun with budget=76ms" in line and "CI" not in line
    (line,) = verdict_lines(rows, "grpo", "5ms", (50.0, 100.0), 76.0)
    assert "below the cheapest configuration" in line and "CI" not in line


def test_one_budget_per_line_and_no_baseline_no_interval():
    rows = tie_rows() + [row("grpo", np.ones(N), 90.0, budget=100.0), row("oracle", np.ones(N), 90.0, budget=100.0)]
    by_budget = margins(rows, "grpo")
    assert list(by_budget) == [76.0, 100.0] and "ci95" not in by_budget[100.0]
    lines = verdict_lines(rows, "grpo", "76ms", (50.0, 100.0), 76.0)
    assert lines[1] == "grpo 1.000 at 100ms, 0% violations (oracle 1.000); score within budget, 300 test samples"


def test_the_report_files_carry_the_margin_and_not_the_per_sample_values(tmp_path):
    rows = tie_rows()
    write_report(tmp_path, rows, {"title": "t", "split": "test", "samples": N}, main_agent="grpo")
    report = read_report(tmp_path / "report.json")
    assert not any(PER_SAMPLE_KEY in r for r in report["rows"]) and all(PER_SAMPLE_KEY in r for r in rows)
    entry = report["margin"]["76ms"]
    assert entry["verdict"] == "ties" and entry["ci95"] == [0.0, 0.0] and entry["samples"] == N
    assert (entry["baseline"], entry["latency_p50_ms"], entry["baseline_latency_p50_ms"]) == ("greedy", 56.0, 76.0)
    assert entry["bootstrap"] == {"resamples": 2000, "seed": 0, "paired_by": "sample"}
    text = (tmp_path / "report.md").read_text()
    assert "- " + verdict_lines(rows, "grpo", "76ms", (50.0, 100.0), 76.0)[0] in text


def test_the_interval_does_not_depend_on_how_many_resamples_are_drawn_at_once(monkeypatch):
    import knobgym_cli.margin as margin

    rng = np.random.default_rng(3)
    mine, theirs = rng.random(N), rng.random(N)
    whole = paired_bootstrap(mine, theirs)
    monkeypatch.setattr(margin, "_BLOCK", N * 7)  # blocks of 7 resamples
    assert paired_bootstrap(mine, theirs) == whole
