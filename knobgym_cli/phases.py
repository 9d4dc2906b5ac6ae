"""The phases ``train.py`` and ``evaluate.py`` share: build the run's env, fit or load the baselines,
compare every agent on the test split.

Each phase is one function, so both entry points read as the same sequence of named steps, and
the baselines loop exists once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
from omegaconf import DictConfig, OmegaConf

from knobgym_cli.budgets import describe_range, env_range
from knobgym_cli.build import build_agent, make_env
from knobgym_cli.checkpoints import checkpoint_file
from knobgym_cli.logs import say
from knobgym_cli.progress import cli_progress


def build_run_env(env_cfg: dict, backend_cfg: dict, budget: Any, estimator: str | None,
                  split: str = "train", estimator_object: Any = None
                  ) -> tuple[gym.Env, list[str], tuple[float, float], float]:
    """The run's env, the warnings its construction raised, its achievable range and suggested budget
    (said on the terminal and in the run log). ``estimator_object`` (e.g. another device's estimator,
    ``latency.profile=``) replaces the cached estimator."""
    env, notes = make_env(env_cfg, backend_cfg, budget, estimator, split=split, estimator=estimator_object)
    achievable, suggested = env_range(env)
    say(describe_range(achievable, suggested))
    return env, notes, achievable, suggested


def baseline_options(baselines_cfg: DictConfig | None) -> Callable[[str], dict]:
    """``name -> options`` of the baselines fitted for a comparison (the run config's ``baselines:``)."""
    def options(name: str) -> dict:
        node = baselines_cfg.get(name) if baselines_cfg is not None else None
        return OmegaConf.to_container(node, resolve=True) if node is not None else {}
    return options


def baseline_agents(env: gym.Env, names: Sequence[str], options: Callable[[str], dict], seed: int, split: str,
                    budgets_ms: Sequence[float], *, saved_dir: Path | None = None, save_dir: Path | None = None,
                    title: str = "fitting baselines") -> dict:
    """The baselines a trained agent is compared with, in ``names`` order.

    A baseline saved in ``saved_dir`` (evaluate.py: the run's ``baselines/``) is loaded unless it is
    refitted per budget (``fits_budgets``); any other is built with the run's ``seed`` and fitted on
    ``split`` at ``budgets_ms``, then saved in ``save_dir`` (train.py) unless it is evaluation only.
    """
    from agents import FitContext, agent_class, load_agent

    agents = {}
    bar = cli_progress(len(names), title, "agent")
    for name in names:
        bar.set_postfix(agent=name)
        saved = None if saved_dir is None else saved_dir / checkpoint_file(name)
        if saved is not None and saved.exists() and not agent_class(name).fits_budgets:
            agents[name] = load_agent(name, saved, env)
        else:
            agents[name], _ = build_agent(name, options(name), env, seed, FitContext(split=split, budgets_ms=budgets_ms))
            if save_dir is not None and not agents[name].evaluation_only:
                agents[name].save(save_dir / checkpoint_file(name), env)
        bar.update(1)
    bar.close()
    return agents


def compare_on_test(env: gym.Env, agents: dict, budgets_ms: Sequence[float], split: str,
                    num_samples: int | None, key: str = "eval.num_samples") -> tuple[list[dict], list[int]]:
    """Report rows of every agent at every budget on the first ``num_samples`` samples of ``split``
    (the option ``key``; a split smaller than that is said once)."""
    from knobgym_cli.report import compare_agents
    from knobgym_cli.training import capped_sample_ids

    test_ids = capped_sample_ids(env, split, num_samples, key)
    return compare_agents(env, agents, budgets_ms, test_ids, split, progress=cli_progress), test_ids
