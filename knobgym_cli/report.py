"""Comparing agents on a fixed evaluation set and writing ``report.md``, ``report.json``, ``pareto.png``.

Every report file is written atomically (:mod:`backends.io`); ``report.json`` is plain JSON that
also carries the SHA-256 of the rest of its content under ``sha256`` (:func:`read_report` checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym

from agents import Agent, evaluate_agent, evaluation_only, score_in_budget, summarize
from backends.io import CHECKSUM_KEY, CorruptFileError, atomic_write_text, read_json, sha256_bytes
from knobgym_cli.margin import PER_SAMPLE_KEY, margins

COLUMNS = (("reward", "reward", "{:.3f}"), ("score", "score", "{:.3f}"), ("score_in_budget", "score in budget", "{:.3f}"),
           ("latency_p50_ms", "p50 ms", "{:.1f}"),
           ("latency_p95_ms", "p95 ms", "{:.1f}"), ("violation_rate", "violations", "{:.1%}"))


def compare_agents(env: gym.Env, agents: Mapping[str, Agent], budgets_ms: Sequence[float], sample_ids: Sequence[int],
                   split: str, progress: Callable[..., Any] | None = None) -> list[dict]:
    """Evaluate every agent at every budget on the same samples; one row per (agent, budget): the
    :func:`~agents.summarize` figures plus each sample's score within budget, in ``sample_ids`` order
    (:data:`~knobgym_cli.margin.PER_SAMPLE_KEY`, what the verdict's paired bootstrap pairs).

    Evaluation-only agents (the oracle), when present, run first: the oracle runs every
    configuration of each sample once, and the env memoises those runs, so every other agent's
    episodes are then free of model runs.
    ``progress(total, desc, unit)``, when given, makes a display (``update(n)``, ``close()``) for each
    of the two phases, counting episodes: the oracle's pass, then the other agents.
    """
    first = [name for name in agents if agents[name].evaluation_only]  # upper bounds (the oracle)
    rest = [name for name in agents if name not in first]
    phases = [(f"{', '.join(first)}: every configuration of each sample",
               [(name, b) for b in budgets_ms for name in first]),
              (f"evaluating {len(rest)} agent(s) at {len(budgets_ms)} budget(s)",
               [(name, b) for b in budgets_ms for name in rest])]
    rows = []
    for desc, phase_jobs in phases:
        if not phase_jobs:
            continue
        bar = progress(len(phase_jobs) * len(sample_ids), f"{desc} ({split}, {len(sample_ids)} samples)",
                       "episode") if progress else None
        for name, budget_ms in phase_jobs:
            infos = []
            for sample_id in sample_ids:
                infos += evaluate_agent(env, agents[name], [sample_id], budget_ms, split)["infos"]
                if bar is not None:
                    bar.update(1)
            rows.append({"agent": name, **summarize(infos), "budget_ms": float(budget_ms),
                         PER_SAMPLE_KEY: [score_in_budget(i) for i in infos]})
        if bar is not None:
            bar.close()
    position = {name: i for i, name in enumerate(agents)}
    return sorted(rows, key=lambda r: (r["budget_ms"], position[r["agent"]]))


def oracle_gaps(rows: Sequence[dict], agent: str) -> dict[float, dict]:
    """Per budget, how far ``agent`` is below the oracle in reward and score."""
    gaps = {}
    by_key = {(r["agent"], r["budget_ms"]): r for r in rows}
    bounds = set(evaluation_only())
    for (name, budget), oracle in by_key.items():
        if name not in bounds or (agent, budget) not in by_key:
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


def _report_digest(payload: dict) -> str:
    body = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def write_report_json(path: str | Path, payload: dict) -> Path:
    """``payload`` as pretty JSON plus its own ``sha256``, atomically (values JSON cannot hold as ``str``)."""
    payload = json.loads(json.dumps({k: v for k, v in payload.items() if k != CHECKSUM_KEY}, default=str))
    return atomic_write_text(path, json.dumps({**payload, CHECKSUM_KEY: _report_digest(payload)}, indent=2,
                                              sort_keys=True) + "\n")


def read_report(path: str | Path) -> dict:
    """A ``report.json`` written by :func:`write_report`; :class:`~backends.io.CorruptFileError` naming
    it when it is cut short, edited, or has no checksum."""
    payload = read_json(path)
    if not isinstance(payload, dict) or CHECKSUM_KEY not in payload:
        raise CorruptFileError(path, "no checksum")
    if payload[CHECKSUM_KEY] != _report_digest(payload):
        raise CorruptFileError(path, "checksum mismatch (the file was edited or damaged)")
    return {k: v for k, v in payload.items() if k != CHECKSUM_KEY}


def write_report(out_dir: str | Path, rows: Sequence[dict], meta: dict[str, Any], main_agent: str | None = None,
                 stem: str = "report", plot_name: str = "pareto.png") -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and the plot (:func:`knobgym_cli.plots.budget_panels`)
    into ``out_dir``; returns the JSON payload.

    With ``main_agent``, both files carry its margin over the best baseline per budget
    (:func:`knobgym_cli.margin.margins`: the margin, its 95% paired bootstrap interval, the verdict
    word, the p50 latencies); the rows' per-sample values stay out of the files.
    """
    from knobgym_cli.plots import budget_panels
    from knobgym_cli.summary import checkpoint_line, margin_lines

    out_dir = Path(out_dir)
    gaps = oracle_gaps(rows, main_agent) if main_agent else {}
    by_budget = margins(rows, main_agent) if main_agent else {}
    payload = {**meta, "rows": [{k: v for k, v in r.items() if k != PER_SAMPLE_KEY} for r in rows],
               "oracle_gap": {f"{b:g}ms": g for b, g in gaps.items()},
               "margin": {f"{b:g}ms": m for b, m in by_budget.items()}}
    write_report_json(out_dir / f"{stem}.json", payload)
    lines = [f"# {meta.get('title', 'Evaluation')}", ""]
    for key in ("env", "agent", "budget", "budget_requested", "achievable_range_ms", "suggested_budget_ms", "split",
                "samples", "checkpoint", "train_seconds", "total_seconds", "backend", "previous_reports"):
        if key in meta:
            value = checkpoint_line(meta[key]) if key == "checkpoint" and isinstance(meta[key], dict) else meta[key]
            lines.append(f"- {key}: {value}")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", markdown_table(rows), ""]
    for budget, gap in gaps.items():
        lines.append(f"Gap of {main_agent} to oracle at {budget:g}ms: reward {gap['reward']:.3f}, "
                     f"score {gap['score']:.3f}, score in budget {gap['score_in_budget']:.3f}.")
    if by_budget:
        lines += ["", f"Margin of {main_agent} over the best baseline (95% paired bootstrap interval over the test "
                      f"samples):", ""]
        lines += [f"- {line}" for line in margin_lines(by_budget, meta.get("split", "test"))]
    lines.append("")
    lines.append(f"![score vs latency]({plot_name})")
    atomic_write_text(out_dir / f"{stem}.md", "\n".join(lines) + "\n")
    budget_panels(rows, out_dir / plot_name, meta.get("title", "score vs latency"))
    return payload
