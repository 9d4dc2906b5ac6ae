"""Train a budget-aware controller and compare it with the baselines on the test split.

    python train.py env=MultiKnob-v0 budget=auto               # GRPO at a budget that binds on this device
    python train.py env=MultiKnob-v0 budget=45ms agent.total_updates=200 seed=1
    python train.py agent=bandit budget="[35ms,55ms]"
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

from knobgym_cli.budgets import describe_range, env_range, is_auto, probe_suggested_budget
from knobgym_cli.build import (agent_class_of, agent_options, build_agent, check_recorded_config, eval_budgets,
                               make_env)
from knobgym_cli.checkpoints import checkpoint_file, load_run_checkpoint, read_with_fallback
from knobgym_cli.errors import CONF_DIR, GROUPS, UsageError, fail, run_cli
from knobgym_cli.logs import say, setup_cli_logging, warning_line
from knobgym_cli.progress import cli_progress, phase
from knobgym_cli.rollout import rollout_executor
from knobgym_cli.runs import check_run_folder, discard_failed_run_dir, is_resume, register_resolvers
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


def run_training(cfg: DictConfig, run_dir: Path) -> None:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from agents import FitContext, eval_sample_ids, evaluation_only, list_agents
    from backends.io import atomic_write_json
    from envs.protocols import group_env
    from knobgym_cli.budgets import binding
    from knobgym_cli.report import compare_agents, markdown_table, write_report
    from knobgym_cli.summary import (archive_previous_report, checkpoint_line, checkpoint_record, display_path,
                                     next_commands, now_stamp, portable, previous_report_problem, print_summary,
                                     run_files, verdict_lines)
    from knobgym_cli.training import TrainingHooks

    setup_cli_logging(run_dir / "train.log")
    resume_ckpt = None
    if is_resume(cfg.resume):
        cfg, resume_ckpt = resumed_config(cfg, run_dir)
        problem = previous_report_problem(run_dir)
        if problem:
            warning_line(problem)
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    cls = agent_class_of(agent_cfg)
    name = cls.name
    if cls.evaluation_only:
        raise UsageError(f"agent={name} is evaluation only; accepted: "
                         f"{', '.join(a for a in list_agents() if a not in evaluation_only())}")
    torch.set_num_threads(int(cfg.torch_threads))
    start = time.perf_counter()
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    backend_cfg = OmegaConf.to_container(cfg.backend, resolve=True)
    requested_budget = str(cfg.budget)
    if is_auto(cfg.budget):
        with phase("budget=auto: loading the model and the latency estimator (profiled once per device when not "
                   "cached) to find a budget that binds on this device"):
            cfg.budget = f"{probe_suggested_budget(env_cfg, backend_cfg, cfg.estimator):g}ms"
        say(f"budget=auto -> budget={cfg.budget} (recorded in the checkpoint's config and the report)")
    with phase(f"building {cfg.env.id} at budget={cfg.budget} (loads the model and the latency estimator, "
               f"profiled once per device when not cached)"):
        env, notes = make_env(env_cfg, backend_cfg, cfg.budget, cfg.estimator, split=cfg.train_split)
    achievable, suggested = env_range(env)
    say(describe_range(achievable, suggested))
    if resume_ckpt is not None and resume_ckpt["env_id"] != cfg.env.id:
        raise UsageError(f"run {str(run_dir)!r} was trained on {resume_ckpt['env_id']}, not {cfg.env.id}")
    budget = group_env(env).budget
    budgets_ms = eval_budgets(budget, cfg.eval.budgets)
    atomic_write_json(run_dir / "versions.json", versions(env))
    writer = SummaryWriter(log_dir=str(run_dir))
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    say(f"run folder: {display_path(run_dir)}")

    resumed = resume_ckpt is not None and cls.resumable
    hooks = TrainingHooks(env, run_dir, writer, config_dict, OmegaConf.to_container(cfg.eval, resolve=True),
                          budgets_ms, cfg.checkpoint_every, resumed=resumed,
                          best=resume_ckpt["metadata"].get("best_validation_reward", -np.inf) if resumed else -np.inf,
                          last=resume_ckpt["metadata"].get("last_validation_reward") if resumed else None,
                          title=f"{name} {cfg.env.id} {budget}")
    # rollout=ray: a Ray session (and its actors) for training only; baselines and evaluation run here
    with rollout_executor(cfg.get("rollout"), int(cfg.torch_threads)) as executor:
        context = FitContext(split=cfg.train_split, sample_pool=cfg.sample_pool, budgets_ms=budgets_ms, hooks=hooks,
                             executor=executor)
        if resumed:
            agent = cls.restore(env, resume_ckpt["state"])
            agent.configure(**agent_options(agent_cfg))  # e.g. a larger total_updates
            train_stats = agent.fit(env, context)
        else:  # an agent with an update loop shows its phases through the hooks (initial validation, updates)
            with phase(f"training {name}"):
                agent, train_stats = build_agent(name, agent_options(agent_cfg), env, cfg.seed, context)
    if hooks.validated:
        train_stats = {**train_stats, "best_validation_reward": hooks.best}
    agent = hooks.finish(agent, train_stats)
    train_seconds = time.perf_counter() - start

    # Final comparison on the test split, against the baselines fitted on the same env.
    compared = {name: agent}
    baseline_dir = run_dir / "baselines"
    baselines = [b for b in cfg.eval.baselines if b != name]
    bar = cli_progress(len(baselines), "fitting baselines", "agent")
    for baseline in baselines:
        bar.set_postfix(agent=baseline)
        node = cfg.baselines.get(baseline)
        options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        compared[baseline], _ = build_agent(baseline, options, env, cfg.seed,
                                            FitContext(split=cfg.train_split, budgets_ms=budgets_ms))
        if not compared[baseline].evaluation_only:
            compared[baseline].save(baseline_dir / checkpoint_file(baseline), env)
        bar.update(1)
    bar.close()
    test_ids = eval_sample_ids(env, cfg.eval.split, cfg.eval.num_samples)
    rows = compare_agents(env, compared, budgets_ms, test_ids, cfg.eval.split, progress=cli_progress)
    for row in rows:
        writer.add_scalar(f"test/{row['agent']}/score", row["score"], 0)
        writer.add_scalar(f"test/{row['agent']}/violation_rate", row["violation_rate"], 0)
    writer.close()
    validation = {"split": cfg.eval.validation_split, "every": cfg.eval.every, "budgets_ms": budgets_ms,
                  "samples": len(hooks.validation_ids)}
    chosen = checkpoint_record(load_run_checkpoint(hooks.reported_checkpoint)["metadata"],
                               read_with_fallback(run_dir, "latest")[0]["metadata"], name, validation,
                               path=f"checkpoints/{hooks.reported_checkpoint.name}")
    previous = archive_previous_report(run_dir)
    meta = {"title": f"{cfg.env.id} / {name} / {cfg.eval.split} split", "env": cfg.env.id, "agent": name,
            "split": cfg.eval.split, "samples": len(test_ids), "budget": str(budget),
            "budget_requested": requested_budget, "achievable_range_ms": [round(x, 2) for x in achievable],
            "suggested_budget_ms": round(suggested, 2),
            "backend": group_env(env).provenance()["model"], "checkpoint": chosen,
            "train": to_jsonable(train_stats), "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - start, 1), "notes": notes, "finished_at": now_stamp(),
            "resumed": resume_ckpt is not None}
    if previous is not None:
        meta["previous_reports"] = display_path(previous.parent, run_dir) + "/ (the latest: " + \
            display_path(previous, run_dir) + ")"
    write_report(run_dir, rows, portable(meta), main_agent=name)
    print(markdown_table(rows), file=sys.stdout)
    print_summary(verdict_lines(rows, name, str(budget), achievable, suggested), run_files(run_dir),
                  next_commands(run_dir, cfg.runs_dir, cfg.env.id, name, binding(str(budget), achievable), suggested,
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
