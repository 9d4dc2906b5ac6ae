"""Every registered env id (and agent) is a CLI option; a ``conf/env/<id>.yaml`` only changes defaults.

Hydra composes config groups from files and from its ``ConfigStore``: before the CLI composes,
:func:`register_env_configs` stores an ``env/<id>`` entry (``id`` and ``kwargs``: the env class's
:attr:`envs.base.KnobgymEnv.cli_kwargs`) for every registered id that has no yaml, so
``train.py env=<id>`` works for any id ``import envs`` registers (the KV envs of every registered
policy included).

Gymnasium's ``module:Env-v0`` form works too: ``env=my_envs:MyEnv-v0`` imports ``my_envs`` (a
module the user names on the command line; never one named inside a file), which registers its
env ids or KV policies, then selects ``MyEnv-v0``. The run records the plain id; ``evaluate.py``
takes the same form in ``env_id=``. Likewise ``agent=my_agents:cheapest`` imports ``my_agents``
(which registers the agent, :func:`agents.register_agent`) and selects it with its class's
defaults; a registered agent without a ``conf/agent`` yaml is an option as well.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import gymnasium as gym


def resolve_env_id(value: str) -> str:
    """The registered env id ``value`` names: ``<id>``, or ``<module>:<id>`` after importing ``module``.

    Importing a module may register KV policies: their ``KV-<Policy>-v0`` ids are registered then.
    Raises ``ValueError`` (one line) for a module that does not import or an id nobody registered.
    """
    import envs
    from envs.registry import check_env_id

    value = str(value)
    if ":" in value:
        module, value = value.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"env={module}:{value}: module {module!r} does not import ({error}); accepted: "
                             f"an importable module that registers {value} (envs.register_env)") from None
    envs.register_kv_envs()  # policies registered since `import envs` get their env ids
    return check_env_id(value)


def cli_kwargs(env_id: str) -> dict:
    """The CLI's default keyword arguments of a registered env id (its class's ``cli_kwargs``)."""
    entry = gym.spec(env_id).entry_point
    if isinstance(entry, str):
        module, attr = entry.split(":", 1)
        entry = vars(importlib.import_module(module))[attr]
    return dict(getattr(entry, "cli_kwargs", {}) or {})


def group_override(argv: Sequence[str], group: str) -> str | None:
    """The value of a ``<group>=`` override in ``argv`` (the last one), if any."""
    values = [a.split("=", 1)[1] for a in argv if not a.startswith("-") and a.lstrip("+").startswith(f"{group}=")]
    return values[-1] if values else None


def resolve_agent_name(value: str) -> str:
    """The registered agent ``value`` names: ``<name>``, or ``<module>:<name>`` after importing ``module``."""
    from agents import check_agent_name

    value = str(value)
    if ":" in value:
        module, value = value.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"agent={module}:{value}: module {module!r} does not import ({error}); accepted: "
                             f"an importable module that registers agent {value} (agents.register_agent)") from None
    return check_agent_name(value)


def register_agent_configs(argv: Sequence[str], yaml_names: Sequence[str]) -> list[str]:
    """Store ``agent/<name>`` for every registered agent without a yaml in ``yaml_names`` (evaluation-only
    agents are no training option), and ``agent/<module>:<name>`` for such an override. Returns the options."""
    from hydra.core.config_store import ConfigStore

    from agents import evaluation_only, list_agents

    store = ConfigStore.instance()
    requested = group_override(argv, "agent")
    options = set(yaml_names)
    if requested is not None and ":" in requested:
        store.store(group="agent", name=requested, node={"name": resolve_agent_name(requested)})
        options.add(requested)
    for name in list_agents():
        if name not in yaml_names and name not in evaluation_only():
            store.store(group="agent", name=name, node={"name": name})
            options.add(name)
    return sorted(options)


def register_env_configs(argv: Sequence[str], yaml_ids: Sequence[str]) -> list[str]:
    """Store ``env/<id>`` in Hydra's ConfigStore for every registered id without a yaml in ``yaml_ids``,
    and ``env/<module>:<id>`` for an ``env=<module>:<id>`` override. Returns the env options."""
    import envs
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    requested = group_override(argv, "env")
    options = set(yaml_ids)
    if requested is not None and ":" in requested:
        env_id = resolve_env_id(requested)
        store.store(group="env", name=requested, node={"id": env_id, "kwargs": cli_kwargs(env_id)})
        options.add(requested)
    envs.register_kv_envs()
    for env_id in envs.list_envs():
        if env_id not in yaml_ids:
            store.store(group="env", name=env_id, node={"id": env_id, "kwargs": cli_kwargs(env_id)})
            options.add(env_id)
    return sorted(options)
