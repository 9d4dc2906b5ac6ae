"""One estimator per (backend checkpoint, device): cached on disk, profiled and fitted once when missing.

Cache directory, first match wins: the ``cache_dir`` argument, the ``KNOBGYM_CACHE`` environment
variable (estimators go to ``$KNOBGYM_CACHE/latency``), ``~/.cache/knobgym/latency``. Each entry
is ``<backend>-<key>.estimator`` plus the profile it was fitted on, ``<backend>-<key>.csv``, where
``key`` hashes :func:`~latency_model.profile.identity_key` of the backend identity (its
``content_revision`` when it has one, never a checkout path: fresh clones share the entry) and
the device fingerprint keys latency depends on.

An entry is used only when it is valid: a corrupt estimator is refitted, a corrupt profile is
measured again, and an estimator whose recorded profile checksum differs from the cached profile
(the profile was re-measured) is refitted; each of these says so on stderr. A noisy profile
(:class:`~latency_model.profile.ProfileNoise`) is never cached: see :func:`get_estimator`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from backends.io import CorruptFileError
from latency_model import speed
from latency_model.estimator import AUTO, EstimatorFileError, LatencyEstimator, fit_estimator
from latency_model.profile import (FINGERPRINT_KEYS_THAT_MATTER, ProfileData, ProfileSettings, notice,
                                   device_fingerprint, identity_key, profile_backend, read_profile, write_profile)

CACHE_ENV_VAR = "KNOBGYM_CACHE"


class NoisyProfileWarning(UserWarning):
    """A latency profile whose repeat noise exceeds its bound: used for this process only, not cached."""


class SpeedShiftWarning(UserWarning):
    """This machine's speed probe is beyond the bound from the one recorded with the latency profile."""


def _warn_if_speed_moved(estimator: LatencyEstimator, backend) -> None:
    """Run the speed probe and warn when it moved beyond the bound since the profile was taken."""
    probe = estimator.fingerprint.get("speed_probe")
    if not probe:
        return
    message = speed.shift_warning(probe, speed.speed_probe_ms(), str(backend.identity().get("backend")))
    if message:
        warnings.warn(message, SpeedShiftWarning, stacklevel=3)


def default_cache_dir() -> Path:
    """``$KNOBGYM_CACHE/latency`` if the variable is set, else ``~/.cache/knobgym/latency``."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root).expanduser() / "latency"
    return Path.home() / ".cache" / "knobgym" / "latency"


def cache_key(identity: dict, fingerprint: dict) -> str:
    """Short hash of the backend's :func:`identity_key` and the latency-relevant device fingerprint."""
    relevant = {k: fingerprint.get(k) for k in FINGERPRINT_KEYS_THAT_MATTER}
    text = json.dumps({"backend": identity_key(identity), "device": relevant}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_paths(backend, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(estimator_path, profile_csv_path)`` of ``backend`` on this device."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = backend.identity()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(identity.get("backend", type(backend).__name__)))[:40]
    stem = f"{name}-{cache_key(identity, device_fingerprint(backend.device))}"
    return directory / f"{stem}.estimator", directory / f"{stem}.csv"


def _cached_profile(path: Path) -> ProfileData | None:
    """The cached profile at ``path`` if it exists and is valid; a corrupt one is reported and ignored."""
    if not path.exists():
        return None
    try:
        return read_profile(path)
    except CorruptFileError as exc:
        notice(f"ignoring the cached latency profile: {exc}; profiling again")
        return None


def get_estimator(backend, cache_dir: str | os.PathLike | None = None, *, profile_if_missing: bool = True,
                  settings: ProfileSettings | None = None, method: str = AUTO, progress: bool = True,
                  force: bool = False) -> LatencyEstimator:
    """The estimator of ``backend`` on this device: from the cache, or profiled and fitted once.

    A cached estimator is returned when it is valid and was fitted on the cached profile (same
    checksum); otherwise it is refitted on the cached profile, or the backend is profiled again
    when the profile is missing or corrupt (each said on stderr).

    A noisy profile (repeat noise above ``settings.max_noise_pct`` in its quietest take) is
    **not cached**: the estimator fitted on it is returned for this process only, with
    ``estimator.noise.exceeds`` true, and a :class:`NoisyProfileWarning` says how to re-profile.
    Later calls in the same process with the same settings reuse it without measuring again (one
    profile per command, however many envs it builds); the next process profiles again, so a
    quiet machine replaces it.

    Args:
        backend: any :class:`~backends.base.Backend`.
        cache_dir: cache directory (default: :func:`default_cache_dir`).
        profile_if_missing: profile and fit when nothing valid is cached (else raise ``FileNotFoundError``).
        settings: profiling settings used when profiling (default :class:`ProfileSettings`).
        method: estimator method (default ``auto``: the selection rule of :func:`~latency_model.estimator.select_method`).
        progress: show profiling progress (a bar on a terminal, periodic lines in a log).
        force: profile and fit again even when the cache holds a valid entry.
    """
    return cache_entry(backend, cache_dir, profile_if_missing=profile_if_missing, settings=settings, method=method,
                       progress=progress, force=force)[0]


#: (estimator path, settings, method) -> (estimator, profile) of profiles not cached on disk (noisy, or
#: the machine's speed moved): used for the rest of the process, so a command that builds several envs
#: of one backend (train.py: the budget=auto probe, the training env, the evaluation envs) profiles
#: once, not once per env. A later process finds nothing on disk and profiles again.
_PROCESS_ONLY: dict[tuple, tuple[LatencyEstimator, ProfileData]] = {}


def cache_entry(backend, cache_dir: str | os.PathLike | None = None, *, profile_if_missing: bool = True,
                settings: ProfileSettings | None = None, method: str = AUTO, progress: bool = True,
                force: bool = False) -> tuple[LatencyEstimator, ProfileData | None]:
    """:func:`get_estimator` and the profile the estimator was fitted on (``None`` when the cache
    holds a valid estimator whose profile file was removed)."""
    estimator_path, profile_path = cache_paths(backend, cache_dir)
    if not force and estimator_path.exists():
        try:
            estimator = LatencyEstimator.load(estimator_path, expect_fingerprint=device_fingerprint(backend.device),
                                              expect_identity=backend.identity())
        except EstimatorFileError as exc:
            notice(f"ignoring the cached latency estimator: {exc}; refitting")
            estimator = None
        if estimator is not None:
            _warn_if_speed_moved(estimator, backend)
            if not profile_path.exists():
                return estimator, None
            profile = _cached_profile(profile_path)
            if profile is not None and profile.sha256 == estimator.profile_sha256:
                return estimator, profile
            if profile is not None:
                notice(f"cached latency estimator {str(estimator_path)!r} was fitted on another profile than "
                     f"{str(profile_path)!r} (re-profiled since); refitting")
    profile = None if force else _cached_profile(profile_path)
    settings = settings or ProfileSettings()
    process_key = (str(estimator_path), settings, method)
    if profile is None and not force and process_key in _PROCESS_ONLY:
        return _PROCESS_ONLY[process_key]  # profiled earlier in this process but not cached: not measured again
    if profile is None:
        if not profile_if_missing:
            raise FileNotFoundError(f"no valid latency estimator cached for backend "
                                    f"{backend.identity().get('backend')!r} on this device at "
                                    f"{str(estimator_path)!r}; run `python -m latency_model profile backend=...` "
                                    f"or pass profile_if_missing=True")
        profile = profile_backend(backend, settings, progress=progress)
        why_not = _why_not_cached(profile, str(backend.identity().get("backend")))
        if why_not is not None:
            warnings.warn(*why_not, stacklevel=2)
            _PROCESS_ONLY[process_key] = fit_estimator(profile, method, source=None), profile
            return _PROCESS_ONLY[process_key]
        write_profile(profile, profile_path)
    estimator = fit_estimator(profile, method, source=str(profile_path))
    estimator.save(estimator_path)
    return estimator, profile


def _why_not_cached(profile: ProfileData, name: str) -> tuple[str, type] | None:
    """``(message, warning class)`` when a fresh profile must not be cached: too noisy, or the
    machine's speed moved while it was measured (the estimator is then for this process only)."""
    rerun = "re-profile on a quiet machine with `python -m latency_model profile backend=... force=true`"
    if profile.noise.exceeds:
        return (f"latency profile of backend {name!r} is too noisy to cache: {profile.noise.describe()} (other jobs "
                f"running?). Its estimator is used for this process only; {rerun}, or accept the noise with "
                f"max_noise_pct=...", NoisyProfileWarning)
    probe = profile.device.get("speed_probe")
    if probe and speed.moved_during(probe):
        return (f"latency profile of backend {name!r} is not cached: the machine's speed moved while it was measured "
                f"({speed.describe(probe)}; other jobs started or stopped?). Its estimator is used for this process "
                f"only; {rerun}", SpeedShiftWarning)
    return None


def describe(estimator: LatencyEstimator) -> dict[str, Any]:
    """A short JSON-able description of an estimator (for logs and ``versions.json``)."""
    return {"method": estimator.method, "package_version": estimator.package_version,
            "fingerprint": estimator.fingerprint, "identity": estimator.identity, "info": estimator.info,
            "profile_sha256": estimator.profile_sha256, "profile_rows": estimator.profile_rows,
            "noise": None if estimator.noise is None else estimator.noise.as_dict(),
            "speed_probe": estimator.fingerprint.get("speed_probe"),
            "selection": {k: v for k, v in estimator.selection.items() if k in ("rule", "chosen")}}
