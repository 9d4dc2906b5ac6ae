"""Agents: GRPO versus every baseline at three budgets on MultiKnob-v0 (tiny backend, test split).

Budgets are placed relative to this machine's latencies (a fixed number of milliseconds means
different things on different CPUs): the budget the env's warning suggests for the README's
``budget=120ms`` when that does not bind (``suggested_budget_ms``: the full configuration misses
it on a typical input, the cheapest fits about 95%), and halfway from it to each end of the
achievable range. Trains GRPO with the README's train command at the suggested budget (or
reuses ``--run``), then evaluates the frozen checkpoint and the baselines with ``evaluate.py``
at the three budgets and prints score, violation rate, p50/p95 latency and the gap to the oracle.

    python bench/agents.py [--run runs/MultiKnob-v0/grpo/<ts>] [--num-samples 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym

import envs  # noqa: F401
from backends.script_args import OneLineArgumentParser, at_least


def latency_references() -> tuple[float, float, float]:
    """The achievable range and the suggested (binding) budget of MultiKnob-v0 on this machine."""
    import torch

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("MultiKnob-v0").unwrapped
    lo, hi = env.achievable_range_ms
    return lo, hi, env.suggested_budget_ms


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return done.stdout + done.stderr


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a train.py run folder to evaluate (default: train one)")
    parser.add_argument("--num-samples", type=at_least(1), default=64)
    parser.add_argument("--runs-dir", default="runs/bench")
    args = parser.parse_args()

    lo, hi, suggested = latency_references()
    budgets = [f"{b:.1f}ms" for b in (0.5 * (lo + suggested), suggested, 0.5 * (suggested + hi))]
    print(f"achievable range on this machine: {lo:.1f}..{hi:.1f} ms; suggested budget {suggested:.1f} ms; "
          f"budgets: {budgets}")
    run_dir = args.run
    if run_dir is None:
        out = run([sys.executable, "train.py", "env=MultiKnob-v0", f"budget={budgets[1]}",
                   f"runs_dir={args.runs_dir}", f"eval.num_samples={args.num_samples}"])
        run_dir = next(line.split("run folder:", 1)[1].strip() for line in out.splitlines() if "run folder:" in line)
    out_dir = Path(run_dir) / "bench-eval"
    run([sys.executable, "evaluate.py", f"run={run_dir}", f"budgets=[{','.join(budgets)}]",
         f"num_samples={args.num_samples}", f"out={out_dir}"])
    report = json.loads((out_dir / "report.json").read_text())
    print(f"\nrun: {run_dir}   test samples per budget: {args.num_samples}")
    print(f"{'budget':>9} {'agent':>8} {'score':>6} {'in-budget':>9} {'viol%':>6} {'p50 ms':>7} {'p95 ms':>7}")
    for row in sorted(report["rows"], key=lambda r: (r["budget_ms"], -r["reward"])):
        print(f"{row['budget_ms']:>7.1f}ms {row['agent']:>8} {row['score']:6.3f} {row['score_in_budget']:9.3f} "
              f"{100 * row['violation_rate']:6.1f} {row['latency_p50_ms']:7.1f} {row['latency_p95_ms']:7.1f}")
    for budget, gap in report.get("oracle_gap", {}).items():
        print(f"oracle gap at {budget}: score {gap['score']:+.3f}, reward {gap['reward']:+.3f}")


if __name__ == "__main__":
    main()
