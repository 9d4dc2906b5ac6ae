"""``python -m latency_model profile|fit|report backend=tiny [key=value ...]``.

Commands:
    profile   time the backend on this device and write the profile CSV (``csv=`` or the cache).
    fit       fit the estimator on the profile (profiling first if there is none) and save it
              (``out=`` or the cache entry ``get_estimator`` reads).
    report    held-out accuracy of every method on the profile, FLOPs-only baseline beside the
              estimator (``json=`` also writes it as JSON).

Overrides (``key=value``, as in ``train.py``):
    backend=NAME              backend name (default ``tiny``); ``backend.KEY=VALUE`` passes options to it.
    cache_dir=PATH            estimator cache (default ``$KNOBGYM_CACHE/latency`` or ``~/.cache/knobgym/latency``).
    csv=PATH                  profile CSV to write (profile) or read (fit, report; then no backend is loaded).
    out=PATH                  estimator file written by ``fit``.
    method=NAME               estimator method for ``fit`` (default ``analytic_gbt``).
    threads=N                 torch CPU threads while profiling (recorded in the device fingerprint).
    force=true                re-profile / re-fit even if the cache has an entry.
    points, repeats, warmup, samples, split, holdout_fraction, clock, seed: see ``ProfileSettings``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from latency_model.cache import cache_paths
from latency_model.estimator import METHODS, fit_estimator
from latency_model.profile import ProfileSettings, atomic_write_bytes, profile_backend, read_profile
from latency_model.report import held_out_report

COMMANDS = ("profile", "fit", "report")
SETTING_KEYS = tuple(f.name for f in fields(ProfileSettings))
KEYS = ("backend", "cache_dir", "csv", "out", "method", "threads", "force", "json") + SETTING_KEYS


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(args: list[str]) -> tuple[dict, dict]:
    """``(options, backend_options)`` from ``key=value`` strings; unknown keys are an error."""
    options: dict[str, Any] = {"backend": "tiny"}
    backend_options: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"override {arg!r} is invalid; accepted: key=value with key in {', '.join(KEYS)} "
                             f"or backend.KEY")
        if key.startswith("backend."):
            backend_options[key[len("backend."):]] = _value(value)
        elif key in KEYS:
            options[key] = _value(value) if key not in ("csv", "out", "cache_dir", "json", "backend") else value
        else:
            raise ValueError(f"unknown override {key!r}; accepted: {', '.join(KEYS)} or backend.KEY")
    if "method" in options and options["method"] not in METHODS:
        raise ValueError(f"method={options['method']!r} is invalid; accepted: {', '.join(METHODS)}")
    return options, backend_options


def _load_backend(options: dict, backend_options: dict):
    threads = options.get("threads")
    if threads is not None:
        import torch

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} is invalid; accepted: an integer >= 1")
        torch.set_num_threads(threads)
    from backends.registry import load_backend

    return load_backend(options["backend"], **backend_options)


def _settings(options: dict) -> ProfileSettings:
    return ProfileSettings(**{k: options[k] for k in SETTING_KEYS if k in options})


def _profile(options: dict, backend_options: dict, *, reuse: bool):
    """The profile CSV path and data: read if it exists (and ``reuse``), else measured now."""
    if options.get("csv") and reuse and Path(options["csv"]).exists():
        return Path(options["csv"]), read_profile(options["csv"]), None
    backend = _load_backend(options, backend_options)
    path = Path(options["csv"]) if options.get("csv") else cache_paths(backend, options.get("cache_dir"))[1]
    settings = _settings(options)
    if reuse and path.exists() and not options.get("force"):
        cached = read_profile(path)
        asked = {k: options[k] for k in SETTING_KEYS if k in options}
        if all(cached.settings.get(k) == v for k, v in asked.items()):
            return path, cached, backend
        print(f"cached profile {path} was measured with other settings than {asked}; profiling again", flush=True)
    print(f"profiling {backend.identity().get('backend')} on this device: {settings.points} points x "
          f"{settings.repeats} repeats (+{settings.warmup} warm-up runs)", flush=True)
    return path, profile_backend(backend, settings, path), backend


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        got = argv[0] if argv else "nothing"
        raise SystemExit(f"command {got!r} is invalid; accepted: {', '.join(COMMANDS)}")
    command, (options, backend_options) = argv[0], parse_overrides(argv[1:])
    if command == "profile":
        path, profile, _ = _profile(options, backend_options, reuse=False)
        print(f"wrote {len(profile)} measurements ({int(profile.holdout.sum())} held out) to {path}")
    elif command == "fit":
        path, profile, backend = _profile(options, backend_options, reuse=True)
        method = options.get("method", "analytic_gbt")
        estimator = fit_estimator(profile, method, source=str(path))
        if options.get("out"):
            out = Path(options["out"])
        else:
            backend = backend or _load_backend(options, backend_options)
            out = cache_paths(backend, options.get("cache_dir"))[0]
        estimator.save(out)
        print(f"fitted {method} on {len(profile)} measurements from {path}; saved to {out}")
    else:
        path, profile, _ = _profile(options, backend_options, reuse=True)
        report = held_out_report(profile)
        print(f"profile: {path}")
        print(report.format(options.get("method", "analytic_gbt")))
        if options.get("json"):
            atomic_write_bytes(Path(options["json"]), json.dumps(report.as_dict(), indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
