"""Env, agent and evaluation budgets from a run config: the CLI's boundary (parsing happens here)."""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from typing import Any, Callable, Sequence

import gymnasium as gym

from agents import Agent, FitContext, agent_class
from envs.budget import Budget

#: keys of a conf/agent yaml that are not options of the agent
AGENT_META_KEYS = ("name", "module")


def import_callable(spec: str) -> Callable:
    """``"package.module:attr"`` -> the attribute."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"estimator={spec!r} is invalid; accepted: null (the cached estimator) or "
                         f"'module:callable' returning an estimator for a backend")
    module, attr = spec.split(":", 1)
    return vars(importlib.import_module(module))[attr]


def make_env(env_cfg: dict, backend_cfg: dict, budget: Any, estimator_spec: str | None,
             split: str = "train", log_warnings: bool = True, estimator: Any = None) -> tuple[gym.Env, list[str]]:
    """The env of a run config, and the warnings its construction raised (e.g. a budget that never
    binds; logged unless ``log_warnings`` is false).

    Every key of ``backend_cfg`` except ``name`` is a keyword option of the backend's factory.
    ``estimator`` (an estimator object, e.g. another device's loaded from its file) replaces the
    cached one; it excludes ``estimator_spec``.
    Envs whose constructor takes no ``backend`` (the KV envs load a causal LM from
    ``env.kwargs.model_path``) get neither a backend nor an estimator: ``backend=`` other than the
    default ``tiny``, or an ``estimator=``, is then a one-line error naming the env.
    """
    import envs  # noqa: F401  (registers the env ids)
    from backends.registry import load_backend
    from envs.registry import check_env_id

    env_id = check_env_id(env_cfg["id"])
    kwargs = dict(env_cfg.get("kwargs") or {})
    if takes_backend(env_id):
        backend_spec = dict(backend_cfg)
        backend = load_backend(backend_spec)  # cached: the env gets the same object from the same spec
        if estimator_spec and estimator is not None:
            raise ValueError(f"estimator={estimator_spec!r} and an estimator object were both given; accepted: one")
        estimator = import_callable(estimator_spec)(backend) if estimator_spec else estimator
        kwargs.update(backend=backend_spec, estimator=estimator)  # the spec: the env pickles without the model
    else:
        if backend_cfg.get("name", "tiny") != "tiny":
            raise ValueError(f"backend={backend_cfg.get('name')!r} is invalid for env {env_id} (it takes no backend); "
                             f"accepted: the default, with the model chosen by env.kwargs.model_path=<checkpoint dir>")
        if estimator_spec:
            raise ValueError(f"estimator={estimator_spec!r} is invalid for env {env_id} (it profiles its own TPOT "
                             f"estimator); accepted: null")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make(env_id, budget=budget, split=split, **kwargs)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for note in notes if log_warnings else ():  # the CLI's log (knobgym_cli.logs): terminal and run log
        logging.getLogger("knobgym").warning(f"warning: {note}")
    return env, notes


def takes_backend(env_id: str) -> bool:
    """Whether the registered env's constructor accepts ``backend`` (read from its signature: a
    ``backend`` parameter or ``**kwargs``)."""
    entry = gym.spec(env_id).entry_point
    if isinstance(entry, str):
        module, attr = entry.split(":", 1)
        entry = vars(importlib.import_module(module))[attr]
    parameters = inspect.signature(entry).parameters.values()
    # ``**kwargs`` forwarded to a base class (the knob envs) counts as taking it
    return any(p.name == "backend" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def eval_budgets(env_budget: Budget, budgets: Sequence[Any] | None = None) -> list[float]:
    """Evaluation budgets in ms: the given list (parsed here, at the boundary), else the env
    budget's :meth:`~envs.budget.Budget.evaluation_budgets`."""
    if budgets:
        return [Budget.parse(b).fixed_ms for b in budgets]
    return env_budget.evaluation_budgets()


def agent_class_of(agent_cfg: dict) -> type[Agent]:
    """The agent class a conf/agent node names (importing its ``module`` first, when given)."""
    if agent_cfg.get("module"):
        importlib.import_module(str(agent_cfg["module"]))
    return agent_class(str(agent_cfg["name"]))


def agent_options(agent_cfg: dict) -> dict:
    return {k: v for k, v in agent_cfg.items() if k not in AGENT_META_KEYS}


def build_agent(name: str, options: dict, env: gym.Env, seed: int, context: FitContext) -> tuple[Agent, dict]:
    """A new agent of ``name`` (seeded with the run's seed unless its options set one), fitted."""
    cls = agent_class(name)
    options = dict(options)
    if cls.seeded:
        options.setdefault("seed", int(seed))
    agent = cls.from_env(env, **options)
    return agent, agent.fit(env, context)
