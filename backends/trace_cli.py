"""usage: python -m backends.trace record backend=NAME [backend.KEY=VALUE ...] [split=test] [key=value ...]
       python -m backends.trace --help

Record a trace: run a backend once over a split and the whole knob grid (every tier x top-k x depth,
plus the token budgets at the highest tier), storing answers, scores, token counts, timings and the
stage-1 summaries with the backend identity and this device's latency estimator. The recording is
resumable (rerun the same command: recorded samples are skipped) and shows its progress (a bar on a
terminal, a line every 30 s in a log). Train and evaluate on it without the model:

    python train.py env=MultiKnob-v0 backend=trace backend.path=<file> budget=auto

options:
  backend=NAME            the backend to record (default tiny); backend.KEY=VALUE passes options to it
  split=test              the split to record (train, validation or test)
  samples=N               record the split's first N samples only (default: all)
  out=PATH                the trace file (default runs/traces/<backend>-<split>.trace); one file may
                          hold several splits (record them one after another)
  estimator=PATH          the latency estimator stored with the trace (default: the backend's cached
                          estimator on this device, profiled once when missing)
  rollout=ray             shard the samples over Ray actors (one model each); rollout.workers=N
                          (default 2), rollout.address=auto (a running cluster, else a local instance)
  threads=N               torch intra-op threads (default: the backend's own setting)

A trace of one split is served by backend=trace as train / validation / test (a seeded 80/10/10
division, conf/backend/trace.yaml); record train, validation and test into one file to keep them.
Bad options: one line, exit status 2, before any model loads.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from backends.base import check_split
from backends.checks import check_int

KEYS = ("backend", "split", "samples", "out", "estimator", "rollout", "rollout.workers", "rollout.address",
        "threads")


def parse_args(argv: list[str]) -> tuple[dict, dict]:
    """``(options, backend_options)`` of ``record`` arguments, checked (no model is loaded)."""
    from latency_model.__main__ import split_key_values  # one key=value parser for the module command lines

    defaults = {"backend": "tiny", "split": "test", "rollout": "local", "rollout.workers": 2, "rollout.address": "auto"}
    options, backend_options = split_key_values(argv, KEYS, ("backend", "out", "estimator", "split", "rollout"),
                                                defaults, "python -m backends.trace")
    check_split(options["split"])
    for key in ("samples", "rollout.workers", "threads"):
        value = options.get(key)
        if value is not None:
            check_int(key, value, 1)
    if options["rollout"] not in ("local", "ray"):
        raise ValueError(f"rollout={options['rollout']!r} is invalid; accepted: local, ray")
    if options["rollout"] == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("rollout=ray needs Ray, which is not installed; install with pip install -e '.[ray]'") \
                from None
    if options.get("estimator") is not None:
        from latency_model import LatencyEstimator

        LatencyEstimator.load(options["estimator"])  # a bad file: EstimatorFileError (a ValueError) naming it
    options.setdefault("out", f"runs/traces/{options['backend']}-{options['split']}.trace")
    return options, backend_options


def record(options: dict, backend_options: dict) -> Path:
    """Record the trace the options describe (resuming what the file already holds); returns its path."""
    from contextlib import nullcontext

    from backends.registry import load_backend
    from backends.trace import record_trace

    if options.get("threads") is not None:
        import torch

        torch.set_num_threads(options["threads"])
    spec = {"name": options["backend"], **backend_options}
    backend = load_backend(spec)
    with tempfile.TemporaryDirectory() as tmp:
        estimator_file = options.get("estimator")
        if estimator_file is None:
            from latency_model import get_estimator

            print("latency estimator: the cached one of this backend on this device (profiled once when missing)",
                  file=sys.stderr, flush=True)
            estimator_file = get_estimator(backend).save(Path(tmp) / "estimator.json")
        sample_ids = None if options.get("samples") is None else range(
            min(options["samples"], len(backend.samples(options["split"]))))
        executor, session = None, nullcontext()
        if options["rollout"] == "ray":
            from executors.ray import RayExecutor, ray_session

            session = ray_session(options["rollout.address"], options["rollout.workers"])
            executor = RayExecutor(options["rollout.workers"], threads=options.get("threads") or 1)
        with session:
            path = record_trace(spec if executor is not None else backend, options["out"], split=options["split"],
                                sample_ids=sample_ids, estimator_file=estimator_file, executor=executor)
    print(f"wrote {path} (split {options['split']}); train on it with: python train.py env=MultiKnob-v0 "
          f"backend=trace backend.path={path} budget=auto")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    if argv[0] != "record":
        print(f"error: unknown command {argv[0]!r}; accepted: record (python -m backends.trace --help)",
              file=sys.stderr)
        sys.exit(2)
    try:
        options, backend_options = parse_args(argv[1:])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        record(options, backend_options)
    except ValueError as exc:  # a backend option, a trace recorded with another backend, ...
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (rerun the same command to resume)", file=sys.stderr)
        sys.exit(130)
