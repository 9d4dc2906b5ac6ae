"""The command line's log: what the terminal shows, also appended to the run folder's ``train.log``.

``setup_cli_logging(log_file)`` gives the ``knobgym`` logger two handlers: the terminal (stderr,
the bare message) and, for a run, ``log_file`` (appended, with a timestamp). Progress bars write
only their final line to the file (see :mod:`knobgym_cli.progress`), so the log holds what
happened without bar spam. Python warnings are shown as one line, ``warning: <message>``, with no
internal source line, on the terminal and in the log.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

LOGGER_NAME = "knobgym"
log = logging.getLogger(LOGGER_NAME)

_FILE_ONLY = "knobgym_file_only"


class _TerminalFilter(logging.Filter):
    """Drops records meant for the log file only (a progress bar already showed them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _FILE_ONLY, False)


def setup_cli_logging(log_file: str | Path | None = None) -> logging.Logger:
    """Route the ``knobgym`` logger to stderr and, when given, to ``log_file`` (appended); returns it.

    Calling it again replaces the handlers it installed before (one process may run several
    commands, e.g. in tests), and installs :func:`show_warning` as ``warnings.showwarning``.
    """
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(message)s"))
    terminal.addFilter(_TerminalFilter())
    log.addHandler(terminal)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = _AppendNoFollow(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        log.addHandler(to_file)
    warnings.showwarning = show_warning
    if not sys.stderr.isatty():  # no carriage-return bar states of model loading in a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return log


class _AppendNoFollow(logging.FileHandler):
    """A ``FileHandler`` appending to its file, which is opened without following a symbolic link
    (a planted ``train.log`` link is refused: :class:`~backends.io.SymlinkRefused`)."""

    def __init__(self, path: str | Path):
        from backends.io import refuse_symlink

        super().__init__(refuse_symlink(path), mode="a", encoding="utf-8", delay=False)

    def _open(self):
        import os

        from backends.io import open_no_follow

        fd = open_no_follow(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding="utf-8")


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: ``warning: <message>`` (no file, line or source text)."""
    log.warning("warning: %s", " ".join(str(message).split()))


def say(message: str) -> None:
    """One line on the terminal and in the run log."""
    log.info(message)


def warning_line(message: str) -> None:
    """``warning: <message>`` as one line on stderr (the stream of the moment) and in the run log."""
    line = "warning: " + " ".join(str(message).split())
    print(line, file=sys.stderr, flush=True)
    to_log_file_only(line)


def error_line(message: str) -> None:
    """``error: <message>`` as one line on stderr (the stream of the moment) and in the run log."""
    line = "error: " + " ".join(str(message).split())
    print(line, file=sys.stderr, flush=True)
    to_log_file_only(line)


def to_log_file_only(message: str) -> None:
    """One line in the run log only (e.g. the final state of a progress bar the terminal already shows)."""
    log.info(message, extra={_FILE_ONLY: True})
