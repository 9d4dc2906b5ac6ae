"""The version record of a run (``versions.json``): packages, model revision, estimator, device."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from envs.protocols import group_env

PACKAGES = ("torch", "transformers", "gymnasium", "numpy", "hydra-core", "omegaconf", "stable-baselines3", "trl",
            "scikit-learn", "tensorboard", "matplotlib", "bitsandbytes", "accelerate")


def versions(env: gym.Env) -> dict:
    """Package versions, model revision (backend identity), estimator and device of this process."""
    import torch

    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    provenance = group_env(env).provenance()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": pkgs,
            "model": provenance["model"], "estimator": provenance["estimator"], "device": device,
            "torch_threads": torch.get_num_threads(),
            # Trained results can follow the vector unit's kernels (issue #31): record which ran.
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "knobgym_commit": commit}


def to_jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))
