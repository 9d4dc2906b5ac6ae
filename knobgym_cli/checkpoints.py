"""Run checkpoints: ``checkpoints/{latest,best}.safetensors`` and ``baselines/<agent>.safetensors``.

Every one is an agent checkpoint (:mod:`agents.checkpoint`: data only, atomic, checksummed) whose
metadata also holds the run's step, resolved config, observation shape and best validation
reward. :func:`save_run_checkpoint` is the one place the CLI writes one and
:func:`load_run_checkpoint` the one place it reads one.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym

from agents.base import Agent
from agents.checkpoint import env_id_of, read_checkpoint

CHECKPOINT_NAMES = ("best", "latest")
SUFFIX = ".safetensors"


def checkpoint_file(name: str) -> str:
    """``latest`` -> ``latest.safetensors``."""
    return f"{name}{SUFFIX}"


def save_run_checkpoint(path: str | Path, agent: Agent, env: gym.Env, config: dict, step: int,
                        extra: dict | None = None) -> Path:
    """Write ``agent`` with the run's metadata (step, config, env id, observation shape, action space)."""
    metadata = {"step": int(step), "config": config, "obs_shape": list(env.observation_space.shape),
                "action_space": str(env.action_space), **(extra or {})}
    return agent.save(path, env, metadata)


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
