"""Train a budget-aware controller and compare it with the baselines on the test split.

    python train.py env=MultiKnob-v0 budget=auto               # GRPO at a budget that binds on this device
    python train.py env=MultiKnob-v0 budget=50% agent.total_updates=200 seed=1   # halfway up this device's range
    python train.py agent=bandit budget="[25%,75%]"
    python train.py resume=true                                # continue the latest run (or resume=<run dir>)

Writes ``runs/<env>/<agent>/<timestamp>/``: ``.hydra/`` (resolved config), ``versions.json``,
``train.log`` (what the terminal showed), TensorBoard events,
``checkpoints/{latest,best}.safetensors``, ``baselines/``, ``report.md``, ``report.json`` and
``pareto.png`` (a resumed run moves the earlier report to ``reports/<timestamp>/``), and ends with
a summary: the verdict, the files, what to run next. ``budget=auto`` (the default) is the env's
``suggested_budget_ms`` on this device, resolved once at startup. Configuration:
``conf/config.yaml`` and the groups ``conf/env``, ``conf/agent``, ``conf/backend``, ``conf/rollout``
(``rollout=ray rollout.workers=N``: GRPO's groups on Ray actors, same results);
``python train.py --help`` lists them. The agent's own ``fit`` is the training loop;
this script supplies its hooks (:class:`knobgym_cli.training.TrainingHooks`) and knows no agent
by name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from backends.registry import with_threads
from backends.threads import resolve_threads, set_torch_threads
from envs.budget import is_device_relative
from envs.protocols import group_env
from knobgym_cli.budgets import is_auto, probe_suggested_budget, recorded_budget, run_budget
from knobgym_cli.build import (agent_class_of, agent_options, build_agent, check_recorded_config, check_run_backend,
                              eval_budgets)
from knobgym_cli.checkpoints import checkpoint_file, load_run_checkpoint, read_with_fallback
from knobgym_cli.errors import CONF_DIR, GROUPS, run_cli
from knobgym_cli.logs import say, setup_cli_logging, warning_line
from knobgym_cli.phases import baseline_agents, baseline_options, build_run_env, compare_on_test
from knobgym_cli.progress import phase
from knobgym_cli.rollout import rollout_executor
from knobgym_cli.runs import check_run_folder, discard_failed_run_dir, is_resume, register_resolvers
from knobgym_cli.usage import UsageError, fail
from knobgym_cli.versions import to_jsonable, versions

register_resolvers()


def resumed_config(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, dict]:
    """The run's saved config with this invocation's explicit overrides applied; and the checkpoint.

    Changing the env, agent or backend of a run is an error; other overrides (e.g. a larger
    ``agent.total_updates``) apply to the continued run.
    """
    from hydra.core.hydra_config import HydraConfig

    if not any((run_dir / "checkpoints").glob(checkpoint_file("*"))):
        raise UsageError(f"resume={cfg.resume!r}: no checkpoints/{checkpoint_file('latest')} found (looked in "
                         f"{str(run_dir)!r}); accepted: resume=true with an earlier run of env {cfg.env.id} and "
                         f"agent {cfg.agent.name} under {cfg.runs_dir!r}, or resume=<run dir>")
    ckpt, path = read_with_fallback(run_dir, "latest")  # a damaged latest: the last valid one, said so
    overridden = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    recorded = ckpt["metadata"]["config"]
    # the run folder is data: what its config names is resolved by registered name only; the
    # agent's module comes from this command line's conf/agent yaml (when it is the run's agent)
    same_agent = str(cfg.agent.name) == str((recorded.get("agent") or {}).get("name"))
    command_line = {"estimator": cfg.estimator if "estimator" in overridden else None,
                    "env.id": cfg.env.id if "env" in overridden else None,
                    "agent.module": cfg.agent.get("module") if same_agent else None,
                    "backend.trust_remote_code": cfg.backend.get("trust_remote_code")
                    if "backend.trust_remote_code" in overridden else None}
    saved = OmegaConf.create(check_recorded_config(recorded, f"checkpoint {str(path)!r}", command_line))
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra"):
            continue
        if key in GROUPS:
            name_key = "id" if key == "env" else "name"
            if cfg[key][name_key] != saved[key][name_key]:
                raise UsageError(f"cannot resume a {key}={saved[key][name_key]} run with {key}={cfg[key][name_key]}; "
                                 f"accepted: the run's own {key} ({saved[key][name_key]})")
            continue
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.resume = False
    return saved, ckpt


def run_backend_config(cfg: DictConfig) -> dict:
    """The run's backend config with its torch thread count (``torch_threads: null``: the default
    every entry point shares, :data:`backends.threads.DEFAULT_TORCH_THREADS`)."""
    return with_threads(OmegaConf.to_container(cfg.backend, resolve=True), cfg.torch_threads)


def run_training(cfg: DictConfig, run_dir: Path) -> None:
    """The run, phase by phase: prepare (resume, agent, budget), build the env, train, fit the
    baselines, compare on the test split and report."""
    setup_cli_logging(run_dir / "train.log")
    start = time.perf_counter()
    cfg, resume_ckpt, cls, requested_budget = prepare_run(cfg, run_dir)
    with phase(f"building {cfg.env.id} at budget={cfg.budget} (loads the model and the latency estimator, "
               f"profiled once per device when not cached)"):
        env, notes, achievable, suggested = build_run_env(
            OmegaConf.to_container(cfg.env, resolve=True), run_backend_config(cfg),
            run_budget(cfg.budget), cfg.estimator, split=cfg.train_split)
    if resume_ckpt is not None and resume_ckpt["env_id"] != cfg.env.id:
        raise UsageError(f"run {str(run_dir)!r} was trained on {resume_ckpt['env_id']}, not {cfg.env.id}")
    if is_device_relative(cfg.budget):  # '50%', [25%,75%]: resolved once, here, and recorded like budget=auto
        cfg.budget = recorded_budget(env)
        say(f"budget={requested_budget} -> budget={cfg.budget} (recorded in the checkpoint's config and the report)")
    budgets_ms = eval_budgets(group_env(env).budget, cfg.eval.budgets, achievable, suggested)
    agent, train_stats, hooks = train_agent(cfg, run_dir, env, cls, resume_ckpt, budgets_ms)
    train_seconds = time.perf_counter() - start
    compared = {cls.name: agent, **baseline_agents(
        env, [b for b in cfg.eval.baselines if b != cls.name], baseline_options(cfg.get("baselines")), cfg.seed,
        cfg.train_split, budgets_ms, save_dir=run_dir / "baselines")}
    rows, test_ids = compare_on_test(env, compared, budgets_ms, cfg.eval.split, cfg.eval.num_samples)
    for row in rows:  # at the step training ended, beside the run's last training and validation points
        hooks.writer.add_scalar(f"test/{row['agent']}/score", row["score"], hooks.step)
        hooks.writer.add_scalar(f"test/{row['agent']}/violation_rate", row["violation_rate"], hooks.step)
    hooks.writer.close()
    facts = {"samples": len(test_ids), "budget": str(group_env(env).budget), "budget_requested": requested_budget,
             "backend": group_env(env).provenance()["model"], "train": to_jsonable(train_stats),
             "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
             "notes": notes, "resumed": resume_ckpt is not None}
    write_run_report(cfg, run_dir, rows, facts, hooks, cls.name, budgets_ms, achievable, suggested)


def prepare_run(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, dict | None, type, str]:
    """The run's config (a resumed run's own, with this invocation's overrides), its checkpoint when
    resumed, the agent class (evaluation-only agents refused) and the budget as requested; resolves
    ``budget=auto`` into ``cfg.budget`` and sets torch's threads."""
    from agents import evaluation_only, list_agents
    from knobgym_cli.summary import previous_report_problem

    resume_ckpt = None
    if is_resume(cfg.resume):
        cfg, resume_ckpt = resumed_config(cfg, run_dir)
        problem = previous_report_problem(run_dir)  # a damaged report.json: said before training, not after
        if problem:
            warning_line(problem)
    cls = agent_class_of(OmegaConf.to_container(cfg.agent, resolve=True))
    if cls.evaluation_only:
        raise UsageError(f"agent={cls.name} is evaluation only; accepted: "
                         f"{', '.join(a for a in list_agents() if a not in evaluation_only())}")
    env_kwargs = cfg.env.get("kwargs")  # an env config may have none
    check_run_backend(cfg.env.id, run_backend_config(cfg),  # a missing model or dataset: one line, now
                      OmegaConf.to_container(env_kwargs, resolve=True) if env_kwargs is not None else None)
    set_torch_threads(resolve_threads(cfg.torch_threads))  # null: the default gym.make's backends use too
    requested_budget = str(cfg.budget)
    if is_auto(cfg.budget):
        with phase("budget=auto: loading the model and the latency estimator (profiled once per device when not "
                   "cached) to find a budget that binds on this device"):
            suggested = probe_suggested_budget(OmegaConf.to_container(cfg.env, resolve=True),
                                               run_backend_config(cfg), cfg.estimator)
            cfg.budget = f"{suggested:g}ms"  # recorded as the user would write it; the env gets run_budget's object
        say(f"budget=auto -> budget={cfg.budget} (recorded in the checkpoint's config and the report)")
    return cfg, resume_ckpt, cls, requested_budget


def train_agent(cfg: DictConfig, run_dir: Path, env, cls, resume_ckpt: dict | None, budgets_ms: list[float]):
    """Train (or continue) the run's agent through its own ``fit``, with the CLI's hooks validating,
    checkpointing and logging; returns ``(agent, train_stats, hooks)``."""
    from torch.utils.tensorboard import SummaryWriter

    from agents import FitContext
    from backends.io import atomic_write_json
    from knobgym_cli.summary import display_path
    from knobgym_cli.training import TrainingHooks

    atomic_write_json(run_dir / "versions.json", versions(env))
    writer = SummaryWriter(log_dir=str(run_dir))
    say(f"run folder: {display_path(run_dir)}")
    resumed = resume_ckpt is not None and cls.resumable
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    hooks = TrainingHooks(env, run_dir, writer, OmegaConf.to_container(cfg, resolve=True),
                          OmegaConf.to_container(cfg.eval, resolve=True), budgets_ms, cfg.checkpoint_every,
                          resumed=resumed,
                          best=resume_ckpt["metadata"].get("best_validation_reward", -np.inf) if resumed else -np.inf,
                          last=resume_ckpt["metadata"].get("last_validation_reward") if resumed else None,
                          title=f"{cls.name} {cfg.env.id} {group_env(env).budget}")
    # rollout=ray: a Ray session (and its actors) for training only; baselines and evaluation run here
    with rollout_executor(cfg.get("rollout"), resolve_threads(cfg.torch_threads)) as executor:
        context = FitContext(split=cfg.train_split, sample_pool=cfg.sample_pool, budgets_ms=budgets_ms, hooks=hooks,
                             executor=executor)
        if resumed:
            agent = cls.restore(env, resume_ckpt["state"])
            agent.configure(**agent_options(agent_cfg))  # e.g. a larger total_updates
            train_stats = agent.fit(env, context)
        else:  # an agent with an update loop shows its phases through the hooks (initial validation, updates)
            with phase(f"training {cls.name}"):
                agent, train_stats = build_agent(cls.name, agent_options(agent_cfg), env, cfg.seed, context)
    if hooks.validated:
        train_stats = {**train_stats, "best_validation_reward": hooks.best}
    return hooks.finish(agent, train_stats), train_stats, hooks


def write_run_report(cfg: DictConfig, run_dir: Path, rows: list[dict], facts: dict, hooks, name: str,
                     budgets_ms: list[float], achievable: tuple[float, float], suggested: float) -> None:
    """``report.md`` / ``report.json`` / ``pareto.png`` (an earlier report archived), the table on
    stdout and the closing summary."""
    from knobgym_cli.budgets import binding
    from knobgym_cli.report import markdown_table, write_report
    from knobgym_cli.summary import (archive_previous_report, checkpoint_line, checkpoint_record, display_path,
                                     next_commands, now_stamp, portable, print_summary, run_files, verdict_lines)

    validation = {"split": cfg.eval.validation_split, "every": cfg.eval.every, "budgets_ms": budgets_ms,
                  "samples": len(hooks.validation_ids)}
    chosen = checkpoint_record(load_run_checkpoint(hooks.reported_checkpoint)["metadata"],
                               read_with_fallback(run_dir, "latest")[0]["metadata"], name, validation,
                               path=f"checkpoints/{hooks.reported_checkpoint.name}")
    previous = archive_previous_report(run_dir)
    budget = facts["budget"]
    meta = {"title": f"{cfg.env.id} / {name} / {cfg.eval.split} split", "env": cfg.env.id, "agent": name,
            "split": cfg.eval.split, "samples": facts["samples"], "budget": budget,
            "budget_requested": facts["budget_requested"], "achievable_range_ms": [round(x, 2) for x in achievable],
            "suggested_budget_ms": round(suggested, 2), "backend": facts["backend"], "checkpoint": chosen,
            **{k: facts[k] for k in ("train", "train_seconds", "total_seconds", "notes")},
            "finished_at": now_stamp(), "resumed": facts["resumed"]}
    if previous is not None:
        meta["previous_reports"] = display_path(previous.parent, run_dir) + "/ (the latest: " + \
            display_path(previous, run_dir) + ")"
    write_report(run_dir, rows, portable(meta), main_agent=name)
    print(markdown_table(rows), file=sys.stdout)
    print_summary(verdict_lines(rows, name, budget, achievable, suggested, cfg.eval.split), run_files(run_dir),
                  next_commands(run_dir, cfg.runs_dir, cfg.env.id, name, binding(budget, achievable), suggested,
                                cfg.estimator),
                  checkpoint=checkpoint_line(chosen))


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from knobgym_cli.guard import hold_run_folder, one_line_errors

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_run_folder(run_dir)  # resume=true's folder (resume=<dir> was checked before Hydra wrote to it)
    except ValueError as exc:
        fail(str(exc))
    # The folder is locked while this process trains in it; any failure is one line, and a folder
    # this process created is removed when it fails before the first checkpoint.
    with hold_run_folder(run_dir, HydraConfig.get().output_subdir), \
            one_line_errors(on_failure=lambda: discard_failed_run_dir(run_dir)):
        run_training(cfg, run_dir)


def cli(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad overrides before Hydra composes the config."""
    run_cli("config", main, argv)


if __name__ == "__main__":
    cli()
