"""What ``train.py`` and ``evaluate.py`` share: run folders, env construction from a config,
checkpoints, version records, one-line command-line errors."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from agents.io import atomic_torch_save
from envs.budget import Budget

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("env", "agent", "backend")
CHECKPOINT_NAMES = ("best", "latest")
PACKAGES = ("torch", "transformers", "gymnasium", "numpy", "hydra-core", "omegaconf", "stable-baselines3", "trl",
            "scikit-learn", "tensorboard", "matplotlib")


# ------------------------------------------------------------------------------------------------
# command-line errors
# ------------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad command-line value; reported as one line on stderr, exit status 2."""


def fail(message: str, status: int = 2) -> None:
    """Print ``message`` as one line on stderr and exit with ``status``."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(status)


def run_cli(config_name: str, hydra_main, argv: Sequence[str] | None = None) -> None:
    """Entry point of train.py / evaluate.py: one-line errors for bad overrides before Hydra
    composes ``config_name``, then ``hydra_main()``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_overrides(argv, config_name)
    except ValueError as exc:
        fail(str(exc))
    hydra_main()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_overrides(argv: Sequence[str], config_name: str) -> None:
    """Validate the overrides Hydra would otherwise report over several lines (or accept silently).

    Unknown config-group options (``env=``, ``agent=``, ``backend=``), unknown top-level keys and
    unparsable budgets raise :class:`UsageError` listing what is accepted.
    """
    from omegaconf import OmegaConf

    top_keys = (set(OmegaConf.load(CONF_DIR / f"{config_name}.yaml")) - {"defaults"}) | {"hydra"}
    if config_name == "config":
        top_keys |= set(GROUPS)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        root = key.split(".")[0].split("/")[0]
        if root not in top_keys:
            raise UsageError(f"unknown option {key!r}; accepted: {', '.join(sorted(top_keys - {'hydra'}))}")
        if key in GROUPS and config_name == "config":
            options = group_options(key)
            if value not in options:
                extra = " (oracle is evaluation only: it looks at the outcome it is scored on)" \
                    if key == "agent" and value == "oracle" else ""
                raise UsageError(f"unknown {key} {value!r}{extra}; accepted: {', '.join(options)}")
        if key == "budget" and value.strip().lower() != "auto":
            Budget.parse(value)
        if key == "budgets" and value.strip().lower() != "auto":
            for item in parse_budget_list(value):
                Budget.parse(item)


def parse_budget_list(value: Any) -> list[str]:
    """``[80ms,120ms,200ms]`` (a string or a list) -> its items; a single budget -> a one-item list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            return [p.strip() for p in text[1:-1].split(",") if p.strip()]
        return [text]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


# ------------------------------------------------------------------------------------------------
# run folders
# ------------------------------------------------------------------------------------------------
_RUN_DIRS: dict[tuple, str] = {}
_CREATED_BY_US: set[str] = set()


def is_resume(value: Any) -> bool:
    return value not in (None, False, "false", "False", "", "null")


def new_run_dir(runs_dir: str | Path, env_id: str, agent: str) -> Path:
    """``<runs_dir>/<env>/<agent>/<timestamp>``, with ``-1``, ``-2``... when that already exists."""
    base = Path(runs_dir) / env_id / agent
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    candidate, n = base / stamp, 0
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    return candidate


def latest_run_dir(runs_dir: str | Path, env_id: str, agent: str) -> Path | None:
    """The newest run of (env, agent) holding ``checkpoints/latest.pt``."""
    base = Path(runs_dir) / env_id / agent
    runs = sorted((p for p in base.glob("*") if (p / "checkpoints" / "latest.pt").exists()),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def resolve_run_dir(runs_dir: str, env_id: str, agent: str, resume: Any) -> str:
    """Hydra resolver behind ``hydra.run.dir``: the run folder of this invocation (memoised).

    A fresh run gets a new timestamped folder; ``resume=true`` the latest run of (env, agent);
    ``resume=<dir>`` that folder. When nothing can be resumed a fresh folder is returned and
    ``train.py`` reports the error (and removes the empty folder).
    """
    key = (str(runs_dir), str(env_id), str(agent), str(resume))
    if key not in _RUN_DIRS:
        if not is_resume(resume):
            path = new_run_dir(runs_dir, env_id, agent)
        elif resume is True or str(resume).lower() == "true":
            path = latest_run_dir(runs_dir, env_id, agent) or new_run_dir(runs_dir, env_id, agent)
        else:
            path = Path(str(resume))
            if not (path / "checkpoints" / "latest.pt").exists():
                path = new_run_dir(runs_dir, env_id, agent)
        if not path.exists():
            _CREATED_BY_US.add(str(path.resolve()))
        _RUN_DIRS[key] = str(path)
    return _RUN_DIRS[key]


def output_subdir(resume: Any) -> str:
    """Hydra resolver behind ``hydra.output_subdir``: a resumed run keeps its original ``.hydra/``."""
    if not is_resume(resume):
        return ".hydra"
    return ".hydra/resume-" + _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("knobgym_run_dir", resolve_run_dir, replace=True)
    OmegaConf.register_new_resolver("knobgym_output_subdir", output_subdir, replace=True)


def discard_failed_run_dir(run_dir: Path) -> None:
    """Remove a run folder this process created when it fails before writing any checkpoint."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _CREATED_BY_US and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# envs, estimators, versions
# ------------------------------------------------------------------------------------------------
def import_callable(spec: str) -> Callable:
    """``"package.module:attr"`` -> the attribute."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"estimator={spec!r} is invalid; accepted: null (the cached estimator) or "
                         f"'module:callable' returning an estimator for a backend")
    module, attr = spec.split(":", 1)
    return getattr(importlib.import_module(module), attr)


def make_env(env_cfg: dict, backend_cfg: dict, budget: Any, estimator_spec: str | None,
             split: str = "train") -> tuple[gym.Env, list[str]]:
    """The env of a run config, and the warnings its construction raised (e.g. a budget that never binds)."""
    import envs  # noqa: F401  (registers the env ids)
    from backends.registry import load_backend
    from envs.registry import check_env_id

    check_env_id(env_cfg["id"])
    backend = load_backend(backend_cfg["name"], **dict(backend_cfg.get("options") or {}))
    estimator = import_callable(estimator_spec)(backend) if estimator_spec else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make(env_cfg["id"], backend=backend, budget=budget, split=split, estimator=estimator,
                       **dict(env_cfg.get("kwargs") or {}))
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for note in notes:  # the CLI's log (knobgym_cli.logs): terminal and run log; bare stderr line otherwise
        logging.getLogger("knobgym").warning(f"warning: {note}")
    return env, notes


def eval_budgets(budget: Any, budgets: Sequence[Any] | None = None) -> list[float]:
    """Evaluation budgets in ms: the given list, else the fixed budget, else a range's low, middle and high."""
    if budgets:
        out = []
        for b in budgets:
            parsed = Budget.parse(b)
            if parsed.is_range:
                raise ValueError(f"evaluation budget {b!r} is invalid; accepted: fixed budgets such as 120ms")
            out.append(parsed.low_ms)
        return out
    parsed = Budget.parse(budget)
    if not parsed.is_range:
        return [parsed.low_ms]
    return [parsed.low_ms, 0.5 * (parsed.low_ms + parsed.high_ms), parsed.high_ms]


def versions(env: gym.Env) -> dict:
    """Package versions, model revision (backend identity), estimator and device of this process."""
    import torch

    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    base = env.unwrapped
    estimator = getattr(base.latency, "estimator", None)
    try:
        from latency_model.cache import describe

        est = describe(estimator)
    except Exception:  # a test double or an estimator without the describe fields
        est = {"class": type(estimator).__name__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": pkgs,
            "model": base.backend.identity(), "estimator": est, "device": device,
            "torch_threads": torch.get_num_threads(), "knobgym_commit": commit}


def fit_agent(name: str, options: dict, env, cfg, budgets_ms: list[float]):
    """Build and fit a non-GRPO agent (the trained agent or a baseline) from its options.

    ``static`` calibrates at ``budgets_ms`` on its calibration split; ``bandit`` and ``ppo`` train on
    the run's training split and budget; the others need no fitting.
    """
    from agents import eval_sample_ids, make_agent

    options = dict(options)
    fit_kwargs: dict[str, Any] = {}
    if name == "static":
        split = options.pop("calibration_split", "validation")
        ids = eval_sample_ids(env, split, options.pop("calibration_samples", 24))
        fit_kwargs = {"budgets": budgets_ms, "sample_ids": ids, "split": split}
    elif name == "bandit":
        fit_kwargs = {"rounds": int(options.pop("rounds", 256)), "budget": cfg.budget, "split": cfg.train_split}
    agent = make_agent(name, env, **options)
    stats = agent.fit(env, **fit_kwargs) if (fit_kwargs or name == "ppo") else {}
    return agent, stats


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, agent_name: str, agent_state: dict, config: dict, env: gym.Env, step: int,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint atomically: agent state (policy, optimizer, RNGs), step, config, env id, obs shape."""
    payload = {"agent": agent_name, "state": agent_state, "step": int(step), "config": config,
               "env_id": env.spec.id if env.spec else type(env.unwrapped).__name__,
               "obs_shape": list(env.observation_space.shape),
               "action_space": str(env.action_space), **(extra or {})}
    return atomic_torch_save(payload, path)


def load_checkpoint(path: Path) -> dict:
    import torch

    if not Path(path).exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; accepted: a run folder with checkpoints/"
                         f"{{{','.join(CHECKPOINT_NAMES)}}}.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_checkpoint_matches(ckpt: dict, env: gym.Env, path: Path) -> None:
    """A checkpoint from another env or with another observation shape is an error naming both."""
    env_id = env.spec.id if env.spec else type(env.unwrapped).__name__
    if ckpt.get("env_id") != env_id:
        raise ValueError(f"checkpoint {str(path)!r} was trained on env {ckpt.get('env_id')!r}, not {env_id!r}; "
                         f"accepted: env {ckpt.get('env_id')!r} (the env the checkpoint was trained on)")
    if list(ckpt.get("obs_shape", [])) != list(env.observation_space.shape):
        raise ValueError(f"checkpoint {str(path)!r} expects observations of shape {tuple(ckpt.get('obs_shape', []))}, "
                         f"this env gives {tuple(env.observation_space.shape)}; accepted: the same backend and "
                         f"env as the run")


def to_jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))
