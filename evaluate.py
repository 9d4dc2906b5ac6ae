"""Evaluate a frozen checkpoint of a run against the baselines at several budgets.

    python evaluate.py run=runs/MultiKnob-v0/grpo/<timestamp>                  # budgets=auto
    python evaluate.py run=runs/MultiKnob-v0/grpo/<timestamp> budgets=[25%,50%,75%]
    python evaluate.py run=runs/... checkpoint=latest num_samples=200

The model weights and the policy are both frozen (no update, no refit of the trained agent). The
env, backend and estimator come from the run's config; a checkpoint of another env, or with
another observation shape, is an error. ``budgets=auto`` (the default) spreads the budgets across
this device's achievable latency range and adds the run's training budget
(:func:`knobgym_cli.budgets.auto_budgets`); a given budget outside the range is warned about.
Writes ``<run>/eval-<budgets>/`` (or ``out=``): ``report.md`` (the table and, per budget, the
trained agent's margin over the best baseline with its 95% paired bootstrap interval), ``report.json``
and ``pareto.png`` (score versus p50 latency, a panel per budget); prints the table and a verdict
line per budget (:func:`knobgym_cli.summary.margin_lines`).

``latency.profile=<estimator file>`` evaluates as another device: its latency estimator replaces
this device's, so a controller trained against one device's latency is evaluated on another's by
re-profiling only (the policy is not retrained; the budget-fitted baselines are refitted there).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from agents import check_agent_name
from backends.registry import with_threads
from backends.threads import resolve_threads, set_torch_threads
from envs.protocols import group_env
from knobgym_cli.budgets import auto_budgets, fixed_budgets_ms, is_auto, out_of_range_warnings
from knobgym_cli.build import agent_class_of, check_recorded_config, check_run_backend, eval_budgets
from knobgym_cli.checkpoints import CHECKPOINT_NAMES, check_checkpoint_matches, checkpoint_file, load_run_checkpoint
from knobgym_cli.errors import CONF_DIR, run_cli
from knobgym_cli.group_configs import resolve_env_id
from knobgym_cli.logs import say, setup_cli_logging
from knobgym_cli.phases import baseline_agents, baseline_options, build_run_env, compare_on_test
from knobgym_cli.progress import phase
from knobgym_cli.runs import check_run_folder
from knobgym_cli.margin import margins
from knobgym_cli.summary import display_path, margin_lines, portable
from knobgym_cli.usage import UsageError
from knobgym_cli.versions import to_jsonable


def run_evaluation(cfg: DictConfig) -> Path:
    """The evaluation, phase by phase: read the checkpoint, build the run's env, load or fit the
    baselines, compare on the test split and report."""
    from knobgym_cli.report import markdown_table, write_report

    setup_cli_logging(None)
    start = time.perf_counter()
    run_dir, ckpt_path, ckpt, run_cfg, env_cfg, main_class = read_run(cfg)
    # this command's torch_threads, else the run's (so the run's latency cache entry is read), else the default
    threads = cfg.torch_threads if cfg.torch_threads is not None else run_cfg.get("torch_threads")
    set_torch_threads(resolve_threads(threads))
    estimator = run_cfg.get("estimator")  # this command's estimator= was applied by check_recorded_config
    device_estimator = None
    profile = cfg.get("latency", {}).get("profile")
    if profile is not None:  # another device's latency: the run's estimator setting gives way to it
        from latency_model import LatencyEstimator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fitted on another device: that is the point here
            device_estimator, estimator = LatencyEstimator.load(str(profile)), None
    backend_cfg = with_threads(OmegaConf.to_container(run_cfg.backend, resolve=True), threads)
    check_run_backend(env_cfg["id"], backend_cfg, env_cfg.get("kwargs"))  # the run's model or dataset missing here
    with phase("loading the model and the latency estimator (profiled once per device when not cached)"):
        env, notes, achievable, suggested = build_run_env(env_cfg, backend_cfg, run_cfg.budget, estimator,
                                                          estimator_object=device_estimator)
    if device_estimator is not None:
        notes = [*notes, f"latency.profile={profile}: latencies, budgets=auto and the refitted baselines are "
                         f"those of the device this estimator was profiled on "
                         f"({device_estimator.fingerprint.get('device', device_estimator.fingerprint)})"]
    check_checkpoint_matches(ckpt, env, ckpt_path)
    budgets_ms = evaluation_budgets(cfg, group_env(env).budget, achievable, suggested)
    name = main_class.name
    baselines = [check_agent_name(b) for b in (cfg.baselines if cfg.baselines is not None else run_cfg.eval.baselines)]
    compared = {name: main_class.restore(env, ckpt["state"]).freeze(), **baseline_agents(
        env, [b for b in baselines if b != name], baseline_options(run_cfg.get("baselines")), int(run_cfg.seed),
        run_cfg.train_split, budgets_ms, saved_dir=run_dir / "baselines", title="loading and fitting baselines")}
    num_samples = cfg.num_samples if cfg.num_samples is not None else run_cfg.eval.num_samples
    rows, test_ids = compare_on_test(env, compared, budgets_ms, cfg.split, num_samples, "num_samples")
    out_dir = Path(str(cfg.out)) if cfg.out is not None else run_dir / ("eval-" + "-".join(f"{b:g}" for b in budgets_ms) + "ms")
    meta = {"title": f"{env_cfg['id']} / {name} (frozen {cfg.checkpoint}) / {cfg.split} split", "env": env_cfg["id"],
            "agent": name, "split": cfg.split, "samples": len(test_ids), "checkpoint": display_path(ckpt_path),
            "checkpoint_step": ckpt["metadata"].get("step"), "backend": group_env(env).provenance()["model"],
            "budgets_ms": budgets_ms, "budgets_requested": str(cfg.budgets), "achievable_range_ms": list(achievable),
            "suggested_budget_ms": suggested, "seconds": round(time.perf_counter() - start, 1), "notes": notes}
    write_report(out_dir, to_jsonable(rows), portable(meta), main_agent=name)
    print(markdown_table(rows))
    for line in margin_lines(margins(rows, name), cfg.split):
        print(f"verdict: {line}")
    say(f"wrote {display_path(out_dir / 'report.md')}, {display_path(out_dir / 'report.json')}, "
        f"{display_path(out_dir / 'pareto.png')}")
    return out_dir


def read_run(cfg: DictConfig):
    """``(run_dir, checkpoint path, checkpoint, the run's config, its env config, the agent class)``
    of ``run=`` and ``checkpoint=`` (``env_id=`` replacing the run's env id)."""
    run_dir = Path(str(cfg.run))
    if cfg.checkpoint not in CHECKPOINT_NAMES:
        raise UsageError(f"checkpoint={cfg.checkpoint!r} is invalid; accepted: {', '.join(CHECKPOINT_NAMES)}")
    ckpt_path = run_dir / "checkpoints" / checkpoint_file(cfg.checkpoint)
    if not ckpt_path.exists():
        raise UsageError(f"run={str(run_dir)!r} has no checkpoints/{ckpt_path.name}; accepted: a run folder "
                         f"written by train.py (runs/<env>/<agent>/<timestamp>)")
    check_run_folder(run_dir)
    if cfg.out is not None:
        check_out_dir(Path(str(cfg.out)), run_dir)
    ckpt = load_run_checkpoint(ckpt_path)
    # the run folder is data: what its config names is resolved by registered name only
    run_cfg = OmegaConf.create(check_recorded_config(
        ckpt["metadata"]["config"], f"checkpoint {str(ckpt_path)!r}",
        {"estimator": cfg.estimator, "agent.module": cfg.agent_module, "env.id": cfg.env_id,
         "backend.trust_remote_code": True if cfg.trust_remote_code else None}))
    env_cfg = OmegaConf.to_container(run_cfg.env, resolve=True)
    if cfg.env_id is not None:  # <id>, or <module>:<id> importing a module named here (knobgym_cli.group_configs)
        env_cfg = {**env_cfg, "id": resolve_env_id(str(cfg.env_id))}
    main_class = agent_class_of(OmegaConf.to_container(run_cfg.agent, resolve=True))
    if main_class.name != ckpt["agent"]:
        raise UsageError(f"checkpoint {str(ckpt_path)!r} holds a {ckpt['agent']!r} agent but the run's config names "
                         f"{main_class.name!r}; accepted: a checkpoint written by this run")
    return run_dir, ckpt_path, ckpt, run_cfg, env_cfg, main_class


def evaluation_budgets(cfg: DictConfig, env_budget, achievable: tuple[float, float], suggested: float) -> list[float]:
    """``budgets=auto``: spread across the achievable range plus the run's training budget; else the
    given list (a budget outside the range is warned about)."""
    if cfg.budgets is None or is_auto(cfg.budgets):
        budgets_ms = auto_budgets(achievable, fixed_budgets_ms(env_budget))
        say("budgets=auto: " + ", ".join(f"{b:g}ms" for b in budgets_ms))
    else:
        budgets_ms = eval_budgets(env_budget, cfg.budgets, achievable, suggested)
    for message in out_of_range_warnings(budgets_ms, achievable, suggested):
        warnings.warn(message)
    return budgets_ms
def check_out_dir(out_dir: Path, run_dir: Path) -> None:
    """``out=``: a new or existing folder that is not the run folder, nor a training run's folder (its
    report, plot and table are the run's own), nor a file, nor a link; checked before any work."""
    accepted = "accepted: out=<a new folder>, or a folder of an earlier evaluation (null: <run>/eval-<budgets>/)"
    if out_dir.is_symlink():
        raise UsageError(f"out={str(out_dir)!r} is a symbolic link; {accepted}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"out={str(out_dir)!r} is an existing file; {accepted}")
    if out_dir.resolve() == run_dir.resolve() or (out_dir / "checkpoints").is_dir() or (out_dir / "run.lock").exists():
        raise UsageError(f"out={str(out_dir)!r} is a training run's folder (its report, plot and table would be "
                         f"replaced); {accepted}")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from knobgym_cli.guard import one_line_errors

    with one_line_errors():  # bad values exit 2, anything unexpected 1: one line each
        run_evaluation(cfg)


def cli(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad overrides before Hydra composes the config."""
    run_cli("evaluate", main, argv)


if __name__ == "__main__":
    cli()
