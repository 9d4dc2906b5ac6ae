"""The SLO report of a served requests file: the controller and the run's calibrated static side by side."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from serving.controller import Answer
from serving.guard import GUARD_OUTCOMES


def slo_summary(answers: Sequence[Answer]) -> dict:
    """Share within budget (measured wall clock; the estimator's latency with the run's token counts,
    ``estimated``; and before the run, ``predicted``), p50 / p95 of the first two, the mean score over
    the answers that have one (``None`` when none has) and how often the budget guard kept, replaced
    or fell back (:mod:`serving.guard`; empty when unguarded)."""
    if not answers:
        raise ValueError("cannot summarise zero answers; accepted: at least one answer")
    measured = np.array([a.measured_ms for a in answers])
    estimated = np.array([a.estimated_ms for a in answers])
    predicted = np.array([a.predicted_ms for a in answers])
    budgets = np.array([a.budget_ms for a in answers])
    scores = [a.score for a in answers if a.score is not None]
    return {
        "requests": len(answers),
        "within_budget": float(np.mean(measured <= budgets)),
        "latency_p50_ms": float(np.percentile(measured, 50)),
        "latency_p95_ms": float(np.percentile(measured, 95)),
        "within_budget_estimated": float(np.mean(estimated <= budgets)),
        "estimated_p50_ms": float(np.percentile(estimated, 50)),
        "estimated_p95_ms": float(np.percentile(estimated, 95)),
        "within_budget_predicted": float(np.mean(predicted <= budgets)),
        "mean_score": float(np.mean(scores)) if scores else None,
        "scored": len(scores),
        "guard": dict(Counter(a.guard for a in answers if a.guard is not None)),
    }


COLUMNS = (("within_budget", "within budget (measured)", "{:.1%}"), ("latency_p50_ms", "p50 ms", "{:.1f}"),
           ("latency_p95_ms", "p95 ms", "{:.1f}"), ("within_budget_estimated", "within budget (estimated)", "{:.1%}"),
           ("estimated_p50_ms", "estimated p50 ms", "{:.1f}"), ("estimated_p95_ms", "estimated p95 ms", "{:.1f}"),
           ("within_budget_predicted", "within budget (predicted)", "{:.1%}"), ("mean_score", "mean score", "{:.3f}"))


def markdown_report(title: str, rows: dict[str, dict], notes: Sequence[str] = ()) -> str:
    """``rows``: controller name -> :func:`slo_summary`; one table, then the notes as a list."""
    header = "| controller | requests | " + " | ".join(label for _, label, _ in COLUMNS) + " | budget guard |"
    lines = [f"# {title}", "", header, "|" + " --- |" * (len(COLUMNS) + 3)]
    for name, row in rows.items():
        cells = ["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        guard = ", ".join(f"{row['guard'].get(k, 0)} {k}" for k in GUARD_OUTCOMES) if row["guard"] else "off"
        lines.append(f"| {name} | {row['requests']} | " + " | ".join(cells) + f" | {guard} |")
    lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
