"""The offline text corpus of the tiny reference language model.

Every machine with CPython has the same two sources of real English and code text, no download
needed: the documentation topics bundled for ``help()`` (:mod:`pydoc_data.topics`) and the
standard library's own sources. Documents are split deterministically:

* held-out documents: the longest documentation topics, every ``HELD_OUT_STRIDE``-th of them
  by length rank (long enough to exceed a KV window several times);
* training documents: every other documentation topic plus the standard-library modules in
  :data:`STDLIB_MODULES`.
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


def training_documents() -> list[str]:
    """Training documents in a fixed order: documentation topics, then standard-library sources."""
    held_out = set(held_out_topic_names())
    docs = [PYDOC_TOPICS[name] for name in sorted(PYDOC_TOPICS) if name not in held_out]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for module in STDLIB_MODULES:
        path = stdlib / f"{module}.py"
        if path.is_file():
            docs.append(path.read_text(encoding="utf-8"))
    return docs
