"""The one integer check (a value that must be a whole number in a range, or one line naming it),
and the one check of a checkpoint folder named by a user.

Every layer (backends, latency models, envs, agents, the CLI) checks integer options through
:func:`check_int`, so a boolean is never taken as 0 or 1, a numpy integer is accepted as the
integer it holds, and the message always names the option and what is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a boolean."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              where: str = "") -> int:
    """``value`` as an ``int`` if it is an integer with ``low <= value < high`` (either bound optional).

    Raises a ``ValueError`` naming ``name=value`` and the accepted range (``where`` is appended in
    parentheses, e.g. ``"episodes in split 'test'"``).
    """
    ok = is_int(value) and (low is None or value >= low) and (high is None or value < high)
    if not ok:
        if low is not None and high is not None:
            accepted = f"an integer in [0, {high})" if low == 0 else f"an integer in [{low}, {high})"
        elif low is not None:
            accepted = f"an integer >= {low}"
        elif high is not None:
            accepted = f"an integer < {high}"
        else:
            accepted = "an integer"
        raise ValueError(f"{name}={value!r} is invalid; accepted: {accepted}" + (f" ({where})" if where else ""))
    return int(value)


def checkpoint_folder(name: str, value: Any, not_a_folder_hint: str = "") -> Path:
    """``value`` as an existing folder holding ``config.json`` (a ``save_pretrained`` checkpoint), else a
    ``ValueError`` naming ``name`` and the value (``not_a_folder_hint`` ends the message when the path is
    no folder). Cheap (reads no file): commands check with it first."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"{name}={value!r} is invalid; accepted: a checkpoint folder written by save_pretrained()")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is not a folder; accepted: a checkpoint folder written by "
                         f"save_pretrained(){not_a_folder_hint}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{name} {str(path)!r} has no config.json; accepted: a checkpoint folder written by "
                         "save_pretrained()")
    return path
