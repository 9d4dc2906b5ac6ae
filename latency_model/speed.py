"""How fast this machine is right now: a short fixed speed probe recorded with every latency profile.

A profile is keyed by the device's name and thread count, which two machines (or one machine
with and without another job running) can share while running 2-4x apart. So every profile
records :func:`speed_probe_ms` (a fixed float32 matmul loop on the current torch threads, the
median of a few repeats, about 0.2 s in all) before and after it is measured:

- a profile whose probe moved by more than :func:`shift_bound` during profiling was taken while
  the machine's speed changed: it is not cached (:func:`moved_during`);
- whenever a cached estimator is used, the probe runs again and a shift beyond the bound is a
  warning with both numbers and the command to re-profile (:func:`shift_warning`).

The bound is ``KNOBGYM_SPEED_PROBE_BOUND`` (a ratio, default 1.5): a quiet machine repeats the probe
within a few percent; a machine that another job shares moves it by far more.
"""

from __future__ import annotations

import os
import time

import numpy as np

BOUND_ENV_VAR = "KNOBGYM_SPEED_PROBE_BOUND"
DEFAULT_BOUND = 1.5
#: the probe's fixed work: ``LOOPS`` products of two ``SIZE`` x ``SIZE`` float32 matrices per repeat
SIZE, LOOPS, REPEATS = 256, 24, 5


def shift_bound() -> float:
    """The largest accepted ratio between two probes (``KNOBGYM_SPEED_PROBE_BOUND``, default 1.5)."""
    try:
        bound = float(os.environ.get(BOUND_ENV_VAR, DEFAULT_BOUND))
    except ValueError:
        bound = DEFAULT_BOUND
    return bound if bound > 1 else DEFAULT_BOUND


def speed_probe_ms(repeats: int = REPEATS) -> float:
    """Median milliseconds of the fixed matmul loop (same inputs every time, current torch threads)."""
    import torch

    a = torch.linspace(-1, 1, SIZE * SIZE, dtype=torch.float32).reshape(SIZE, SIZE)
    b = a.t().contiguous()
    times = []
    for _ in range(repeats + 1):  # the first repeat warms up and is dropped
        start = time.perf_counter()
        for _ in range(LOOPS):
            torch.mm(a, b)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times[1:]))


def ratio(a: float, b: float) -> float:
    """How far apart two probe times are, as a ratio >= 1."""
    low, high = sorted((float(a), float(b)))
    return high / low if low > 0 else float("inf")


def record(before_ms: float, after_ms: float) -> dict:
    """What a profile stores: the probe before and after profiling, and the bound in force."""
    return {"before_ms": round(before_ms, 3), "after_ms": round(after_ms, 3), "bound": shift_bound()}


def reference_ms(probe: dict) -> float:
    """One number for a recorded probe: the mean of its before and after times."""
    return (float(probe["before_ms"]) + float(probe["after_ms"])) / 2


def moved_during(probe: dict) -> bool:
    """Whether the machine's speed moved beyond the bound while the profile was measured."""
    return ratio(probe["before_ms"], probe["after_ms"]) > shift_bound()


def describe(probe: dict | None, now_ms: float | None = None) -> str:
    """``speed probe: 12.1 ms before / 12.4 ms after profiling (now 12.3 ms; bound 1.5x)``."""
    if not probe:
        return "speed probe: not recorded (a profile taken before knobgym recorded one)"
    text = f"speed probe: {probe['before_ms']:.2f} ms before / {probe['after_ms']:.2f} ms after profiling"
    if now_ms is not None:
        text += f" (now {now_ms:.2f} ms)"
    return text + f"; bound {shift_bound():g}x"


def shift_warning(probe: dict | None, now_ms: float, backend_name: str, rerun: str | None = None) -> str | None:
    """The warning when this machine now runs the probe beyond the bound from the profile's
    recorded speed (``None`` when within it, or when the profile recorded no probe). ``rerun``: the
    command that re-profiles (default: the knob envs' ``python -m latency_model profile``)."""
    if not probe:
        return None
    then = reference_ms(probe)
    if ratio(then, now_ms) <= shift_bound():
        return None
    slower = "slower" if now_ms > then else "faster"
    rerun = rerun or f"python -m latency_model profile backend={backend_name} force=true"
    return (f"this machine runs the speed probe in {now_ms:.2f} ms, {ratio(then, now_ms):.2f}x {slower} than when the "
            f"latency profile of {backend_name!r} was taken ({then:.2f} ms; bound {shift_bound():g}x): its "
            f"estimated latencies may not hold here; re-profile with `{rerun}` (on a quiet machine)")


def probed(measure):
    """``(measure(), probe record)``: the speed probe run before and after ``measure`` (a profiling
    function), for profiles other than the knob envs' (TPOT, decoding)."""
    before = speed_probe_ms()
    result = measure()
    return result, record(before, speed_probe_ms())


def warn_if_shifted(probe: dict | None, name: str, rerun: str, category: type[Warning], stacklevel: int = 3) -> None:
    """Run the probe now and warn (``category``) when it moved beyond the bound since ``probe``."""
    if probe:
        message = shift_warning(probe, speed_probe_ms(), name, rerun)
        if message:
            import warnings

            warnings.warn(message, category, stacklevel=stacklevel)
