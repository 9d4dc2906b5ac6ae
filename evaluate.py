"""Evaluate a frozen checkpoint of a run against the baselines at several budgets.

    python evaluate.py run=runs/MultiKnob-v0/grpo/<timestamp>                  # budgets=auto
    python evaluate.py run=runs/MultiKnob-v0/grpo/<timestamp> budgets=[40ms,45ms,50ms]
    python evaluate.py run=runs/... checkpoint=latest num_samples=200

The model weights and the policy are both frozen (no update, no refit of the trained agent). The
env, backend and estimator come from the run's config; a checkpoint of another env, or with
another observation shape, is an error. ``budgets=auto`` (the default) spreads the budgets across
this device's achievable latency range and adds the run's training budget
(:func:`knobgym_cli.budgets.auto_budgets`); a given budget outside the range is warned about.
Writes ``<run>/eval-<budgets>/`` (or ``out=``): ``report.md`` (the table), ``report.json`` and
``pareto.png`` (score versus p50 latency, a panel per budget).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from agents.runs import (CHECKPOINT_NAMES, UsageError, check_checkpoint_matches, eval_budgets, fail,
                         fit_agent, load_checkpoint, make_env, run_cli, to_jsonable)
from knobgym_cli.budgets import (auto_budgets, describe_range, env_range, fixed_budgets_ms, is_auto,
                                 out_of_range_warnings)
from knobgym_cli.logs import say, setup_cli_logging
from knobgym_cli.progress import cli_progress, phase
from knobgym_cli.summary import display_path, portable


def load_trained_agent(ckpt: dict, run_dir: Path, env):
    """The run's agent, frozen: GRPO from the checkpoint's policy, others from ``checkpoints/agent.pt``."""
    from agents import load_agent
    from agents.grpo import GRPOAgent

    if ckpt["agent"] == "grpo":
        return GRPOAgent.from_state(ckpt["state"]).freeze()
    return load_agent(ckpt["agent"], run_dir / "checkpoints" / ckpt["state"]["path"], env)


def run_evaluation(cfg: DictConfig) -> Path:
    import torch

    from agents import check_agent_name, eval_sample_ids, load_agent
    from agents.report import compare_agents, markdown_table, write_report

    setup_cli_logging(None)
    run_dir = Path(str(cfg.run))
    if cfg.checkpoint not in CHECKPOINT_NAMES:
        raise UsageError(f"checkpoint={cfg.checkpoint!r} is invalid; accepted: {', '.join(CHECKPOINT_NAMES)}")
    ckpt_path = run_dir / "checkpoints" / f"{cfg.checkpoint}.pt"
    if not ckpt_path.exists():
        raise UsageError(f"run={str(run_dir)!r} has no checkpoints/{cfg.checkpoint}.pt; accepted: a run folder "
                         f"written by train.py (runs/<env>/<agent>/<timestamp>)")
    torch.set_num_threads(int(cfg.torch_threads))
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(ckpt["config"])
    env_cfg = OmegaConf.to_container(run_cfg.env, resolve=True)
    if cfg.env_id is not None:
        env_cfg = {**env_cfg, "id": str(cfg.env_id)}
    estimator = cfg.estimator if cfg.estimator is not None else run_cfg.get("estimator")
    start = time.perf_counter()
    with phase("loading the model and the latency estimator (profiled once per device when not cached)"):
        env, notes = make_env(env_cfg, OmegaConf.to_container(run_cfg.backend, resolve=True), run_cfg.budget, estimator)
    check_checkpoint_matches(ckpt, env, ckpt_path)
    achievable, suggested = env_range(env)
    say(describe_range(achievable, suggested))
    if cfg.budgets is None or is_auto(cfg.budgets):
        budgets_ms = auto_budgets(achievable, fixed_budgets_ms(run_cfg.budget))
        say("budgets=auto: " + ", ".join(f"{b:g}ms" for b in budgets_ms))
    else:
        budgets_ms = eval_budgets(run_cfg.budget, list(cfg.budgets))
    for message in out_of_range_warnings(budgets_ms, achievable, suggested):
        warnings.warn(message)

    name = ckpt["agent"]
    compared = {name: load_trained_agent(ckpt, run_dir, env)}
    baselines = [check_agent_name(b) for b in (cfg.baselines if cfg.baselines is not None else run_cfg.eval.baselines)]
    bar = cli_progress(len([b for b in baselines if b != name]), "loading and fitting baselines", "agent")
    for baseline in baselines:
        if baseline == name:
            continue
        bar.set_postfix(agent=baseline)
        saved = run_dir / "baselines" / f"{baseline}.pt"
        if saved.exists() and baseline != "static":  # static is re-calibrated for these budgets
            compared[baseline] = load_agent(baseline, saved, env)
            bar.update(1)
            continue
        node = run_cfg.baselines.get(baseline) if "baselines" in run_cfg else None
        options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        if baseline in ("random", "bandit", "ppo"):
            options.setdefault("seed", int(run_cfg.seed))
        compared[baseline], _ = fit_agent(baseline, options, env, run_cfg, budgets_ms)
        bar.update(1)
    bar.close()
    num_samples = cfg.num_samples if cfg.num_samples is not None else run_cfg.eval.num_samples
    test_ids = eval_sample_ids(env, cfg.split, num_samples)
    rows = compare_agents(env, compared, budgets_ms, test_ids, cfg.split, progress=cli_progress)

    out_dir = Path(str(cfg.out)) if cfg.out is not None else run_dir / ("eval-" + "-".join(f"{b:g}" for b in budgets_ms) + "ms")
    meta = {"title": f"{env_cfg['id']} / {name} (frozen {cfg.checkpoint}) / {cfg.split} split", "env": env_cfg["id"],
            "agent": name, "split": cfg.split, "samples": len(test_ids), "checkpoint": display_path(ckpt_path),
            "checkpoint_step": ckpt.get("step"), "backend": env.unwrapped.backend.identity(),
            "budgets_ms": budgets_ms, "budgets_requested": str(cfg.budgets), "achievable_range_ms": list(achievable),
            "suggested_budget_ms": suggested, "seconds": round(time.perf_counter() - start, 1), "notes": notes}
    write_report(out_dir, to_jsonable(rows), portable(meta), main_agent=name)
    print(markdown_table(rows))
    say(f"wrote {display_path(out_dir / 'report.md')}, {display_path(out_dir / 'report.json')}, "
        f"{display_path(out_dir / 'pareto.png')}")
    return out_dir


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run_evaluation(cfg)
    except ValueError as exc:
        fail(str(exc))


def cli(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad overrides before Hydra composes the config."""
    run_cli("evaluate", main, argv)


if __name__ == "__main__":
    cli()
