"""The CLI's override checks: bad values become ``error: ...`` on stderr and exit status 2, before
Hydra composes (``UsageError`` and ``fail`` live in :mod:`knobgym_cli.usage`, a leaf module, so the
checks here, in :mod:`knobgym_cli.overrides` and :mod:`knobgym_cli.rollout` import no cycle)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from envs.budget import device_budget
from knobgym_cli.budgets import run_budget
from knobgym_cli.usage import UsageError, fail

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("env", "agent", "backend")
#: config groups that say where a run executes, not what it trains (a resumed run may change them)
EXECUTION_GROUPS = ("rollout",)


def run_cli(config_name: str, hydra_main, argv: Sequence[str] | None = None) -> None:
    """Entry point of train.py / evaluate.py: one-line errors for bad overrides before Hydra
    composes ``config_name``, then ``hydra_main()``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_overrides(argv, config_name)
    except ValueError as exc:
        fail(str(exc))
    hydra_main()


def search_dirs(argv: Sequence[str]) -> list[Path]:
    """``conf/`` plus the folders of a ``hydra.searchpath=[file://...]`` override (extra config groups)."""
    dirs = [CONF_DIR]
    for arg in argv:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            value = arg.split("=", 1)[1].strip().strip("[]")
            for item in value.split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    dirs.append(Path(item[len("file://"):]))
    return dirs


def group_options(group: str, dirs: Sequence[Path] = (CONF_DIR,)) -> list[str]:
    return sorted({p.stem for d in dirs for p in (Path(d) / group).glob("*.yaml")})


def check_overrides(argv: Sequence[str], config_name: str) -> None:
    """Validate the overrides Hydra would otherwise report over several lines (or accept silently).

    Unknown config-group options (``env=``, ``agent=``, ``backend=``), unknown top-level keys and
    unparsable budgets raise :class:`UsageError` listing what is accepted.
    """
    from omegaconf import OmegaConf

    from agents import evaluation_only

    top_keys = (set(OmegaConf.load(CONF_DIR / f"{config_name}.yaml")) - {"defaults"}) | {"hydra"}
    if config_name == "config":
        top_keys |= set(GROUPS) | set(EXECUTION_GROUPS)
    dirs = search_dirs(argv)
    stored = {}
    if config_name == "config":  # every registered env id, agent and backend is an option
        from knobgym_cli.group_configs import register_group_configs

        stored = {group: register_group_configs(argv, group, group_options(group, dirs)) for group in GROUPS}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        root = key.split(".")[0].split("/")[0]
        if root not in top_keys:
            raise UsageError(f"unknown option {key!r}; accepted: {', '.join(sorted(top_keys - {'hydra'}))}")
        if key in EXECUTION_GROUPS and config_name == "config":
            options = group_options(key, dirs)
            if value not in options:
                raise UsageError(f"unknown {key} {value!r}; accepted: {', '.join(options)}")
            from knobgym_cli.rollout import check_rollout_available

            check_rollout_available(value)
        if key in GROUPS and config_name == "config":
            options = stored[key]
            if value not in options:
                extra = f" ({value} is evaluation only: it looks at the outcome it is scored on)" \
                    if key == "agent" and value in evaluation_only() else ""
                raise UsageError(f"unknown {key} {value!r}{extra}; accepted: {', '.join(options)}")
        if key == "budget" and value.strip().lower() != "auto":  # auto: knobgym_cli.budgets
            run_budget(value)  # a KV budget ('20ms+256tok') is a Budget plus a cache cap
        if key == "budgets" and value.strip().lower() != "auto":
            for item in parse_budget_list(value):
                device_budget(item)
    from knobgym_cli.overrides import check_typed_overrides  # typed keys, agent options, resume=<dir>

    check_typed_overrides(argv, config_name)
    if config_name == "config":
        check_rollout_workers(argv)


def check_rollout_workers(argv: Sequence[str]) -> None:
    """``rollout.workers=N`` (N > 1) without ``rollout=ray`` would run in one process and ignore N: an error."""
    values = {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in argv if "=" in a and not a.startswith("-")}
    workers = values.get("rollout.workers")
    if workers is not None and values.get("rollout", "local") == "local" and workers.strip() != "1":
        raise UsageError(f"rollout.workers={workers} needs rollout=ray (rollout=local collects groups in this "
                         f"process); accepted: rollout=ray rollout.workers={workers}, or no rollout.workers")


def parse_budget_list(value: Any) -> list[Any]:
    """``[80ms,120ms,200ms]`` (a string or a list) -> its items; a single budget -> a one-item list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            return [p.strip() for p in text[1:-1].split(",") if p.strip()]
        return [text]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)
