"""Every registered env id, agent and backend is a CLI option; a ``conf/<group>/<name>.yaml`` only changes defaults.

Hydra composes config groups from files and from its ``ConfigStore``: before the CLI composes,
:func:`register_group_configs` stores an entry for every registered name that has no yaml:
``env/<id>`` (``id`` and ``kwargs``, the env class's :attr:`envs.base.KnobgymEnv.cli_kwargs`),
``agent/<name>`` (``name``: the agent's options are its class's defaults) and ``backend/<name>``
(``name``: the factory's defaults). So ``train.py env=<id>`` works for any id ``import envs``
registers, the KV envs of every registered policy included.

Gymnasium's ``module:Env-v0`` form works in every group: ``env=my_envs:MyEnv-v0`` imports
``my_envs`` (a module the user names on the command line; never one named inside a file), which
registers its env ids or KV policies, then selects ``MyEnv-v0``; ``agent=my_agents:cheapest`` and
``backend=my_backends:mine`` likewise. The run records the plain name; ``evaluate.py`` takes the
form in ``env_id=`` (importing the module, which registers what the run needs).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import gymnasium as gym

#: what each group's names are registered by (for the one-line error of a module that registers nothing)
REGISTERED_BY = {"env": "envs.register_env", "agent": "agents.register_agent",
                 "backend": "backends.registry.register_backend"}


def import_named_module(group: str, value: str) -> str:
    """``<module>:<name>`` -> ``name``, after importing ``module`` (named on the command line); ``name`` as is."""
    if ":" not in value:
        return value
    module, name = value.split(":", 1)
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"{group}={value}: module {module!r} does not import ({error}); accepted: an importable "
                         f"module that registers {name} ({REGISTERED_BY[group]})") from None
    return name


def resolve_env_id(value: str) -> str:
    """The registered env id ``value`` names: ``<id>``, or ``<module>:<id>`` after importing ``module``.

    Importing a module may register KV policies: their ``KV-<Policy>-v0`` ids are registered then.
    """
    import envs
    from envs.registry import check_env_id

    env_id = import_named_module("env", str(value))
    envs.register_kv_envs()  # policies registered since `import envs` get their env ids
    return check_env_id(env_id)


def resolve_agent_name(value: str) -> str:
    """The registered agent ``value`` names (``<name>`` or ``<module>:<name>``)."""
    from agents import check_agent_name

    return check_agent_name(import_named_module("agent", str(value)))


def resolve_backend_name(value: str) -> str:
    """The registered backend ``value`` names (``<name>`` or ``<module>:<name>``)."""
    from backends.registry import available_backends

    name = import_named_module("backend", str(value))
    if name not in available_backends():
        raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(available_backends())}")
    return name


def cli_kwargs(env_id: str) -> dict:
    """The CLI's default keyword arguments of a registered env id (its class's ``cli_kwargs``)."""
    entry = gym.spec(env_id).entry_point
    if isinstance(entry, str):
        module, attr = entry.split(":", 1)
        entry = vars(importlib.import_module(module))[attr]
    return dict(getattr(entry, "cli_kwargs", {}) or {})


def _registered(group: str) -> list[str]:
    if group == "env":
        import envs

        envs.register_kv_envs()
        return envs.list_envs()
    if group == "agent":  # evaluation-only agents are no training option
        from agents import evaluation_only, list_agents

        return [name for name in list_agents() if name not in evaluation_only()]
    from backends.registry import available_backends

    return available_backends()


_RESOLVE: dict[str, Callable[[str], str]] = {"env": resolve_env_id, "agent": resolve_agent_name,
                                             "backend": resolve_backend_name}


def _node(group: str, name: str) -> dict:
    return {"id": name, "kwargs": cli_kwargs(name)} if group == "env" else {"name": name}


def group_override(argv: Sequence[str], group: str) -> str | None:
    """The value of a ``<group>=`` override in ``argv`` (the last one), if any."""
    values = [a.split("=", 1)[1] for a in argv if not a.startswith("-") and a.lstrip("+").startswith(f"{group}=")]
    return values[-1] if values else None


def register_group_configs(argv: Sequence[str], group: str, yaml_names: Sequence[str]) -> list[str]:
    """Store ``<group>/<name>`` for every registered name without a yaml in ``yaml_names``, and
    ``<group>/<module>:<name>`` for such an override in ``argv``. Returns the group's options."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    options = set(yaml_names)
    requested = group_override(argv, group)
    if requested is not None and ":" in requested:
        store.store(group=group, name=requested, node=_node(group, _RESOLVE[group](requested)))
        options.add(requested)
    for name in _registered(group):
        if name not in yaml_names:
            store.store(group=group, name=name, node=_node(group, name))
            options.add(name)
    return sorted(options)
