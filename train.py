"""Train a budget-aware controller and compare it with the baselines on the test split.

    python train.py env=MultiKnob-v0 budget=auto               # GRPO at a budget that binds on this device
    python train.py env=MultiKnob-v0 budget=45ms agent.total_updates=200 seed=1
    python train.py agent=bandit budget="[35ms,55ms]"
    python train.py resume=true                                # continue the latest run (or resume=<run dir>)

Writes ``runs/<env>/<agent>/<timestamp>/``: ``.hydra/`` (resolved config), ``versions.json``,
``train.log`` (what the terminal showed), TensorBoard events, ``checkpoints/{latest,best}.pt``,
``baselines/``, ``report.md``, ``report.json`` and ``pareto.png`` (a resumed run moves the earlier
report to ``reports/<timestamp>/``), and ends with a summary: the verdict, the files, what to run
next. ``budget=auto`` (the default) is the env's ``suggested_budget_ms`` on this device, resolved
once at startup. Configuration: ``conf/config.yaml`` and the groups ``conf/env``, ``conf/agent``,
``conf/backend``; ``python train.py --help`` lists them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.runs import (GROUPS, UsageError, discard_failed_run_dir, eval_budgets, fail, fit_agent,
                         import_callable, is_resume, load_checkpoint, make_env, register_resolvers, save_checkpoint,
                         to_jsonable, run_cli, versions)
from envs.budget import Budget
from knobgym_cli.budgets import describe_range, env_range, is_auto, probe_suggested_budget
from knobgym_cli.logs import say, setup_cli_logging
from knobgym_cli.progress import cli_progress, phase

register_resolvers()


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def resumed_config(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, dict]:
    """The run's saved config with this invocation's explicit overrides applied; and the checkpoint.

    Changing the env, agent or backend of a run is an error; other overrides (e.g. a larger
    ``agent.total_updates``) apply to the continued run.
    """
    from hydra.core.hydra_config import HydraConfig

    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    if not ckpt_path.exists():
        raise UsageError(f"resume={cfg.resume!r}: no checkpoints/latest.pt found (looked in {str(run_dir)!r}); "
                         f"accepted: resume=true with an earlier run of env {cfg.env.id} and agent {cfg.agent.name} "
                         f"under {cfg.runs_dir!r}, or resume=<run dir>")
    ckpt = load_checkpoint(ckpt_path)
    saved = OmegaConf.create(ckpt["config"])
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


def agent_options(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.agent, resolve=True).items() if k != "name"}


# ------------------------------------------------------------------------------------------------
# logging helpers
# ------------------------------------------------------------------------------------------------
def log_episodes(writer, prefix: str, infos: list[dict], step: int, tier_names) -> dict:
    """Reward, score, latency p50/p95, violation rate and per-knob histograms of a batch of episodes."""
    from agents.base import summarize

    summary = summarize(infos)
    for key in ("reward", "score", "latency_p50_ms", "latency_p95_ms", "violation_rate"):
        writer.add_scalar(f"{prefix}/{key}", summary[key], step)
    knobs = [i["knobs"] for i in infos]
    for knob in ("top_k", "depth", "token_budget"):
        values = [k[knob] for k in knobs if k.get(knob) is not None]
        if values and len(set(values)) > 0:
            writer.add_histogram(f"{prefix}/knob_{knob}", np.asarray(values, dtype=np.float64), step)
    tiers = [tier_names.index(k["tier"]) for k in knobs if k.get("tier") in tier_names]
    if tiers:
        writer.add_histogram(f"{prefix}/knob_tier_index", np.asarray(tiers, dtype=np.float64), step)
    return summary


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def train_grpo(cfg: DictConfig, env, run_dir: Path, writer, resume_ckpt: dict | None) -> tuple[Any, dict]:
    """The GRPO loop: updates with a progress bar, validation into best.pt, latest.pt every few updates."""
    from agents import EnvLayout, eval_sample_ids, evaluate_agent
    from agents.grpo import GRPOAgent, GRPOConfig

    layout = EnvLayout(env)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    if resume_ckpt is not None:
        agent = GRPOAgent.from_state(resume_ckpt["state"])
        agent.config = GRPOConfig.from_dict(agent_options(cfg))  # e.g. a larger total_updates
        best = float(resume_ckpt.get("best_validation_reward", -np.inf))
        val_reward = float(resume_ckpt.get("last_validation_reward", best))
        say(f"resumed at update {agent.step}: last validation reward {val_reward:.3f}, best {best:.3f}")
    else:
        agent = GRPOAgent.from_env(env, config=agent_options(cfg))
        best = val_reward = -np.inf
    budget = Budget.parse(cfg.budget)
    val_budgets = eval_budgets(cfg.budget, cfg.eval.budgets)
    val_ids = eval_sample_ids(env, cfg.eval.validation_split, cfg.eval.validation_samples)
    ckpt_dir = run_dir / "checkpoints"
    tier_names = list(env.unwrapped.space.tier_names)

    def checkpoint(name: str) -> None:
        save_checkpoint(ckpt_dir / f"{name}.pt", "grpo", agent.state_dict(), config_dict, env, agent.step,
                        {"best_validation_reward": best, "last_validation_reward": val_reward})

    def validate() -> float:
        nonlocal best, val_reward
        agent.policy.eval()
        rewards = []
        for b in val_budgets:
            result = evaluate_agent(env, agent, val_ids, b, cfg.eval.validation_split)
            log_episodes(writer, f"validation/{b:g}ms", result["infos"], agent.step, tier_names)
            rewards.append(result["reward"])
        agent.policy.train()
        reward = val_reward = float(np.mean(rewards))
        if reward > best:
            best = reward
            checkpoint("best")
        writer.add_scalar("validation/best_reward", best, agent.step)
        return reward

    total = agent.config.total_updates
    if resume_ckpt is None:  # the initial policy is the first "best": best.pt exists even for a 0-update run
        with phase(f"validating the initial policy ({len(val_ids)} {cfg.eval.validation_split} samples x "
                   f"{len(val_budgets)} budget(s))"):
            validate()
    bar = cli_progress(total, f"grpo {cfg.env.id} {budget}", "update", initial=min(agent.step, total))
    while agent.step < total:
        rollout, stats = agent.train_step(layout, budget, cfg.train_split, cfg.sample_pool)
        summary = log_episodes(writer, "train", rollout.infos, agent.step, tier_names)
        for key, value in stats.items():
            writer.add_scalar(f"grpo/{key}", value, agent.step)
        if agent.step % cfg.eval.every == 0 or agent.step == total:
            validate()
        if agent.step % cfg.checkpoint_every == 0 or agent.step == total:
            checkpoint("latest")
        bar.update(1)
        bar.set_postfix(reward=f"{summary['reward']:.3f}", viol=f"{summary['violation_rate']:.0%}",
                        val=f"{val_reward:.3f}", kl=f"{stats['kl']:.3f}")
    bar.close()
    checkpoint("latest")
    best_agent = GRPOAgent.from_state(load_checkpoint(ckpt_dir / "best.pt")["state"]).freeze()
    return best_agent, {"updates": agent.step, "best_validation_reward": best}


def run_training(cfg: DictConfig, run_dir: Path) -> None:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from agents import EVALUATION_ONLY, check_agent_name, eval_sample_ids, list_agents
    from agents.io import atomic_write_json
    from agents.report import compare_agents, markdown_table, write_report
    from knobgym_cli.budgets import binding
    from knobgym_cli.summary import (archive_previous_report, checkpoint_line, checkpoint_record, display_path,
                                     next_commands, now_stamp, portable, print_summary, run_files, verdict_lines)

    setup_cli_logging(run_dir / "train.log")
    resume_ckpt = None
    if is_resume(cfg.resume):
        cfg, resume_ckpt = resumed_config(cfg, run_dir)
    name = check_agent_name(cfg.agent.name)
    if name in EVALUATION_ONLY:
        raise UsageError(f"agent={name} is evaluation only; accepted: {', '.join(a for a in list_agents() if a not in EVALUATION_ONLY)}")
    torch.set_num_threads(int(cfg.torch_threads))
    start = time.perf_counter()
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    backend_cfg = OmegaConf.to_container(cfg.backend, resolve=True)
    requested_budget = str(cfg.budget)
    if is_auto(cfg.budget):
        with phase("budget=auto: loading the model and the latency estimator (profiled once per device when not "
                   "cached) to find a budget that binds on this device"):
            estimator = import_callable(cfg.estimator) if cfg.estimator else None
            cfg.budget = f"{probe_suggested_budget(env_cfg, backend_cfg, estimator):g}ms"
        say(f"budget=auto -> budget={cfg.budget} (recorded in the checkpoint's config and the report)")
    with phase(f"building {cfg.env.id} at budget={cfg.budget} (loads the model and the latency estimator, "
               f"profiled once per device when not cached)"):
        env, notes = make_env(env_cfg, backend_cfg, cfg.budget, cfg.estimator, split=cfg.train_split)
    achievable, suggested = env_range(env)
    say(describe_range(achievable, suggested))
    if resume_ckpt is not None and resume_ckpt.get("env_id") != cfg.env.id:
        raise UsageError(f"run {str(run_dir)!r} was trained on {resume_ckpt.get('env_id')}, not {cfg.env.id}")
    budgets_ms = eval_budgets(cfg.budget, cfg.eval.budgets)
    atomic_write_json(versions(env), run_dir / "versions.json")
    writer = SummaryWriter(log_dir=str(run_dir))
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    say(f"run folder: {display_path(run_dir)}")

    if name == "grpo":
        agent, train_stats = train_grpo(cfg, env, run_dir, writer, resume_ckpt)
    else:
        with phase(f"fitting {name}"):
            agent, train_stats = fit_agent(name, agent_options(cfg), env, cfg, budgets_ms)
        for key, value in train_stats.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"fit/{key}", value, 0)
        agent.save(run_dir / "checkpoints" / "agent.pt")
        for ckpt_name in ("latest", "best"):
            save_checkpoint(run_dir / "checkpoints" / f"{ckpt_name}.pt", name, {"path": "agent.pt"}, config_dict,
                            env, 0)
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
        if baseline in ("random", "bandit", "ppo"):
            options.setdefault("seed", int(cfg.seed))
        compared[baseline], _ = fit_agent(check_agent_name(baseline), options, env, cfg, budgets_ms)
        if baseline not in EVALUATION_ONLY:
            compared[baseline].save(baseline_dir / f"{baseline}.pt")
        bar.update(1)
    bar.close()
    test_ids = eval_sample_ids(env, cfg.eval.split, cfg.eval.num_samples)
    rows = compare_agents(env, compared, budgets_ms, test_ids, cfg.eval.split, progress=cli_progress)
    for row in rows:
        writer.add_scalar(f"test/{row['agent']}/score", row["score"], 0)
        writer.add_scalar(f"test/{row['agent']}/violation_rate", row["violation_rate"], 0)
    writer.close()
    validation = {"split": cfg.eval.validation_split, "every": cfg.eval.every, "budgets_ms": budgets_ms,
                  "samples": len(eval_sample_ids(env, cfg.eval.validation_split, cfg.eval.validation_samples))}
    chosen = checkpoint_record(load_checkpoint(run_dir / "checkpoints" / "best.pt"),
                               load_checkpoint(run_dir / "checkpoints" / "latest.pt"), name, validation)
    previous = archive_previous_report(run_dir)
    meta = {"title": f"{cfg.env.id} / {name} / {cfg.eval.split} split", "env": cfg.env.id, "agent": name,
            "split": cfg.eval.split, "samples": len(test_ids), "budget": str(Budget.parse(cfg.budget)),
            "budget_requested": requested_budget, "achievable_range_ms": [round(x, 2) for x in achievable],
            "suggested_budget_ms": round(suggested, 2),
            "backend": env.unwrapped.backend.identity(), "checkpoint": chosen,
            "train": to_jsonable(train_stats), "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - start, 1), "notes": notes, "finished_at": now_stamp(),
            "resumed": resume_ckpt is not None}
    if previous is not None:
        meta["previous_reports"] = display_path(previous.parent, run_dir) + "/ (the latest: " + \
            display_path(previous, run_dir) + ")"
    write_report(run_dir, rows, portable(meta), main_agent=name)
    print(markdown_table(rows), file=sys.stdout)
    print_summary(verdict_lines(rows, name, cfg.budget, achievable, suggested), run_files(run_dir),
                  next_commands(run_dir, cfg.runs_dir, cfg.env.id, name, binding(cfg.budget, achievable), suggested),
                  checkpoint=checkpoint_line(chosen))


@hydra.main(version_base=None, config_path="conf", config_name="config")
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
