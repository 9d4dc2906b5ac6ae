"""How much per-input control can gain on a backend: static vs per-question-type vs oracle.

    python bench/headroom.py [--env MultiKnob-v0] [--backend tiny] [--checkpoint DIR] [--samples 150]
                             [--budgets auto | 60ms,80ms,...] [--estimator module:callable]

For each evaluation budget (``auto``: the low, middle and high end of the env's suggested budget
range, ``suggested_budget_range_ms``), every configuration of the env's search space is scored on
the first ``--samples`` validation and test samples by *score within budget* (the sample's score,
0 when the configuration's latency exceeds the budget; latency from the env's latency source, the
estimator by default), then:

- ``static``: the one configuration with the best mean on validation, scored on test (what the
  ``static`` baseline does);
- ``per-type``: per question type, the configuration with the best mean on that type's validation
  samples, scored on test: a controller that reads only the question type from its observation;
- ``oracle``: per test sample, the best configuration on that very sample (an upper bound);
- ``best static on test``: the static configuration chosen on test itself (no selection noise).

Prints, per budget, the four scores and the gains ``per-type - static`` and ``oracle - static``
(points of score within budget), and the configuration each question type gets. Works on any
backend whose env is a :class:`envs.protocols.GroupEnv`; a backend without question types gets
per-type = static.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from agents.base import EnvLayout, score_in_budget  # noqa: E402
from agents.baselines import search_space  # noqa: E402
from envs.budget import Budget  # noqa: E402
from backends.script_args import OneLineArgumentParser, at_least


def score_matrix(layout: EnvLayout, actions: np.ndarray, split: str, n: int, budgets: list[float]) -> dict:
    """``{budget: [samples, actions] score within budget}`` on the first ``n`` samples of ``split``."""
    out = {b: [] for b in budgets}
    for sid in range(min(n, layout.num_samples(split))):
        for b in budgets:  # outcomes are memoised by the env: later budgets cost no model runs
            _, infos = layout.evaluate(sid, b, actions, split)
            out[b].append([score_in_budget(i) for i in infos])
    return {b: np.asarray(rows) for b, rows in out.items()}


def question_types(env, split: str, n: int) -> np.ndarray:
    backend = getattr(env, "backend", None)
    if backend is None:
        return np.full(n, -1)
    samples = backend.samples(split)
    return np.array([samples[i].question_type for i in range(min(n, len(samples)))])


def headroom(val: np.ndarray, test: np.ndarray, val_types: np.ndarray, test_types: np.ndarray) -> dict:
    """Static, per-type, oracle and best-on-test static scores (means over test) and the choices."""
    static = int(np.argmax(val.mean(axis=0)))
    per_type_score = np.empty(len(test))
    choice = {}
    for t in np.unique(test_types):
        rows = val[val_types == t]
        a = int(np.argmax(rows.mean(axis=0))) if len(rows) else static
        choice[int(t)] = a
        per_type_score[test_types == t] = test[test_types == t, a]
    return {"static": float(test[:, static].mean()), "per_type": float(per_type_score.mean()),
            "oracle": float(test.max(axis=1).mean()), "best_static_on_test": float(test.mean(axis=0).max()),
            "static_action": static, "per_type_actions": choice}


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="MultiKnob-v0")
    p.add_argument("--backend", default="tiny")
    p.add_argument("--checkpoint", default=None, help="the backend's checkpoint (default: its own)")
    p.add_argument("--samples", type=at_least(1), default=150, help="validation and test samples each")
    p.add_argument("--estimator", default=None,
                   help="'module:callable' returning the latency estimator for the backend (default: the cached "
                        "one of this checkpoint and device, profiled when missing)")
    p.add_argument("--budgets", default="auto",
                   help="'auto' (low, middle, high of the suggested range) or comma-separated budgets, e.g. 60ms,80ms")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.exit(2, f"--samples={args.samples} is invalid; accepted: an integer >= 1\n")
    try:
        budgets = None if args.budgets == "auto" else [Budget.parse(b).fixed_ms for b in args.budgets.split(",")]
    except ValueError as exc:
        p.exit(2, f"--budgets={args.budgets!r} is invalid ({exc}); accepted: auto or e.g. 60ms,80ms\n")
    from knobgym_cli.build import make_env
    from envs.protocols import group_env

    backend_cfg = {"name": args.backend, **({"checkpoint": args.checkpoint} if args.checkpoint else {})}
    try:
        env, _ = make_env({"id": args.env}, backend_cfg, "1000000ms", args.estimator, log_warnings=False)
        base = group_env(env)
    except ValueError as exc:
        p.exit(2, f"{exc}\n")
    if budgets is None:
        low, high = env.get_wrapper_attr("suggested_budget_range_ms")
        budgets = Budget(low, high).evaluation_budgets()
    layout = EnvLayout(env)
    actions = search_space(layout)
    val = score_matrix(layout, actions, "validation", args.samples, budgets)
    test = score_matrix(layout, actions, "test", args.samples, budgets)
    val_types, test_types = question_types(base, "validation", args.samples), question_types(base, "test", args.samples)
    names = tuple(getattr(getattr(base, "backend", None), "question_types", ()) or ())
    lo, hi = env.get_wrapper_attr("achievable_range_ms")
    print(f"env {args.env} | backend {args.backend}{' ' + args.checkpoint if args.checkpoint else ''} | "
          f"{len(actions)} configurations | {len(test_types)} validation + {len(test_types)} test samples | "
          f"achievable {lo:.1f}..{hi:.1f} ms | score within budget (0 when over budget)")
    print("| budget | static | per-type | oracle | best static on test | per-type - static | oracle - static |")
    print("|---|---|---|---|---|---|---|")
    results = {b: headroom(val[b], test[b], val_types, test_types) for b in budgets}
    for b, r in results.items():
        print(f"| {b:.1f} ms | {100 * r['static']:.1f} | {100 * r['per_type']:.1f} | {100 * r['oracle']:.1f} | "
              f"{100 * r['best_static_on_test']:.1f} | {100 * (r['per_type'] - r['static']):+.1f} | "
              f"{100 * (r['oracle'] - r['static']):+.1f} |")
    for b, r in results.items():
        knobs = lambda a: str(base.action_to_knobs(base.to_env_action(actions[a], 0))) \
            if hasattr(base, "action_to_knobs") else str(actions[a].tolist())  # noqa: E731
        print(f"\nat {b:.1f} ms: static {knobs(r['static_action'])}")
        per_type = defaultdict(list)
        for t, a in sorted(r["per_type_actions"].items()):
            per_type[a].append(names[t] if 0 <= t < len(names) else str(t))
        for a, types in per_type.items():
            print(f"  {', '.join(types)}: {knobs(a)}")


if __name__ == "__main__":
    main()
