"""The typed options of ``train.py`` and ``evaluate.py``, declared once and checked before Hydra composes.

Every command-line override is parsed the way Hydra parses it (so ``seed=3`` is the integer 3 and
``seed=abc`` the string ``'abc'``) and checked against :data:`SCHEMAS`: a bad value is one
:class:`UsageError` naming the key, the value and what is accepted, raised before Hydra creates a
run folder. Agent options (``agent.<option>=...``, and the baselines' ``baselines.<agent>.<option>``)
are checked against the type of their default in ``conf/agent/<agent>.yaml``, then through the
config dataclass the agent declares (``Agent.config_class``: help and bounds per field); the CLI
lists no agent's options itself.

``resume=<dir>`` must name a run folder that holds a checkpoint (:func:`check_resume`).

Keys a schema does not name (``env.kwargs.*``, ``backend.options.*``, ``hydra.*``) pass through:
the env and the backend check their own arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from knobgym_cli.usage import UsageError
from backends.base import SPLITS
from backends.checks import is_int

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class Option:
    """One typed option: ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``choice`` or ``names``.

    ``low`` / ``high`` bound numbers (``low_open`` / ``high_open``: strictly); ``choices`` lists
    what a ``choice`` accepts; ``nullable`` also accepts ``null``; ``help`` says what it is.
    """

    kind: str
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False

    def accepted(self) -> str:
        """What this option accepts, in words."""
        if self.kind in ("int", "float"):
            text = "an integer" if self.kind == "int" else "a finite number"
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
            text += " " + " and ".join(bounds) if bounds else ""
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind == "names":
            text = "a list of " + ", ".join(str(c) for c in self.choices)
        else:
            text = "a string"
        if self.nullable:
            text = "null or " + text
        return text + (f" ({self.help})" if self.help else "")

    def is_valid(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "int":
            return is_int(value) and self._in_range(value)
        if self.kind == "float":
            return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and self._in_range(value))
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, (str, int, float)) and value in self.choices
        if self.kind == "names":
            return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v in self.choices for v in value)
        return isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) != ""

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def check(self, key: str, value: Any, raw: str | None = None) -> None:
        """``UsageError`` naming ``key``, the value and :meth:`accepted` unless ``value`` is valid."""
        if not self.is_valid(value):
            shown = raw if raw is not None else repr(value)
            raise UsageError(f"{key}={shown} is invalid; accepted: {self.accepted()}")


def _number(x: float) -> str:
    """A bound as written: whole numbers in full (4294967295, not 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _count(help_text: str, low: int = 1, nullable: bool = False) -> Option:
    return Option("int", help_text, low=low, nullable=nullable)


_SPLIT = Option("choice", "a data split", choices=SPLITS)
_THREADS = _count("torch intra-op threads; null: backends.threads.DEFAULT_TORCH_THREADS", nullable=True)
_SEED = Option("int", "random seed", low=0, high=2**32 - 1)  # numpy and torch both accept this range

#: the typed options of each CLI config (``config`` = train.py, ``evaluate`` = evaluate.py)
SCHEMAS: dict[str, dict[str, Option]] = {
    "config": {
        "seed": _SEED,
        "torch_threads": _THREADS,
        "checkpoint_every": _count("updates between checkpoints/latest writes"),
        "sample_pool": _count("training samples drawn from the first N of the split", nullable=True),
        "train_split": _SPLIT,
        "runs_dir": Option("str", "the folder runs are written under"),
        "eval.split": _SPLIT,
        "eval.validation_split": _SPLIT,
        "eval.num_samples": _count("test samples per budget"),
        "eval.every": _count("updates between validations"),
        "eval.validation_samples": _count("validation samples per budget"),
        "rollout.workers": _count("Ray actors collecting GRPO groups"),
        "rollout.address": Option("str", "auto, or the address of a running Ray cluster"),
    },
    "evaluate": {
        "run": Option("str", "the run folder written by train.py"),
        "checkpoint": Option("choice", "which checkpoint of the run", choices=("best", "latest")),
        "split": _SPLIT,
        "num_samples": _count("test samples per budget", nullable=True),
        "torch_threads": _THREADS,
        "env_id": Option("str", "an env id", nullable=True),
        "out": Option("str", "the output folder", nullable=True),
        "estimator": Option("str", "a registered estimator name or module:callable", nullable=True),
        "agent_module": Option("str", "a module to import first (it registers an agent)", nullable=True),
        "trust_remote_code": Option("bool", "run code shipped with the run's model"),
        "latency.profile": Option("str", "another device's latency estimator file", nullable=True),
    },
}


# ------------------------------------------------------------------------------------------------
def parse_override(arg: str):
    """``arg`` parsed by Hydra's own override parser; an unparsable one is a :class:`UsageError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot parse override {arg!r} ({first}); accepted: key=value as in "
                         f"https://hydra.cc/docs/advanced/override_grammar/basic/") from None


def _default_option(config_name: str, group: str) -> str | None:
    """The ``group`` option ``conf/<config_name>.yaml``'s defaults list picks (``agent`` -> ``grpo``)."""
    from omegaconf import DictConfig, OmegaConf

    if config_name != "config":
        return None
    for item in OmegaConf.load(CONF_DIR / f"{config_name}.yaml").get("defaults", []):
        if isinstance(item, DictConfig) and group in item:
            return str(item[group])
    return None


def _agent_names() -> list[str]:
    """Registered agents and those with a ``conf/agent`` yaml."""
    from agents import list_agents

    return sorted(set(list_agents()) | {p.stem for p in (CONF_DIR / "agent").glob("*.yaml")})


def check_typed_overrides(argv: Sequence[str], config_name: str) -> None:
    """Check every override of ``argv`` against :data:`SCHEMAS` and the agent option rules.

    Raises :class:`UsageError` (one line: key, value, what is accepted) for the first bad one.
    """
    schema = SCHEMAS.get(config_name, {})
    parsed = []
    for arg in argv:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        override = parse_override(arg)
        key = override.key_or_group
        raw = arg.split("=", 1)[1] if "=" in arg else ""
        if override.is_sweep_override():
            raise UsageError(f"{key}={raw} is a sweep; accepted: one value per key (this CLI runs one job)")
        if override.is_delete():
            if key in schema or key == "resume":
                raise UsageError(f"~{key} would delete a required option; accepted: {key}=<value> "
                                 f"({schema[key].accepted() if key in schema else 'see conf/'})")
            continue
        value = override.value()
        parsed.append((key, value, raw))
        adds = override.is_add() or override.is_force_add()
        if key.startswith("backend.") and config_name == "config" and not adds:
            _check_backend_key(key, raw, argv)
        if key in schema:
            schema[key].check(key, value, raw)
        if key == "resume":
            check_resume(value, raw)
        if key in ("eval.baselines", "baselines") and config_name in ("config", "evaluate"):
            if not (config_name == "evaluate" and value is None):
                Option("names", "agents to compare", choices=tuple(_agent_names())).check(key, value, raw)
    if config_name == "config":
        _check_agent_overrides(parsed, config_name)


def _check_backend_key(key: str, raw: str, argv: Sequence[str]) -> None:
    """``backend.<option>`` must be a key of the chosen ``conf/backend/<name>.yaml`` (the factory's arguments)."""
    from omegaconf import OmegaConf

    name = (next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == "backend"), None)
            or _default_option("config", "backend"))
    path = CONF_DIR / "backend" / f"{name}.yaml"
    if not path.exists():  # a backend configured outside conf/ (hydra.searchpath)
        return
    options = sorted(set(OmegaConf.load(path)) - {"name"})
    if key.split(".")[1] not in options:
        raise UsageError(f"unknown option {key!r} of backend {name}; accepted: "
                         f"{', '.join('backend.' + o for o in options)} (+backend.<option>=... adds one)")


def _check_agent_overrides(parsed: list[tuple[str, Any, str]], config_name: str) -> None:
    """``agent.<option>`` against the chosen agent; ``baselines.<agent>.<option>`` against that agent."""
    agent = next((str(v) for k, v, _ in parsed if k == "agent"), None) or _default_option(config_name, "agent")
    groups: dict[tuple[str, str], dict[str, tuple[Any, str]]] = {}
    for key, value, raw in parsed:
        parts = key.split(".")
        if parts[0] == "agent" and len(parts) == 2 and agent is not None:
            groups.setdefault(("agent", agent), {})[parts[1]] = (value, raw)
        elif parts[0] == "baselines" and len(parts) == 3:
            groups.setdefault((f"baselines.{parts[1]}", parts[1]), {})[parts[2]] = (value, raw)
    for (prefix, name), options in groups.items():
        check_agent_options(name, options, prefix)


def check_agent_options(agent: str, options: dict[str, tuple[Any, str]], prefix: str = "agent",
                        seed: int = 0) -> None:
    """Check ``options`` (``option -> (value, raw text)``) of ``agent`` before a run folder exists.

    Unknown options are an error listing the agent's options; each value must have the type of
    its default in ``conf/agent/<agent>.yaml``; then the agent's declared config dataclass
    (``Agent.config_class``) validates the whole set.
    """
    from omegaconf import OmegaConf

    path = CONF_DIR / "agent" / f"{agent}.yaml"
    if not path.exists():  # an agent configured outside conf/ (hydra.searchpath) checks its own options
        return
    from agents import agent_class, list_agents

    defaults = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    defaults.pop("name", None)
    config_class = agent_class(agent).config_class if agent in list_agents() else None
    declared = {f.name for f in fields(config_class)} if config_class is not None else set()
    known = set(defaults) | declared | {"seed"}
    for option, (value, raw) in options.items():
        key = f"{prefix}.{option}"
        if option not in known:
            raise UsageError(f"unknown option {key!r} of agent {agent}; accepted: "
                             f"{', '.join(sorted(known)) or '(none)'}")
        if option == "seed":
            _SEED.check(key, value, raw)
        else:
            _check_like_default(key, value, raw, defaults.get(option))
    if config_class is not None:
        merged = {k: v for k, v in defaults.items() if not (isinstance(v, str) and v.startswith("${"))}
        merged.update({k: v for k, (v, _) in options.items() if k in declared})
        try:
            config_class.from_dict(merged)
        except (ValueError, TypeError) as exc:
            raise UsageError(_prefixed(str(exc), prefix, merged)) from None


def _check_like_default(key: str, value: Any, raw: str, default: Any) -> None:
    """A value of the same kind as the option's default (an int where the default is an int, ...)."""
    if default is None or (isinstance(default, str) and default.startswith("${")):
        return
    if isinstance(default, bool):
        Option("bool").check(key, value, raw)
    elif isinstance(default, int):
        Option("int").check(key, value, raw)
    elif isinstance(default, float):
        Option("float").check(key, value, raw)
    elif isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise UsageError(f"{key}={raw} is invalid; accepted: a list like {default}")


def _prefixed(message: str, prefix: str, options: dict) -> str:
    """A config dataclass's ``name=value is invalid`` message with the CLI key (``agent.name=value``)."""
    for name in sorted(options, key=len, reverse=True):
        if message.startswith(f"{name}="):
            return f"{prefix}.{message}"
    return f"{prefix}: {message}"


# ------------------------------------------------------------------------------------------------
def run_folder_checkpoint(path: Path) -> Path | None:
    """The ``checkpoints/latest*`` entry of a run folder (file or folder), or ``None``."""
    found = sorted((Path(path) / "checkpoints").glob("latest*"))
    return found[0] if found else None


def check_resume(value: Any, raw: str) -> None:
    """``resume=true/false/null`` or the path of a run folder that holds ``checkpoints/latest``.

    A missing folder, or one without a checkpoint, is a :class:`UsageError` naming the path given
    (nothing is created).
    """
    if value is None or isinstance(value, bool) or str(value).lower() in ("true", "false", "null", ""):
        return
    path = Path(str(value)).expanduser()
    accepted = ("accepted: resume=true (the latest run of this env and agent), resume=false, or resume=<run folder> "
                "holding checkpoints/latest (runs/<env>/<agent>/<timestamp>)")
    if not path.is_dir():
        raise UsageError(f"resume={raw}: no such run folder {str(path)!r}; {accepted}")
    if run_folder_checkpoint(path) is None:
        raise UsageError(f"resume={raw}: {str(path)!r} holds no checkpoints/latest; {accepted}")
    from knobgym_cli.runs import check_run_folder

    check_run_folder(path)  # before Hydra writes its record into it
