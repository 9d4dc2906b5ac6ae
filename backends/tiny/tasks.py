"""The procedural tasks a tiny checkpoint can be trained on, by the name its config carries
(``config.json`` -> ``knobgym.task``; a checkpoint without it is v1)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from backends.io import read_json
from backends.tiny import data, data_v2

TASKS: dict[str, ModuleType] = {"v1": data, "v2": data_v2}


def task_module(name: str) -> ModuleType:
    """The data module of task ``name`` (``make_sample``, ``generate_split``, ``QUESTION_TYPES``, ...)."""
    if name not in TASKS:
        raise ValueError(f"tiny task {name!r} is unknown; accepted: {', '.join(TASKS)}")
    return TASKS[name]


def task_name(module: ModuleType) -> str:
    """The name :data:`TASKS` gives ``module`` (what a pickled or copied split records)."""
    return next(name for name, task in TASKS.items() if task is module)


def checkpoint_task(path: str | Path) -> ModuleType:
    """The data module of the task the checkpoint at ``path`` was trained on (read from its
    config.json; v1 when there is none, so the model loader reports the missing checkpoint)."""
    if not (Path(path) / "config.json").is_file():
        return data
    config = read_json(Path(path) / "config.json")
    return task_of(config.get("knobgym") if isinstance(config, dict) else None)


def task_of(knobgym: dict | None) -> ModuleType:
    """The data module a model config's ``knobgym`` dict names (v1 without one)."""
    name = knobgym.get("task", "v1") if isinstance(knobgym, dict) else "v1"
    if not isinstance(name, str):
        raise ValueError(f"knobgym.task={name!r} is invalid; accepted: {', '.join(TASKS)}")
    return task_module(name)
