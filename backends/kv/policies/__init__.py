"""KV-cache policies, one per file; importing this package registers the shipped ones.

* :mod:`~backends.kv.policies.base`: :class:`KVPolicy` (override ``score``) and the registry;
* :mod:`~backends.kv.policies.full_cache`: :class:`FullCache` (the reference);
* :mod:`~backends.kv.policies.sink_window`: :class:`SinkWindow` (StreamingLLM);
* :mod:`~backends.kv.policies.key_norm_window`: :class:`KeyNormWindow`.
"""

from backends.kv.policies.base import KVPolicy, kv_policy_class, register_kv_policy, registered_kv_policies
from backends.kv.policies.full_cache import FullCache
from backends.kv.policies.key_norm_window import KeyNormWindow
from backends.kv.policies.sink_window import SinkWindow

__all__ = ["KVPolicy", "FullCache", "SinkWindow", "KeyNormWindow", "register_kv_policy", "registered_kv_policies",
           "kv_policy_class"]
