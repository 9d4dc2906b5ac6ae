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

from knobgym_cli.budgets import (auto_budgets, describe_range, env_range, fixed_budgets_ms, is_auto,
                                 out_of_range_warnings)
from knobgym_cli.build import agent_class_of, build_agent, eval_budgets, make_env
from knobgym_cli.checkpoints import CHECKPOINT_NAMES, check_checkpoint_matches, checkpoint_file, load_run_checkpoint
from knobgym_cli.errors import CONF_DIR, UsageError, run_cli
from knobgym_cli.logs import say, setup_cli_logging
from knobgym_cli.progress import cli_progress, phase
from knobgym_cli.summary import display_path, portable
from knobgym_cli.versions import to_jsonable


def run_evaluation(cfg: DictConfig) -> Path:
    import torch

    from agents import FitContext, agent_class, check_agent_name, eval_sample_ids, load_agent
    from envs.protocols import group_env
    from knobgym_cli.report import compare_agents, markdown_table, write_report

    setup_cli_logging(None)
    run_dir = Path(str(cfg.run))
    if cfg.checkpoint not in CHECKPOINT_NAMES:
        raise UsageError(f"checkpoint={cfg.checkpoint!r} is invalid; accepted: {', '.join(CHECKPOINT_NAMES)}")
    ckpt_path = run_dir / "checkpoints" / checkpoint_file(cfg.checkpoint)
    if not ckpt_path.exists():
        raise UsageError(f"run={str(run_dir)!r} has no checkpoints/{ckpt_path.name}; accepted: a run folder "
                         f"written by train.py (runs/<env>/<agent>/<timestamp>)")
    torch.set_num_threads(int(cfg.torch_threads))
    ckpt = load_run_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(ckpt["metadata"]["config"])
    env_cfg = OmegaConf.to_container(run_cfg.env, resolve=True)
    if cfg.env_id is not None:
        env_cfg = {**env_cfg, "id": str(cfg.env_id)}
    name = ckpt["agent"]
    main_class = agent_class_of(OmegaConf.to_container(run_cfg.agent, resolve=True))
    if main_class.name != name:
        raise UsageError(f"checkpoint {str(ckpt_path)!r} holds a {name!r} agent but the run's config names "
                         f"{main_class.name!r}; accepted: a checkpoint written by this run")
    baselines = [check_agent_name(b) for b in (cfg.baselines if cfg.baselines is not None else run_cfg.eval.baselines)]
    estimator = cfg.estimator if cfg.estimator is not None else run_cfg.get("estimator")
    device_estimator = None
    profile = cfg.get("latency", {}).get("profile")
    if profile is not None:  # another device's latency: the run's estimator setting gives way to it
        from latency_model import LatencyEstimator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fitted on another device: that is the point here
            device_estimator, estimator = LatencyEstimator.load(str(profile)), None
    start = time.perf_counter()
    with phase("loading the model and the latency estimator (profiled once per device when not cached)"):
        env, notes = make_env(env_cfg, OmegaConf.to_container(run_cfg.backend, resolve=True), run_cfg.budget,
                              estimator, estimator=device_estimator)
    if device_estimator is not None:
        notes = [*notes, f"latency.profile={profile}: latencies, budgets=auto and the refitted baselines are "
                         f"those of the device this estimator was profiled on "
                         f"({device_estimator.fingerprint.get('device', device_estimator.fingerprint)})"]
    check_checkpoint_matches(ckpt, env, ckpt_path)
    achievable, suggested = env_range(env)
    say(describe_range(achievable, suggested))
    if cfg.budgets is None or is_auto(cfg.budgets):
        budgets_ms = auto_budgets(achievable, fixed_budgets_ms(group_env(env).budget))
        say("budgets=auto: " + ", ".join(f"{b:g}ms" for b in budgets_ms))
    else:
        budgets_ms = eval_budgets(group_env(env).budget, list(cfg.budgets))
    for message in out_of_range_warnings(budgets_ms, achievable, suggested):
        warnings.warn(message)

    compared = {name: main_class.restore(env, ckpt["state"]).freeze()}
    bar = cli_progress(len([b for b in baselines if b != name]), "loading and fitting baselines", "agent")
    for baseline in baselines:
        if baseline == name:
            continue
        bar.set_postfix(agent=baseline)
        saved = run_dir / "baselines" / checkpoint_file(baseline)
        if saved.exists() and not agent_class(baseline).fits_budgets:  # budget-fitted ones are refitted here
            compared[baseline] = load_agent(baseline, saved, env)
            bar.update(1)
            continue
        node = run_cfg.baselines.get(baseline) if "baselines" in run_cfg else None
        options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        compared[baseline], _ = build_agent(baseline, options, env, int(run_cfg.seed),
                                            FitContext(split=run_cfg.train_split, budgets_ms=budgets_ms))
        bar.update(1)
    bar.close()
    num_samples = cfg.num_samples if cfg.num_samples is not None else run_cfg.eval.num_samples
    test_ids = eval_sample_ids(env, cfg.split, num_samples)
    rows = compare_agents(env, compared, budgets_ms, test_ids, cfg.split, progress=cli_progress)

    out_dir = Path(str(cfg.out)) if cfg.out is not None else run_dir / ("eval-" + "-".join(f"{b:g}" for b in budgets_ms) + "ms")
    meta = {"title": f"{env_cfg['id']} / {name} (frozen {cfg.checkpoint}) / {cfg.split} split", "env": env_cfg["id"],
            "agent": name, "split": cfg.split, "samples": len(test_ids), "checkpoint": display_path(ckpt_path),
            "checkpoint_step": ckpt["metadata"].get("step"), "backend": group_env(env).provenance()["model"],
            "budgets_ms": budgets_ms, "budgets_requested": str(cfg.budgets), "achievable_range_ms": list(achievable),
            "suggested_budget_ms": suggested, "seconds": round(time.perf_counter() - start, 1), "notes": notes}
    write_report(out_dir, to_jsonable(rows), portable(meta), main_agent=name)
    print(markdown_table(rows))
    say(f"wrote {display_path(out_dir / 'report.md')}, {display_path(out_dir / 'report.json')}, "
        f"{display_path(out_dir / 'pareto.png')}")
    return out_dir


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
