"""The report's plot: score versus latency, one panel per evaluation budget.

Each panel shows every agent at that budget (the same marker and colour for an agent in every
panel), the budget as a dashed line, and marks an agent that violates the budget hollow, with
its violation rate written next to it. An agent *violates* a budget when more than
:data:`VIOLATION_LIMIT` of its test samples run over it. The panel names the best agent *within
budget*: the highest score among the agents that do not violate it (the oracle, which sees the
outcome it is scored on, is a ceiling and never named best); a violating agent is never best.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from backends.io import atomic_savefig

VIOLATION_LIMIT = 0.05
MARKERS = "osD^vP*Xh<>"


def violates(row: dict, limit: float = VIOLATION_LIMIT) -> bool:
    """More than ``limit`` of the samples ran over the budget."""
    return float(row["violation_rate"]) > limit


def best_within_budget(rows: Sequence[dict], limit: float = VIOLATION_LIMIT) -> dict | None:
    """The highest-scoring row of a deployable agent (not evaluation only, as the oracle is) that does
    not violate its budget (rows of one budget)."""
    from agents import evaluation_only

    fair = [r for r in rows if r["agent"] not in evaluation_only() and not violates(r, limit)]
    return max(fair, key=lambda r: (r["score"], -r["latency_p50_ms"])) if fair else None


def label_rows(points: Sequence[tuple[float, float]], x_span: float, y_span: float,
               near: tuple[float, float] = (0.1, 0.08)) -> list[int]:
    """A text row per point (0, 1, 2, ...) so that the labels of points closer than ``near`` (a share
    of the x and y spans: about a short label's width and height in a panel) are stacked below one
    another instead of drawn over each other."""
    rows: list[int] = []
    for i, (x, y) in enumerate(points):
        taken = {rows[j] for j, (u, v) in enumerate(points[:i])
                 if abs(u - x) <= near[0] * x_span and abs(v - y) <= near[1] * y_span}
        rows.append(next(k for k in range(len(points) + 1) if k not in taken))
    return rows


def budget_panels(rows: Sequence[dict], path: str | Path, title: str, limit: float = VIOLATION_LIMIT) -> Path:
    """Write the plot to ``path`` (atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({float(r["budget_ms"]) for r in rows})
    agents = list(dict.fromkeys(r["agent"] for r in rows))
    style = {name: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, name in enumerate(agents)}
    cols = len(budgets) if len(budgets) <= 4 else 3
    n_rows = math.ceil(len(budgets) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols + 1.8, 3.4 * n_rows + 0.9), sharex=True,
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(budgets):]:
        ax.set_visible(False)
    x_span = (max(r["latency_p50_ms"] for r in rows) - min(r["latency_p50_ms"] for r in rows)) or 1.0
    y_span = (max(r["score"] for r in rows) - min(r["score"] for r in rows)) or 1.0
    for ax, budget in zip(axes.flat, budgets):
        here = [r for r in rows if float(r["budget_ms"]) == budget]
        for r in here:
            marker, colour = style[r["agent"]]
            bad = violates(r, limit)
            # the oracle (the ceiling every agent is read against) larger and underneath: an agent at
            # the same point sits inside it and both stay visible
            oracle = r["agent"] == "oracle"
            ax.scatter(r["latency_p50_ms"], r["score"], marker=marker, s=150 if oracle else 70, zorder=2.5 if oracle else 3,
                       facecolors="none" if bad else colour, edgecolors=colour, linewidths=1.5)
        violating = sorted((r for r in here if violates(r, limit)), key=lambda r: -r["score"])
        for r, row in zip(violating, label_rows([(r["latency_p50_ms"], r["score"]) for r in violating], x_span, y_span)):
            ax.annotate(f"{r['violation_rate']:.0%}", (r["latency_p50_ms"], r["score"]), textcoords="offset points",
                        xytext=(6, -10 - 9 * row), fontsize=7, color=style[r["agent"]][1])
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1)
        best = best_within_budget(here, limit)
        label = f"best within budget: {best['agent']} {best['score']:.3f}" if best else "every agent violates"
        ax.set_title(f"budget {budget:g}ms\n{label}", fontsize=9)
        if best:
            ax.scatter(best["latency_p50_ms"], best["score"], marker="o", s=260, facecolors="none",
                       edgecolors="black", linewidths=1.0, zorder=2)
        ax.set_xlabel("latency p50 (ms)")
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.margins(x=0.08, y=0.15)  # markers at the best score stay inside the panel
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("score")
    handles = [plt.Line2D([], [], linestyle="", marker=style[n][0], color=style[n][1], label=n) for n in agents]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    # wrapped to the figure's width (about 17 characters of 7-point text per inch), so one panel keeps it whole
    note = textwrap.fill(f"hollow marker: violates the budget (more than {limit:.0%} of samples over it); "
                         f"circled: best score within budget (oracle excluded); dashed line: the budget",
                         width=int(17 * fig.get_figwidth()))
    fig.text(0.01, 0.01, note, fontsize=7, color="dimgrey", va="bottom")
    note_height = (0.14 * (note.count("\n") + 1) + 0.05) / fig.get_figheight()  # 7-point lines, in figure units
    fig.tight_layout(rect=(0, note_height, 1 - 1.4 / fig.get_figwidth(), 0.95))
    try:
        return atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
