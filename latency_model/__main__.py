"""usage: python -m latency_model {profile,fit,report} [key=value ...]
       python -m latency_model --help

Profile a backend's latency on this device, fit the latency estimator envs use, and report its
held-out accuracy. Estimators are cached per (checkpoint content, device) under
$KNOBGYM_CACHE/latency (default ~/.cache/knobgym/latency) and reused by train.py / evaluate.py.

commands:
  profile   time the backend on this device (always measures anew), then refit and cache the
            estimator on the new profile; with csv=PATH only write the profile CSV there.
            A profile whose repeat noise stays above max_noise_pct is not cached (exit code 1).
  fit       fit the estimator on the cached profile (profiling first if there is none, or when
            force=true) and save it to the cache, or to out=PATH; csv=PATH out=PATH fits on that
            CSV instead (no backend is loaded).
  report    validate the estimator (the cached one, or estimator=PATH) and the profile it was
            fitted on, then print every method's held-out accuracy, the starred method chosen by
            the stated selection rule, and the FLOPs-only baseline; json=PATH also writes it.

options (key=value, as in train.py):
  backend=NAME           backend name (default tiny); backend.KEY=VALUE passes options to it
  force=true             profile again (and refit) even if the cache holds a valid entry
  cache_dir=PATH         estimator cache directory
  csv=PATH               profile CSV to write (profile) or read (fit, report: then no backend is loaded)
  out=PATH               estimator file written by fit
  estimator=PATH         estimator file report validates (default: the backend's cached one)
  method=NAME            auto (default: the selection rule), analytic_gbt, gbt, analytic or flops_linear
  json=PATH              report: also write the report as JSON
  threads=N              torch CPU threads while profiling (recorded in the device fingerprint; default: the
                         backend's, backends.threads.DEFAULT_TORCH_THREADS = 1, as gym.make and train.py)
  points=240 repeats=9 warmup=6 samples=30 split=validation holdout_fraction=0.2 clock=wall seed=0
                         how much to profile (clock: wall, cpu or outcome)
  holdout_repeats=N      timed runs per held-out point, the report's ground truth (default 3 x repeats)
  max_noise_pct=40       bound on a profile's repeat noise, (slowest - fastest repeat) / median, in %
  remeasure_rounds=2     times a profile above the bound is taken again as a whole (the quietest kept)

examples:
  python -m latency_model report backend=tiny
  python -m latency_model profile backend=tiny force=true
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from backends.io import atomic_write_text
from latency_model.cache import cache_entry, cache_paths
from latency_model.estimator import AUTO, METHODS, EstimatorFileError, LatencyEstimator, fit_estimator
from latency_model.profile import ProfileSettings, profile_backend, read_profile
from latency_model import speed
from latency_model.report import held_out_report

COMMANDS = ("profile", "fit", "report")
HELP = ("-h", "--help", "help")
SETTING_KEYS = tuple(f.name for f in fields(ProfileSettings))
PATH_KEYS = ("cache_dir", "csv", "out", "json", "estimator", "backend")
KEYS = ("backend", "cache_dir", "csv", "out", "estimator", "method", "threads", "force", "json") + SETTING_KEYS


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


def split_key_values(args: list[str], keys: tuple[str, ...], verbatim: tuple[str, ...], defaults: dict,
                     command: str) -> tuple[dict, dict]:
    """``(options, backend_options)`` of ``key=value`` arguments of a module command line (``python
    -m latency_model``, ``python -m backends.trace record``): ``backend.KEY=VALUE`` goes to the
    backend's options; ``verbatim`` keys (paths, names) stay strings, others are parsed as JSON
    values; an unknown key is a ``ValueError`` naming it and ``command --help``."""
    options: dict[str, Any] = dict(defaults)
    backend_options: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"override {arg!r} is invalid; accepted: key=value with key in {', '.join(keys)} "
                             f"or backend.KEY ({command} --help)")
        if key.startswith("backend."):
            backend_options[key[len("backend."):]] = _value(value)
        elif key in keys:
            options[key] = value if key in verbatim else _value(value)
        else:
            raise ValueError(f"unknown override {key!r}; accepted: {', '.join(keys)} or backend.KEY ({command} --help)")
    return options, backend_options


def parse_overrides(args: list[str]) -> tuple[dict, dict]:
    """``(options, backend_options)`` from ``key=value`` strings; unknown keys are an error."""
    options, backend_options = split_key_values(args, KEYS, PATH_KEYS, {"backend": "tiny"}, "python -m latency_model")
    if "method" in options and options["method"] not in (AUTO, *METHODS):
        raise ValueError(f"method={options['method']!r} is invalid; accepted: {AUTO}, {', '.join(METHODS)}")
    if not isinstance(options.get("force", False), bool):
        raise ValueError(f"force={options['force']!r} is invalid; accepted: true or false")
    return options, backend_options


def _load_backend(options: dict, backend_options: dict):
    from backends.registry import load_backend, with_threads
    from backends.threads import check_num_threads

    threads = options.get("threads")
    if threads is not None:
        check_num_threads(threads, name="threads")
    # the backend applies the thread count (default: backends.threads.DEFAULT_TORCH_THREADS, as gym.make and train.py)
    return load_backend(with_threads({"name": options["backend"], **backend_options}, threads))


def _settings(options: dict) -> ProfileSettings:
    return ProfileSettings(**{k: options[k] for k in SETTING_KEYS if k in options})


def _entry(options: dict, backend_options: dict, *, force: bool):
    """The backend, its cached (estimator, profile) and cache paths; measured again when ``force`` or
    when the cached profile was taken with other settings than the ones given."""
    backend = _load_backend(options, backend_options)
    estimator_path, profile_path = cache_paths(backend, options.get("cache_dir"))
    asked = {k: options[k] for k in SETTING_KEYS if k in options}
    if not force and asked and profile_path.exists():
        try:
            cached = read_profile(profile_path).settings
        except ValueError:
            cached = None  # cache_entry says why and profiles again
        if cached is not None and any(cached.get(k) != v for k, v in asked.items()):
            print(f"cached profile {profile_path} was measured with other settings than {asked}; profiling again",
                  flush=True)
            force = True
    estimator, profile = cache_entry(backend, options.get("cache_dir"), settings=_settings(options),
                                     method=options.get("method", AUTO), force=force)
    return backend, estimator, profile, estimator_path, profile_path


def _noise_line(noise) -> str:
    return f"noise: {noise.describe()}" if noise is not None else "noise: not recorded"


def _profile(options: dict, backend_options: dict) -> int:
    if options.get("csv"):
        backend = _load_backend(options, backend_options)
        profile = profile_backend(backend, _settings(options), options["csv"])
        print(f"wrote {len(profile)} measurements ({int(profile.holdout.sum())} held out) to {options['csv']}")
        print(_noise_line(profile.noise))
        if profile.noise.exceeds:
            print("warning: this profile is noisy; the estimator cache would not accept it (max_noise_pct=)",
                  file=sys.stderr)
        return 0
    _, estimator, profile, estimator_path, profile_path = _entry(options, backend_options, force=True)
    print(_noise_line(profile.noise))
    if profile.noise.exceeds:
        print(f"profile NOT cached: its noise exceeds the bound; the cache keeps its previous entry, if any. "
              f"Re-profile on a quiet machine, or raise max_noise_pct=", file=sys.stderr)
        return 1
    if profile.sha256 is None:  # never written: the speed moved while profiling (warned above)
        print(f"profile NOT cached: the machine's speed moved while it was measured; the cache keeps its previous "
              f"entry, if any. Re-profile on a quiet machine, or raise {speed.BOUND_ENV_VAR}= (now "
              f"{speed.shift_bound():g})", file=sys.stderr)
        return 1
    print(f"wrote {len(profile)} measurements ({int(profile.holdout.sum())} held out) to {profile_path}")
    print(f"refitted the estimator ({estimator.method}) on it: {estimator_path}")
    return 0


def _fit(options: dict, backend_options: dict) -> int:
    method = options.get("method", AUTO)
    if options.get("csv"):
        path = Path(options["csv"])
        profile = read_profile(path)
        if not options.get("out"):
            raise ValueError("fit with csv= needs out=PATH (the cache entry belongs to a backend); accepted: "
                             "csv=PROFILE out=ESTIMATOR, or backend=NAME without csv=")
        estimator = fit_estimator(profile, method, source=str(path))
        out = estimator.save(options["out"])
    else:
        backend, estimator, profile, estimator_path, profile_path = _entry(options, backend_options,
                                                                           force=bool(options.get("force")))
        if profile is None:
            raise ValueError(f"the cached estimator {str(estimator_path)!r} has no profile beside it; accepted: "
                             f"`python -m latency_model profile backend=... force=true`")
        path = profile_path
        if method != AUTO and estimator.method != method:
            estimator = fit_estimator(profile, method, source=str(profile_path))
        out = estimator.save(options.get("out") or estimator_path)
    print(f"fitted {estimator.method} ({estimator.selection.get('rule')}) on {len(profile)} measurements from "
          f"{path}; saved to {out}")
    print(_noise_line(estimator.noise))
    return 0


def _report(options: dict, backend_options: dict) -> int:
    estimator_file = options.get("estimator")
    status = 0
    if options.get("csv"):
        path = Path(options["csv"])
        profile = read_profile(path)
        estimator = LatencyEstimator.load(estimator_file) if estimator_file else None
    else:
        backend = _load_backend(options, backend_options)
        cached_path, path = cache_paths(backend, options.get("cache_dir"))
        if estimator_file or (cached_path.exists() and not options.get("force")):
            # Validate before anything can refit it: a corrupt estimator is an error, not "all is well".
            try:
                LatencyEstimator.load(estimator_file or cached_path)
            except EstimatorFileError as exc:
                raise EstimatorFileError(exc.path, f"{str(exc).split(': ', 1)[-1]}; refit it with `python -m "
                                                   f"latency_model fit backend={options['backend']} force=true`") from None
        _, estimator, profile, cached_path, path = _entry(options, backend_options, force=bool(options.get("force")))
        if estimator_file:
            estimator = LatencyEstimator.load(estimator_file)
        if profile is None:
            raise ValueError(f"the cached estimator {str(cached_path)!r} has no profile beside it; accepted: "
                             f"`python -m latency_model profile backend=... force=true`")
    print(f"profile: {path} ({len(profile)} rows, sha256 {str(profile.sha256)[:12]}); {_noise_line(profile.noise)}")
    probe = profile.device.get("speed_probe")
    now_ms = speed.speed_probe_ms() if probe else None
    print(speed.describe(probe, now_ms))
    shift = speed.shift_warning(probe, now_ms, str(profile.backend.get("backend"))) if probe else None
    if shift:
        print(f"warning: {shift}", file=sys.stderr)
    if estimator is None:
        print("estimator: none checked (estimator=PATH validates one against this profile)")
    elif estimator.profile_sha256 != profile.sha256:
        print(f"estimator: {estimator_file} is STALE: fitted on profile sha256 {str(estimator.profile_sha256)[:12]}, "
              f"not on this one; refit with `python -m latency_model fit ...`")
        status = 1
    else:
        print(f"estimator: valid, {estimator.method} fitted on this profile ({estimator.profile_rows} rows; "
              f"method chosen by: {estimator.selection.get('rule')})")
    report = held_out_report(profile)
    chosen = options.get("method") if options.get("method", AUTO) != AUTO else None
    print(report.format(chosen))
    if options.get("json"):
        atomic_write_text(Path(options["json"]), json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HELP:
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        raise ValueError(f"command {got!r} is invalid; accepted: {', '.join(COMMANDS)} "
                         f"(python -m latency_model --help)")
    command, (options, backend_options) = argv[0], parse_overrides(argv[1:])
    return {"profile": _profile, "fit": _fit, "report": _report}[command](options, backend_options)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
