"""Train a budget-aware controller and compare it with the baselines on the test split.

    python train.py env=MultiKnob-v0 budget=120ms              # GRPO on the tiny default backend
    python train.py env=MultiKnob-v0 budget=120ms agent.total_updates=200 seed=1
    python train.py agent=bandit budget="[80ms,200ms]"
    python train.py resume=true                                # continue the latest run (or resume=<run dir>)

Writes ``runs/<env>/<agent>/<timestamp>/``: ``.hydra/`` (resolved config), ``versions.json``,
TensorBoard events, ``checkpoints/{latest,best}.pt``, ``baselines/``, ``report.md``,
``report.json`` and ``pareto.png``. Configuration: ``conf/config.yaml`` and the groups
``conf/env``, ``conf/agent``, ``conf/backend``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.runs import (GROUPS, UsageError, discard_failed_run_dir, eval_budgets, fit_agent,
                         is_resume, load_checkpoint, make_env, register_resolvers, save_checkpoint, to_jsonable,
                         run_cli, versions)
from envs.budget import Budget

log = logging.getLogger("train")
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
    from tqdm.auto import tqdm

    from agents import EnvLayout, eval_sample_ids, evaluate_agent
    from agents.grpo import GRPOAgent, GRPOConfig

    layout = EnvLayout(env)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    if resume_ckpt is not None:
        agent = GRPOAgent.from_state(resume_ckpt["state"])
        agent.config = GRPOConfig.from_dict(agent_options(cfg))  # e.g. a larger total_updates
        best = float(resume_ckpt.get("best_validation_reward", -np.inf))
        log.info("resumed %s at update %d", run_dir, agent.step)
    else:
        agent = GRPOAgent.from_env(env, config=agent_options(cfg))
        best = -np.inf
    budget = Budget.parse(cfg.budget)
    val_budgets = eval_budgets(cfg.budget, cfg.eval.budgets)
    val_ids = eval_sample_ids(env, cfg.eval.validation_split, cfg.eval.validation_samples)
    ckpt_dir = run_dir / "checkpoints"
    tier_names = list(env.unwrapped.space.tier_names)

    def checkpoint(name: str) -> None:
        save_checkpoint(ckpt_dir / f"{name}.pt", "grpo", agent.state_dict(), config_dict, env, agent.step,
                        {"best_validation_reward": best})

    def validate() -> float:
        nonlocal best
        agent.policy.eval()
        rewards = []
        for b in val_budgets:
            result = evaluate_agent(env, agent, val_ids, b, cfg.eval.validation_split)
            log_episodes(writer, f"validation/{b:g}ms", result["infos"], agent.step, tier_names)
            rewards.append(result["reward"])
        agent.policy.train()
        reward = float(np.mean(rewards))
        if reward > best:
            best = reward
            checkpoint("best")
        writer.add_scalar("validation/best_reward", best, agent.step)
        return reward

    total = agent.config.total_updates
    if resume_ckpt is None:
        validate()  # the initial policy is the first "best": best.pt exists even for a 0-update run
    bar = tqdm(total=total, initial=min(agent.step, total), desc=f"grpo {cfg.env.id} {budget}", unit="update",
               dynamic_ncols=True)
    val_reward = float("nan")
    while agent.step < total:
        rollout, stats = agent.train_step(layout, budget, cfg.train_split, cfg.sample_pool)
        summary = log_episodes(writer, "train", rollout.infos, agent.step, tier_names)
        for key, value in stats.items():
            writer.add_scalar(f"grpo/{key}", value, agent.step)
        if agent.step % cfg.eval.every == 0 or agent.step == total:
            val_reward = validate()
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
    from agents.report import compare_agents, write_report

    resume_ckpt = None
    if is_resume(cfg.resume):
        cfg, resume_ckpt = resumed_config(cfg, run_dir)
    name = check_agent_name(cfg.agent.name)
    if name in EVALUATION_ONLY:
        raise UsageError(f"agent={name} is evaluation only; accepted: {', '.join(a for a in list_agents() if a not in EVALUATION_ONLY)}")
    torch.set_num_threads(int(cfg.torch_threads))
    start = time.perf_counter()
    env, notes = make_env(OmegaConf.to_container(cfg.env, resolve=True),
                          OmegaConf.to_container(cfg.backend, resolve=True), cfg.budget, cfg.estimator,
                          split=cfg.train_split)
    if resume_ckpt is not None and resume_ckpt.get("env_id") != cfg.env.id:
        raise UsageError(f"run {str(run_dir)!r} was trained on {resume_ckpt.get('env_id')}, not {cfg.env.id}")
    budgets_ms = eval_budgets(cfg.budget, cfg.eval.budgets)
    atomic_write_json(versions(env), run_dir / "versions.json")
    writer = SummaryWriter(log_dir=str(run_dir))
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    print(f"run folder: {run_dir}", file=sys.stderr)

    if name == "grpo":
        agent, train_stats = train_grpo(cfg, env, run_dir, writer, resume_ckpt)
    else:
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
    for baseline in cfg.eval.baselines:
        if baseline == name:
            continue
        node = cfg.baselines.get(baseline)
        options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        if baseline in ("random", "bandit", "ppo"):
            options.setdefault("seed", int(cfg.seed))
        compared[baseline], _ = fit_agent(check_agent_name(baseline), options, env, cfg, budgets_ms)
        if baseline not in EVALUATION_ONLY:
            compared[baseline].save(baseline_dir / f"{baseline}.pt")
    test_ids = eval_sample_ids(env, cfg.eval.split, cfg.eval.num_samples)
    rows = compare_agents(env, compared, budgets_ms, test_ids, cfg.eval.split, progress=True)
    for row in rows:
        writer.add_scalar(f"test/{row['agent']}/score", row["score"], 0)
        writer.add_scalar(f"test/{row['agent']}/violation_rate", row["violation_rate"], 0)
    writer.close()
    meta = {"title": f"{cfg.env.id} / {name} / {cfg.eval.split} split", "env": cfg.env.id, "agent": name,
            "split": cfg.eval.split, "samples": len(test_ids), "budget": str(Budget.parse(cfg.budget)),
            "backend": env.unwrapped.backend.identity(), "checkpoint": "checkpoints/best.pt",
            "train": to_jsonable(train_stats), "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - start, 1), "notes": notes}
    write_report(run_dir, rows, meta, main_agent=name)
    print((run_dir / "report.md").read_text(), file=sys.stdout)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from knobgym_cli.guard import hold_run_folder, one_line_errors

    run_dir = Path(HydraConfig.get().runtime.output_dir)
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
