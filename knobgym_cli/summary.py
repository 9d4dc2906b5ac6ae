"""What a run says when it ends: the verdict in one line, where its files are, what to run next.

Also the report's account of the chosen checkpoint (:func:`checkpoint_record`), the history of
reports a resumed run keeps (:func:`archive_previous_report`) and the relative paths reports hold
(:func:`portable`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.io import refuse_symlink
from knobgym_cli.budgets import binding
from knobgym_cli.logs import to_log_file_only
from knobgym_cli.margin import margins

CHECKOUT = Path(__file__).resolve().parent.parent
REPORT_FILES = ("report.md", "report.json", "pareto.png")
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")


def display_path(path: str | Path, base: str | Path | None = None) -> str:
    """``path`` relative to ``base`` (default: the working directory) when it lies below it, else absolute."""
    path = Path(path).resolve()
    base = Path(base if base is not None else os.getcwd()).resolve()
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)


def portable(obj: Any, base: str | Path | None = None) -> Any:
    """A copy of a JSON-like ``obj`` whose absolute paths are written relative to ``base`` (default:
    the working directory) when below it, else relative to the knobgym checkout when below that
    (e.g. ``backends/tiny/checkpoint``), so a report reads the same in every clone."""
    base = Path(base if base is not None else os.getcwd()).resolve()
    if isinstance(obj, dict):
        return {k: portable(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, base) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        shown = display_path(obj, base)
        return display_path(obj, CHECKOUT) if os.path.isabs(shown) else shown
    return obj


# ------------------------------------------------------------------------------------------------
# the chosen checkpoint
# ------------------------------------------------------------------------------------------------
def checkpoint_record(best: dict, latest: dict, agent: str, validation: dict,
                      path: str = "checkpoints/best.safetensors") -> dict:
    """The report's ``checkpoint`` entry: which file, which update, its validation score, and why.

    Args:
        best, latest: the metadata of the reported checkpoint (``checkpoints/best.safetensors``,
            or the fallback the run reported when it was damaged) and of ``checkpoints/latest``.
        agent: the trained agent's name.
        validation: ``split``, ``samples``, ``budgets_ms`` and ``every`` of the validation that chose.
        path: the reported checkpoint, relative to the run folder.
    """
    step, last_step = int(best.get("step", 0)), int(latest.get("step", 0))
    reward = best.get("best_validation_reward")
    if reward is None or not np.isfinite(reward):
        return {"path": path, "update": step, "of_updates": last_step,
                "why": f"{agent} is fitted once, with no training updates to choose between: "
                       f"best and latest hold the same agent"}
    reward = float(reward)
    budgets = ", ".join(f"{b:g}ms" for b in validation["budgets_ms"])
    return {"path": path, "update": step, "of_updates": last_step,
            "validation_reward": round(reward, 4), "validation_split": validation["split"],
            "validation_samples": int(validation["samples"]), "validation_budgets_ms": list(validation["budgets_ms"]),
            "why": f"the highest mean validation reward of the validations (every {validation['every']} updates "
                   f"and at the end, on {validation['samples']} {validation['split']} samples at {budgets}); "
                   f"latest is update {last_step}"}


def checkpoint_line(record: dict) -> str:
    """One Markdown-free line for the report and the terminal."""
    if "validation_reward" not in record:
        return f"{record['path']}: {record['why']}"
    return (f"{record['path']} (update {record['update']} of {record['of_updates']}, validation reward "
            f"{record['validation_reward']:.3f} on {record['validation_samples']} samples): {record['why']}")


# ------------------------------------------------------------------------------------------------
# report history
# ------------------------------------------------------------------------------------------------
def archive_previous_report(run_dir: str | Path) -> Path | None:
    """Move an earlier ``report.md`` / ``report.json`` / ``pareto.png`` of ``run_dir`` into
    ``reports/<when it was written>/`` before a resumed run writes its own; returns that folder.

    Nothing is ever overwritten: a name already taken gets ``-1``, ``-2``...
    """
    run_dir = Path(run_dir)
    present = [name for name in REPORT_FILES if os.path.lexists(run_dir / name)]
    if not present:
        return None
    stamp = report_stamp(run_dir / "report.json")
    if stamp is None:  # no readable report.json, or its finished_at is not a timestamp: the file's time
        mtime = (run_dir / present[0]).lstat().st_mtime
        stamp = _dt.datetime.fromtimestamp(mtime).strftime(STAMP_FORMAT)
    reports = refuse_symlink(run_dir / "reports")
    target, n = reports / stamp, 0
    while target.exists() or target.is_symlink():
        n += 1
        target = reports / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for name in present:
        os.rename(run_dir / name, target / name)  # within the folder: a rename, never a copy through a link
    return target


def previous_report_problem(run_dir: str | Path) -> str | None:
    """Why the ``report.json`` a resumed run will archive is not a valid report (``None`` when it is,
    or there is none): said at the start of a resume, not found at its end."""
    from knobgym_cli.report import read_report

    path = Path(run_dir) / "report.json"
    if not os.path.lexists(path):
        return None
    try:
        read_report(path)
    except ValueError as exc:
        return f"{exc}; it will be kept as it is under reports/ (named by its modification time) when this run ends"
    return None


def report_stamp(path: Path) -> str | None:
    """The ``finished_at`` of a ``report.json`` when it is a timestamp of :data:`STAMP_FORMAT` (a field
    read from a file never becomes a path component otherwise); ``None`` when there is none."""
    try:
        stamp = json.loads(path.read_text()).get("finished_at")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(stamp, str) or not STAMP.fullmatch(stamp):
        return None
    return stamp


def now_stamp() -> str:
    return _dt.datetime.now().strftime(STAMP_FORMAT)


# ------------------------------------------------------------------------------------------------
# the verdict
# ------------------------------------------------------------------------------------------------
def verdict_lines(rows: Sequence[dict], main_agent: str, train_budget: Any, achievable: tuple[float, float],
                  suggested_ms: float, split: str = "test") -> list[str]:
    """The run's outcome in one line per evaluation budget (or one line when the budget does not bind).

    A training budget above the full configuration's latency leaves nothing to learn; one below
    the cheapest configuration's leaves nothing to win; both say which budget to rerun with.
    Otherwise :func:`margin_lines`.
    """
    state = binding(train_budget, achievable)
    lo, hi = achievable
    rerun = f"rerun with budget={suggested_ms:.0f}ms (or budget=auto)"
    if state == "never binds":
        return [f"budget {train_budget} never binds here (the full configuration takes at most {hi:.1f}ms on this "
                f"device): nothing to learn; {rerun}"]
    if state == "unreachable":
        return [f"budget {train_budget} is below the cheapest configuration here ({lo:.1f}ms on this device): "
                f"every agent violates it; {rerun}"]
    return margin_lines(margins(rows, main_agent), split)


def margin_lines(by_budget: dict[float, dict], split: str = "test") -> list[str]:
    """One line per budget of :func:`knobgym_cli.margin.margins`: the trained agent's score within
    budget against the best baseline's, the margin with its 95% paired bootstrap interval and the
    word it supports (the oracle, which sees the outcome it is scored on, is shown as the ceiling,
    not as a baseline); on a tie, what the trained agent's p50 latency is at that score against the
    baseline's."""
    lines = []
    for budget, m in by_budget.items():
        text = f"{m['agent']} {m['score_in_budget']:.3f}"
        if "baseline" in m:
            low, high = m["ci95"]
            text += (f" {m['verdict']} best baseline {m['baseline']} {m['baseline_score_in_budget']:.3f} by "
                     f"{m['margin']:+.3f} [95% CI {low:+.3f}, {high:+.3f}]")
        text += f" at {budget:g}ms, {m['violation_rate']:.0%} violations"
        text += "".join(f" ({name} {score:.3f})" for name, score in m["bounds"].items())
        text += f"; score within budget, {m['samples']} {split} samples"
        if m.get("verdict") == "ties":
            mine, theirs = m["latency_p50_ms"], m["baseline_latency_p50_ms"]
            change = f" ({(mine - theirs) / theirs:+.0%})" if theirs > 0 else ""
            text += (f"; at that score its p50 latency is {mine:.3g}ms against {m['baseline']}'s "
                     f"{theirs:.3g}ms{change}")
        lines.append(text)
    return lines


def next_commands(run_dir: str | Path, runs_dir: str | Path, env_id: str, agent: str, state: str,
                  suggested_ms: float, estimator: str | None = None) -> list[str]:
    """What to run next: a rerun at a binding budget (when this one does not bind), evaluation, TensorBoard.

    ``estimator``: the run's ``module:callable`` estimator, which evaluation must be given again on
    its command line (a run folder's config is never imported from).
    """
    run = display_path(run_dir)
    commands = []
    if state != "binds":
        commands.append(f"python train.py env={env_id} agent={agent} budget={suggested_ms:.0f}ms")
    again = f" estimator={estimator}" if estimator and ":" in str(estimator) else ""
    commands += [f"python evaluate.py run={run}{again}          # budgets=auto: across this device's range",
                 f"tensorboard --logdir {display_path(runs_dir)}"]
    return commands


def run_files(run_dir: str | Path) -> list[str]:
    """The run folder's files worth opening, as ``name: what`` lines (paths relative to the working directory)."""
    run_dir = Path(run_dir)
    described = [("report.md", "results table and the chosen checkpoint"), ("report.json", "the same, for scripts"),
                 ("pareto.png", "score vs latency, a panel per budget"), ("train.log", "this output"),
                 ("checkpoints/best.safetensors", "the chosen policy"), ("reports", "earlier reports of this run")]
    return [f"{display_path(run_dir / name)}: {what}" for name, what in described if (run_dir / name).exists()]


def print_summary(verdict: Sequence[str], files: Sequence[str], commands: Sequence[str], checkpoint: str | None = None,
                  stream=None) -> str:
    """Print the closing summary (stdout by default) and append it to the run log; returns its text."""
    lines = ["", "== summary =="]
    lines += [f"verdict: {v}" for v in verdict]
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    lines.append("files:")
    lines += [f"  {f}" for f in files]
    lines.append("next:")
    lines += [f"  {c}" for c in commands]
    text = "\n".join(lines)
    print(text, file=stream or sys.stdout, flush=True)
    for line in lines[1:]:
        to_log_file_only(line)
    return text
