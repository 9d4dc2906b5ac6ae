"""KV env ids: ``StreamingKV-v0`` and one ``KV-<Policy>-v0`` per registered KV policy.

``import envs`` calls :func:`register_kv_envs`, which also listens to the policy registry: a policy
registered later (in a module ``gym.make("module:KV-<Policy>-v0")`` or the CLI imports) gets its
env id as it registers.
"""

from __future__ import annotations

import gymnasium as gym

from backends.kv.policies import FullCache, KVPolicy, registered_kv_policies
from backends.kv.policies.base import on_kv_policy_registered
from envs.kv_grid import kv_action_grid
from envs.registry import list_envs, register_env, registered_entry_point
from envs.streaming_kv import StreamingKVEnv

STREAMING_KV_ID = "StreamingKV-v0"


def kv_env_id(policy_class: type[KVPolicy]) -> str:
    """The env id generated for a policy class: ``KV-<PolicyName>-v0``."""
    return f"KV-{policy_class.policy_name()}-v0"


def register_kv_env(policy_class: type[KVPolicy], knob_grid: dict | None = None) -> str:
    """Register ``KV-<PolicyName>-v0`` for one policy class (idempotent), with an optional action grid."""
    grid = kv_action_grid(policy_class, knob_grid)  # checked now, not at the first gym.make
    kwargs = {"policy": policy_class.policy_name()}
    if knob_grid is not None:
        kwargs["knob_grid"] = grid
    return register_env(kv_env_id(policy_class), StreamingKVEnv,
                        description=f"stream a document choosing {policy_class.policy_name()} knobs "
                                    f"({', '.join(grid)}) per chunk", **kwargs)


def register_kv_envs() -> list[str]:
    """Register ``StreamingKV-v0`` and ``KV-<Policy>-v0`` for every registered policy but FullCache (idempotent:
    an id already registered, e.g. with its own grid by :func:`register_kv_env`, is kept as it is).

    Also listens to the policy registry: a policy registered later gets its id as it registers.
    """
    on_kv_policy_registered(_register_default)
    ids = [register_env(STREAMING_KV_ID, StreamingKVEnv, policy="SinkWindow",
                        description="StreamingLLM sinks + window with lazy pruning, knobs chosen per chunk")]
    ids += [_register_default(cls) for cls in registered_kv_policies().values() if cls is not FullCache]
    return ids


def _register_default(policy_class: type[KVPolicy]) -> str | None:
    """``KV-<Policy>-v0`` with the default grid, unless the policy is FullCache or its id exists already."""
    if policy_class is FullCache:
        return None
    env_id = kv_env_id(policy_class)
    return env_id if env_id in gym.registry else register_kv_env(policy_class)


def kv_env_ids() -> list[str]:
    """The registered ids whose env streams a KV cache (they accept a KV budget's cache cap)."""
    return [env_id for env_id in list_envs() if registered_entry_point(env_id) is StreamingKVEnv]
