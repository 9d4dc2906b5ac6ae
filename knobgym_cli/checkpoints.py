"""Run checkpoints: ``checkpoints/{latest,best}.safetensors`` and ``baselines/<agent>.safetensors``.

Every one is an agent checkpoint (:mod:`agents.checkpoint`: data only, atomic, checksummed) whose
metadata also holds the run's step, resolved config, observation shape and best validation
reward. :func:`save_run_checkpoint` is the one place the CLI writes one and
:func:`load_run_checkpoint` the one place it reads one.

Recovery: before ``latest`` or ``best`` is replaced, the file it replaces is kept as
``latest.prev.safetensors`` / ``best.prev.safetensors`` (:func:`save_run_checkpoint` rotates on
each write). :func:`read_with_fallback` reads a checkpoint and, when it is damaged (cut short,
edited, not a checkpoint), the next valid one of :data:`FALLBACKS`, saying so in one warning line
naming the damaged file; ``evaluate.py`` reads exactly the checkpoint it is asked for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

import gymnasium as gym

from agents.base import Agent
from agents.checkpoint import env_id_of, read_checkpoint
from backends.io import CorruptFileError
from knobgym_cli.logs import warning_line

CHECKPOINT_NAMES = ("best", "latest")
SUFFIX = ".safetensors"
#: what a run falls back to when a checkpoint is damaged, in order
FALLBACKS = {"latest": ("latest", "latest.prev", "best", "best.prev"),
             "best": ("best", "best.prev", "latest", "latest.prev")}

T = TypeVar("T")


def checkpoint_file(name: str) -> str:
    """``latest`` -> ``latest.safetensors``; ``latest.prev`` -> ``latest.prev.safetensors``."""
    return f"{name}{SUFFIX}"


def previous_file(path: str | Path) -> Path:
    """``checkpoints/latest.safetensors`` -> ``checkpoints/latest.prev.safetensors``."""
    path = Path(path)
    return path.with_name(path.name[:-len(SUFFIX)] + ".prev" + SUFFIX) if path.name.endswith(SUFFIX) \
        else path.with_name(path.name + ".prev")


def _keep_previous(path: Path) -> None:
    """Make ``path``'s current content the ``.prev`` file, atomically; ``path`` stays in place.

    A damaged ``path`` is not kept (the ``.prev`` file it would replace may be the last valid one).
    """
    if not path.is_file():
        return
    try:
        read_checkpoint(path)
    except CorruptFileError:
        return
    prev = previous_file(path)
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        os.link(path, tmp)  # a second name for the same bytes: nothing is copied
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def save_run_checkpoint(path: str | Path, agent: Agent, env: gym.Env, config: dict, step: int,
                        extra: dict | None = None) -> Path:
    """Write ``agent`` with the run's metadata (step, config, env id, observation shape, action
    space), atomically; the checkpoint it replaces is kept as the ``.prev`` file."""
    metadata = {"step": int(step), "config": config, "obs_shape": list(env.observation_space.shape),
                "action_space": str(env.action_space), **(extra or {})}
    _keep_previous(Path(path))
    return agent.save(path, env, metadata)


def read_with_fallback(run_dir: str | Path, name: str, read: Callable[[Path], T] = read_checkpoint) -> tuple[T, Path]:
    """``(read(path), path)`` of checkpoint ``name`` of ``run_dir``, or of the first valid one of
    its :data:`FALLBACKS` when it is damaged or missing, with one warning line per damaged file.

    Only a damaged file (:class:`~backends.io.CorruptFileError`) is skipped: a checkpoint of
    another agent or env is an error as it is. When none is valid, the error names ``name``'s file.
    """
    folder = Path(run_dir) / "checkpoints"
    first_error: CorruptFileError | None = None
    damaged: list[Path] = []
    for candidate in FALLBACKS.get(name, (name,)):
        path = folder / checkpoint_file(candidate)
        if not path.exists():
            continue
        try:
            value = read(path)
        except CorruptFileError as exc:
            first_error = first_error or exc
            damaged.append(path)
            warning_line(str(exc))
            continue
        if damaged or candidate != name:
            warning_line(f"using {str(path)!r} instead of checkpoints/{checkpoint_file(name)} "
                         f"({'damaged' if damaged else 'missing'})")
        return value, path
    if first_error is not None:
        raise first_error
    raise CorruptFileError(folder / checkpoint_file(name), "file does not exist")


def load_run_checkpoint(path: str | Path) -> dict:
    """``{"agent", "env_id", "metadata", "state"}`` of a run checkpoint; one ``ValueError`` naming
    the file when it is missing, damaged or not a checkpoint."""
    return read_checkpoint(path)


def check_checkpoint_matches(ckpt: dict, env: gym.Env, path: str | Path) -> None:
    """A checkpoint from another env or with another observation shape is an error naming both."""
    env_id = env_id_of(env)
    if ckpt["env_id"] != env_id:
        raise ValueError(f"checkpoint {str(path)!r} was trained on env {ckpt['env_id']!r}, not {env_id!r}; "
                         f"accepted: env {ckpt['env_id']!r} (the env the checkpoint was trained on)")
    shape = list(ckpt["metadata"].get("obs_shape", []))
    if shape != list(env.observation_space.shape):
        raise ValueError(f"checkpoint {str(path)!r} expects observations of shape {tuple(shape)}, this env gives "
                         f"{tuple(env.observation_space.shape)}; accepted: the same backend and env as the run")
