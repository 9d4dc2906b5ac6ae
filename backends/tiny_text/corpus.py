"""The offline text corpus of the tiny reference language model.

Every machine with CPython has the same two sources of real English and code text, no download
needed: the documentation topics bundled for ``help()`` (:mod:`pydoc_data.topics`) and the
standard library's own sources. Documents are split deterministically:

* held-out documents: the longest documentation topics, every ``HELD_OUT_STRIDE``-th of them
  by length rank (long enough to exceed a KV window several times);
* training documents: every other documentation topic plus the standard-library modules in
  :data:`STDLIB_MODULES` (the v1 model), or plus every standard-library source file up to
  :data:`STDLIB_CHAR_CAP` characters (``all_stdlib=True``, the v2 model: long-context training
  needs millions of tokens, and the listed modules hold about 0.4 M). The standard library is
  the installed CPython's, so the training text follows the Python version (a model card names it).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from pydoc_data.topics import topics as PYDOC_TOPICS

# Modules whose source is added to the training text (mixed prose in docstrings and code).
STDLIB_MODULES = (
    "argparse", "textwrap", "string", "shlex", "fractions", "decimal", "statistics", "heapq",
    "bisect", "difflib", "calendar", "csv", "configparser", "dataclasses", "enum", "functools",
    "glob", "fnmatch", "gettext", "locale", "pprint", "queue", "random", "sched", "shutil",
    "tempfile", "threading", "timeit", "tokenize", "trace", "typing", "uuid", "warnings", "zipfile",
)

# Package folders whose files are not prose-and-code of the library itself (tests, demos, GUI tools).
STDLIB_SKIPPED_DIRS = ("test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
                       "__pycache__", "lib2to3", "tkinter", "ensurepip", "config-3")
STDLIB_CHAR_CAP = 16_000_000
MIN_HELD_OUT_CHARS = 8000  # a held-out document must span thousands of tokens
HELD_OUT_STRIDE = 3  # every third long topic (by length rank) is held out


def _long_topic_names() -> list[str]:
    names = [name for name, text in PYDOC_TOPICS.items() if len(text) >= MIN_HELD_OUT_CHARS]
    # Sort by length then name so the split does not depend on dict order.
    return sorted(names, key=lambda n: (-len(PYDOC_TOPICS[n]), n))


def held_out_topic_names() -> list[str]:
    """Names of the documentation topics never seen in training."""
    return _long_topic_names()[1::HELD_OUT_STRIDE]


def held_out_documents() -> dict[str, str]:
    """Held-out documents (topic name -> text), longest first."""
    return {name: PYDOC_TOPICS[name] for name in held_out_topic_names()}


def stdlib_sources(cap: int = STDLIB_CHAR_CAP) -> list[str]:
    """Every standard-library ``.py`` file outside :data:`STDLIB_SKIPPED_DIRS`, in path order, until
    ``cap`` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(p in STDLIB_SKIPPED_DIRS or p.startswith("config-3") for p in parts[:-1]) or path.is_symlink():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if total + len(text) > cap:
            break
        docs.append(text)
        total += len(text)
    return docs


def training_documents(all_stdlib: bool = False) -> list[str]:
    """Training documents in a fixed order: documentation topics, then standard-library sources
    (the :data:`STDLIB_MODULES`, or every file with ``all_stdlib``)."""
    held_out = set(held_out_topic_names())
    docs = [PYDOC_TOPICS[name] for name in sorted(PYDOC_TOPICS) if name not in held_out]
    if all_stdlib:
        return docs + stdlib_sources()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for module in STDLIB_MODULES:
        path = stdlib / f"{module}.py"
        if path.is_file():
            docs.append(path.read_text(encoding="utf-8"))
    return docs
