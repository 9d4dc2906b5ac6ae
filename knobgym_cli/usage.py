"""One-line command-line errors: a :class:`UsageError` becomes ``error: ...`` on stderr and exit status 2.

A leaf module (it imports nothing of the CLI at module level), so every CLI module can raise
usage errors without importing the override checks.
"""

from __future__ import annotations

import sys


class UsageError(ValueError):
    """A bad command-line value; reported as one line on stderr, exit status 2."""


def fail(message: str, status: int = 2) -> None:
    """Print ``message`` as one line on stderr and exit with ``status``."""
    from knobgym_cli.logs import error_line

    error_line(message)  # also in the run log, when one is open
    sys.exit(status)
