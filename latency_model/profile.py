"""Profiling a backend on this device: which runs to time, how to time them, and the CSV they go to.

The design covers the knob grid (``knob_space.grid(token_budgets=True)``) and a spread of input
sizes without running the full product: configurations are chosen greedily so every knob level
appears about equally often (a discrete Latin-hypercube-like design), and paired with samples
chosen at evenly spaced prompt lengths. A fraction of the configurations *and* of the samples is
held out as whole units (rows marked ``holdout``): they are paired only with each other, so the
accuracy report can score unseen configurations on unseen inputs.

Timing: a few warm-up runs, then ``repeats`` rounds over all points in a fresh random order each
round (so a burst of load from other processes hits different points in different rounds), and
the median per point; held-out points, the report's ground truth, are timed ``holdout_repeats``
times (default three times as often), spread over the same rounds. Each run is timed around
``backend.run`` with ``time.perf_counter_ns`` on CPU, or CUDA events after a synchronize on GPU,
with Python's garbage collector paused; stage 1 is timed the same way around
``backend.run_stage1`` right after (``stage1_ms``).

Noise: a point's *spread* is (slowest - fastest repeat) / median repeat; the profile's noise is
the median spread over its fitting points (held-out points have more runs, and a spread grows
with them). A profile whose noise exceeds ``max_noise_pct`` is taken again as a whole (at most
``remeasure_rounds`` times, while a take comes out quieter than the best so far) and the
quietest take is kept (re-timing only the noisy points biased them against the rest;
:class:`ProfileNoise`). A profile whose noise still exceeds the bound is *noisy*:
:func:`latency_model.get_estimator` uses it for the current process only and never caches it
(see its docstring).

File: a CSV with ``#`` metadata lines (format, device, backend, knob space, settings, noise,
row count), the rows, and a last line ``# sha256: <digest of every byte before it>``. Reading
checks the checksum and the row count, so a profile cut short (even at a row boundary) or edited
by hand is a :class:`~backends.io.CorruptFileError` naming the file, never silently fitted on.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from backends.checks import check_int
from backends.io import CorruptFileError, atomic_write_bytes, sha256_bytes
from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import TokenCounts
from backends.progress import progress as progress_bar
from backends.threads import configured_threads

PROFILE_FORMAT = "knobgym-latency-profile/2"
CLOCKS = ("wall", "cpu", "outcome")
CHECKSUM_PREFIX = "# sha256: "

CSV_COLUMNS = ("point", "holdout", "tier", "token_budget", "top_k", "depth", "split", "sample_id",
               "prompt_tokens", "vision_tokens_full", "vision_tokens", "new_tokens", "latency_ms",
               "latency_runs_ms", "backend_ms", "stage1_ms")


# --------------------------------------------------------------------------------------------
# Device fingerprint
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_fingerprint(device: Any = None) -> dict[str, Any]:
    """What latency depends on besides the model: CPU model, GPU name, threads, library versions.

    Args:
        device: the backend's device (``torch.device`` or string); the GPU name is recorded for a
            CUDA device, otherwise ``gpu`` is ``None``.
    """
    import torch
    import transformers

    gpu = None
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    # the threads the process's backends were configured with (in a child forked from a multi-threaded
    # parent torch runs on one, but the configuration, and so the cache entry, is the parent's)
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": configured_threads(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


FINGERPRINT_KEYS_THAT_MATTER = ("cpu", "cpu_count", "torch_threads", "gpu", "torch", "transformers")
"""Fingerprint keys whose change invalidates an estimator (``python`` / ``platform`` do not)."""


def _is_path_like(value: Any) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "./", "../")))


def identity_key(identity: dict) -> dict:
    """The part of a backend identity a latency estimator depends on (cache key and mismatch check).

    Path-like values (absolute paths, ``~``, ``./``) are dropped, and so is ``model`` when the
    identity has a ``content_revision`` (a hash of the checkpoint's files): the same checkpoint in
    two clones of the repository, or at two paths, is the same model and shares one estimator.
    """
    content = "content_revision" in identity
    return {k: v for k, v in identity.items() if not _is_path_like(v) and not (content and k == "model")}


# --------------------------------------------------------------------------------------------
# Settings and design
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileSettings:
    """How much to profile.

    Args:
        points: (configuration, sample) pairs timed (default 240).
        repeats: timed runs per point; the median is kept (default 9; BENCHMARKS.md has the
            held-out accuracy that led to this default).
        holdout_repeats: timed runs per held-out point (default ``None``: 3 x ``repeats``). The
            held-out medians are the ground truth the report scores the estimator against, so they
            are measured more precisely than the fitting points (whose noise the fit averages out):
            with 9 runs a median's own jitter on a VM is a few percent, a large share of a +-10%
            tolerance.
        warmup: untimed runs before timing starts (default 6).
        samples: distinct samples used, spread over prompt length (default 30).
        split: data split the samples come from (default ``validation``).
        holdout_fraction: share of configurations and of samples held out for the report (default 0.2).
        clock: ``wall`` (default: wall-clock time of ``backend.run``, CUDA events on GPU), ``cpu``
            (CPU time of this process during ``backend.run``: on a machine shared with other jobs it
            excludes time spent waiting for a core; equals latency only with one torch thread and a
            CPU device) or ``outcome`` (the backend's own ``Outcome.measured_ms``).
        seed: seed of the design and the run order (default 0).
        max_noise_pct: bound on the repeat spread, in % (default 40; BENCHMARKS.md has the profiles
            that set it): a profile whose median spread is above it is taken again, and one that
            stays above it is noisy (never cached).
        remeasure_rounds: at most how many times a noisy profile is taken again as a whole (default 2;
            a take no quieter than the best so far ends the retaking; the quietest take is kept).
    """

    points: int = 240
    repeats: int = 9
    holdout_repeats: int | None = None
    warmup: int = 6
    samples: int = 30
    split: str = "validation"
    holdout_fraction: float = 0.2
    clock: str = "wall"
    seed: int = 0
    max_noise_pct: float = 40.0
    remeasure_rounds: int = 2

    def __post_init__(self) -> None:
        for name, low in (("points", 2), ("repeats", 1), ("warmup", 0), ("samples", 2), ("remeasure_rounds", 0)):
            value = getattr(self, name)
            check_int(name, value, low)
        if self.holdout_repeats is not None:
            check_int("holdout_repeats", self.holdout_repeats, 1)
        if not (isinstance(self.holdout_fraction, (int, float)) and 0 < self.holdout_fraction < 0.5):
            raise ValueError(f"holdout_fraction={self.holdout_fraction!r} is invalid; accepted: 0 < f < 0.5")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock={self.clock!r} is invalid; accepted: {', '.join(CLOCKS)}")
        bound = self.max_noise_pct
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ValueError(f"max_noise_pct={bound!r} is invalid; accepted: a number > 0 (percent)")


@dataclass(frozen=True)
class DesignPoint:
    """One (configuration, sample) pair to time."""

    knobs: KnobConfig
    sample_index: int  # index into the split's samples
    holdout: bool


def _knob_levels(config: KnobConfig) -> tuple:
    return (config.tier, config.token_budget, config.top_k, config.depth)


def balanced_configs(candidates: Sequence[KnobConfig], n: int, rng: np.random.Generator) -> list[KnobConfig]:
    """``n`` configurations from ``candidates`` with every knob level used about equally often.

    Greedy: each pick is an unused candidate whose levels have been used least so far (random
    tie-break); when every candidate is used, the pool refills (repeats only beyond the grid).
    """
    if not candidates:
        raise ValueError("no candidate configurations; accepted: a non-empty knob grid")
    counts: list[dict] = [dict() for _ in range(4)]
    chosen: list[KnobConfig] = []
    pool = list(candidates)
    while len(chosen) < n:
        if not pool:
            pool = list(candidates)
        order = rng.permutation(len(pool))
        best = min(order, key=lambda i: sum(counts[d].get(level, 0) for d, level in enumerate(_knob_levels(pool[i]))))
        pick = pool.pop(int(best))
        for d, level in enumerate(_knob_levels(pick)):
            counts[d][level] = counts[d].get(level, 0) + 1
        chosen.append(pick)
    return chosen


def choose_samples(samples: Sequence, n: int) -> list[int]:
    """Indices of ``n`` samples at evenly spaced question lengths (a spread of prompt sizes)."""
    if not samples:
        raise ValueError("the backend returned no samples; accepted: a split with at least one sample")
    pool = min(len(samples), max(20 * n, 200))
    by_length = sorted(range(pool), key=lambda i: (len(samples[i].question), i))
    n = min(n, pool)
    picks = np.unique(np.round(np.linspace(0, pool - 1, n)).astype(int))
    return [by_length[i] for i in picks]


def design(space: KnobSpace, samples: Sequence, settings: ProfileSettings) -> list[DesignPoint]:
    """The points to time: balanced configurations x samples spread by size, with a held-out block."""
    rng = np.random.default_rng(settings.seed)
    grid = list(space.grid(token_budgets=True))
    sample_ids = choose_samples(samples, settings.samples)
    f = settings.holdout_fraction
    # Held-out samples: every 1/f-th by size, so they span the whole size range.
    step = max(2, round(1 / f))
    held_samples = sample_ids[step // 2::step] if len(sample_ids) >= 2 else []
    fit_samples = [s for s in sample_ids if s not in held_samples] or sample_ids
    held_samples = held_samples or sample_ids[-1:]
    n_held_configs = max(1, round(f * len(grid))) if len(grid) > 1 else 0
    shuffled = [grid[i] for i in rng.permutation(len(grid))]
    held_configs, fit_configs = shuffled[:n_held_configs], shuffled[n_held_configs:] or shuffled
    n_test = max(1, round(f * settings.points)) if held_configs else 0
    points: list[DesignPoint] = []
    for configs, pool, n, holdout in ((fit_configs, fit_samples, settings.points - n_test, False),
                                      (held_configs, held_samples, n_test, True)):
        if n <= 0:
            continue
        picked = balanced_configs(configs, n, rng)
        order = [pool[i] for i in rng.permutation(len(pool))]
        points += [DesignPoint(knobs, order[i % len(order)], holdout) for i, knobs in enumerate(picked)]
    return points


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
class RunTimer:
    """Times one call in milliseconds: CUDA events on a GPU device, ``perf_counter_ns`` otherwise.

    With ``cpu_time=True`` (CPU devices only) it measures this process's CPU time instead
    (``process_time_ns``), which a busy shared machine inflates far less than the wall clock.
    """

    def __init__(self, device: Any = "cpu", cpu_time: bool = False):
        import torch

        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        if cpu_time and self.cuda:
            raise ValueError(f"clock='cpu' is invalid for device {device!r}; accepted on a GPU: clock='wall'")
        if cpu_time and torch.get_num_threads() > 1:
            warnings.warn(f"clock='cpu' with {torch.get_num_threads()} torch threads sums the CPU time of all "
                          f"threads, which exceeds latency; set threads=1 for CPU-time profiles", stacklevel=2)
        self.clock = time.process_time_ns if cpu_time else time.perf_counter_ns
        self._torch = torch

    def time(self, fn, *args) -> tuple[float, Any]:
        """``(milliseconds, result)`` of ``fn(*args)``, with the garbage collector paused."""
        torch = self._torch
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fn(*args)
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end)), result
            t0 = self.clock()
            result = fn(*args)
            return (self.clock() - t0) / 1e6, result
        finally:
            if gc_was_enabled:
                gc.enable()


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------
def run_spread(runs: Sequence[float]) -> float | None:
    """(slowest - fastest) / median of one point's repeats; ``None`` with fewer than two repeats."""
    runs = np.asarray(runs, dtype=np.float64)
    if len(runs) < 2:
        return None
    return float((runs.max() - runs.min()) / np.median(runs))


def spreads_of(runs_per_point: Iterable[Sequence[float]]) -> list[float]:
    """:func:`run_spread` of every point that has one (points run once have none)."""
    return [s for s in map(run_spread, runs_per_point) if s is not None]


def parse_runs(text: str) -> list[float]:
    """The repeats of a profile row's ``latency_runs_ms`` column (``;``-separated milliseconds)."""
    return [float(x) for x in str(text).split(";") if x]


@dataclass(frozen=True)
class ProfileNoise:
    """How noisy a profile's measurements were, and the bound they were held to.

    Attributes:
        spread_pct: median over the fitting points of (slowest - fastest repeat) / median repeat, in %
            (``None`` when each point was run once: the noise is then unknown).
        bound_pct: the bound (``ProfileSettings.max_noise_pct``).
        noisy_points: points whose own spread is still above the bound.
        points: points in the profile.
        remeasured_points: point timings repeated by retaking a noisy profile (points x retakes).
        rounds: retakes of the whole profile that ran.
    """

    spread_pct: float | None
    bound_pct: float
    noisy_points: int = 0
    points: int = 0
    remeasured_points: int = 0
    rounds: int = 0

    @property
    def exceeds(self) -> bool:
        """Whether the profile is noisy: its median spread is above the bound."""
        return self.spread_pct is not None and self.spread_pct > self.bound_pct

    def describe(self) -> str:
        """One line for warnings and reports, e.g. ``repeat noise 7.9% (bound 40%)``."""
        if self.spread_pct is None:
            return f"repeat noise unknown (one run per point; bound {self.bound_pct:g}%)"
        text = f"repeat noise {self.spread_pct:.1f}% (bound {self.bound_pct:g}%)"
        if self.rounds:
            text += f", the quietest of {self.rounds + 1} takes"
        return text + (": NOISY" if self.exceeds else "")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileNoise":
        return cls(spread_pct=None if d.get("spread_pct") is None else float(d["spread_pct"]),
                   bound_pct=float(d["bound_pct"]), noisy_points=int(d.get("noisy_points", 0)),
                   points=int(d.get("points", 0)), remeasured_points=int(d.get("remeasured_points", 0)),
                   rounds=int(d.get("rounds", 0)))

    @classmethod
    def of_rows(cls, rows: Sequence[dict], bound_pct: float, remeasured_points: int = 0,
                rounds: int = 0) -> "ProfileNoise":
        spreads = spreads_of(parse_runs(r["latency_runs_ms"]) for r in rows)
        median = 100.0 * float(np.median(spreads)) if spreads else None
        noisy = sum(100.0 * s > bound_pct for s in spreads)
        return cls(median, float(bound_pct), int(noisy), len(rows), remeasured_points, rounds)


# --------------------------------------------------------------------------------------------
# The profile dataset
# --------------------------------------------------------------------------------------------
@dataclass
class ProfileData:
    """A profile: one row per timed point, plus what it was measured on.

    ``sha256`` is the checksum of the file it was written to or read from (``None`` before it is
    written); an estimator records it to refuse a profile it was not fitted on.
    """

    rows: list[dict]
    device: dict
    backend: dict
    knob_space: KnobSpace
    cost_params: dict
    settings: dict = field(default_factory=dict)
    noise: ProfileNoise | None = None
    sha256: str | None = None

    def configs(self, mask: np.ndarray | None = None) -> list[KnobConfig]:
        rows = self._select(mask)
        return [KnobConfig(tier=r["tier"], token_budget=r["token_budget"], top_k=r["top_k"], depth=r["depth"])
                for r in rows]

    def token_counts(self, mask: np.ndarray | None = None) -> list[TokenCounts]:
        return [TokenCounts(r["prompt_tokens"], r["vision_tokens_full"], r["vision_tokens"], r["new_tokens"])
                for r in self._select(mask)]

    def column(self, name: str, mask: np.ndarray | None = None) -> np.ndarray:
        return np.asarray([r[name] for r in self._select(mask)])

    def _select(self, mask: np.ndarray | None) -> list[dict]:
        return self.rows if mask is None else [r for r, keep in zip(self.rows, mask) if keep]

    @property
    def holdout(self) -> np.ndarray:
        return self.column("holdout").astype(bool)

    def __len__(self) -> int:
        return len(self.rows)


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_profile(data: ProfileData, path: str | os.PathLike) -> Path:
    """Write ``data`` atomically as CSV: ``#`` metadata lines, one row per point, then the checksum line.

    Sets ``data.sha256`` to the file's checksum.
    """
    buf = io.StringIO()
    bound = float(data.settings.get("max_noise_pct", ProfileSettings.max_noise_pct))
    noise = data.noise or ProfileNoise.of_rows(data.rows, bound)
    meta = {"format": PROFILE_FORMAT, "device": data.device, "backend": data.backend,
            "knob_space": data.knob_space.as_dict(), "cost_params": data.cost_params, "settings": data.settings,
            "noise": noise.as_dict(), "rows": len(data.rows)}
    for key, value in meta.items():
        buf.write(f"# {key}: {json.dumps(value, sort_keys=True, default=str)}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in data.rows:
        writer.writerow([_encode(row[c]) for c in CSV_COLUMNS])
    body = buf.getvalue().encode("utf-8")
    digest = sha256_bytes(body)
    path = Path(path)
    atomic_write_bytes(path, body + f"{CHECKSUM_PREFIX}{digest}\n".encode("utf-8"))
    data.sha256, data.noise = digest, noise
    return path


def knob_space_from_dict(d: dict) -> KnobSpace:
    """:meth:`KnobSpace.from_dict` of a knob space read back from a file written with sorted JSON keys:
    the tiers are put back in order of their token counts (cheapest first), as backends build them."""
    tiers = sorted(((str(k), int(v)) for k, v in d["tiers"].items()), key=lambda kv: (kv[1], kv[0]))
    return KnobSpace.from_dict({**d, "tiers": dict(tiers)})


def _decode_row(raw: dict, path: Path, line: int) -> dict:
    def opt_int(s):
        return None if s == "" else int(s)

    try:
        row = {"point": int(raw["point"]), "holdout": raw["holdout"] == "1", "tier": raw["tier"] or None,
               "token_budget": float(raw["token_budget"]), "top_k": opt_int(raw["top_k"]),
               "depth": opt_int(raw["depth"]), "split": raw["split"], "sample_id": int(raw["sample_id"]),
               "prompt_tokens": int(raw["prompt_tokens"]), "vision_tokens_full": int(raw["vision_tokens_full"]),
               "vision_tokens": int(raw["vision_tokens"]), "new_tokens": int(raw["new_tokens"]),
               "latency_ms": float(raw["latency_ms"]), "latency_runs_ms": raw["latency_runs_ms"],
               "backend_ms": float(raw["backend_ms"]), "stage1_ms": float(raw["stage1_ms"])}
        runs = parse_runs(row["latency_runs_ms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(path, f"line {line}: bad row ({exc}); accepted: rows written by write_profile with "
                                     f"columns {', '.join(CSV_COLUMNS)}") from None
    times = [row["latency_ms"], row["backend_ms"], row["stage1_ms"], *runs]
    if not all(math.isfinite(t) for t in times) or row["latency_ms"] <= 0 or not runs:
        raise CorruptFileError(path, f"line {line}: latencies must be finite with latency_ms > 0 and at least one "
                                     f"run (got latency_ms={row['latency_ms']!r}, runs {row['latency_runs_ms']!r})")
    return row


def read_profile(path: str | os.PathLike) -> ProfileData:
    """Read and validate a profile CSV written by :func:`write_profile`.

    Raises:
        CorruptFileError: (a ``ValueError`` naming the file) the file is missing, of another
            format, cut short (the checksum line or rows missing), edited (checksum mismatch), or
            holds a row that is not a finite measurement.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(path, f"cannot read the latency profile ({exc.strerror or exc})") from None
    body, sep, trailer = data.rstrip(b"\n").rpartition(b"\n")
    if not trailer.startswith(CHECKSUM_PREFIX.encode()):
        if not data.startswith(b"# format: "):
            raise CorruptFileError(path, f"not a latency profile; accepted: {PROFILE_FORMAT} written by "
                                         f"`python -m latency_model profile`")
        raise CorruptFileError(path, "latency profile without its checksum line (cut short, or written by an older "
                                     "knobgym); re-profile with `python -m latency_model profile ... force=true`")
    digest = trailer[len(CHECKSUM_PREFIX):].decode("ascii", "replace").strip()
    if sha256_bytes(body + sep) != digest:
        raise CorruptFileError(path, "latency profile checksum mismatch (the file was edited or damaged)")
    try:
        lines = (body + sep).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise CorruptFileError(path, "latency profile is not UTF-8 text") from None
    meta, body_start = {}, 0
    for body_start, line in enumerate(lines):
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise CorruptFileError(path, f"corrupted metadata line {body_start + 1}") from None
    if meta.get("format") != PROFILE_FORMAT:
        raise CorruptFileError(path, f"latency profile format {meta.get('format')!r}; accepted: {PROFILE_FORMAT} "
                                     f"written by `python -m latency_model profile`")
    rows = [_decode_row(raw, path, body_start + i + 2) for i, raw in enumerate(csv.DictReader(lines[body_start:]))]
    if not rows or len(rows) != meta.get("rows"):
        raise CorruptFileError(path, f"latency profile holds {len(rows)} rows but its header says "
                                     f"{meta.get('rows')!r}")
    try:
        return ProfileData(rows=rows, device=meta["device"], backend=meta["backend"],
                           knob_space=knob_space_from_dict(meta["knob_space"]), cost_params=meta["cost_params"],
                           settings=meta.get("settings", {}), noise=ProfileNoise.from_dict(meta["noise"]),
                           sha256=digest)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(path, f"incomplete latency profile metadata ({exc!r})") from None


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------
class _Measurements:
    """The repeats of every point, filled round by round."""

    def __init__(self, n: int):
        self.wall: list[list[float]] = [[] for _ in range(n)]  # this process's clock (wall or CPU time)
        self.reported: list[list[float]] = [[] for _ in range(n)]  # the backend's Outcome.measured_ms
        self.stage1: list[list[float]] = [[] for _ in range(n)]
        self.counts: list[TokenCounts | None] = [None] * n

    def clear(self, i: int) -> None:
        self.wall[i], self.reported[i], self.stage1[i] = [], [], []

    def runs(self, i: int, clock: str) -> list[float]:
        return self.reported[i] if clock == "outcome" else self.wall[i]


def notice(message: str) -> None:
    """A one-line notice on stderr (refits, re-measuring): what happens, not a warning."""
    print(f"latency_model: {message}", file=sys.stderr, flush=True)


def profile_backend(backend, settings: ProfileSettings = ProfileSettings(), path: str | os.PathLike | None = None,
                    *, progress: bool = True) -> ProfileData:
    """Time ``backend.run`` over the design of ``settings``; write the CSV to ``path`` if given.

    Uses the :class:`~backends.base.Backend` protocol only: ``knob_space``, ``samples``, ``run``,
    ``run_stage1``, ``device``, ``cost_params`` and ``identity``. Points whose repeat spread
    exceeds ``settings.max_noise_pct`` are measured again (saying so), at most
    ``settings.remeasure_rounds`` times; the result's ``noise`` tells whether the profile is noisy.
    A noisy profile is still written to an explicit ``path`` (with its noise in the metadata);
    whether to cache it is the caller's decision.
    """
    from latency_model import speed

    probe_before = speed.speed_probe_ms()  # how fast the machine is, before and after (latency_model.speed)
    space = backend.knob_space
    samples = backend.samples(settings.split)
    points = design(space, samples, settings)
    device = backend.device
    timer = RunTimer(device, cpu_time=settings.clock == "cpu")
    rng = np.random.default_rng(settings.seed + 1)

    held_out_runs = settings.holdout_repeats or 3 * settings.repeats
    runs_of = [held_out_runs if p.holdout else settings.repeats for p in points]

    def runs_in_round(i: int, round_: int) -> int:
        # a held-out point's extra runs are spread over the same rounds as everything else, so that
        # both kinds are timed under the same conditions (rounds of held-out points alone ran ~5% slower)
        return runs_of[i] // settings.repeats + (round_ < runs_of[i] % settings.repeats)

    def take(desc: str) -> _Measurements:
        """Every point, ``repeats`` rounds in a fresh random order each."""
        m = _Measurements(len(points))
        with progress_bar(sum(runs_of), desc, unit="run", enabled=progress) as bar:
            for round_ in range(settings.repeats):
                order = [i for i in range(len(points)) for _ in range(runs_in_round(i, round_))]
                for i in rng.permutation(np.asarray(order, dtype=np.int64)):
                    sample, knobs = samples[points[i].sample_index], points[i].knobs
                    ms, outcome = timer.time(backend.run, sample, knobs)
                    m.wall[i].append(ms)
                    m.reported[i].append(float(outcome.measured_ms))
                    if settings.clock == "outcome":
                        m.stage1[i].append(float(outcome.stage1_ms))
                    else:  # stage 1 timed on its own, with the same clock
                        m.stage1[i].append(timer.time(backend.run_stage1, sample, knobs.tier, knobs.token_budget)[0])
                    if m.counts[i] is None:
                        m.counts[i] = outcome.token_counts
                    bar.update()
        return m

    def noise_of(m: _Measurements) -> float:
        # over the fitting points: they all have `repeats` runs (a spread grows with the number of runs)
        spreads = spreads_of(m.runs(i, settings.clock) for i, p in enumerate(points) if not p.holdout)
        return 100.0 * float(np.median(spreads)) if spreads else 0.0

    with progress_bar(settings.warmup, "latency profile warm-up", unit="run",
                      enabled=progress and settings.warmup > 0) as bar:
        # Allocator, lazy initialisation and caches, on configurations spread over the grid.
        for _ in range(settings.warmup):
            point = points[int(rng.integers(len(points)))]
            backend.run(samples[point.sample_index], point.knobs)
            bar.update()
    m = take("profiling latency")
    bound, rounds, noise_pct = settings.max_noise_pct, 0, noise_of(m)
    # A noisy profile is taken again as a whole, never point by point: points re-timed on their own
    # ran under other conditions than the rest (a smaller working set, another moment's load), which
    # biased them by several percent against the points they are compared with (BENCHMARKS.md).
    for round_ in range(1, settings.remeasure_rounds + 1):
        if noise_pct <= bound:
            break
        if progress:
            notice(f"repeat noise {noise_pct:.1f}% is above {bound:g}%: taking the profile again as a whole "
                   f"(round {round_} of {settings.remeasure_rounds}; the quietest take is kept)")
        rounds = round_
        again = take(f"profiling latency again ({round_}/{settings.remeasure_rounds})")
        if noise_of(again) >= noise_pct:  # no quieter: the load persists
            break
        m, noise_pct = again, noise_of(again)
    rows = []
    for i, point in enumerate(points):
        runs = m.runs(i, settings.clock)
        c, k = m.counts[i], point.knobs
        rows.append({"point": i, "holdout": point.holdout, "tier": k.tier, "token_budget": float(k.token_budget),
                     "top_k": k.top_k, "depth": k.depth, "split": settings.split,
                     "sample_id": int(samples[point.sample_index].sample_id), "prompt_tokens": int(c.prompt_tokens),
                     "vision_tokens_full": int(c.vision_tokens_full), "vision_tokens": int(c.vision_tokens),
                     "new_tokens": int(c.new_tokens), "latency_ms": float(np.median(runs)),
                     "latency_runs_ms": ";".join(f"{r:.4f}" for r in runs),
                     "backend_ms": float(np.median(m.reported[i])), "stage1_ms": float(np.median(m.stage1[i]))})
    noise = replace(ProfileNoise.of_rows([r for r in rows if not r["holdout"]], bound, len(points) * rounds, rounds),
                    points=len(rows))
    probe = speed.record(probe_before, speed.speed_probe_ms())
    data = ProfileData(rows=rows, device={**device_fingerprint(device), "speed_probe": probe}, backend=backend.identity(),
                       knob_space=space, cost_params=dict(backend.cost_params()), settings=asdict(settings),
                       noise=noise)
    if path is not None:
        write_profile(data, path)
    return data
