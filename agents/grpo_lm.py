"""``grpo_lm``: a tiny causal-LM controller trained with TRL's ``GRPOTrainer``.

The controller is a language model: the *prompt* describes the episode in words, the
*completion* is the knob choice as tokens, and TRL's ``GRPOTrainer`` trains it from the env's
group-relative rewards.

**Prompt.** ``budget <digits of the budget in whole ms> ms obs <i>:<v> ... act``: the budget,
then each element ``i`` of the env's stage-0 observation (:meth:`GroupEnv.stage_observation`,
``MultiKnob-v0``: budget / reference latency, prompt length, the question-type one-hot, image size)
whose value ``v`` rounded to one decimal is not zero, as one word ``i:v`` of the vocabulary
(``i`` below the observation size, ``v`` in ``-10.0 .. 10.0``). One word per feature and value
lets the LM read a feature from that word's embedding alone (a question type is one word); with
bare values at fixed positions it first has to learn which position is which, and in our runs it
settled on one choice for every input before it had (BENCHMARKS.md, "grpo_lm").

**Completion.** One action token ``a<v>`` per trajectory element, in element order
(``MultiKnob-v0``: tier, top-k index, depth index, e.g. ``a2 a0 a1``). During training every other
token is suppressed in generation (``generation_kwargs.suppress_tokens``), so a completion is
always ``len(trajectory_nvec)`` action tokens; one whose value at element ``i`` is not below
``trajectory_nvec[i]`` (possible only when the elements have different numbers of choices) or of the
wrong length is unparsable and gets the fixed reward ``invalid_reward``. Acting (evaluation) decodes
greedily restricted to each element's valid tokens, so the agent always returns a valid trajectory.

**Two-stage envs: one prompt, the whole trajectory.** The prompt is built once, from the stage-0
observation, and the completion emits the whole trajectory (``MultiKnob-v0``: tier, top-k and
depth together). Why not follow the stages: the stage-1 summary depends on the tier the completion
chooses first, and TRL's ``GRPOTrainer`` generates a completion from one prompt (no env text can be
inserted between the tier token and the top-k token other than through its chat-template tool
calls, which a word-level toy tokenizer has no template for); putting the stage-1 summary of some
fixed tier into the prompt instead would run stage 1 at a tier the episode never chose, a cost the
episode's latency does not count. The question-type features of the stage-0 observation carry
what the stage-1 summary tells about the difficulty on the stand-in backends. At a later stage
:meth:`GRPOLMAgent.act` re-decodes from the same stage-0 prompt with the elements earlier stages
chose forced, so each step returns the trajectory the episode is following.

**Rewards.** TRL's reward function receives each completion with its row's ``sample_id`` and
``budget_ms`` (dataset columns); the completions of one prompt (``num_generations`` of them) form
one group, scored with the env's :meth:`~envs.protocols.GroupEnv.evaluate_group` (shared stage 1,
same reward as separate episodes). TRL computes the group-relative advantages and the clipped
update.

**The model.** A randomly initialised ``transformers.LlamaForCausalLM`` (``num_hidden_layers``
layers of width ``hidden_size``) over a word-level ``tokenizers`` vocabulary built in code: the
prompt words, the digits, the observation values and the action tokens; nothing is downloaded.
The checkpoint holds its weights as tensors and its config and vocabulary as JSON
(:mod:`agents.checkpoint`); :meth:`GRPOLMAgent.save_pretrained` also writes the model and tokenizer
in the Hugging Face layout (safetensors) for use outside knobgym.

:meth:`GRPOLMAgent.fit` is the whole training loop: one ``GRPOTrainer.train()`` of the remaining
updates, the caller's :class:`~agents.base.FitHooks` called from a ``TrainerCallback`` after each
optimizer step. The agent owns the AdamW optimizer (passed to the trainer), so a resumed run
continues with the optimizer's state.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch

from agents.base import TrajectoryPolicyAgent, EnvLayout, EpisodeContext, FitContext
from agents.checkpoint import check_finite
from agents.config_checks import (JITTER_BOUNDS, JITTER_HELP, SEED_BOUNDS, SEED_HELP, check_epsilon_high, check_flags,
                                  check_options, config_from_dict, described, normalize_scale_rewards, option)
from agents.registry import register_agent

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOS]")
PROMPT_WORDS = ("budget", "ms", "obs", "act")
DIGITS = tuple(str(d) for d in range(10))
#: observation values are rounded to one decimal in [-VALUE_LIMIT, VALUE_LIMIT] (the envs' clip range)
VALUE_LIMIT = 10.0


@dataclass
class GRPOLMConfig:
    """Options of the LM controller and of its ``trl.GRPOConfig``.

    Passed to TRL's ``GRPOConfig`` under the same name and meaning (TRL default in brackets where
    ours differs, and why): ``num_generations`` (8), ``learning_rate`` (1e-6 fine-tunes a pretrained
    LLM; 3e-3 trains a freshly initialised toy LM), ``temperature``, ``beta``, ``epsilon``,
    ``epsilon_high``, ``num_iterations``, ``scale_rewards``, ``loss_type``, ``max_grad_norm``,
    ``entropy_coef``.

    Mapped: ``batch_size`` prompts per update, each with its own group of ``num_generations``
    completions (TRL ``per_device_train_batch_size = batch_size * num_generations``, one optimizer
    step per generation batch); ``total_updates`` (TRL ``max_steps``).

    Ours: ``budget_jitter`` (a fixed budget is widened to ``[b(1-j), b(1+j)]`` for training, as in
    ``grpo``), ``invalid_reward`` (the fixed reward of an unparsable completion; below a valid
    trajectory's reward unless it overshoots the budget by more than 100%), ``budget_constrained``
    (acting decodes only among the trajectories the env's latency estimator predicts to fit the
    budget on this input, when any does and the env has at most
    :data:`MAX_CONSTRAINED_TRAJECTORIES`; see :meth:`GRPOLMAgent.act`), the model's size
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``) and
    ``seed`` (model initialisation, sample and budget draws, TRL's seed).
    """

    num_generations: int = option(8, "completions sampled per prompt; a group needs two to compare", low=2)
    learning_rate: float = option(3e-3, "AdamW step size", low=0, low_open=True)
    temperature: float = option(1.0, "sampling temperature", low=0, low_open=True)
    beta: float = option(0.0, "weight of the KL term to the reference model", low=0)
    epsilon: float = option(0.2, "lower clip of the probability ratio", low=0, low_open=True)
    epsilon_high: float | None = described("upper clip of the ratio; None: epsilon", None)
    num_iterations: int = option(1, "optimizer steps per generated batch", low=1)
    scale_rewards: Any = described("advantage scaling: group (or true), batch, none (or false)", "group")
    loss_type: str = option("dapo", "TRL's loss normalisation", choices=("grpo", "dr_grpo", "dapo", "bnpo"))
    max_grad_norm: float = option(1.0, "gradient clipping norm", low=0)
    entropy_coef: float = option(0.0, "entropy bonus", low=0)
    batch_size: int = option(4, "prompts per update, each with its own group", low=1)
    total_updates: int = option(100, "updates of the whole run (TRL max_steps)", low=0)
    budget_jitter: float = option(0.2, JITTER_HELP, **JITTER_BOUNDS)
    invalid_reward: float = option(-2.0, "reward of an unparsable completion")
    budget_constrained: bool = described("act only among trajectories predicted to fit the budget", True)
    hidden_size: int = option(64, "LM width", low=1)
    num_hidden_layers: int = option(2, "LM blocks", low=1)
    num_attention_heads: int = option(4, "attention heads; hidden_size is a multiple", low=1)
    intermediate_size: int = option(128, "LM MLP width", low=1)
    seed: int = option(0, SEED_HELP, **SEED_BOUNDS)

    def __post_init__(self) -> None:
        check_options(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is invalid with num_attention_heads="
                             f"{self.num_attention_heads}; accepted: a multiple of num_attention_heads")
        check_epsilon_high(self.epsilon_high)
        self.scale_rewards = normalize_scale_rewards(self.scale_rewards)
        check_flags(self, ("budget_constrained",))

    @classmethod
    def from_dict(cls, values: dict) -> "GRPOLMConfig":
        """Build from a config mapping; unknown keys are an error naming the accepted ones."""
        return config_from_dict(cls, values, "grpo_lm")

    def as_dict(self) -> dict:
        return asdict(self)


#: envs with more trajectories than this are decoded without the budget constraint (one estimator
#: query per trajectory at every step)
MAX_CONSTRAINED_TRAJECTORIES = 4096


# ------------------------------------------------------------------------------------------------
# The vocabulary: prompt rendering and completion parsing
# ------------------------------------------------------------------------------------------------
def value_token(v: float) -> str:
    """An observation value as its word: rounded to one decimal, clipped to +-10 (``-0.0`` is ``0.0``)."""
    v = float(np.clip(round(float(v), 1), -VALUE_LIMIT, VALUE_LIMIT))
    return f"{0.0 if v == 0 else v:.1f}"


class ControllerVocab:
    """The word-level vocabulary of the controller LM, and the text of its prompts and completions.

    ``action_values`` is the largest number of choices of any trajectory element: the action
    tokens are ``a0 .. a<action_values - 1>``.
    """

    def __init__(self, obs_dim: int, action_values: int):
        self.obs_dim, self.action_values = int(obs_dim), int(action_values)
        steps = int(round(VALUE_LIMIT * 10))
        values = [value_token(i / 10) for i in range(-steps, steps + 1) if i != 0]
        self.feature_tokens = [f"{i}:{v}" for i in range(self.obs_dim) for v in values]
        self.action_tokens = [f"a{v}" for v in range(self.action_values)]
        self.tokens = [*SPECIAL_TOKENS, *PROMPT_WORDS, *DIGITS, *self.feature_tokens, *self.action_tokens]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.eos_id = (self.index[t] for t in SPECIAL_TOKENS)
        self.action_ids = [self.index[t] for t in self.action_tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def prompt(self, obs: np.ndarray, budget_ms: float) -> str:
        """The prompt of an episode: its budget and its stage-0 observation as words."""
        budget = " ".join(str(int(round(float(budget_ms)))))
        words = [f"{i}:{value_token(v)}" for i, v in enumerate(np.asarray(obs, dtype=np.float64).reshape(-1))]
        values = " ".join(w for w in words if not w.endswith(":0.0"))
        return f"budget {budget} ms obs {values} act"

    def parse(self, completion: str, nvec: Sequence[int]) -> np.ndarray | None:
        """The trajectory a completion names, or ``None`` when it is unparsable (wrong length, a
        word that is not an action token, a value outside its element's choices)."""
        words = completion.replace(SPECIAL_TOKENS[2], " ").split()
        if len(words) != len(nvec):
            return None
        out = np.zeros(len(nvec), dtype=np.int64)
        for i, (word, n) in enumerate(zip(words, nvec)):
            if word not in self.action_tokens or int(word[1:]) >= int(n):
                return None
            out[i] = int(word[1:])
        return out

    def tokenizer(self):
        """A ``PreTrainedTokenizerFast`` over this vocabulary (whitespace-split words)."""
        from tokenizers import Tokenizer, decoders
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(WordLevel(dict(self.index), unk_token="[UNK]"))
        tok.pre_tokenizer = WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                       padding_side="left")


def build_lm(vocab: ControllerVocab, config: GRPOLMConfig, max_positions: int):
    """A randomly initialised ``LlamaForCausalLM`` of the configured size over ``vocab``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    lm_config = LlamaConfig(vocab_size=len(vocab), hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                            num_attention_heads=config.num_attention_heads,
                            num_key_value_heads=config.num_attention_heads, max_position_embeddings=max_positions,
                            pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id, bos_token_id=None,
                            tie_word_embeddings=True)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(lm_config)
    model.generation_config = GenerationConfig(pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id)
    return model


# ------------------------------------------------------------------------------------------------
# The agent
# ------------------------------------------------------------------------------------------------
def update_callback(agent: "GRPOLMAgent", hooks, infos: list[dict], tally: dict):
    """The ``TrainerCallback`` reporting each optimizer step to ``hooks`` (the caller's training hooks);
    ``infos`` / ``tally`` are filled by the reward function as it scores completions."""
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        """After each optimizer step: the caller's ``on_update`` with the episodes that step trained
        on (a step reusing a generated batch, ``num_iterations > 1``, reports that batch again) and
        TRL's logged statistics."""

        pending = False
        batch: list = []
        invalid = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            agent.step += 1
            check_finite({"model": dict(agent.model.named_parameters())}, f"GRPO-LM update {agent.step} diverged")
            self.pending = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self.pending:
                return
            self.pending = False
            stats = {k: float(v) for k, v in (logs or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if tally["scored"]:  # this step generated and scored a new batch
                self.batch, self.invalid = list(infos), 1.0 - len(infos) / tally["scored"]
                infos.clear()
                tally["scored"] = 0
            stats["invalid_fraction"] = self.invalid
            hooks.on_update(agent, agent.step, self.batch, stats)

    return Hooks()


@register_agent
class GRPOLMAgent(TrajectoryPolicyAgent):
    """The LM controller: prompts from the stage-0 observation, completions as knob tokens.

    Acting reads the stage-0 observation of the episode at later stages (``needs_context``): run it
    through :func:`agents.base.run_episode` / :func:`agents.base.evaluate_agent` or the CLI.
    """

    name = "grpo_lm"
    config_class = GRPOLMConfig
    checkpoint_noun = "controller"

    def __init__(self, obs_dim: int, nvec: Sequence[int], stage_heads: Sequence[Sequence[int]],
                 config: GRPOLMConfig | None = None):
        self._set_shapes(obs_dim, nvec, stage_heads, config)
        self.vocab = ControllerVocab(self.obs_dim, max(self.nvec))
        self.tokenizer = self.vocab.tokenizer()
        # budget digits (at most 7: MAX_BUDGET_MS) + words + observation + completion + slack
        self.max_positions = 16 + self.obs_dim + len(self.nvec) + 8
        self.model = build_lm(self.vocab, self.config, self.max_positions)
        # the trainer steps this optimizer (torch AdamW defaults otherwise), so a resumed run keeps its state
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.learning_rate)
        self.rng = np.random.default_rng(self.config.seed)
        self.step = 0

    def configure(self, **options: Any) -> None:
        """New options for a resumed run (e.g. a larger ``total_updates``); the model's size stays the checkpoint's."""
        config = GRPOLMConfig.from_dict(options)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if vars(config)[key] != vars(self.config)[key]:
                raise ValueError(f"{key}={vars(config)[key]} differs from the checkpoint's "
                                 f"{vars(self.config)[key]}; accepted: the checkpoint's model size")
        self.config = config
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate
            if "initial_lr" in group:  # set by the trainer's (constant) scheduler
                group["initial_lr"] = config.learning_rate

    # ------------------------------------------------------------------------------- acting
    @torch.no_grad()
    def decode(self, prompt: str, forced: dict[int, int] | None = None,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """The most probable valid trajectory for ``prompt``: element by element, the most probable
        action token among that element's choices (``forced`` elements are taken as given). With
        ``allowed`` (rows of trajectories), an element's choices are further limited to the values
        some allowed row with the same earlier elements has (none left: every choice)."""
        forced = forced or {}
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        training = self.model.training
        self.model.eval()
        out = np.zeros(len(self.nvec), dtype=np.int64)
        rows = None if allowed is None or len(allowed) == 0 else np.asarray(allowed, dtype=np.int64)
        for i, n in enumerate(self.nvec):
            if i in forced:
                out[i] = int(forced[i])
            else:
                logits = self.model(input_ids=ids).logits[0, -1, self.vocab.action_ids[:n]]
                if rows is not None:
                    mask = torch.full_like(logits, -float("inf"))
                    mask[np.unique(rows[:, i])] = 0.0
                    logits = logits + mask
                out[i] = int(torch.argmax(logits))
            if rows is not None:
                rows = rows[rows[:, i] == out[i]]
                rows = rows if len(rows) else None
            ids = torch.cat([ids, torch.tensor([[self.vocab.action_ids[out[i]]]])], dim=1)
        self.model.train(training)
        return out

    @property
    def constrains_to_budget(self) -> bool:
        """Whether acting and training keep to the trajectories predicted to fit (``budget_constrained``
        and at most :data:`MAX_CONSTRAINED_TRAJECTORIES` of them to check)."""
        return self.config.budget_constrained and math.prod(self.nvec) <= MAX_CONSTRAINED_TRAJECTORIES

    def neutralise_overshooting(self, layout: EnvLayout, sample_id: int, budget_ms: float, split: str,
                                trajectories: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Training rewards under ``budget_constrained``: a completion predicted to overshoot gets the
        mean reward of the group's completions predicted to fit (zero advantage), when there are any.

        Why: acting never picks a trajectory predicted to overshoot when one fits, so the LM's job is
        to rank the ones that fit; penalising the others teaches it that expensive choices are risky
        in general, and over a budget range it then settles on a cheap one at every budget."""
        if not self.constrains_to_budget:
            return rewards
        fits = layout.estimated_latency_ms(sample_id, trajectories, split) <= budget_ms
        if not fits.any() or fits.all():
            return rewards
        out = np.asarray(rewards, dtype=np.float64).copy()
        out[~fits] = out[fits].mean()
        return out

    def fitting_trajectories(self, context: EpisodeContext) -> np.ndarray | None:
        """The trajectories the env's estimator predicts to fit ``context.budget_ms`` on this input;
        ``None`` (no constraint) when none fits, when ``budget_constrained`` is off, or when the env
        has more than :data:`MAX_CONSTRAINED_TRAJECTORIES` trajectories."""
        if not self.constrains_to_budget:
            return None
        layout = EnvLayout(context.env)
        trajectories = layout.all_actions()
        ms = layout.estimated_latency_ms(context.sample_id, trajectories, context.split)
        fits = trajectories[ms <= context.budget_ms]
        return fits if len(fits) else None

    def act(self, obs: np.ndarray, context: EpisodeContext | None = None) -> np.ndarray:
        """The whole trajectory, decoded from the episode's stage-0 prompt (earlier stages' elements
        forced), among the trajectories predicted to fit the budget (:meth:`fitting_trajectories`).

        Why constrain acting: the prompt carries the budget, but a small LM trained over a budget
        range learns the accuracy of each choice far sooner than the budget boundary of every input
        (BENCHMARKS.md, "grpo_lm"); the estimator knows the boundary exactly, so decoding keeps the
        LM's preference among the choices that fit, and the choice moves with the budget."""
        if context is None:
            raise ValueError("GRPOLMAgent.act needs an EpisodeContext (later stages re-read the stage-0 "
                             "observation); accepted: run it through agents.run_episode / evaluate_agent")
        stage = int(context.stage)
        if stage == 0:
            stage0_obs = obs
        else:
            stage0_obs = context.env.stage_observation(context.sample_id, context.budget_ms, context.split, 0, None)
        forced = {}
        if context.trajectory is not None and stage > 0:
            forced = {h: int(context.trajectory[h]) for s in range(stage) for h in self.stage_heads[s]}
        return self.decode(self.vocab.prompt(stage0_obs, context.budget_ms), forced, self.fitting_trajectories(context))

    # ------------------------------------------------------------------------------- the loop
    def training_rows(self, layout: EnvLayout, budgets, split: str, sample_pool: int | None, updates: int) -> dict:
        """The prompts of ``updates`` updates: ``batch_size`` (sample, budget) draws each, as dataset columns."""
        n_samples = layout.num_samples(split)
        pool = n_samples if sample_pool is None else min(int(sample_pool), n_samples)
        sample_ids = self.rng.integers(pool, size=updates * self.config.batch_size).tolist()
        budget_ms = [budgets.sample(self.rng) for _ in sample_ids]
        prompts = [self.vocab.prompt(layout.observation(sid, b, split, 0), b) for sid, b in zip(sample_ids, budget_ms)]
        return {"prompt": prompts, "sample_id": sample_ids, "budget_ms": budget_ms}

    def reward_function(self, layout: EnvLayout, split: str, sink: list, tally: dict | None = None):
        """TRL's reward function: each group of completions of one prompt scored by ``evaluate_group``;
        an unparsable completion gets ``invalid_reward``. Episode infos of the valid ones go to ``sink``;
        ``tally["scored"]`` counts every completion scored."""
        agent = self
        tally = {} if tally is None else tally

        def knob_reward(prompts, completions, sample_id, budget_ms, **kwargs) -> list[float]:
            rewards = [float(agent.config.invalid_reward)] * len(completions)
            tally["scored"] = tally.get("scored", 0) + len(completions)
            keys = list(zip(prompts, sample_id, budget_ms))
            for key in dict.fromkeys(keys):  # each prompt's group, in order
                rows = [i for i, k in enumerate(keys) if k == key]
                parsed = [(i, agent.vocab.parse(completions[i], agent.nvec)) for i in rows]
                valid = [(i, t) for i, t in parsed if t is not None]
                if not valid:
                    continue
                trajectories = np.stack([t for _, t in valid])
                values, infos = layout.evaluate(int(key[1]), float(key[2]), trajectories, split)
                values = agent.neutralise_overshooting(layout, int(key[1]), float(key[2]), split, trajectories, values)
                for (i, _), r, info in zip(valid, values, infos):
                    rewards[i] = float(r)
                    info["reward"] = float(r)
                    sink.append(info)
            return rewards

        return knob_reward

    def trl_config(self, output_dir: str, updates: int):
        """The ``trl.GRPOConfig`` of ``updates`` updates on CPU, with saving, logging and reporting off."""
        from trl import GRPOConfig

        cfg, action_ids = self.config, set(self.vocab.action_ids)
        return GRPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
            logging_steps=1, disable_tqdm=True, log_completions=False, seed=cfg.seed + self.step,
            max_steps=updates, per_device_train_batch_size=cfg.batch_size * cfg.num_generations,
            gradient_accumulation_steps=1, gradient_checkpointing=False, num_generations=cfg.num_generations,
            max_completion_length=len(self.nvec), shuffle_dataset=False, dataloader_num_workers=0,
            learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
            temperature=cfg.temperature, top_p=1.0, top_k=0, beta=cfg.beta, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high, num_iterations=cfg.num_iterations, scale_rewards=cfg.scale_rewards,
            loss_type=cfg.loss_type, max_grad_norm=cfg.max_grad_norm, entropy_coef=cfg.entropy_coef,
            # only action tokens are sampled: a completion is always len(nvec) of them
            generation_kwargs={"suppress_tokens": [i for i in range(len(self.vocab)) if i not in action_ids]},
        )

    def fit(self, env: gym.Env, context: FitContext | None = None) -> dict:
        """Train until ``config.total_updates`` updates (continuing from ``self.step``) with ``GRPOTrainer``."""
        from datasets import Dataset
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl import GRPOTrainer

        context = context or FitContext()
        layout = EnvLayout(env)
        total = self.config.total_updates
        context.hooks.on_fit_start(self, self.step, total)
        remaining = total - self.step
        if remaining > 0:
            budgets = layout.env.budget.training_range(self.config.budget_jitter)
            rows = self.training_rows(layout, budgets, context.split, context.sample_pool, remaining)
            infos: list[dict] = []
            tally = {"scored": 0}
            with tempfile.TemporaryDirectory(prefix="grpo_lm-") as tmp, warnings.catch_warnings():
                # TRL 1.16 reads transformers' renamed gradient-checkpointing attributes: the library's
                # deprecation notice, not the user's to act on (the CLI shows every warning)
                warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
                reward = self.reward_function(layout, context.split, infos, tally)
                trainer = GRPOTrainer(model=self.model, reward_funcs=reward,
                                      args=self.trl_config(tmp, remaining), train_dataset=Dataset.from_dict(rows),
                                      processing_class=self.tokenizer,
                                      callbacks=[update_callback(self, context.hooks, infos, tally)],
                                      optimizers=(self.optimizer, None))
                for cb in (PrinterCallback, ProgressCallback):
                    trainer.remove_callback(cb)
                trainer.train()
                self.model = trainer.accelerator.unwrap_model(trainer.model)
        context.hooks.on_fit_end(self, self.step)
        return {"updates": self.step}

    # ------------------------------------------------------------------------------- state
    def freeze(self) -> "GRPOLMAgent":
        """Evaluation mode with gradients off."""
        self.model.eval().requires_grad_(False)
        return self

    def state_dict(self) -> dict:
        return {**self.common_state(), "vocab": list(self.vocab.tokens),
                "lm_config": json.loads(self.model.config.to_json_string()),
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._check_shapes(state, self.obs_dim, self.nvec)
        if list(state["vocab"]) != self.vocab.tokens:
            raise ValueError("checkpoint controller has another vocabulary; accepted: a checkpoint of this "
                             "knobgym version's grpo_lm agent")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_step_and_rng(state)

    def save_pretrained(self, directory: str | Path) -> Path:
        """The controller LM and its tokenizer in the Hugging Face layout (``model.safetensors``,
        ``config.json``, ``tokenizer.json``), loadable with ``AutoModelForCausalLM`` /
        ``PreTrainedTokenizerFast.from_pretrained``."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory
