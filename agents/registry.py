"""Agents by name: ``@register_agent`` on the class, in the agent's own file.

Every module of the ``agents`` package is imported by ``import agents``, so a new agent is one
file in ``agents/`` (a class with a ``name``, decorated with :func:`register_agent`) plus one
``conf/agent/<name>.yaml`` holding its options. An agent defined outside the package registers
itself the same way when its module is imported; its yaml names that module (``module: pkg.mod``)
so the CLI imports it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym

from agents.base import Agent
from agents.checkpoint import env_id_of, read_checkpoint

_AGENTS: dict[str, type[Agent]] = {}


def register_agent(cls: type[Agent]) -> type[Agent]:
    """Class decorator: make ``cls`` available as ``agent=<cls.name>`` (idempotent for the same class)."""
    if not (isinstance(cls, type) and issubclass(cls, Agent)) or not isinstance(cls.name, str) or cls.name == Agent.name:
        raise ValueError(f"cannot register {cls!r}; accepted: an Agent subclass with its own name")
    existing = _AGENTS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"agent name {cls.name!r} is already registered by {existing.__module__}."
                         f"{existing.__qualname__}; choose another name")
    _AGENTS[cls.name] = cls
    return cls


def list_agents() -> list[str]:
    return sorted(_AGENTS)


def check_agent_name(name: str) -> str:
    if name not in _AGENTS:
        raise ValueError(f"unknown agent {name!r}; accepted: {', '.join(list_agents())}")
    return name


def agent_class(name: str) -> type[Agent]:
    return _AGENTS[check_agent_name(name)]


def evaluation_only() -> tuple[str, ...]:
    """Names of the agents that cannot be trained and deployed (they look at the outcome they are scored on)."""
    return tuple(name for name in list_agents() if _AGENTS[name].evaluation_only)


def make_agent(name: str, env: gym.Env, **options: Any) -> Agent:
    """A new agent of ``name`` for ``env`` (options as in its ``from_env``)."""
    return agent_class(name).from_env(env, **options)


def load_agent(name: str | None, path: str | Path, env: gym.Env) -> Agent:
    """The agent saved at ``path`` for ``env``; ``name`` (when given) must match the checkpoint's agent.

    A checkpoint of another agent or env is a ``ValueError`` naming the file; a damaged one a
    :class:`~backends.io.CorruptFileError`.
    """
    ckpt = read_checkpoint(path, agent=name, env_id=env_id_of(env))
    return agent_class(ckpt["agent"]).restore(env, ckpt["state"])
