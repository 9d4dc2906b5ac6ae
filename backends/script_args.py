"""The argument parser of every ``python -m bench.*`` / ``python -m backends.*`` script.

A bad option is one line on stderr, ``error: <what is wrong>; accepted: ...``, and exit code 2, before
the script does any work: no usage block, no traceback. Counts are parsed with :func:`at_least`, so
``--repeats 0`` is refused at the boundary instead of failing later inside a median or a stack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (and :meth:`fail`) print one line and exit 2; its
    default ``prog`` is the command as typed for a script of this repository
    (``python -m bench.kv_policies``), not the file's name."""

    def __init__(self, *args, **kwargs):
        if "prog" not in kwargs and sys.argv and sys.argv[0]:
            script = Path(sys.argv[0]).resolve()
            if script.suffix == ".py" and script.is_relative_to(REPO):
                kwargs["prog"] = "python -m " + ".".join(script.relative_to(REPO).with_suffix("").parts)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's own errors: unknown option, missing value, bad type
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    def fail(self, message: str):
        """A check made after parsing: ``message`` names the value and what is accepted."""
        self.exit(2, f"error: {message}\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``, else one line naming the text and the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def checkpoint_folder_arg(text: str) -> Path:
    """An argparse ``type``: an existing checkpoint folder (holding ``config.json``), else one line."""
    from backends.checks import checkpoint_folder

    try:
        return checkpoint_folder("--model", text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("--model ", "", 1)) from None


checkpoint_folder_arg.__name__ = "checkpoint folder"
