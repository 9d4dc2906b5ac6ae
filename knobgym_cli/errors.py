"""The CLI's override checks: bad values become ``error: ...`` on stderr and exit status 2, before
Hydra composes (``UsageError`` and ``fail`` live in :mod:`knobgym_cli.usage`, a leaf module, so the
checks here, in :mod:`knobgym_cli.overrides` and :mod:`knobgym_cli.rollout` import no cycle)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from envs.budget import device_budget, device_kv_budget, split_kv_budget
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
        if not any(arg.startswith("-") for arg in argv):  # --help, --cfg, -m...: Hydra's own
            check_composition(argv, config_name)
    except ValueError as exc:
        fail(str(exc))
    hydra_main()


def check_composition(argv: Sequence[str], config_name: str) -> None:
    """Compose ``config_name`` with ``argv`` as Hydra will, and turn what Hydra would report over
    several lines (exit 1) into one :class:`UsageError`: an unknown key (``eval.nope``,
    ``baselines.<no such agent>.x``), a missing mandatory value, ``runs_dir`` or ``hydra.run.dir``
    naming a file, ``resume=true`` finding a run folder that holds a link. Nothing is written.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(argv)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        key = getattr(exc.__cause__, "full_key", None) or getattr(exc, "full_key", None)
        if key:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            raise UsageError(f"unknown option {key!r}; accepted: {_keys_below(config_name, parent, argv)} "
                             f"(+{key}=... adds a new key)") from None
        first = " ".join(str(exc).strip().split("\n\n")[0].split())
        raise UsageError(f"{first}; see python {'train' if config_name == 'config' else 'evaluate'}.py --help") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"{missing[0]} is missing; accepted: {missing[0]}=<value> ({_help(config_name, missing[0])})")
    for key in ("runs_dir", "hydra.run.dir"):
        value = cfg.get("runs_dir") if key == "runs_dir" else _given(argv, key)
        if value is not None and "${" not in str(value):
            _check_folder_path(key, str(value))
    if config_name == "config":
        _check_env_kwargs(cfg)
    if config_name == "config" and str(cfg.get("resume")).lower() == "true":
        from knobgym_cli.runs import check_run_folder, latest_run_dir

        latest = latest_run_dir(cfg.runs_dir, cfg.env.id, cfg.agent.name)
        if latest is not None:
            check_run_folder(latest)


def _check_env_kwargs(cfg: Any) -> None:
    """Every ``env.kwargs`` key is a keyword of the chosen env (checked before a model loads)."""
    import envs  # noqa: F401  (registers the env ids)
    from envs.registry import list_envs
    from knobgym_cli.build import env_keywords

    env_id = str(cfg.env.id)
    if env_id not in list_envs():
        return  # make_env names the unknown id
    accepted = sorted(set(env_keywords(env_id)) - {"budget", "split", "backend", "estimator"})
    for key in cfg.env.get("kwargs") or {}:
        if key not in accepted:
            raise UsageError(f"unknown option env.kwargs.{key} of env {env_id}; accepted: "
                             f"{', '.join('env.kwargs.' + k for k in accepted)}")


def _keys_below(config_name: str, parent: str, argv: Sequence[str]) -> str:
    """The keys of ``parent`` in ``config_name`` composed with the config-group choices of ``argv``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    groups = [a for a in argv if a.split("=", 1)[0].lstrip("+~") in (*GROUPS, *EXECUTION_GROUPS)
              or a.startswith("hydra.searchpath=")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name, overrides=groups)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return "(no keys)"
    return ", ".join(f"{parent}.{k}" if parent else str(k) for k in node)


def _given(argv: Sequence[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in argv if "=" in a and a.split("=", 1)[0].lstrip("+~") == key]
    return found[-1] if found else None


def _help(config_name: str, key: str) -> str:
    from knobgym_cli.overrides import SCHEMAS

    option = SCHEMAS.get(config_name, {}).get(key)
    return option.help if option is not None else "see --help"


def _check_folder_path(key: str, value: str) -> None:
    """``value`` is a folder or can be made one: neither it nor a parent of it is an existing file."""
    path = Path(value).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                what = "is an existing file" if candidate == path else f"lies under the file {str(candidate)!r}"
                raise UsageError(f"{key}={value} {what}; accepted: a folder (existing, or one that can be created)")
            return


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
            check_budget_override(arg, value, argv)
        if key in ("budgets", "eval.budgets") and value.strip().lower() not in ("auto", "null"):
            for item in parse_budget_list(value):
                device_budget(item)
    from knobgym_cli.overrides import check_typed_overrides  # typed keys, agent options, resume=<dir>

    check_typed_overrides(argv, config_name)
    if config_name == "config":
        check_rollout_workers(argv)


def check_budget_override(arg: str, value: str, argv: Sequence[str]) -> None:
    """``budget=``: a :class:`Budget`, or a KV budget (``20ms+256tok``, ``{tpot:[15ms,25ms],kv:256tok}``)
    when the chosen env is a KV env; read as Hydra reads it (a mapping is a mapping)."""
    from knobgym_cli.overrides import parse_override

    parsed = parse_override(arg).value()
    form = dict(parsed) if isinstance(parsed, dict) else value
    try:
        device_budget(parsed if not isinstance(parsed, dict) else value)  # '50%' too: the env resolves it
        return
    except ValueError as error:  # a KV budget ('20ms+256tok', '50%+256tok') is a budget plus a cache cap
        try:
            device_kv_budget(form)
        except ValueError as kv_error:
            raise (kv_error if isinstance(parsed, dict) or "+" in value else error) from None
    tpot, cap = split_kv_budget(form)
    if cap is None:
        return
    import envs  # noqa: F401  (registers the env ids)
    from envs.kv_registration import kv_env_ids

    env_id = next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == "env"), None)
    if env_id is None:
        from omegaconf import DictConfig, OmegaConf

        env_id = next(str(item["env"]) for item in OmegaConf.load(CONF_DIR / "config.yaml")["defaults"]
                      if isinstance(item, DictConfig) and "env" in item)
    if env_id not in kv_env_ids():
        raise UsageError(f"budget={value} has a KV-cache cap, which env {env_id} has no cache to apply to; "
                         f"accepted: a latency budget such as {tpot} for {env_id}, or a KV env "
                         f"({', '.join(kv_env_ids())}) for a KV cap")


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
