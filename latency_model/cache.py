"""One estimator per (backend identity, device): cached on disk, profiled and fitted once when missing.

Cache directory, first match wins: the ``cache_dir`` argument, the ``KNOBGYM_CACHE`` environment
variable (estimators go to ``$KNOBGYM_CACHE/latency``), ``~/.cache/knobgym/latency``. Each entry
is ``<backend>-<key>.estimator`` plus the profile it was fitted on, ``<backend>-<key>.csv``, where
``key`` hashes the backend identity and the device fingerprint keys latency depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from latency_model.estimator import LatencyEstimator, fit_estimator
from latency_model.profile import (FINGERPRINT_KEYS_THAT_MATTER, ProfileSettings, backend_device, device_fingerprint,
                                   profile_backend, read_profile)

CACHE_ENV_VAR = "KNOBGYM_CACHE"


def default_cache_dir() -> Path:
    """``$KNOBGYM_CACHE/latency`` if the variable is set, else ``~/.cache/knobgym/latency``."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root).expanduser() / "latency"
    return Path.home() / ".cache" / "knobgym" / "latency"


def cache_key(identity: dict, fingerprint: dict) -> str:
    """Short hash of the backend identity and the latency-relevant device fingerprint."""
    relevant = {k: fingerprint.get(k) for k in FINGERPRINT_KEYS_THAT_MATTER}
    text = json.dumps({"backend": identity, "device": relevant}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_paths(backend, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(estimator_path, profile_csv_path)`` of ``backend`` on this device."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = backend.identity()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(identity.get("backend", type(backend).__name__)))[:40]
    stem = f"{name}-{cache_key(identity, device_fingerprint(backend_device(backend)))}"
    return directory / f"{stem}.estimator", directory / f"{stem}.csv"


def get_estimator(backend, cache_dir: str | os.PathLike | None = None, *, profile_if_missing: bool = True,
                  settings: ProfileSettings | None = None, method: str = "analytic_gbt",
                  progress: bool = True) -> LatencyEstimator:
    """The estimator of ``backend`` on this device: from the cache, or profiled and fitted once.

    Args:
        backend: any :class:`~backends.base.Backend`.
        cache_dir: cache directory (default: :func:`default_cache_dir`).
        profile_if_missing: profile and fit when nothing is cached (else raise ``FileNotFoundError``).
        settings: profiling settings used on a miss (default :class:`ProfileSettings`).
        method: estimator method used on a miss.
        progress: show a progress bar while profiling.
    """
    estimator_path, profile_path = cache_paths(backend, cache_dir)
    expected = {"expect_fingerprint": device_fingerprint(backend_device(backend)),
                "expect_identity": backend.identity()}
    if estimator_path.exists():
        return LatencyEstimator.load(estimator_path, **expected)
    if not profile_if_missing:
        raise FileNotFoundError(f"no latency estimator cached for backend {backend.identity().get('backend')!r} on "
                                f"this device at {str(estimator_path)!r}; run `python -m latency_model fit "
                                f"backend=...` or pass profile_if_missing=True")
    if profile_path.exists():
        profile = read_profile(profile_path)
    else:
        profile = profile_backend(backend, settings or ProfileSettings(), profile_path, progress=progress)
    estimator = fit_estimator(profile, method, source=str(profile_path))
    estimator.save(estimator_path)
    return estimator


def describe(estimator: LatencyEstimator) -> dict[str, Any]:
    """A short JSON-able description of an estimator (for logs and ``versions.json``)."""
    return {"method": estimator.method, "package_version": estimator.package_version,
            "fingerprint": estimator.fingerprint, "identity": estimator.identity, "info": estimator.info}
