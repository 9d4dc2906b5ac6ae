"""The trained agent's margin over the best baseline, with its uncertainty: the figures a verdict says.

The margin is the difference of mean score within budget (:data:`VERDICT_KEY`) on the same test
samples. Its 95% interval is a paired bootstrap: the per-sample differences (trained minus
baseline, sample by sample) are resampled with replacement :data:`RESAMPLES` times with a fixed
seed, so a report is reproducible, and the 2.5th and 97.5th percentiles of the resampled means are
the interval. The verdict word follows the interval, never the point estimate alone: "beats" when
its lower end is above zero, "trails" when its upper end is below zero, "ties" otherwise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agents import evaluation_only

# The verdict's measure: the mean score of answers that arrive within the budget (a late answer
# counts 0), one number that neither ignores violations nor hides accuracy.
VERDICT_KEY = "score_in_budget"
# Each row's per-sample values of VERDICT_KEY, in the order of the samples every agent ran on
# (knobgym_cli.report.compare_agents): what the bootstrap pairs.
PER_SAMPLE_KEY = "per_sample_score_in_budget"
RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
_BLOCK = 1 << 21  # resampled values held at once (16 MiB of float64)


def paired_bootstrap(mine: Sequence[float], theirs: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(margin, low, high)``: the mean of ``mine - theirs`` (paired by position: the same samples)
    and the percentile interval of that mean over ``resamples`` paired bootstrap resamples.

    Identical arrays give ``(0, 0, 0)``. Raises ``ValueError`` for empty or unequal-length arrays.
    """
    mine, theirs = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if mine.ndim != 1 or mine.shape != theirs.shape or mine.size == 0:
        raise ValueError(f"paired bootstrap needs two 1-D arrays of the same non-zero length; got shapes "
                         f"{mine.shape} and {theirs.shape}")
    diff = mine - theirs
    rng, means = np.random.default_rng(seed), []
    per_block = max(1, _BLOCK // diff.size)  # resamples drawn at once: memory stays bounded for any sample count
    for start in range(0, int(resamples), per_block):  # the same draws as one block would give
        picks = rng.integers(0, diff.size, size=(min(per_block, int(resamples) - start), diff.size))
        means.append(diff[picks].mean(axis=1))
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(np.concatenate(means), [tail, 100.0 - tail])
    return float(diff.mean()), float(low), float(high)


def verdict_word(low: float, high: float) -> str:
    """"beats" when the interval lies above zero, "trails" when below, else "ties"."""
    return "beats" if low > 0 else ("trails" if high < 0 else "ties")


def margins(rows: Sequence[dict], main_agent: str) -> dict[float, dict]:
    """Per budget where ``main_agent`` has a row: its score within budget, p50 latency and violation
    rate, the evaluation-only bounds' scores (the oracle: a ceiling, not a rival) and, when a
    baseline ran too, the best baseline's figures (the highest score within budget, the lower p50
    latency between equal scores), the margin over it, its interval and the verdict
    word (:func:`paired_bootstrap`, :func:`verdict_word`).

    ``rows``: :func:`knobgym_cli.report.compare_agents` rows, which carry :data:`PER_SAMPLE_KEY`.
    """
    bounds = set(evaluation_only())
    out = {}
    for budget in sorted({float(r["budget_ms"]) for r in rows}):
        at = {r["agent"]: r for r in rows if float(r["budget_ms"]) == budget}
        mine = at.get(main_agent)
        if mine is None:
            continue
        entry = {"agent": main_agent, "score_in_budget": mine[VERDICT_KEY], "latency_p50_ms": mine["latency_p50_ms"],
                 "violation_rate": mine["violation_rate"], "samples": len(mine[PER_SAMPLE_KEY]),
                 "bounds": {name: r[VERDICT_KEY] for name, r in at.items() if name in bounds}}
        others = [r for name, r in at.items() if name != main_agent and name not in bounds]
        if others:
            # of baselines that score the same, the fastest: a tie is then a tie with the cheaper rival
            best = max(others, key=lambda r: (r[VERDICT_KEY], -r["latency_p50_ms"]))
            margin, low, high = paired_bootstrap(mine[PER_SAMPLE_KEY], best[PER_SAMPLE_KEY])
            entry.update({"baseline": best["agent"], "baseline_score_in_budget": best[VERDICT_KEY],
                          "baseline_latency_p50_ms": best["latency_p50_ms"], "margin": margin,
                          "ci95": [low, high], "verdict": verdict_word(low, high),
                          "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "paired_by": "sample"}})
        out[budget] = entry
    return out
