"""Progress of the command line's long phases: a tqdm bar on a terminal, plain periodic lines otherwise.

``cli_progress(total, desc, unit)`` returns an object with ``update(n)``, ``set_postfix(**values)``
and ``close()``. On a terminal it is a tqdm bar; when stderr is not a terminal (a log file, CI,
``nohup``) it prints one plain line about every ``every_s`` seconds instead of carriage-return bar
states. Either way, closing it appends one summary line (count, elapsed time, last values) to the
run log (:mod:`knobgym_cli.logs`). Each phase gets its own bar, so a slow first step (model
loading, profiling, the oracle's pass over every configuration) is never hidden inside another
phase's first item.

This is the command line's own progress helper (``knobgym_cli.progress.cli_progress``), for the
phases of train.py and evaluate.py; latency_model's profiling has its own, below the CLI layer.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from knobgym_cli.logs import say, to_log_file_only

PLAIN_EVERY_S = 30.0


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Progress:
    """Counting, postfix values and the closing summary line shared by both displays."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.initial = int(initial)
        self.postfix: dict[str, Any] = {}
        self.start = time.monotonic()
        self.closed = False

    def line(self) -> str:
        done = f"{self.n}/{self.total} {self.unit}s"
        post = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        elapsed = format_seconds(time.monotonic() - self.start)
        return f"{self.desc}: {done} in {elapsed}" + (f" ({post})" if post else "")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = dict(values)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TerminalProgress(_Progress):
    """A tqdm bar; its final state goes to the run log when it closes."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        from tqdm.auto import tqdm

        super().__init__(total, desc, unit, initial)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def set_postfix(self, **values: Any) -> None:
        super().set_postfix(**values)
        self.bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        super().update(n)
        self.bar.update(n)

    def close(self) -> None:
        if not self.closed:
            self.bar.close()
            to_log_file_only(self.line())
        super().close()


class PlainProgress(_Progress):
    """Periodic plain lines (terminal and run log): at most one every ``every_s`` seconds, plus the last."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = PLAIN_EVERY_S):
        super().__init__(total, desc, unit, initial)
        self.every_s = every_s
        self.last = self.start

    def update(self, n: int = 1) -> None:
        super().update(n)
        now = time.monotonic()
        if now - self.last >= self.every_s and self.n < self.total:
            self.last = now
            say(self.line())

    def close(self) -> None:
        if not self.closed:
            say(self.line())
        super().close()


def cli_progress(total: int, desc: str, unit: str = "it", initial: int = 0, plain: bool | None = None) -> _Progress:
    """A progress display for one phase: tqdm on a terminal, :class:`PlainProgress` otherwise.

    ``plain`` forces the choice (default: plain exactly when stderr is not a terminal).
    """
    if plain is None:
        plain = not sys.stderr.isatty()
    return PlainProgress(total, desc, unit, initial) if plain else TerminalProgress(total, desc, unit, initial)


class phase:
    """``with phase("loading the model"):`` says what starts and, at the end, how long it took."""

    def __init__(self, message: str):
        self.message = message

    def __enter__(self) -> "phase":
        self.start = time.monotonic()
        say(f"{self.message}...")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            say(f"{self.message}: done in {format_seconds(time.monotonic() - self.start)}")
