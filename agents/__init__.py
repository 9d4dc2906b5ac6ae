"""knobgym agents: GRPO, Stable-Baselines3 PPO, and the baselines, all behind :class:`Agent`.

>>> import gymnasium as gym, envs, agents
>>> env = gym.make("MultiKnob-v0", budget="auto")
>>> greedy = agents.make_agent("greedy", env)
>>> agents.evaluate_agent(env, greedy, agents.eval_sample_ids(env, "test", 16), 120.0, "test")

``import agents`` imports every module of this package, so each agent registers itself
(:func:`register_agent`); Stable-Baselines3 is only imported when PPO fits or loads.
"""

from __future__ import annotations

import importlib
import pkgutil

from agents.base import (Agent, EnvLayout, EpisodeContext, FitContext, FitHooks, eval_sample_ids, evaluate_agent,
                         run_episode, score_in_budget, summarize)
from agents.checkpoint import read_checkpoint, write_checkpoint
from agents.registry import (agent_class, check_agent_name, evaluation_only, list_agents, load_agent, make_agent,
                             register_agent)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Agent", "EnvLayout", "EpisodeContext", "FitContext", "FitHooks", "agent_class", "check_agent_name",
           "eval_sample_ids", "evaluate_agent", "evaluation_only", "list_agents", "load_agent", "make_agent",
           "read_checkpoint", "register_agent", "run_episode", "score_in_budget", "summarize", "write_checkpoint"]
