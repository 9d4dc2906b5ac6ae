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
_PARENTS_CREATED: dict[str, list[Path]] = {}  # run folder -> the folders above it its mkdir created, deepest first


def is_resume(value: Any) -> bool:
    return value not in (None, False, "false", "False", "", "null")


def new_run_dir(runs_dir: str | Path, env_id: str, agent: str) -> Path:
    """``<runs_dir>/<env>/<agent>/<timestamp>``, with ``-1``, ``-2``... when that already exists (created here)."""
    base = Path(runs_dir) / env_id / agent
    new_parents = [p for p in (base, *base.parents) if not p.exists()]  # removed with a failed run's folder
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
    _PARENTS_CREATED[str(candidate.resolve())] = [p.resolve() for p in new_parents]
    return candidate


def check_run_folder(run_dir: str | Path) -> Path:
    """``run_dir``, or a :class:`~knobgym_cli.errors.UsageError` naming the first symbolic link inside it.

    knobgym never writes a link into a run folder, so one there was planted or added by hand: a
    lock, log, checkpoint or report written through it would land outside the folder, and a
    checkpoint read through it would come from elsewhere. Checked before a run folder is used.
    """
    from knobgym_cli.errors import UsageError

    run_dir = Path(run_dir)
    for path in sorted(run_dir.rglob("*")):  # rglob does not descend into linked folders
        if path.is_symlink():
            raise UsageError(f"run folder {str(run_dir)!r} holds a symbolic link {str(path.relative_to(run_dir))!r} "
                             f"(to {os.readlink(path)!r}); knobgym never follows a link in a run folder; accepted: "
                             f"a run folder of regular files and folders (replace the link by the file it names)")
    return run_dir


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
    # memoised: Hydra resolves it when writing the record and again when asked (a second apart on a
    # loaded machine), and a folder in use removes exactly the record this process wrote
    key = ("output_subdir", str(resume), os.getpid())
    if key not in _RUN_DIRS:
        _RUN_DIRS[key] = ".hydra/resume-" + _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}"
    return _RUN_DIRS[key]


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("knobgym_run_dir", resolve_run_dir, replace=True)
    OmegaConf.register_new_resolver("knobgym_output_subdir", output_subdir, replace=True)


def discard_failed_run_dir(run_dir: Path) -> None:
    """Remove a run folder this process created when it fails before writing any checkpoint, and the
    folders above it that creating it made (``runs/<env>/<agent>/`` of a first run) while they are empty."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _CREATED_BY_US and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in _PARENTS_CREATED.get(key, []):  # e.g. runs/<env>/<agent>/ of a first run, while empty
            try:
                parent.rmdir()
            except OSError:  # another run's folder is in it now, or it is gone already
                break
