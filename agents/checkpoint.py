"""The one checkpoint format: agent state as data only (safetensors + JSON), never a pickle.

:func:`write_checkpoint` is the one place a checkpoint is written and :func:`read_checkpoint` the
one place it is read (agents' ``save`` / ``load`` and the CLI's run checkpoints both go through
them). A checkpoint is one :func:`backends.io.save_tensors` file: the tensors and arrays of the
agent's state are stored as tensors, everything else (numbers, strings, RNG states, the run's
config) as JSON metadata, with a checksum over both. It records the agent name and the env id, and
reading one of another agent or env is a ``ValueError`` naming the file and both ids. Non-finite
parameters (NaN, inf) are refused at save (:class:`NonFiniteError`) and at load (a
:class:`~backends.io.CorruptFileError`), naming the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from backends.io import CorruptFileError, load_tensors, save_tensors

FORMAT = "knobgym-agent-checkpoint"
FORMAT_VERSION = 1


def env_id_of(env: gym.Env) -> str:
    """The registered id of ``env`` (its class name when it was made without ``gym.make``)."""
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__


# ------------------------------------------------------------------------------------------------
# state <-> (JSON skeleton, tensors)
# ------------------------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.array(obj, copy=True))
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot store a {type(obj).__name__} in a checkpoint; accepted: tensors, arrays, numbers, "
                     f"strings, lists, tuples and dicts of them")


def _decode(obj: Any, tensors: dict, path: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, path) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise CorruptFileError(path, f"tensor {key!r} is missing")
        return tensors[key] if "__tensor__" in obj else tensors[key].numpy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, path) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, path) for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------
# finite parameters: a diverged policy is an error, never a checkpoint
# ------------------------------------------------------------------------------------------------
class NonFiniteError(ValueError):
    """Floating-point parameters holding NaN or inf (a diverged training)."""


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors and arrays in ``obj`` (nested dicts, lists, tuples)
    that hold NaN or inf."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, np.ndarray):
        return [prefix] if obj.dtype.kind in "fc" and not np.isfinite(obj).all() else []
    if isinstance(obj, dict):
        return [name for k, v in obj.items() for name in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [name for i, v in enumerate(obj) for name in nonfinite_tensors(v, f"{prefix}.{i}" if prefix else str(i))]
    return []


def describe_nonfinite(names: list[str]) -> str:
    """``tensor 'policy.net.0.weight' holds NaN or inf (and 3 more)``."""
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"tensor {names[0]!r} holds NaN or inf{more}"


def check_finite(state: Any, what: str) -> None:
    """:class:`NonFiniteError` naming the first non-finite tensor of ``state`` (``what``: where it was found)."""
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(f"{what}: {describe_nonfinite(bad)} (a diverged policy); accepted: finite parameters "
                             f"(lower the learning rate; the last finite checkpoint is kept)")


# ------------------------------------------------------------------------------------------------
# the one writer and the one reader
# ------------------------------------------------------------------------------------------------
def write_checkpoint(path: str | Path, agent: str, env_id: str, state: dict, metadata: dict | None = None) -> Path:
    """Write ``state`` of an ``agent`` trained on ``env_id`` (plus JSON ``metadata``) atomically.

    A state with non-finite parameters is a :class:`NonFiniteError` naming the tensor; nothing is written.
    """
    check_finite(state, f"refusing to save checkpoint {str(path)!r}")
    tensors: dict = {}
    skeleton = _encode(state, tensors)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "agent": str(agent), "env_id": str(env_id),
            "metadata": _encode(dict(metadata or {}), tensors), "state": skeleton}
    return save_tensors(path, tensors, meta)


def read_checkpoint(path: str | Path, *, agent: str | None = None, env_id: str | None = None) -> dict:
    """``{"agent", "env_id", "metadata", "state"}`` of a checkpoint.

    A file that is missing, damaged or not a checkpoint is a :class:`~backends.io.CorruptFileError`
    naming it; when ``agent`` / ``env_id`` are given, a checkpoint of another agent / env is a
    ``ValueError`` naming the file and both.
    """
    path = Path(path)
    tensors, meta = load_tensors(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptFileError(path, f"not a knobgym agent checkpoint (format {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(path, f"checkpoint format version {meta.get('format_version')!r}; accepted: "
                                     f"{FORMAT_VERSION}")
    if agent is not None and meta["agent"] != agent:
        raise ValueError(f"checkpoint {str(path)!r} holds a {meta['agent']!r} agent, not {agent!r}; accepted: a "
                         f"checkpoint of the {agent} agent")
    if env_id is not None and meta["env_id"] != env_id:
        raise ValueError(f"checkpoint {str(path)!r} was trained on env {meta['env_id']!r}, not {env_id!r}; "
                         f"accepted: env {meta['env_id']!r} (the env the checkpoint was trained on)")
    state = _decode(meta["state"], tensors, path)
    bad = nonfinite_tensors(state)
    if bad:  # a damaged policy, like a damaged file: a run falls back to its last valid checkpoint
        raise CorruptFileError(path, f"{describe_nonfinite(bad)} (a diverged policy)")
    return {"agent": meta["agent"], "env_id": meta["env_id"], "metadata": _decode(meta["metadata"], tensors, path),
            "state": state}
