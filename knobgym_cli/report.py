"""Comparing agents on a fixed evaluation set and writing ``report.md``, ``report.json``, ``pareto.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import gymnasium as gym

from agents import Agent, evaluate_agent
from backends.io import atomic_savefig, atomic_write_json, atomic_write_text

COLUMNS = (("reward", "reward", "{:.3f}"), ("score", "score", "{:.3f}"), ("score_in_budget", "score in budget", "{:.3f}"),
           ("latency_p50_ms", "p50 ms", "{:.1f}"),
           ("latency_p95_ms", "p95 ms", "{:.1f}"), ("violation_rate", "violations", "{:.1%}"))


def compare_agents(env: gym.Env, agents: Mapping[str, Agent], budgets_ms: Sequence[float], sample_ids: Sequence[int],
                   split: str, progress: bool = False) -> list[dict]:
    """Evaluate every agent at every budget on the same samples; one row per (agent, budget).

    The oracle, when present, runs first: it runs every configuration of each sample once, and the
    env memoises those runs, so every other agent's episodes are then free of model runs.
    """
    order = sorted(agents, key=lambda name: name != "oracle")
    rows = []
    jobs = [(name, b) for b in budgets_ms for name in order]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc=f"evaluate ({split}, {len(sample_ids)} samples)", leave=False)
    for name, budget_ms in jobs:
        result = evaluate_agent(env, agents[name], sample_ids, budget_ms, split)
        result.pop("infos")
        rows.append({"agent": name, **result})
    position = {name: i for i, name in enumerate(agents)}
    return sorted(rows, key=lambda r: (r["budget_ms"], position[r["agent"]]))


def oracle_gaps(rows: Sequence[dict], agent: str) -> dict[float, dict]:
    """Per budget, how far ``agent`` is below the oracle in reward and score."""
    gaps = {}
    by_key = {(r["agent"], r["budget_ms"]): r for r in rows}
    for (name, budget), oracle in by_key.items():
        if name != "oracle" or (agent, budget) not in by_key:
            continue
        mine = by_key[(agent, budget)]
        gaps[budget] = {key: oracle[key] - mine[key] for key in ("reward", "score", "score_in_budget")}
    return gaps


def markdown_table(rows: Sequence[dict]) -> str:
    header = "| agent | budget | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {r['agent']} | {r['budget_ms']:g}ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Score versus p50 latency, one marker per agent per budget, a dashed line per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*Xh<>"
    agents = list(dict.fromkeys(r["agent"] for r in rows))
    for i, name in enumerate(agents):
        mine = [r for r in rows if r["agent"] == name]
        ax.scatter([r["latency_p50_ms"] for r in mine], [r["score"] for r in mine], marker=markers[i % len(markers)],
                   s=60, label=name, zorder=3)
    for budget in sorted({r["budget_ms"] for r in rows}):
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"budget {budget:g}ms", (budget, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="grey")
    ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def write_report(out_dir: str | Path, rows: Sequence[dict], meta: dict[str, Any], main_agent: str | None = None,
                 stem: str = "report", plot_name: str = "pareto.png") -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and the Pareto plot into ``out_dir``; returns the JSON payload."""
    out_dir = Path(out_dir)
    gaps = oracle_gaps(rows, main_agent) if main_agent else {}
    payload = {**meta, "rows": list(rows), "oracle_gap": {f"{b:g}ms": g for b, g in gaps.items()}}
    atomic_write_json(out_dir / f"{stem}.json", payload)
    lines = [f"# {meta.get('title', 'Evaluation')}", ""]
    for key in ("env", "agent", "budget", "split", "samples", "checkpoint", "train_seconds", "total_seconds", "backend"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", markdown_table(rows), ""]
    for budget, gap in gaps.items():
        lines.append(f"Gap of {main_agent} to oracle at {budget:g}ms: reward {gap['reward']:.3f}, "
                     f"score {gap['score']:.3f}, score in budget {gap['score_in_budget']:.3f}.")
    lines.append("")
    lines.append(f"![score vs latency]({plot_name})")
    atomic_write_text(out_dir / f"{stem}.md", "\n".join(lines) + "\n")
    pareto_plot(rows, out_dir / plot_name, meta.get("title", "score vs latency"))
    return payload
