"""Train a budget-aware controller and compare it with the baselines on the test split.

    python train.py env=MultiKnob-v0 budget=120ms              # GRPO on the tiny default backend
    python train.py env=MultiKnob-v0 budget=120ms agent.total_updates=200 seed=1
    python train.py agent=bandit budget="[80ms,200ms]"
    python train.py resume=true                                # continue the latest run (or resume=<run dir>)

Writes ``runs/<env>/<agent>/<timestamp>/``: ``.hydra/`` (resolved config), ``versions.json``,
TensorBoard events, ``checkpoints/{latest,best}.safetensors``, ``baselines/``, ``report.md``,
``report.json`` and ``pareto.png``. Configuration: ``conf/config.yaml`` and the groups
``conf/env``, ``conf/agent``, ``conf/backend``. The agent's own ``fit`` is the training loop;
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

from knobgym_cli.build import agent_class_of, agent_options, build_agent, eval_budgets, make_env
from knobgym_cli.checkpoints import checkpoint_file, load_run_checkpoint
from knobgym_cli.errors import CONF_DIR, GROUPS, UsageError, fail, run_cli
from knobgym_cli.runs import discard_failed_run_dir, is_resume, register_resolvers
from knobgym_cli.versions import to_jsonable, versions

register_resolvers()


def resumed_config(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, dict]:
    """The run's saved config with this invocation's explicit overrides applied; and the checkpoint.

    Changing the env, agent or backend of a run is an error; other overrides (e.g. a larger
    ``agent.total_updates``) apply to the continued run.
    """
    from hydra.core.hydra_config import HydraConfig

    ckpt_path = run_dir / "checkpoints" / checkpoint_file("latest")
    if not ckpt_path.exists():
        raise UsageError(f"resume={cfg.resume!r}: no checkpoints/{ckpt_path.name} found (looked in {str(run_dir)!r}); "
                         f"accepted: resume=true with an earlier run of env {cfg.env.id} and agent {cfg.agent.name} "
                         f"under {cfg.runs_dir!r}, or resume=<run dir>")
    ckpt = load_run_checkpoint(ckpt_path)
    saved = OmegaConf.create(ckpt["metadata"]["config"])
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
    from knobgym_cli.report import compare_agents, write_report
    from knobgym_cli.training import TrainingHooks

    resume_ckpt = None
    if is_resume(cfg.resume):
        cfg, resume_ckpt = resumed_config(cfg, run_dir)
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    cls = agent_class_of(agent_cfg)
    name = cls.name
    if cls.evaluation_only:
        raise UsageError(f"agent={name} is evaluation only; accepted: "
                         f"{', '.join(a for a in list_agents() if a not in evaluation_only())}")
    torch.set_num_threads(int(cfg.torch_threads))
    start = time.perf_counter()
    env, notes = make_env(OmegaConf.to_container(cfg.env, resolve=True),
                          OmegaConf.to_container(cfg.backend, resolve=True), cfg.budget, cfg.estimator,
                          split=cfg.train_split)
    if resume_ckpt is not None and resume_ckpt["env_id"] != cfg.env.id:
        raise UsageError(f"run {str(run_dir)!r} was trained on {resume_ckpt['env_id']}, not {cfg.env.id}")
    budget = group_env(env).budget
    budgets_ms = eval_budgets(budget, cfg.eval.budgets)
    atomic_write_json(run_dir / "versions.json", versions(env))
    writer = SummaryWriter(log_dir=str(run_dir))
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    print(f"run folder: {run_dir}", file=sys.stderr)

    resumed = resume_ckpt is not None and cls.resumable
    hooks = TrainingHooks(env, run_dir, writer, config_dict, OmegaConf.to_container(cfg.eval, resolve=True),
                          budgets_ms, cfg.checkpoint_every, resumed=resumed,
                          best=resume_ckpt["metadata"].get("best_validation_reward", -np.inf) if resumed else -np.inf,
                          title=f"{name} {cfg.env.id} {budget}")
    context = FitContext(split=cfg.train_split, sample_pool=cfg.sample_pool, budgets_ms=budgets_ms, hooks=hooks)
    if resumed:
        agent = cls.restore(env, resume_ckpt["state"])
        agent.configure(**agent_options(agent_cfg))  # e.g. a larger total_updates
        train_stats = agent.fit(env, context)
    else:
        agent, train_stats = build_agent(name, agent_options(agent_cfg), env, cfg.seed, context)
    if hooks.validated:
        train_stats = {**train_stats, "best_validation_reward": hooks.best}
    agent = hooks.finish(agent, train_stats)
    train_seconds = time.perf_counter() - start

    # Final comparison on the test split, against the baselines fitted on the same env.
    compared = {name: agent}
    baseline_dir = run_dir / "baselines"
    for baseline in cfg.eval.baselines:
        if baseline == name:
            continue
        node = cfg.baselines.get(baseline)
        options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        compared[baseline], _ = build_agent(baseline, options, env, cfg.seed,
                                            FitContext(split=cfg.train_split, budgets_ms=budgets_ms))
        if not compared[baseline].evaluation_only:
            compared[baseline].save(baseline_dir / checkpoint_file(baseline), env)
    test_ids = eval_sample_ids(env, cfg.eval.split, cfg.eval.num_samples)
    rows = compare_agents(env, compared, budgets_ms, test_ids, cfg.eval.split, progress=True)
    for row in rows:
        writer.add_scalar(f"test/{row['agent']}/score", row["score"], 0)
        writer.add_scalar(f"test/{row['agent']}/violation_rate", row["violation_rate"], 0)
    writer.close()
    meta = {"title": f"{cfg.env.id} / {name} / {cfg.eval.split} split", "env": cfg.env.id, "agent": name,
            "split": cfg.eval.split, "samples": len(test_ids), "budget": str(budget),
            "backend": group_env(env).provenance()["model"], "checkpoint": f"checkpoints/{checkpoint_file('best')}",
            "train": to_jsonable(train_stats), "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - start, 1), "notes": notes}
    write_report(run_dir, rows, meta, main_agent=name)
    print((run_dir / "report.md").read_text(), file=sys.stdout)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_training(cfg, run_dir)
    except ValueError as exc:  # our bad-value errors (UsageError, KnobError, budget, options): one line
        discard_failed_run_dir(run_dir)
        fail(str(exc))


def cli(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad overrides before Hydra composes the config."""
    run_cli("config", main, argv)


if __name__ == "__main__":
    cli()
