"""The CLI side of a training run: the :class:`~agents.base.FitHooks` plugged into an agent's ``fit``.

:class:`TrainingHooks` validates every ``eval.every`` updates (the best validation reward so far
becomes ``checkpoints/best``), writes ``checkpoints/latest`` every ``checkpoint_every`` updates and
at the end, logs episodes and update statistics to TensorBoard and shows a progress bar
(:func:`knobgym_cli.progress.cli_progress`: tqdm on a terminal, plain periodic lines otherwise); the
validation of the initial policy is its own phase, before the bar starts. Every checkpoint stores the
best and the last validation reward, so a resumed run shows its last validation from the start. Agents
without an update loop call no hooks; :meth:`TrainingHooks.finish` then writes their state as
both ``latest`` and ``best``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents import Agent, FitHooks, evaluate_agent, eval_sample_ids, load_agent, summarize
from envs.protocols import group_env
from knobgym_cli.checkpoints import checkpoint_file, read_with_fallback, save_run_checkpoint
from knobgym_cli.logs import say
from knobgym_cli.progress import cli_progress, phase


def capped_sample_ids(env: gym.Env, split: str, num_samples: int | None, key: str) -> list[int]:
    """:func:`~agents.base.eval_sample_ids`, saying once when ``num_samples`` (the option ``key``) is
    more than the split holds, so a report's sample count is never a silent surprise."""
    ids = eval_sample_ids(env, split, num_samples)
    if num_samples is not None and len(ids) < int(num_samples):
        say(f"{key}={num_samples}: the {split} split has {len(ids)} samples; using all {len(ids)}")
    return ids


def log_episodes(writer, prefix: str, infos: list[dict], step: int, tier_names) -> dict:
    """Reward, score, latency p50/p95, violation rate and per-knob histograms of a batch of episodes."""
    summary = summarize(infos)
    for key in ("reward", "score", "latency_p50_ms", "latency_p95_ms", "violation_rate"):
        writer.add_scalar(f"{prefix}/{key}", summary[key], step)
    knobs = [i["knobs"] for i in infos]
    for knob in ("top_k", "depth", "token_budget"):
        values = [k[knob] for k in knobs if k.get(knob) is not None]
        if values:
            writer.add_histogram(f"{prefix}/knob_{knob}", np.asarray(values, dtype=np.float64), step)
    tiers = [tier_names.index(k["tier"]) for k in knobs if k.get("tier") in tier_names]
    if tiers:
        writer.add_histogram(f"{prefix}/knob_tier_index", np.asarray(tiers, dtype=np.float64), step)
    return summary


class TrainingHooks(FitHooks):
    """Validation, checkpoints, TensorBoard and a progress bar for one training run.

    Args:
        env: the training env.
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoints``).
        writer: a TensorBoard ``SummaryWriter``.
        config: the run's resolved config (stored in every checkpoint).
        eval_cfg: ``every``, ``validation_split``, ``validation_samples`` of the config's ``eval``.
        budgets_ms: validation budgets.
        checkpoint_every: updates between ``latest`` writes.
        best: the best validation reward so far (a resumed run's, else ``-inf``).
        last: the last validation reward (a resumed run's; default: ``best``).
        resumed: a resumed run skips the validation of the initial policy.
        title: progress-bar label.
    """

    def __init__(self, env: gym.Env, run_dir: Path, writer, config: dict, eval_cfg: dict, budgets_ms: list[float],
                 checkpoint_every: int, best: float = -np.inf, resumed: bool = False, title: str = "train",
                 last: float | None = None):
        self.env, self.run_dir, self.writer, self.config = env, Path(run_dir), writer, config
        self.every, self.checkpoint_every = int(eval_cfg["every"]), int(checkpoint_every)
        self.validation_split = eval_cfg["validation_split"]
        self.validation_ids = capped_sample_ids(env, self.validation_split, eval_cfg["validation_samples"],
                                                "eval.validation_samples")
        self.budgets_ms, self.best, self.resumed, self.title = list(budgets_ms), float(best), resumed, title
        self.tier_names = list(group_env(env).provenance()["knob_space"].get("tiers", {}))
        self.validated = False
        #: the checkpoint :meth:`finish` returned the agent of (``best``, or a fallback when it is damaged)
        self.reported_checkpoint = self.path("best")
        self.step, self.total = 0, 0
        self._bar = None
        self.last = float(best if last is None else last)  # the last validation reward

    def path(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / checkpoint_file(name)

    def checkpoint(self, name: str, agent: Agent) -> None:
        save_run_checkpoint(self.path(name), agent, self.env, self.config, self.step,
                            {"best_validation_reward": self.best, "last_validation_reward": self.last})

    def validate(self, agent: Agent) -> float:
        """Mean validation reward over the budgets; a new best is written to ``checkpoints/best``."""
        self.validated = True
        rewards = []
        for budget_ms in self.budgets_ms:
            result = evaluate_agent(self.env, agent, self.validation_ids, budget_ms, self.validation_split)
            log_episodes(self.writer, f"validation/{budget_ms:g}ms", result["infos"], self.step, self.tier_names)
            rewards.append(result["reward"])
        reward = self.last = float(np.mean(rewards))
        if reward > self.best:
            self.best = reward
            self.checkpoint("best", agent)
        self.writer.add_scalar("validation/best_reward", self.best, self.step)
        return reward

    # ---------------------------------------------------------------- FitHooks
    def on_fit_start(self, agent: Agent, step: int, total: int) -> None:
        self.step, self.total = int(step), int(total)
        if self.resumed:
            self.validated = True  # best was written by the run being continued
            say(f"resumed at update {step}: last validation reward {self.last:.3f}, best {self.best:.3f}")
        else:  # the initial policy is the first "best": best exists even for a 0-update run
            with phase(f"validating the initial policy ({len(self.validation_ids)} {self.validation_split} samples "
                       f"x {len(self.budgets_ms)} budget(s))"):
                self.validate(agent)
        self._bar = cli_progress(total, self.title, "update", initial=min(step, total))

    def on_update(self, agent: Agent, step: int, infos: list[dict], stats: dict) -> None:
        self.step = int(step)
        summary = log_episodes(self.writer, "train", infos, step, self.tier_names)
        for key, value in stats.items():
            self.writer.add_scalar(f"{agent.name}/{key}", value, step)
        if step % self.every == 0 or step == self.total:
            self.validate(agent)
        if step % self.checkpoint_every == 0 or step == self.total:
            self.checkpoint("latest", agent)
        self._bar.update(1)
        postfix = {"reward": f"{summary['reward']:.3f}", "viol": f"{summary['violation_rate']:.0%}",
                   "val": f"{self.last:.3f}"}
        if "kl" in stats:
            postfix["kl"] = f"{stats['kl']:.3f}"
        self._bar.set_postfix(**postfix)

    def on_fit_end(self, agent: Agent, step: int) -> None:
        self.step = int(step)
        if self._bar is not None:
            self._bar.close()
        self.checkpoint("latest", agent)

    # ---------------------------------------------------------------- after fit
    def finish(self, agent: Agent, stats: dict[str, Any]) -> Agent:
        """The agent the run reports: the best validated checkpoint (a damaged one: the last valid
        checkpoint, said so), or (no validation) ``agent`` itself, written as both ``latest`` and ``best``."""
        for key, value in stats.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"fit/{key}", value, self.step)
        if not self.validated:
            self.checkpoint("latest", agent)
            self.checkpoint("best", agent)
            return agent.freeze()
        best, path = read_with_fallback(self.run_dir, "best", lambda path: load_agent(agent.name, path, self.env))
        self.reported_checkpoint = path
        return best.freeze()
