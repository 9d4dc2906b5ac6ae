"""The per-token latency (TPOT) estimator of KV-cache policies: profiled once per device, cached.

The model (milliseconds per decoded token)::

    tpot_ms = base_ms + per_slot_ms * attended_tokens + per_prune_ms * [the step pruned the cache]

``attended_tokens`` is the cache length the step attends to (its own token included). Same rails as
the vision estimator (:mod:`latency_model.cache`): :func:`get_tpot_estimator` returns the cached
estimator of (model, device), profiling and fitting it once when missing, so an estimated-mode KV
episode gets the same latencies in every process on the device.

Profile: single-token forwards timed at a few cache lengths under the full cache (slope and
intercept) and with a prune on every step (prune overhead), ``steps`` forwards per point and
round, ``repeats`` rounds in a fresh random order each (so a burst of load from other processes
hits different points in different rounds); each point keeps the median of its round medians.
Noise (the vision profile's definition): a point's spread is ``(slowest - fastest) / median`` of
its round medians, the profile's noise the median spread over points, in %. Points noisier than
``max_noise_pct`` are re-measured (up to ``remeasure`` more rounds); if the profile is still
noisier than ``max_noise_pct`` the estimator is
used in this process but NOT cached (a warning says so), so a profile taken on a loaded machine
is not kept for good. ``force=True`` re-profiles. The noise is stored with the estimator.

Timing runs under :func:`backends.kv.stream.intra_op_threads` with ``threads`` torch threads (the
streamer's default, one), and the device fingerprint records that thread count.

Files (in :func:`latency_model.cache.default_cache_dir`): ``tpot-<Model>-<key>.json`` (the
estimator) and ``tpot-<Model>-<key>.profile.json`` (the timings it was fitted on), checksummed JSON
written atomically (:mod:`backends.io`); ``key`` hashes the model identity (architecture, dtype,
device; not the weights, which latency does not depend on) and the latency-relevant fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.checks import check_int, is_int
from backends.io import CorruptFileError, read_checksummed_json, write_checksummed_json
from backends.kv.cache import DEFAULT_STORAGE, KVPolicyCache, num_decoder_layers
from backends.kv.decode_step import check_decode_step, decode_step_for, resolve_decode_step
from backends.kv.policies import FullCache, SinkWindow
from backends.kv.stream import check_threads, intra_op_threads
from latency_model.cache import cache_key, default_cache_dir
from latency_model import speed
from latency_model.profile import device_fingerprint

TPOT_FORMAT = "knobgym-tpot-estimator/1"
TPOT_PROFILE_FORMAT = "knobgym-tpot-profile/1"
SCHEDULES = ("full", "prune")


class TpotNoiseWarning(UserWarning):
    """A TPOT profile too noisy to cache (the machine was busy while it was taken)."""


@dataclass(frozen=True)
class TpotSettings:
    """How the TPOT profile is taken.

    Args:
        lengths: cache lengths timed (at least two, increasing, >= 2).
        steps: timed forwards per point and round (the round keeps their median).
        repeats: rounds over all points.
        max_noise_pct: largest profile noise (spread between rounds, %) that is cached.
        remeasure: extra rounds at most for the points noisier than ``max_noise_pct``.
        threads: torch intra-op threads while timing (``None``: the process setting).
        seed: seed of the random tokens fed and of the round order.
        decode_step: the one-token step timed (:mod:`backends.kv.decode_step`; ``"auto"``, the
            streams' default: the fused step where the model's family has one); part of the cache key.
    """

    lengths: tuple = (32, 128, 256, 512)
    steps: int = 12
    repeats: int = 5
    max_noise_pct: float = 50.0
    remeasure: int = 3
    threads: int | None = 1
    seed: int = 0
    decode_step: str = "auto"

    def __post_init__(self) -> None:
        check_decode_step(self.decode_step)
        lengths = tuple(self.lengths)
        object.__setattr__(self, "lengths", lengths)
        if (len(lengths) < 2 or any(not is_int(n) for n in lengths)
                or lengths[0] < 2 or any(b <= a for a, b in zip(lengths, lengths[1:]))):
            raise ValueError(f"lengths={lengths!r} is invalid; accepted: at least two increasing integers >= 2")
        for name, low in (("steps", 1), ("repeats", 1), ("remeasure", 0), ("seed", 0)):
            value = getattr(self, name)
            check_int(name, value, low)
        bound = self.max_noise_pct
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
            raise ValueError(f"max_noise_pct={bound!r} is invalid; accepted: a number > 0 (percent)")
        check_threads(self.threads)


@dataclass(frozen=True)
class TpotEstimator:
    """Per-token latency (ms) of a KV policy's decoding steps on one device (see module docstring).

    Attributes:
        base_ms, per_slot_ms, per_prune_ms: the coefficients (finite, >= 0).
        fingerprint: the device it was profiled on (:func:`latency_model.profile.device_fingerprint`).
        identity: the model it was profiled for (:func:`model_identity`).
        noise_pct: the profile's measured noise (spread between rounds, %; 0 = given by hand).
        info: profiling facts (settings, points).
    """

    base_ms: float
    per_slot_ms: float
    per_prune_ms: float
    fingerprint: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)
    noise_pct: float = 0.0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("base_ms", "per_slot_ms", "per_prune_ms", "noise_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TpotEstimator.{name}={value!r} is invalid; accepted: a finite number >= 0")
        for name in ("fingerprint", "identity", "info"):  # as JSON holds them, so a loaded copy compares equal
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name), sort_keys=True, default=str)))

    def predict(self, configs, token_counts) -> np.ndarray:
        """Milliseconds (float64, one per step) for per-step prune flags (0/1) and attended cache lengths.

        The interface every latency estimator shares (:class:`latency_model.protocol.LatencyPredictor`)
        in KV terms: ``configs`` is what the policy decided at each step (a prune or not),
        ``token_counts`` how many tokens the step attends to. Vectorised; each element is computed
        alone, so a step's figure does not depend on the batch it is in.
        """
        pruned = np.asarray(configs, dtype=np.float64)
        attended = np.asarray(token_counts, dtype=np.float64)
        if pruned.shape != attended.shape:
            raise ValueError(f"prunes has shape {pruned.shape} and attended_tokens {attended.shape}; accepted: "
                             "one prune flag per attended length")
        return self.base_ms + self.per_slot_ms * attended + self.per_prune_ms * pruned

    @property
    def coefficients(self) -> dict:
        return {"base_ms": self.base_ms, "per_slot_ms": self.per_slot_ms, "per_prune_ms": self.per_prune_ms}

    def describe(self) -> str:
        """One line for warnings and reports: coefficients and the profile's noise."""
        return (f"TPOT = {self.base_ms:.3f} ms + {self.per_slot_ms * 1e3:.3f} us/slot + {self.per_prune_ms:.3f} ms/prune "
                f"(profile noise {self.noise_pct:.1f}%)")

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the estimator as checksummed JSON, atomically."""
        return write_checksummed_json(path, {"format": TPOT_FORMAT, **asdict(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TpotEstimator":
        """Read an estimator file; :class:`~backends.io.CorruptFileError` naming it if it is not a valid one."""
        payload = read_checksummed_json(path)
        if not isinstance(payload, dict) or payload.get("format") != TPOT_FORMAT:
            raise CorruptFileError(path, f"not a TPOT estimator (format {TPOT_FORMAT!r} expected)")
        try:
            return cls(**{k: v for k, v in payload.items() if k != "format"})
        except (TypeError, ValueError) as exc:
            raise CorruptFileError(path, f"bad TPOT estimator fields ({exc})") from None


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------
def model_identity(model) -> dict:
    """What TPOT depends on besides the device: architecture (config), dtype, device, parameter count."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")}
    text = json.dumps(config, sort_keys=True, default=str)
    parameter = next(model.parameters())
    return {"model": type(model).__name__, "config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "dtype": str(parameter.dtype), "device": str(parameter.device),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


@torch.inference_mode()
def _time_point(model, forward, schedule: str, length: int, steps: int, vocab: int,
                generator: torch.Generator) -> float:
    """Median ms of ``steps`` one-token ``forward`` calls at cache length ``length`` under ``schedule``."""
    # SinkWindow(0, length - 1) with compress_every=1 prunes on every step at cache length `length`.
    policy = FullCache() if schedule == "full" else SinkWindow(0, window=length - 1)
    cache = KVPolicyCache(policy, num_decoder_layers(model))
    device = next(model.parameters()).device
    model(torch.randint(0, vocab, (1, length), generator=generator).to(device), past_key_values=cache, use_cache=True)
    times = []
    for _ in range(steps):
        token = torch.randint(0, vocab, (1, 1), generator=generator).to(device)
        start = time.perf_counter()
        forward(token, past_key_values=cache, use_cache=True)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _spread(rounds: list[float]) -> float:
    values = np.asarray(rounds, dtype=np.float64)
    return float(100.0 * (values.max() - values.min()) / np.median(values)) if len(values) > 1 else 0.0


def profile_tpot(model, settings: TpotSettings = TpotSettings()) -> dict:
    """Time ``model`` on this device (see module docstring); returns the profile (JSON-able dict)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    points = [(schedule, n) for schedule in SCHEDULES for n in settings.lengths]
    forward = decode_step_for(model, settings.decode_step)
    rounds: dict[tuple, list[float]] = {p: [] for p in points}
    with intra_op_threads(settings.threads):
        fingerprint = device_fingerprint(next(model.parameters()).device)
        _time_point(model, forward, "full", settings.lengths[0], settings.steps, vocab, generator)  # warm-up
        for _ in range(settings.repeats):
            for i in rng.permutation(len(points)):
                rounds[points[i]].append(_time_point(model, forward, *points[i], settings.steps, vocab, generator))
        remeasured = 0
        for _ in range(settings.remeasure):
            noisy = [p for p in points if _spread(rounds[p]) > settings.max_noise_pct]
            if not noisy:
                break
            remeasured += len(noisy)
            for i in rng.permutation(len(noisy)):
                rounds[noisy[i]].append(_time_point(model, forward, *noisy[i], settings.steps, vocab, generator))
    rows = [{"schedule": s, "length": n, "rounds_ms": rounds[s, n], "median_ms": float(np.median(rounds[s, n])),
             "spread_pct": _spread(rounds[s, n])} for s, n in points]
    return {"format": TPOT_PROFILE_FORMAT, "settings": asdict(settings), "fingerprint": fingerprint,
            "identity": model_identity(model), "rows": rows, "remeasured_points": remeasured,
            "noise_pct": float(np.median([r["spread_pct"] for r in rows]))}


def fit_tpot(profile: dict) -> TpotEstimator:
    """Fit :class:`TpotEstimator` to a :func:`profile_tpot` profile (deterministic in the profile)."""
    rows = profile["rows"]
    steps = profile["settings"]["steps"]
    full = sorted((r["length"], r["median_ms"]) for r in rows if r["schedule"] == "full")
    pruned = dict((r["length"], r["median_ms"]) for r in rows if r["schedule"] == "prune")
    # Full cache after a prefill of n: the timed steps attend n+1 .. n+steps tokens.
    attended = np.array([n + (steps + 1) / 2 for n, _ in full])
    times = np.array([ms for _, ms in full])
    slope, intercept = np.polyfit(attended, times, 1)
    slope, intercept = max(float(slope), 0.0), max(float(intercept), 0.0)
    # Prune-every-step at cache length n: every step attends n tokens and prunes one.
    overhead = [pruned[n] - (intercept + slope * n) for n, _ in full if n in pruned]
    return TpotEstimator(base_ms=intercept, per_slot_ms=slope, per_prune_ms=max(float(np.median(overhead)), 0.0),
                         fingerprint=dict(profile["fingerprint"]), identity=dict(profile["identity"]),
                         noise_pct=float(profile["noise_pct"]),
                         info={"settings": profile["settings"], "points": len(rows),
                               "remeasured_points": profile.get("remeasured_points", 0)})


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
def tpot_cache_paths(model, cache_dir: str | os.PathLike | None = None,
                     threads: int | None = 1, decode_step: str = "auto") -> tuple[Path, Path]:
    """``(estimator_path, profile_path)`` of ``model`` on this device when timed with ``threads`` threads
    and ``decode_step``."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = model_identity(model)
    with intra_op_threads(threads):
        fingerprint = device_fingerprint(next(model.parameters()).device)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity["model"])[:40]
    # The storage the profile decodes with is part of the key: a profile of the seed's torch.cat
    # cache (before slots became the default) must not be read as one of the slots.
    # So is the decode step it times (a profile of the model's forward is not one of the fused step).
    key = {**identity, "kv_storage": DEFAULT_STORAGE, "decode_step": resolve_decode_step(model, decode_step)}
    stem = f"tpot-{name}-{cache_key(key, fingerprint)}"
    return directory / f"{stem}.json", directory / f"{stem}.profile.json"


def get_tpot_estimator(model, cache_dir: str | os.PathLike | None = None, *,
                       settings: TpotSettings | None = None, force: bool = False,
                       profile_if_missing: bool = True) -> TpotEstimator:
    """The TPOT estimator of ``model`` on this device: from the cache, or profiled, fitted and cached once.

    Args:
        model: a loaded causal LM.
        cache_dir: cache directory (default: :func:`latency_model.cache.default_cache_dir`).
        settings: profiling settings used on a miss (default :class:`TpotSettings`); their
            ``threads`` is part of the cache key.
        force: re-profile even when an estimator is cached.
        profile_if_missing: profile on a miss (else ``FileNotFoundError``).

    A cached file that is corrupt is reported (warning naming it) and replaced by a new profile.
    A profile noisier than ``settings.max_noise_pct`` is used but not cached (:class:`TpotNoiseWarning`).
    """
    settings = settings or TpotSettings()
    estimator_path, profile_path = tpot_cache_paths(model, cache_dir, settings.threads, settings.decode_step)
    if estimator_path.exists() and not force:
        try:
            estimator = TpotEstimator.load(estimator_path)
        except CorruptFileError as error:
            warnings.warn(f"{error}; re-profiling TPOT", TpotNoiseWarning, stacklevel=2)
        else:
            speed.warn_if_shifted(estimator.fingerprint.get("speed_probe"), f"TPOT of {estimator_path.name}",
                                  f"rm {estimator_path} and rerun", TpotNoiseWarning)
            return estimator
    if not profile_if_missing:
        raise FileNotFoundError(f"no TPOT estimator cached for {model_identity(model)['model']} on this device at "
                                f"{str(estimator_path)!r}; accepted: profile_if_missing=True")
    profile, probe = speed.probed(lambda: profile_tpot(model, settings))
    profile["fingerprint"] = {**profile["fingerprint"], "speed_probe": probe}  # how fast the machine was
    estimator = fit_tpot(profile)
    if speed.moved_during(probe):
        warnings.warn(f"TPOT profile not cached: the machine's speed moved while it was measured "
                      f"({speed.describe(probe)}; other jobs started or stopped?); using it in this process only",
                      TpotNoiseWarning, stacklevel=2)
        return estimator
    if profile["noise_pct"] > settings.max_noise_pct:
        warnings.warn(f"TPOT profile noise {profile['noise_pct']:.1f}% exceeds the bound "
                      f"{settings.max_noise_pct:g}% after re-measuring {profile['remeasured_points']} noisy "
                      f"point(s) (is the machine busy?): using it in this process only, not caching it; "
                      f"{estimator.describe()}", TpotNoiseWarning, stacklevel=2)
        return estimator
    write_checksummed_json(profile_path, profile)
    estimator.save(estimator_path)
    return estimator


def describe_tpot(estimator: TpotEstimator) -> dict[str, Any]:
    """A short JSON-able description (for logs, infos and run reports)."""
    return {**estimator.coefficients, "noise_pct": estimator.noise_pct, "fingerprint": estimator.fingerprint,
            "identity": estimator.identity}
