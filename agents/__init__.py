"""knobgym agents: GRPO, Stable-Baselines3 PPO, and the baselines, all behind :class:`Agent`.

>>> import gymnasium as gym, envs, agents
>>> env = gym.make("MultiKnob-v0", budget="120ms")
>>> greedy = agents.make_agent("greedy", env)
>>> agents.evaluate_agent(env, greedy, agents.eval_sample_ids(env, "test", 16), "120ms", "test")
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym

from agents.base import Agent, EnvLayout, EpisodeContext, eval_sample_ids, evaluate_agent, run_episode, summarize

# name -> "module:Class"; imported on first use (SB3 is only loaded when ppo is asked for)
_AGENTS = {
    "grpo": "agents.grpo:GRPOAgent",
    "ppo": "agents.ppo:PPOAgent",
    "random": "agents.baselines:RandomAgent",
    "static": "agents.baselines:StaticAgent",
    "greedy": "agents.baselines:GreedyAgent",
    "bandit": "agents.baselines:BanditAgent",
    "oracle": "agents.baselines:OracleAgent",
}
#: agents that cannot be trained and deployed (they look at the outcome of the sample they are scored on)
EVALUATION_ONLY = ("oracle",)


def list_agents() -> list[str]:
    return list(_AGENTS)


def check_agent_name(name: str) -> str:
    if name not in _AGENTS:
        raise ValueError(f"unknown agent {name!r}; accepted: {', '.join(_AGENTS)}")
    return name


def agent_class(name: str) -> type[Agent]:
    module, attr = _AGENTS[check_agent_name(name)].split(":")
    return getattr(importlib.import_module(module), attr)


def make_agent(name: str, env: gym.Env, **options: Any) -> Agent:
    """A new agent of ``name`` for ``env`` (options as in its ``from_env``)."""
    return agent_class(name).from_env(env, **options)


def load_agent(name: str, path, env: gym.Env) -> Agent:
    """An agent of ``name`` saved at ``path``, for ``env``."""
    return agent_class(name).load(path, env)


__all__ = ["Agent", "EnvLayout", "EpisodeContext", "EVALUATION_ONLY", "agent_class", "check_agent_name",
           "eval_sample_ids", "evaluate_agent", "list_agents", "load_agent", "make_agent", "run_episode",
           "summarize"]
