"""Profiling a backend on this device: which runs to time, how to time them, and the CSV they go to.

The design covers the knob grid (``knob_space.grid(token_budgets=True)``) and a spread of input
sizes without running the full product: configurations are chosen greedily so every knob level
appears about equally often (a discrete Latin-hypercube-like design), and paired with samples
chosen at evenly spaced prompt lengths. A fraction of the configurations *and* of the samples is
held out as whole units (rows marked ``holdout``): they are paired only with each other, so the
accuracy report can score unseen configurations on unseen inputs.

Timing: a few warm-up runs, then ``repeats`` rounds over all points in a fresh random order each
round (so a burst of load from other processes hits different points in different rounds), and
the median per point. Each run is timed around ``backend.run`` with ``time.perf_counter_ns`` on
CPU, or CUDA events after a synchronize on GPU, with Python's garbage collector paused; stage 1
is timed the same way around ``backend.run_stage1`` right after (``stage1_ms``).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import inspect
import io
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import TokenCounts

PROFILE_FORMAT = "knobgym-latency-profile/1"
CLOCKS = ("wall", "cpu", "outcome")

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
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


FINGERPRINT_KEYS_THAT_MATTER = ("cpu", "cpu_count", "torch_threads", "gpu", "torch", "transformers")
"""Fingerprint keys whose change invalidates an estimator (``python`` / ``platform`` do not)."""


def backend_device(backend) -> Any:
    """The device a backend runs on (its ``device`` attribute, else ``identity()['device']``, else cpu)."""
    device = getattr(backend, "device", None)
    if device is None:
        device = backend.identity().get("device", "cpu")
    return device


# --------------------------------------------------------------------------------------------
# Settings and design
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileSettings:
    """How much to profile.

    Args:
        points: (configuration, sample) pairs timed (default 240).
        repeats: timed runs per point; the median is kept (default 9: on the CI kind of VM one
            run's time spreads 10-35% from other tenants' load, and held-out accuracy within
            +-10% of the measured median was 60-88% with 3 or 5 repeats and 100% with 9; the
            tiny backend's profile then takes about 2 minutes on 2 cores).
        warmup: untimed runs before timing starts (default 6).
        samples: distinct samples used, spread over prompt length (default 30).
        split: data split the samples come from (default ``validation``).
        holdout_fraction: share of configurations and of samples held out for the report (default 0.2).
        clock: ``wall`` (default: wall-clock time of ``backend.run``, CUDA events on GPU), ``cpu``
            (CPU time of this process during ``backend.run``: on a machine shared with other jobs it
            excludes time spent waiting for a core; equals latency only with one torch thread and a
            CPU device) or ``outcome`` (the backend's own ``Outcome.measured_ms``).
        seed: seed of the design and the run order (default 0).
    """

    points: int = 240
    repeats: int = 9
    warmup: int = 6
    samples: int = 30
    split: str = "validation"
    holdout_fraction: float = 0.2
    clock: str = "wall"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("points", 2), ("repeats", 1), ("warmup", 0), ("samples", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= {low}")
        if not (isinstance(self.holdout_fraction, (int, float)) and 0 < self.holdout_fraction < 0.5):
            raise ValueError(f"holdout_fraction={self.holdout_fraction!r} is invalid; accepted: 0 < f < 0.5")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock={self.clock!r} is invalid; accepted: {', '.join(CLOCKS)}")


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
# The profile dataset
# --------------------------------------------------------------------------------------------
@dataclass
class ProfileData:
    """A profile: one row per timed point, plus what it was measured on."""

    rows: list[dict]
    device: dict
    backend: dict
    knob_space: KnobSpace
    cost_params: dict
    settings: dict = field(default_factory=dict)

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_profile(data: ProfileData, path: str | os.PathLike) -> Path:
    """Write ``data`` as CSV: ``#`` metadata lines (format, device, backend, ...) then one row per point."""
    buf = io.StringIO()
    meta = {"format": PROFILE_FORMAT, "device": data.device, "backend": data.backend,
            "knob_space": data.knob_space.as_dict(), "cost_params": data.cost_params, "settings": data.settings}
    for key, value in meta.items():
        buf.write(f"# {key}: {json.dumps(value, sort_keys=True, default=str)}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in data.rows:
        writer.writerow([_encode(row[c]) for c in CSV_COLUMNS])
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def _decode_row(raw: dict, path: Path, line: int) -> dict:
    def opt_int(s):
        return None if s == "" else int(s)

    try:
        return {"point": int(raw["point"]), "holdout": raw["holdout"] == "1", "tier": raw["tier"] or None,
                "token_budget": float(raw["token_budget"]), "top_k": opt_int(raw["top_k"]),
                "depth": opt_int(raw["depth"]), "split": raw["split"], "sample_id": int(raw["sample_id"]),
                "prompt_tokens": int(raw["prompt_tokens"]), "vision_tokens_full": int(raw["vision_tokens_full"]),
                "vision_tokens": int(raw["vision_tokens"]), "new_tokens": int(raw["new_tokens"]),
                "latency_ms": float(raw["latency_ms"]), "latency_runs_ms": raw["latency_runs_ms"],
                "backend_ms": float(raw["backend_ms"]), "stage1_ms": float(raw["stage1_ms"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"profile {str(path)!r} line {line}: bad row ({exc}); accepted: rows written by "
                         f"write_profile with columns {', '.join(CSV_COLUMNS)}") from None


def read_profile(path: str | os.PathLike) -> ProfileData:
    """Read a profile CSV written by :func:`write_profile` (errors name the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read latency profile {str(path)!r}: {exc}") from None
    lines = text.splitlines()
    meta, body_start = {}, 0
    for body_start, line in enumerate(lines):
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"latency profile {str(path)!r}: corrupted metadata line {body_start + 1}") from None
    if meta.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a latency profile (format {meta.get('format')!r}); accepted: "
                         f"{PROFILE_FORMAT} written by `python -m latency_model profile`")
    reader = csv.DictReader(lines[body_start:])
    rows = [_decode_row(raw, path, body_start + i + 2) for i, raw in enumerate(reader)]
    if not rows:
        raise ValueError(f"latency profile {str(path)!r} has no rows")
    return ProfileData(rows=rows, device=meta["device"], backend=meta["backend"],
                       knob_space=KnobSpace.from_dict(meta["knob_space"]), cost_params=meta["cost_params"],
                       settings=meta.get("settings", {}))


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------
def _accepts(fn, name: str) -> bool:
    try:
        return fn is not None and name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def profile_backend(backend, settings: ProfileSettings = ProfileSettings(), path: str | os.PathLike | None = None,
                    *, progress: bool = True) -> ProfileData:
    """Time ``backend.run`` over the design of ``settings``; write the CSV to ``path`` if given.

    Only the :class:`~backends.base.Backend` protocol is used: ``knob_space``, ``samples``,
    ``run`` and ``identity`` (and ``cost_params`` when the backend has it).
    """
    from tqdm.auto import tqdm

    space = backend.knob_space
    samples = backend.samples(settings.split)
    points = design(space, samples, settings)
    device = backend_device(backend)
    timer = RunTimer(device, cpu_time=settings.clock == "cpu")
    rng = np.random.default_rng(settings.seed + 1)
    # Stage 1 is timed on its own with the same clock when the backend's run_stage1 takes the token
    # budget (as HFBackend's does); otherwise the backend's own Outcome.stage1_ms is kept.
    own_stage1 = settings.clock != "outcome" and _accepts(getattr(backend, "run_stage1", None), "token_budget")
    total_runs = settings.warmup + settings.repeats * len(points)
    wall = [[] for _ in points]  # this process's clock (wall or CPU time)
    reported = [[] for _ in points]
    stage1 = [[] for _ in points]
    counts: list[TokenCounts | None] = [None] * len(points)
    with tqdm(total=total_runs, desc="profiling latency", unit="run", disable=not progress) as bar:
        # Warm-up: allocator, lazy initialisation and caches, on configurations spread over the grid.
        for i in range(settings.warmup):
            point = points[int(rng.integers(len(points)))]
            backend.run(samples[point.sample_index], point.knobs)
            bar.update()
        for _ in range(settings.repeats):
            for i in rng.permutation(len(points)):
                point = points[i]
                sample, knobs = samples[point.sample_index], point.knobs
                ms, outcome = timer.time(backend.run, sample, knobs)
                wall[i].append(ms)
                reported[i].append(float(outcome.measured_ms))
                if own_stage1:
                    stage1[i].append(timer.time(backend.run_stage1, sample, knobs.tier, knobs.token_budget)[0])
                else:
                    stage1[i].append(float(outcome.stage1_ms))
                if counts[i] is None:
                    counts[i] = outcome.token_counts
                bar.update()
    rows = []
    for i, point in enumerate(points):
        runs = reported[i] if settings.clock == "outcome" else wall[i]
        c, k = counts[i], point.knobs
        rows.append({"point": i, "holdout": point.holdout, "tier": k.tier, "token_budget": float(k.token_budget),
                     "top_k": k.top_k, "depth": k.depth, "split": settings.split,
                     "sample_id": int(samples[point.sample_index].sample_id), "prompt_tokens": int(c.prompt_tokens),
                     "vision_tokens_full": int(c.vision_tokens_full), "vision_tokens": int(c.vision_tokens),
                     "new_tokens": int(c.new_tokens), "latency_ms": float(np.median(runs)),
                     "latency_runs_ms": ";".join(f"{r:.4f}" for r in runs),
                     "backend_ms": float(np.median(reported[i])), "stage1_ms": float(np.median(stage1[i]))})
    data = ProfileData(rows=rows, device=device_fingerprint(device), backend=backend.identity(),
                       knob_space=space, cost_params=dict(getattr(backend, "cost_params", lambda: {})()),
                       settings=asdict(settings))
    if path is not None:
        write_profile(data, path)
    return data

