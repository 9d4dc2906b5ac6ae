"""Env, agent and evaluation budgets from a run config: the CLI's boundary (parsing happens here)."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import warnings
from typing import Any, Callable, Sequence

import gymnasium as gym

from agents import Agent, FitContext, agent_class, list_agents
from envs.budget import Budget, device_budget

#: keys of a conf/agent yaml that are not options of the agent
AGENT_META_KEYS = ("name", "module")


#: latency-estimator factories by name (``estimator=<name>``): the only estimators a run folder may name
_ESTIMATORS: dict[str, Callable] = {}
#: the keys of a recorded config that name code to run; a run folder's own values are never used for them
CODE_KEYS = ("estimator", "agent.module", "backend.trust_remote_code")


def register_estimator(name: str, factory: Callable) -> None:
    """Make ``estimator=<name>`` resolve to ``factory(backend)`` (also when a run's recorded config names it)."""
    if not isinstance(name, str) or ":" in name or not name:
        raise ValueError(f"cannot register estimator {name!r}; accepted: a name without ':'")
    _ESTIMATORS[name] = factory


def import_callable(spec: str) -> Callable:
    """A registered estimator name, or ``"package.module:attr"`` -> the attribute (imported: a spec
    given on the command line only; see :func:`check_recorded_config`)."""
    if isinstance(spec, str) and spec in _ESTIMATORS:
        return _ESTIMATORS[spec]
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"estimator={spec!r} is invalid; accepted: null (the cached estimator), a registered name "
                         f"({', '.join(sorted(_ESTIMATORS)) or 'none registered'}) or 'module:callable' returning "
                         f"an estimator for a backend")
    module, attr = spec.split(":", 1)
    return vars(importlib.import_module(module))[attr]


def check_recorded_config(config: dict, source: str, command_line: dict[str, Any]) -> dict:
    """A config read from a run folder (``source``: the file), with nothing in it that runs code.

    A run folder may come from someone else, and its checksum cannot vouch for it (whoever edits
    the file recomputes it). So the values of :data:`CODE_KEYS` are taken from ``command_line``
    (this invocation's own values, keyed like :data:`CODE_KEYS`; ``None`` = not given) and the
    recorded ones only when they run nothing: an estimator by registered name, an agent by
    registered name (its ``module`` is never imported), an env by registered id (not ``module:Env-v0``),
    ``trust_remote_code`` false. Anything else
    is a :class:`~knobgym_cli.errors.UsageError` naming the file, the key, the value and what to
    pass instead; nothing has been imported or loaded yet. Returns the config to use (a copy).
    """
    from knobgym_cli.errors import UsageError

    config = {**config, "agent": dict(config.get("agent") or {}), "backend": dict(config.get("backend") or {})}
    recorded = config.get("estimator")
    if command_line.get("estimator") is not None:
        config["estimator"] = command_line["estimator"]
    elif recorded is not None and recorded not in _ESTIMATORS:
        raise UsageError(f"{source} names estimator={recorded!r}, which is not a registered estimator; knobgym "
                         f"never imports a module named in a run folder; accepted: estimator={recorded} on the "
                         f"command line (if you trust that module), or estimator=null (the cached estimator)")
    name = config["agent"].get("name")
    module = config["agent"].pop("module", None)
    if command_line.get("agent.module"):
        config["agent"]["module"] = command_line["agent.module"]
    elif name not in list_agents():
        given = f" (knobgym never imports its module {module!r}, named in the run folder)" if module else ""
        raise UsageError(f"{source} names agent {name!r}, which is not a registered agent{given}; accepted: "
                         f"{', '.join(list_agents())}, or the agent's module named on the command line")
    env_id = str((config.get("env") or {}).get("id", ""))
    if ":" in env_id and not command_line.get("env.id"):  # module:Env-v0 imports the module
        raise UsageError(f"{source} names env {env_id!r}, whose module would be imported; knobgym never imports a "
                         f"module named in a run folder; accepted: the env named on the command line (env={env_id} "
                         f"for train.py, env_id={env_id} for evaluate.py) if you trust that module")
    if command_line.get("backend.trust_remote_code") is not None:
        if "trust_remote_code" in config["backend"] or command_line["backend.trust_remote_code"]:
            config["backend"]["trust_remote_code"] = bool(command_line["backend.trust_remote_code"])
    elif config["backend"].get("trust_remote_code"):
        raise UsageError(f"{source} sets backend.trust_remote_code=true; a run folder never turns on code shipped "
                         f"with a model; accepted: trust_remote_code=true on the command line (if you trust the "
                         f"model's code)")
    return config


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
    from omegaconf import Container, OmegaConf

    if isinstance(budget, Container):  # budget={tpot:[15ms,25ms],kv:256tok} composes to a DictConfig
        budget = OmegaConf.to_container(budget, resolve=True)
    if takes_backend(env_id):
        backend_spec = dict(backend_cfg)
        backend = load_backend(backend_spec)  # cached: the env gets the same object from the same spec
        if estimator_spec and estimator is not None:
            raise ValueError(f"estimator={estimator_spec!r} and an estimator object were both given; accepted: one")
        estimator = import_callable(estimator_spec)(backend) if estimator_spec else estimator
        kwargs.update(backend=backend_spec, estimator=estimator)  # the spec: the env pickles without the model
    else:
        check_run_backend(env_id, backend_cfg, kwargs)
        if estimator_spec:
            raise ValueError(f"estimator={estimator_spec!r} is invalid for env {env_id} (it profiles its own TPOT "
                             f"estimator); accepted: null")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            env = gym.make(env_id, budget=budget, split=split, **kwargs)
        except TypeError as exc:
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if unknown is None:
                raise
            accepted = sorted(set(env_keywords(env_id)) - {"budget", "split", "backend", "estimator"})
            raise ValueError(f"unknown option env.kwargs.{unknown.group(1)} of env {env_id}; accepted: "
                             f"{', '.join('env.kwargs.' + k for k in accepted)}") from None
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for note in notes if log_warnings else ():  # the CLI's log (knobgym_cli.logs): terminal and run log
        logging.getLogger("knobgym").warning(f"warning: {note}")
    return env, notes


def env_keywords(env_id: str) -> list[str]:
    """The keyword arguments the registered env's constructor takes (its own and, when it forwards
    ``**kwargs``, those of the classes it inherits from)."""
    entry = _entry_point(env_id)
    classes = entry.__mro__ if isinstance(entry, type) else (entry,)
    names: list[str] = []
    for cls in classes:
        init = cls.__init__ if isinstance(cls, type) else cls
        if init is object.__init__:
            break
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _entry_point(env_id: str) -> Any:
    entry = gym.spec(env_id).entry_point
    if isinstance(entry, str):
        module, attr = entry.split(":", 1)
        entry = vars(importlib.import_module(module))[attr]
    return entry


def check_run_backend(env_id: str, backend_cfg: dict, env_kwargs: dict | None = None) -> None:
    """The backend's cheap option check (:func:`backends.registry.check_backend`: for ``backend=hf``
    every option, and that the model and dataset paths exist) for an env that takes a backend, and
    for one that takes none, that no backend other than the default was named; then the env's own
    cheap check of ``env_kwargs`` where its class has one (``check_options(kwargs)``: the KV envs'
    ``model_path`` / ``model_spec`` / ``dataset``). A command calls it before anything loads, so a bad
    value is one line, not a line after a phase."""
    import envs  # noqa: F401  (registers the env ids)
    from backends.registry import check_backend
    from envs.registry import check_env_id

    if takes_backend(check_env_id(env_id)):
        check_backend(backend_cfg)
    elif backend_cfg.get("name", "tiny") != "tiny":
        raise ValueError(f"backend={backend_cfg.get('name')!r} is invalid for env {env_id} (it takes no backend); "
                         f"accepted: the default, with the model chosen by env.kwargs.model_path=<checkpoint dir>")
    check_options = getattr(_entry_point(env_id), "check_options", None)
    if env_kwargs and callable(check_options):
        check_options(dict(env_kwargs))


def takes_backend(env_id: str) -> bool:
    """Whether the registered env's constructor accepts ``backend`` (read from its signature: a
    ``backend`` parameter or ``**kwargs``)."""
    parameters = inspect.signature(_entry_point(env_id)).parameters.values()
    # ``**kwargs`` forwarded to a base class (the knob envs) counts as taking it
    return any(p.name == "backend" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def eval_budgets(env_budget: Budget, budgets: Sequence[Any] | None = None,
                 achievable_ms: tuple[float, float] | None = None, suggested_ms: float | None = None) -> list[float]:
    """Evaluation budgets in ms: the given list (parsed here, at the boundary; ``'50%'`` is that point
    of ``achievable_ms``), else the env budget's :meth:`~envs.budget.Budget.evaluation_budgets`."""
    from knobgym_cli.errors import parse_budget_list

    if budgets:  # '45ms' is one budget (never its characters), as is [45ms]
        return [device_budget(b, achievable_ms, suggested_ms).fixed_ms for b in parse_budget_list(budgets)]
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
