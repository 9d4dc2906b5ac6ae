"""Progress that is a bar on a terminal and a plain periodic line in a log file.

``progress(total, desc)`` is the one progress helper every layer uses (latency profiling, trace
recording, the CLI). On a terminal it is a tqdm bar; when the stream is not a terminal (output
redirected to a log file, a CI job) it writes one plain line every ``interval_s`` seconds and one
at the end, never carriage-return bar states::

    profiling latency: 120/2166 runs (5%), 31 s elapsed, ~8 min left

Usage::

    with progress(total=n, desc="profiling latency", unit="run") as bar:
        for ...:
            bar.update()
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

DEFAULT_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """Plain progress lines: one when started, one per ``interval_s`` of updates, one when closed.

    Args:
        total: expected number of updates (``None`` when unknown).
        desc: what is progressing (the start of each line).
        unit: name of one update.
        stream: where lines go (default ``sys.stderr``).
        interval_s: least seconds between two lines (0: a line per update).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.clock = interval_s, clock
        self.n = 0
        self.start = self.last = clock()
        self.closed = False
        self._write(f"{desc}: 0/{total if total is not None else '?'} {unit}s")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        if self.total:
            share = self.n / self.total
            left = f", ~{_duration(elapsed / share - elapsed)} left" if 0 < share < 1 else ""
            return (f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * share:.0f}%), "
                    f"{_duration(elapsed)} elapsed{left}")
        return f"{self.desc}: {self.n} {self.unit}s, {_duration(elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval_s and not (self.total and self.n >= self.total):
            self.last = now
            self._write(self._line(now))

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(self._line(self.clock()) + " - done")

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    """Progress that shows nothing (``enabled=False``)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def progress(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, stream: TextIO | None = None,
             interval_s: float = DEFAULT_INTERVAL_S):
    """A progress context: a tqdm bar when ``stream`` (default stderr) is a terminal, plain lines otherwise.

    Both have ``update(n=1)``, ``set_description(desc)`` and ``close()``; ``enabled=False`` shows nothing.
    """
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, stream=stream, interval_s=interval_s)


def quiet_library_bars(*libraries: str, stream: TextIO | None = None) -> None:
    """Turn off the progress bars of ``libraries`` (``transformers``: "Loading weights";
    ``datasets``: "Generating ... split") when ``stream`` (default stderr) is not a terminal: their
    bars redraw with carriage returns, which a piped log keeps as control characters. Called by the
    loaders before they use the library; on a terminal the bars stay."""
    if is_terminal(stream if stream is not None else sys.stderr):
        return
    if "transformers" in libraries:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in libraries:
        import datasets

        datasets.disable_progress_bars()
