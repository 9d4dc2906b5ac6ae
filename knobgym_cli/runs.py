"""Run folders: ``<runs_dir>/<env>/<agent>/<timestamp>/`` and the Hydra resolvers that pick them."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any

from knobgym_cli.checkpoints import checkpoint_file

LATEST = checkpoint_file("latest")

# ------------------------------------------------------------------------------------------------
# run folders
# ------------------------------------------------------------------------------------------------
_RUN_DIRS: dict[tuple, str] = {}
_CREATED_BY_US: set[str] = set()


def is_resume(value: Any) -> bool:
    return value not in (None, False, "false", "False", "", "null")


def new_run_dir(runs_dir: str | Path, env_id: str, agent: str) -> Path:
    """``<runs_dir>/<env>/<agent>/<timestamp>``, with ``-1``, ``-2``... when that already exists (created here)."""
    base = Path(runs_dir) / env_id / agent
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    candidate, n = base / stamp, 0
    while True:  # mkdir is the atomic claim: two runs started in the same second get two folders
        try:
            candidate.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            candidate = base / f"{stamp}-{n}"
    _CREATED_BY_US.add(str(candidate.resolve()))
    return candidate


def latest_run_dir(runs_dir: str | Path, env_id: str, agent: str) -> Path | None:
    """The newest run of (env, agent) holding ``checkpoints/latest.safetensors``."""
    base = Path(runs_dir) / env_id / agent
    runs = sorted((p for p in base.glob("*") if (p / "checkpoints" / LATEST).exists()),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def resolve_run_dir(runs_dir: str, env_id: str, agent: str, resume: Any) -> str:
    """Hydra resolver behind ``hydra.run.dir``: the run folder of this invocation (memoised).

    A fresh run gets a new timestamped folder; ``resume=true`` the latest run of (env, agent);
    ``resume=<dir>`` that folder (``check_overrides`` has checked it holds a checkpoint). When
    ``resume=true`` finds nothing to resume a fresh folder is returned and ``train.py`` reports
    the error (and removes the empty folder).
    """
    key = (str(runs_dir), str(env_id), str(agent), str(resume))
    if key not in _RUN_DIRS:
        if not is_resume(resume):
            path = new_run_dir(runs_dir, env_id, agent)
        elif resume is True or str(resume).lower() == "true":
            path = latest_run_dir(runs_dir, env_id, agent) or new_run_dir(runs_dir, env_id, agent)
        else:
            path = Path(str(resume))
        if not path.exists():
            _CREATED_BY_US.add(str(path.resolve()))
        _RUN_DIRS[key] = str(path)
    return _RUN_DIRS[key]


def output_subdir(resume: Any) -> str:
    """Hydra resolver behind ``hydra.output_subdir``: a resumed run keeps its original ``.hydra/``."""
    if not is_resume(resume):
        return ".hydra"
    # Resolved more than once per run (Hydra writes the record, the guard removes it on failure):
    # one name per process, or a second resolution in a later second names another folder.
    key = ("resume-subdir", os.getpid())
    if key not in _RUN_DIRS:
        _RUN_DIRS[key] = ".hydra/resume-" + _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}"
    return _RUN_DIRS[key]


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("knobgym_run_dir", resolve_run_dir, replace=True)
    OmegaConf.register_new_resolver("knobgym_output_subdir", output_subdir, replace=True)


def discard_failed_run_dir(run_dir: Path) -> None:
    """Remove a run folder this process created when it fails before writing any checkpoint."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _CREATED_BY_US and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
