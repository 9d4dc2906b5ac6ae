"""How a CLI run fails: one line on stderr, and no half-made run folder left behind.

:func:`hold_run_folder` takes the run folder's :class:`~knobgym_cli.lock.RunLock` for the whole
run (a folder in use by another process is one error naming it, exit status 2, and this process
removes only the ``.hydra/resume-*-<pid>`` record it wrote itself). :func:`one_line_errors` turns
any exception into one ``error:`` line: a bad value (``ValueError``) exits with status 2, anything
unexpected with status 1 and a hint to rerun with ``HYDRA_FULL_ERROR=1`` for the traceback (which
then propagates to Hydra), an interrupt with 130. Before either exit ``on_failure`` runs, e.g.
removing the run folder this process created when no checkpoint was written yet.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from backends.io import SymlinkRefused
from knobgym_cli.usage import fail
from knobgym_cli.lock import RunFolderLocked, RunLock
from knobgym_cli.logs import warning_line

FULL_ERROR_HINT = "rerun with HYDRA_FULL_ERROR=1 for the traceback"


@contextmanager
def hold_run_folder(run_dir: str | Path, output_subdir: str | None = None) -> Iterator[RunLock]:
    """Hold ``run_dir``'s lock while the block runs; a stale lock is taken over with a warning line.

    ``output_subdir``: the Hydra record this process wrote into ``run_dir`` (``.hydra/resume-...``),
    removed when the folder turns out to be in use (the holder's own records are left alone).
    """
    run_dir = Path(run_dir)
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except (RunFolderLocked, SymlinkRefused) as exc:
        if output_subdir and Path(output_subdir).name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(run_dir / output_subdir, ignore_errors=True)
        fail(str(exc))
    message = lock.stale_message()
    if message:
        warning_line(message)
    try:
        yield lock
    finally:
        lock.release()


@contextmanager
def one_line_errors(on_failure: Callable[[], None] | None = None) -> Iterator[None]:
    """Report any exception of the block as one line and exit (see the module docstring)."""
    try:
        yield
    except ValueError as exc:  # bad values: UsageError, KnobError, budgets, options
        _run(on_failure)
        fail(str(exc))
    except KeyboardInterrupt:
        _run(on_failure)
        fail("interrupted", status=130)
    except SystemExit as exc:
        if exc.code not in (0, None):
            _run(on_failure)
        raise
    except Exception as exc:
        _run(on_failure)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(f"unexpected {type(exc).__name__}: {exc or '(no message)'}; {FULL_ERROR_HINT}", status=1)


def _run(on_failure: Callable[[], None] | None) -> None:
    if on_failure is not None:
        on_failure()
