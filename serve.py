"""Serve a trained controller: answer a requests file with an SLO report, or behind an HTTP endpoint.

    python serve.py run=runs/MultiKnob-v0/grpo/<timestamp> requests=data/held_out.jsonl budget=60ms
    python serve.py run=runs/MultiKnob-v0/grpo/<timestamp> http.port=8000          # POST /answer, GET /health

Options (``key=value``):
  run=<run folder>          the run written by train.py (required)
  checkpoint=best|latest    which checkpoint of the run (default best)
  requests=<file.jsonl>     a requests file (datasets format: image relative to the file, question,
                            optional answer / answers, type, id, budget)
  budget=<budget>           the requests' budget (default: the run's), e.g. 60ms, 0.06s
  out=<folder>              where answers.jsonl and the report go (default <run>/serve-<file>-<budget>)
  latency.profile=<file>    another device's latency estimator (JSON from latency_model): serve and
                            report as that device (default: this device's cached estimator)
  guard=truncate|expected|every|off
                            the budget guard (serving/guard.py; default truncate): a choice the
                            estimator predicts over the budget (with the expected answer length;
                            every: with every length up to the generation cap) is replaced by the
                            dearest one within it, the run's calibrated static when none is;
                            truncate also cuts the answer where the budget ends; off: unguarded
  http.port=<port>          serve over HTTP on this port instead of a requests file (0: any free port)
  http.host=<host>          the address to listen on (default 127.0.0.1)
  torch_threads=<n>         torch intra-op threads (default 1)

A requests file gets ``answers.jsonl`` (one line per request: answer, knobs, budget, predicted /
estimated / measured latency, score when the file has answers), ``static_answers.jsonl`` (the
same for the static configuration the run calibrated at that budget) and ``report.md`` /
``report.json``: the share within budget, p50 / p95 latency and mean score of both, side by side.
Bad options, a bad run folder or a bad requests file: one line, exit status 2, before any model loads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

OPTIONS = ("run", "checkpoint", "requests", "budget", "out", "latency.profile", "guard", "http.port", "http.host",
           "torch_threads")
GUARDS = ("truncate", "expected", "every", "off")


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments checked (no model is loaded): a ``UsageError`` names the bad one."""
    from knobgym_cli.errors import UsageError
    from serving.controller import CHECKPOINTS, parse_request_budget

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        sys.exit(0)
    opts: dict = {"checkpoint": "best", "http.host": "127.0.0.1", "torch_threads": "1", "guard": "truncate"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise UsageError(f"unknown option {arg!r}; accepted: {', '.join(k + '=...' for k in OPTIONS)}")
        opts[key] = value
    if "run" not in opts:
        raise UsageError("run= is missing; accepted: run=<run folder written by train.py>")
    run = Path(opts["run"])
    if opts["checkpoint"] not in CHECKPOINTS:
        raise UsageError(f"checkpoint={opts['checkpoint']!r} is invalid; accepted: {', '.join(CHECKPOINTS)}")
    if not (run / "checkpoints" / f"{opts['checkpoint']}.safetensors").is_file():
        raise UsageError(f"run={str(run)!r} has no checkpoints/{opts['checkpoint']}.safetensors; accepted: a run "
                         f"folder written by train.py (runs/<env>/<agent>/<timestamp>)")
    if ("requests" in opts) == ("http.port" in opts):
        raise UsageError("give exactly one of requests=<file.jsonl> (answer a file, with an SLO report) and "
                         "http.port=<port> (serve over HTTP)")
    if "budget" in opts:
        parse_request_budget(opts["budget"])
    if opts["guard"] not in GUARDS:
        raise UsageError(f"guard={opts['guard']!r} is invalid; accepted: {', '.join(GUARDS)}")
    for key, low, high in (("http.port", 0, 65535), ("torch_threads", 1, 1024)):
        if key in opts:
            raw = opts[key]
            opts[key] = int(raw) if raw.strip().lstrip("-").isdigit() else None
            if opts[key] is None or not low <= opts[key] <= high:
                raise UsageError(f"{key}={raw} is invalid; accepted: an integer in {low}..{high}")
    if "latency.profile" in opts:
        from latency_model import LatencyEstimator

        opts["latency.profile"] = LatencyEstimator.load(opts["latency.profile"])  # EstimatorFileError: a ValueError
    if "requests" in opts:
        from serving.requests import read_requests

        opts["requests_file"] = Path(opts["requests"])
        opts["requests"] = read_requests(opts["requests_file"], needs_image=False)  # the model's need: checked below
    return opts


def out_dir(opts: dict, budget_ms: float) -> Path:
    if opts.get("out"):
        return Path(opts["out"])
    return Path(opts["run"]) / f"serve-{opts['requests_file'].stem}-{budget_ms:g}ms"


def answer_file(controller, static, requests, opts: dict) -> Path:
    """Answer every request with the controller and the calibrated static (alternating which goes
    first, so machine noise falls on both alike); write the answers and the report."""
    from backends.io import atomic_write_json, atomic_write_text
    from knobgym_cli.logs import say
    from knobgym_cli.progress import cli_progress
    from serving.report import markdown_report, slo_summary

    answers, static_answers = [], []
    bar = cli_progress(len(requests), "answering the requests (controller and calibrated static)", "request")
    for i, request in enumerate(requests):
        first, second = (controller, static) if i % 2 == 0 else (static, controller)
        one, two = first.answer(request), second.answer(request)
        answers.append(one if first is controller else two)
        static_answers.append(two if first is controller else one)
        bar.update(1)
    bar.close()
    rows = {f"{controller.agent.name} (the run's controller)": slo_summary(answers),
            "static (calibrated by the run)": slo_summary(static_answers)}
    budgets = sorted({a.budget_ms for a in answers})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = [*opts["notes"],
             f"run {opts['run']} ({controller.source.get('checkpoint')}, agent {controller.agent.name}, update "
             f"{controller.source.get('step')}); budget(s) {', '.join(f'{b:g}ms' for b in budgets)}",
             "within budget (measured): the wall clock of the whole request (policy and model) <= the budget; "
             "within budget (estimated): the latency estimator's prediction with the run's actual token counts "
             "(what the env charges) <= the budget; within budget (predicted): the estimator before the run, "
             "with the expected answer length",
             f"budget guard: {opts['guard']} (serving/guard.py): kept = the policy's choice predicted within "
             f"budget, replaced = the dearest configuration predicted within budget served instead, fallback = "
             f"none predicted within budget, the calibrated static's configuration served"
             + ("; truncate: every guarded answer is cut at the longest length the budget affords" if opts["guard"]
                == "truncate" else "") + "; the static is served unguarded",
             f"requests answered one at a time, controller and static alternating; load average {load:.1f} "
             f"when the report was written ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})"]
    target = out_dir(opts, controller.budget_ms)
    if target.is_symlink():
        raise ValueError(f"out={str(target)!r} is a symbolic link; accepted: a folder (nothing is written "
                         f"through a link)")
    target.mkdir(parents=True, exist_ok=True)
    for name, items in (("answers.jsonl", answers), ("static_answers.jsonl", static_answers)):
        atomic_write_text(target / name, "".join(json.dumps(a.as_dict(), default=str) + "\n" for a in items))
    title = f"SLO report: {opts['requests_file'].name} served by {controller.source.get('run')}"
    report = markdown_report(title, rows, notes)
    atomic_write_text(target / "report.md", report)
    atomic_write_json(target / "report.json", {"title": title, "rows": rows, "notes": notes,
                                               "source": controller.source, "budgets_ms": budgets})
    print(report)
    say(f"wrote {target / 'answers.jsonl'}, {target / 'static_answers.jsonl'}, {target / 'report.md'}, "
        f"{target / 'report.json'}")
    return target


def main(argv: list[str] | None = None) -> None:
    from knobgym_cli.errors import fail
    from knobgym_cli.guard import one_line_errors
    from knobgym_cli.logs import say, setup_cli_logging

    setup_cli_logging(None)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
    except ValueError as exc:
        fail(str(exc))
    with one_line_errors():
        import torch

        from knobgym_cli.progress import phase
        from serving.controller import Controller, calibrated_static, parse_request_budget

        torch.set_num_threads(opts["torch_threads"])
        Controller.check_run(opts["run"], opts["checkpoint"])  # a bad run folder: one line, before the phase line
        with phase("loading the controller (the policy, the model and the latency estimator)"):
            controller = Controller.from_run(opts["run"], opts["checkpoint"], estimator=opts.get("latency.profile"),
                                             budget=opts.get("budget"),
                                             guard=None if opts["guard"] == "off" else opts["guard"])
        lo, hi = controller.achievable_range_ms
        say(f"achievable latency on this device: {lo:.1f}ms..{hi:.1f}ms; default budget {controller.budget_ms:g}ms")
        if "requests" not in opts:
            from serving.http import serve

            def ready(port: int) -> None:
                say(f"serving {controller.agent.name} of {opts['run']} on http://{opts['http.host']}:{port} "
                    f"(POST /answer, GET /health); Ctrl-C stops")

            serve(controller, opts["http.host"], opts["http.port"], on_ready=ready)
            return
        requests = opts["requests"]
        if controller.env.space.has_vision:
            missing = [r.id for r in requests if r.image is None]
            if missing:
                raise ValueError(f"requests={str(opts['requests_file'])!r}: request(s) {missing[:5]} have no image; "
                                 f"accepted: an image on every line (this model has a vision tower)")
        budgets = {controller.budget_ms if r.budget is None else parse_request_budget(r.budget) for r in requests}
        with phase("loading the static configuration the run calibrated"):
            static, opts["notes"] = calibrated_static(controller, opts["run"], budgets)
        if controller.guard is not None:  # the guard falls back on the very static the report compares with
            controller.guard.fallback = static.agent
        answer_file(controller, static, requests, opts)


if __name__ == "__main__":
    main()
