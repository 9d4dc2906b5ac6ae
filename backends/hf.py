"""The generic Hugging Face backend: one loaded model, its data, and a two-stage run under knobs.

Stage 1 (``run_stage1``): the vision tower, tier pooling and budgeted token selection, then
decoder block 1 at the model's own top-k over the whole prompt. Stage 2 (``run_stage2``): the
remaining blocks under the chosen top-k and depth, the final norm and LM head, then
token-by-token decoding under the same knobs (``apply_knobs``), scored against the reference.

A stage-1 state is never mutated by stage 2 (its KV cache is copied), so one stage-1
computation serves every member of a GRPO group with the same tier. ``run_stage2_batch`` runs
several knob configurations on one stage-1 state as one batch (per-row top-k, depth and stopping).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from backends.base import Sample, check_split
from backends.knobs import (KnobConfig, KnobError, KnobSpace, apply_knobs, knob_space_from_model, model_parts,
                            row_top_k)
from backends import qwen_vl
from backends.loading import GenerationSettings, LoadedModel
from backends.outcome import Outcome, Stage1State, TokenCounts, expected_token_counts
from backends.runner import LRUCache
from backends.quantized import first_nonfinite_module
from backends.text_features import QUESTION_FEATURE_DIM, hashed_bag_of_words

SUMMARY_DIM = 16


class Task(Protocol):
    """The data a backend serves and how answers are scored."""

    question_types: tuple[str, ...]

    def samples(self, split: str) -> Sequence[Sample]: ...

    def score(self, answer: str, sample: Sample) -> float:
        """The answer's score against the sample's reference(s), in [0, 1]."""


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes prompt text: a template string, or a chat template.

    Args:
        template: text with ``{question}`` (and, for a vision model, the image token once); the
            prompt is tokenized with the tokenizer's special tokens (BOS) added.
        chat_template: a Jinja chat template (the model's own, from its tokenizer or processor)
            rendering one user turn (for a vision model: an image, then the question) and the
            generation prompt; its text already holds the special tokens it wants.
    """

    template: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if (self.template is None) == (self.chat_template is None):
            raise ValueError("PromptFormat needs exactly one of template and chat_template")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"prompt_template={self.template!r} is invalid; accepted: a string containing "
                             f"{{question}}")

    @property
    def add_special_tokens(self) -> bool:
        return self.template is not None

    def render(self, tokenizer, question: str, with_image: bool) -> str:
        if self.template is not None:
            return self.template.replace("{question}", question)
        content = ([{"type": "image"}, {"type": "text", "text": question}] if with_image else question)
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=self.chat_template,
                                             tokenize=False, add_generation_prompt=True)


@dataclass
class _Positions:
    """Where a forward's tokens sit: ``text`` ``[1, T]`` sequence indices (causal mask, cache);
    ``rope`` the rotary positions when they differ (Qwen-VL's M-RoPE, ``[3, 1, T]``); ``deepstack``
    block index -> (image mask ``[T]``, features ``[K, d]``) added after that block (Qwen3-VL's
    DeepStack, prompt only)."""

    text: torch.Tensor
    rope: torch.Tensor | None = None
    deepstack: dict = field(default_factory=dict)

    @property
    def rotary(self) -> torch.Tensor:
        return self.rope if self.rope is not None else self.text


@dataclass
class _Stage1Payload:
    hidden: torch.Tensor  # [1, T, d] output of block 1 (before the final norm)
    cache: DynamicCache  # holds block 1's keys/values for the prompt
    positions: _Positions
    prompt_len: int
    rope_delta: int = 0  # rotary position of generated token i: prompt_len + i + rope_delta


@dataclass
class _ImageFeatures:
    """One image through the tower under the knobs: ``features`` ``[1, K, d]`` for the K
    placeholders; ``kept`` ``[1, K]`` which of the tier's tokens the budget kept (``None``: all);
    ``grid_thw`` the processor's patch grid (Qwen-VL); ``deepstack`` Qwen3-VL's per-level
    ``[1, K, d]`` features added after the first decoder blocks."""

    features: torch.Tensor
    kept: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None
    deepstack: list = field(default_factory=list)


class _Timer:
    """Wall-clock milliseconds, CUDA-synchronised when the model is on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.ms = (time.perf_counter_ns() - self.t0) / 1e6


class HFBackend:
    """Backend over a loaded HF model (LLaVA, IDEFICS2, Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE, or a
    text-only MoE / dense causal LM), in any precision or bitsandbytes quantization it loaded with.

    Args:
        loaded: the :class:`~backends.loading.LoadedModel`.
        task: samples per split and the scoring function.
        generation: decoding settings (honoured as given: greedy only if ``do_sample=False``).
        prompt_template: prompt with ``{question}`` and, for vision models, the image token once;
            given, it is used instead of any chat template.
        chat_template: ``True``: the model's chat template when it has one
            (``tokenizer.chat_template`` or the processor's, see :class:`LoadedModel`); a string: that
            Jinja template; ``False``: none. Without a chat template or ``prompt_template``: the
            checkpoint's saved ``knobgym.prompt_template``, else ``USER: <image>\n{question}
            ASSISTANT:`` (vision) / ``{question}`` (text).
        knob_space: override of the space derived from the model config.
        name: backend name recorded in identities (``tiny``, ``hf``, ...).

    Vision inputs are processed one image at a time with image splitting off (IDEFICS2), so the
    language model sees one image's tokens at every tier.
    """

    summary_dim = SUMMARY_DIM
    question_feature_dim = QUESTION_FEATURE_DIM

    def __init__(self, loaded: LoadedModel, task: Task, generation: GenerationSettings = GenerationSettings(),
                 prompt_template: str | None = None, knob_space: KnobSpace | None = None, name: str = "hf",
                 chat_template: bool | str = False):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.image_processor = loaded.image_processor
        self.task = task
        self.generation = generation
        self.name = name
        self.parts = model_parts(self.model)
        self.knob_space = knob_space or knob_space_from_model(self.model)
        self.question_types = tuple(task.question_types)
        self.prompt_format = self._prompt_format(prompt_template, chat_template)
        self.device = next(self.model.parameters()).device
        self._embed = self.model.get_input_embeddings()
        self._layer_takes_layer_past = "layer_past" in inspect.signature(self.parts.layers[0].forward).parameters
        self._rotary = getattr(self.parts.text_decoder, "rotary_emb", None)
        self._mrope = qwen_vl.is_qwen_vl(self.model)  # M-RoPE positions, dynamic resolution, DeepStack
        # A fixed random projection of block 1's pooled output: the stage-2 observation summary.
        gen = torch.Generator().manual_seed(1234)
        hidden = self._embed.weight.shape[1]
        q, _ = torch.linalg.qr(torch.randn(hidden, max(hidden, SUMMARY_DIM), generator=gen))
        self._summary_proj = q[:, :SUMMARY_DIM].to(torch.float32)
        self._eos_ids = self._eos_token_ids()
        self._sample_cache: dict[str, Sequence[Sample]] = {}
        self._prompt_len_cache: LRUCache[int] = LRUCache(100_000)
        self._expected_new_tokens: dict | None = None
        self._nonfinite_module: str | None = None  # see _locate_nonfinite
        self._locating = False

    def _prompt_format(self, prompt_template: str | None, chat_template: bool | str) -> PromptFormat:
        if prompt_template is not None:
            return PromptFormat(template=prompt_template)
        if isinstance(chat_template, str):
            return PromptFormat(chat_template=chat_template)
        if chat_template is True and self.loaded.chat_template is not None:
            return PromptFormat(chat_template=self.loaded.chat_template)
        saved = getattr(self.model.config, "knobgym", None) or {}
        return PromptFormat(template=saved.get("prompt_template") or (
            "USER: <image>\n{question} ASSISTANT:" if self.knob_space.has_vision else "{question}"))

    @property
    def prompt_template(self) -> str | None:
        """The template string in use (``None`` when prompts come from a chat template)."""
        return self.prompt_format.template

    def prompt_text(self, sample: Sample) -> str:
        """The prompt of a sample before tokenization (the image token once for vision models)."""
        return self.prompt_format.render(self.tokenizer, sample.question, self.knob_space.has_vision)

    def _prompt_ids(self, sample: Sample) -> list[int]:
        return self.tokenizer(self.prompt_text(sample),
                              add_special_tokens=self.prompt_format.add_special_tokens)["input_ids"]

    # ----------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Backend name, model, ``content_revision`` (see :meth:`LoadedModel.identity`), dtype, device."""
        return {"backend": self.name, **self.loaded.identity}

    def recorded_estimator_file(self) -> None:
        """Live backends carry no recorded estimator: latency comes from this device's profile."""
        return None

    def question_features(self, sample: Sample) -> np.ndarray:
        """``[question_feature_dim]`` float32 hashed bag of words of the question
        (:func:`backends.text_features.hashed_bag_of_words`): an input feature every sample has,
        with or without question types."""
        return hashed_bag_of_words(sample.question, self.question_feature_dim)

    def cost_params(self) -> dict[str, float]:
        """Architecture numbers for analytic latency features."""
        cfg = self.model.config
        text = getattr(cfg, "text_config", cfg)
        vision = getattr(cfg, "vision_config", None)
        return {
            "hidden_size": float(text.hidden_size),
            "intermediate_size": float(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            "expert_intermediate_size": float(getattr(text, "moe_intermediate_size", None)
                                              or getattr(text, "intermediate_size", 4 * text.hidden_size)),
            "num_layers": float(len(self.parts.layers)),
            "num_experts": float(self.knob_space.num_experts or 0),
            "full_top_k": float(self.knob_space.full_top_k or 0),
            "vocab_size": float(text.vocab_size),
            "vision_layers": float((getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", 0)) if vision
                                   else 0),
            "vision_hidden": float(getattr(vision, "hidden_size", 0) if vision else 0),
            "vision_intermediate_size": float(getattr(vision, "intermediate_size", 0) if vision else 0),
            "native_vision_tokens": float(self.knob_space.native_vision_tokens),
        }

    def samples(self, split: str) -> Sequence[Sample]:
        check_split(split)
        if split not in self._sample_cache:
            self._sample_cache[split] = self.task.samples(split)
        return self._sample_cache[split]

    def sample(self, split: str, sample_id: int) -> Sample:
        items = self.samples(split)
        if not (isinstance(sample_id, (int, np.integer)) and 0 <= sample_id < len(items)):
            raise ValueError(f"sample_id={sample_id!r} is out of range for split {split!r}; accepted: 0..{len(items) - 1}")
        return items[int(sample_id)]

    def prompt_tokens(self, sample: Sample) -> int:
        """Text tokens of the sample's prompt (image placeholders excluded); cached per question (the
        prompt depends on nothing else), bounded, so a server answering new questions stays flat."""
        return self._prompt_len_cache.get_or_compute(sample.question, lambda: sum(
            1 for i in self._prompt_ids(sample) if i != self.parts.image_token_id))

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one run generates (:class:`backends.base.BoundedGeneration`)."""
        return self.generation.max_new_tokens

    @contextlib.contextmanager
    def generation_capped(self, max_new_tokens: int):
        """Within the block a run generates at most ``max_new_tokens`` (clamped to ``min_new_tokens ..
        max_new_tokens``; :class:`backends.base.BoundedGeneration`)."""
        settings = self.generation
        cap = min(settings.max_new_tokens, max(settings.min_new_tokens, int(max_new_tokens)))
        self.generation = replace(settings, max_new_tokens=cap,
                                  min_new_tokens=min(settings.min_new_tokens, cap))
        try:
            yield
        finally:
            self.generation = settings

    @property
    def expected_new_tokens(self) -> int:
        """Mean answer length of the training split (what a run is expected to generate)."""
        return self.expected_new_tokens_by_type[None]

    @property
    def expected_new_tokens_by_type(self) -> dict:
        """Mean answer length of the training split per question type (``None``: all types).

        Why per type: answer length is the largest input-dependent part of a run's latency (each
        answer token is one more pass through the decoder), it is known from the question alone
        ("what is the largest object?" takes two words, "how many ...?" one), and a single mean
        underestimates every long-answer input.
        """
        if self._expected_new_tokens is None:
            refs = [s for s in self.samples("train")[:512] if s.reference]
            lengths = np.array([len(self.tokenizer(s.reference, add_special_tokens=False)["input_ids"]) for s in refs])
            types = np.array([-1 if s.question_type is None else s.question_type for s in refs])

            def typical(values) -> int:
                mean = int(round(float(np.mean(values)))) if len(values) else 1
                return min(self.generation.max_new_tokens, max(1, mean))

            by_type = {None: typical(lengths)}
            by_type.update({int(t): typical(lengths[types == t]) for t in np.unique(types) if t >= 0})
            self._expected_new_tokens = by_type
        return self._expected_new_tokens

    def expected_token_counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        """Token counts of a run before running it (:func:`backends.outcome.expected_token_counts`)."""
        return expected_token_counts(self, sample, knobs)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run_stage1(self, sample: Sample, tier: str | None, token_budget: float = 1.0) -> Stage1State:
        """Vision tower at ``tier`` (and ``token_budget``), then decoder block 1 at full top-k."""
        space = self.knob_space
        tier = space.resolve(KnobConfig(tier=tier, token_budget=token_budget)).tier
        with _Timer(self.device) as timer:
            ids, image, n_full = self._prompt_inputs(sample, tier, token_budget)
            embeds = self._embed(ids)
            n_vision = 0
            positions = _Positions(text=torch.arange(ids.shape[1], device=self.device).unsqueeze(0))
            rope_delta = 0
            if image is not None:
                mask = ids[0] == self.parts.image_token_id
                embeds = embeds.masked_scatter(mask[None, :, None], image.features.to(embeds.dtype))
                n_vision = image.features.shape[1]
                if self._mrope:
                    positions.rope, rope_delta = self._image_rope(mask, image)
                positions.deepstack = {i: (mask, level[0]) for i, level in enumerate(image.deepstack)}
            cache = DynamicCache(config=self._text_config)
            hidden = self._run_blocks(embeds, 0, 1, cache, positions)
        pooled = hidden[0].float().mean(dim=0).cpu()  # the projection lives on the CPU, like the summary
        summary = (pooled / (pooled.norm() + 1e-6)) @ self._summary_proj
        counts = TokenCounts(prompt_tokens=int(ids.shape[1] - n_vision), vision_tokens_full=n_full,
                             vision_tokens=n_vision)
        payload = _Stage1Payload(hidden=hidden, cache=cache, positions=positions, prompt_len=int(ids.shape[1]),
                                 rope_delta=rope_delta)
        return Stage1State(sample_id=sample.sample_id, tier=tier, token_counts=counts,
                           summary=summary.cpu().numpy().astype(np.float32), measured_ms=timer.ms,
                           payload=(sample, token_budget, payload))

    def _stage2_knobs(self, state: Stage1State, knobs: KnobConfig) -> KnobConfig:
        """``knobs`` resolved, or a :class:`KnobError` when they do not match the stage-1 state."""
        _, token_budget, _ = state.payload
        knobs = self.knob_space.resolve(knobs)
        if knobs.tier != state.tier or knobs.token_budget != token_budget:
            raise KnobError(f"stage-2 knobs {knobs} do not match the stage-1 state (tier={state.tier!r}, "
                            f"token_budget={token_budget}); accepted: the same tier and token budget")
        return knobs

    def _sampling_rng(self, sample: Sample) -> torch.Generator:
        """The generator of one run's sampled tokens: a pure function of (seed, sample)."""
        return torch.Generator(device="cpu").manual_seed(self.generation.seed * 1_000_003 + int(sample.sample_id))

    def _outcome(self, state: Stage1State, knobs: KnobConfig, new_ids: list[int], nonfinite: bool,
                 stage2_ms: float) -> Outcome:
        sample = state.payload[0]
        answer = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip() if not nonfinite else ""
        score = 0.0 if nonfinite else float(self.task.score(answer, sample))
        counts = TokenCounts(**{**state.token_counts.__dict__, "new_tokens": len(new_ids)})
        extras = {"nonfinite_module": self._locate_nonfinite(sample, knobs)} if nonfinite else {}
        return Outcome(answer=answer, reference=sample.reference, score=score, token_counts=counts,
                       measured_ms=state.measured_ms + stage2_ms, stage1_ms=state.measured_ms,
                       knobs=knobs, empty_output=(answer == ""), nonfinite_logits=nonfinite, extras=extras)

    def _locate_nonfinite(self, sample: Sample, knobs: KnobConfig) -> str | None:
        """The first module whose output went non-finite, found by replaying the run with forward
        hooks (:func:`backends.quantized.first_nonfinite_module`) the first time a run's logits do,
        and reported in one warning; later non-finite runs carry that first finding."""
        if self._nonfinite_module is None and not self._locating:
            self._locating = True
            try:
                found = first_nonfinite_module(self.model, lambda: self.run(sample, knobs))
            finally:
                self._locating = False
            self._nonfinite_module = found or "none (the replay stayed finite)"
            warnings.warn(f"{type(self.model).__name__}: non-finite logits on sample {sample.sample_id} under "
                          f"{knobs}; first module whose output went non-finite: {self._nonfinite_module}",
                          RuntimeWarning, stacklevel=2)
        return self._nonfinite_module

    @torch.no_grad()
    def run_stage2(self, state: Stage1State, knobs: KnobConfig) -> Outcome:
        """Blocks 2..D under ``knobs``, then decode and score. ``state`` is left untouched."""
        sample, token_budget, payload = state.payload
        knobs = self._stage2_knobs(state, knobs)
        gen = self.generation
        rng = self._sampling_rng(sample)
        new_ids: list[int] = []
        nonfinite = False
        with _Timer(self.device) as timer, apply_knobs(self.model, knobs, self.knob_space):
            cache = copy.deepcopy(payload.cache)  # stage 1's cache is shared by the whole group
            depth = len(self.parts.layers)  # already truncated by apply_knobs
            hidden = self._run_blocks(payload.hidden, 1, depth, cache, payload.positions)
            logits = self.parts.lm_head(self.parts.final_norm(hidden[:, -1:]))[0, -1]
            position = payload.prompt_len
            for step in range(gen.max_new_tokens):
                if not torch.isfinite(logits).all():
                    nonfinite = True
                    break
                token = self._choose_token(logits, step, rng)
                if token in self._eos_ids:
                    break
                new_ids.append(token)
                if step + 1 == gen.max_new_tokens:
                    break
                pos = self._decode_positions(position, payload)
                h = self._run_blocks(self._embed(torch.tensor([[token]], device=self.device)), 0, depth, cache, pos)
                logits = self.parts.lm_head(self.parts.final_norm(h))[0, -1]
                position += 1
        return self._outcome(state, knobs, new_ids, nonfinite, timer.ms)

    @torch.no_grad()
    def run_stage2_batch(self, state: Stage1State, knobs_list: Sequence[KnobConfig]) -> list[Outcome]:
        """Stage 2 of several knob configurations on one stage-1 state, as one batch.

        Equals ``[run_stage2(state, k) for k in knobs_list]`` up to float rounding (batched
        matrix products may round differently; answers, scores and token counts agree on every
        supported architecture's tiny model, ``tests/test_batched_stage2.py``). Per row:

        - top-k: each row's tokens are routed to its own top-k experts with the weights the
          unbatched model computes (:func:`backends.knobs.row_top_k`); block 1 keeps the
          model's own top-k as in :func:`~backends.knobs.apply_knobs`.
        - depth: rows are ordered deepest first and block ``i`` runs only on the rows whose depth
          exceeds ``i`` (a prefix of the batch), so each row's KV cache holds exactly the blocks
          its unbatched run fills and its logits come from its own last block.
        - stopping: a row stops at EOS, at ``max_new_tokens`` or at non-finite logits, and leaves
          the batch (its cache rows are dropped); ``min_new_tokens`` holds per row.
        - sampling: each row draws from its own generator seeded as the unbatched run's
          (:meth:`_sampling_rng`), once per generated token, so sampled rows draw the same
          random numbers as their unbatched runs.

        The stage-1 state is not mutated (its hidden state and cache are copied to the batch).
        ``measured_ms`` of each outcome is stage 1's time plus the batch's stage-2 wall time
        divided by the number of rows: a share of shared work, not the latency of a run; a caller
        that charges measured latency runs :meth:`run_stage2` once per configuration instead.
        """
        knobs_list = [self._stage2_knobs(state, k) for k in knobs_list]
        if len(knobs_list) <= 1:
            return [self.run_stage2(state, k) for k in knobs_list]
        sample, _, payload = state.payload
        gen = self.generation
        n = len(knobs_list)
        order = sorted(range(n), key=lambda r: -knobs_list[r].depth)  # deepest first (stable)
        depths = [knobs_list[r].depth for r in order]
        top_ks = [knobs_list[r].top_k for r in order]
        rngs = [self._sampling_rng(sample) for _ in order]
        new_ids: list[list[int]] = [[] for _ in order]
        nonfinite = [False] * n
        active = list(range(n))  # positions in `order` of the rows still generating
        with _Timer(self.device) as timer, row_top_k(self.model, self.knob_space) as routing:
            if routing is not None:
                routing.set_rows(top_ks)
            cache = copy.deepcopy(payload.cache)  # stage 1's cache is shared by the whole group
            cache.batch_repeat_interleave(n)
            hidden = payload.hidden.repeat(n, 1, 1)
            hidden = self._run_blocks_rows(hidden, 1, depths, cache, payload.positions, routing)
            logits = self.parts.lm_head(self.parts.final_norm(hidden[:, -1:]))[:, -1]
            position = payload.prompt_len
            for step in range(gen.max_new_tokens):
                keep, tokens = [], []
                for j, row in enumerate(active):
                    if not torch.isfinite(logits[j]).all():
                        nonfinite[row] = True
                        continue
                    token = self._choose_token(logits[j], step, rngs[row])
                    if token in self._eos_ids:
                        continue
                    new_ids[row].append(token)
                    if step + 1 < gen.max_new_tokens:
                        keep.append(j)
                        tokens.append(token)
                if not keep:
                    break
                if len(keep) < len(active):
                    self._keep_rows(cache, [depths[row] for row in active], keep)
                    active = [active[j] for j in keep]
                    if routing is not None:
                        routing.set_rows([top_ks[row] for row in active])
                pos = self._decode_positions(position, payload)
                embeds = self._embed(torch.tensor(tokens, device=self.device).unsqueeze(1))
                h = self._run_blocks_rows(embeds, 0, [depths[row] for row in active], cache, pos, routing)
                logits = self.parts.lm_head(self.parts.final_norm(h))[:, -1]
                position += 1
        outcomes: list[Outcome | None] = [None] * n
        for row, r in enumerate(order):
            outcomes[r] = self._outcome(state, knobs_list[r], new_ids[row], nonfinite[row], timer.ms / n)
        return outcomes

    def run(self, sample: Sample, knobs: KnobConfig) -> Outcome:
        return self.run_stage2(self.run_stage1(sample, knobs.tier, knobs.token_budget), knobs)

    # ----------------------------------------------------------------------------------------
    @property
    def _text_config(self):
        return getattr(self.model.config, "text_config", self.model.config)

    def _eos_token_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:  # not `or`: 0 is a real EOS id (GPT-NeoX / Pythia)
            ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return {int(i) for i in ids if i is not None}

    def _choose_token(self, logits: torch.Tensor, step: int, rng: torch.Generator) -> int:
        gen = self.generation
        logits = logits.float().clone()
        if step < gen.min_new_tokens:
            for eos in self._eos_ids:
                logits[eos] = -float("inf")
        if not gen.do_sample:
            return int(logits.argmax())
        probs = torch.softmax(logits / gen.temperature, dim=-1).cpu()
        if gen.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < gen.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=rng))

    def _prompt_inputs(self, sample: Sample, tier: str | None, token_budget: float):
        """Prompt ids with exactly K image placeholders, the image's :class:`_ImageFeatures` (the K
        features for them; ``None`` for a text-only model), and the tokens the tower emitted
        (before the budget)."""
        ids = torch.tensor(self._prompt_ids(sample), dtype=torch.long)
        if not self.knob_space.has_vision:
            return ids.unsqueeze(0).to(self.device), None, 0
        if sample.image is None:
            raise ValueError(f"sample {sample.sample_id} has no image but {type(self.model).__name__} needs one")
        if self._mrope:  # dynamic resolution: the tier is the image size given to the processor
            image_inputs = qwen_vl.image_inputs(self.image_processor, sample.image, self.knob_space.tier_sizes[tier])
        else:
            image_inputs = self.image_processor(images=[sample.image], return_tensors="pt", **self._processor_kwargs)
        # The tier and budget act through apply_knobs: resize before the tower, or pool after it,
        # then budgeted selection (one implementation, backends.knobs.transform_vision_features).
        with apply_knobs(self.model, KnobConfig(tier=tier, token_budget=token_budget), self.knob_space):
            image = self._image_features(image_inputs)
        image_id = self.parts.image_token_id
        positions = (ids == image_id).nonzero().flatten()
        if len(positions) == 0:
            raise ValueError(f"the prompt {self.prompt_text(sample)!r} has no image token (id {image_id}); "
                             f"accepted: a prompt_template or chat template that places the image token once")
        # Collapse whatever run of placeholders the tokenizer produced into exactly K of them.
        start, end = int(positions[0]), int(positions[-1]) + 1
        k = image.features.shape[1]
        ids = torch.cat([ids[:start], torch.full((k,), image_id, dtype=ids.dtype), ids[end:]])
        return ids.unsqueeze(0).to(self.device), image, self.knob_space.tower_tokens(tier)

    @property
    def _processor_kwargs(self) -> dict:
        # IDEFICS2 may split an image into 4 crops + the whole: one image per prompt here.
        return {"do_image_splitting": False} if getattr(self.image_processor, "do_image_splitting", False) else {}

    def _image_features(self, image_inputs) -> "_ImageFeatures":
        mm = self.parts.multimodal
        accepted = inspect.signature(mm.get_image_features).parameters
        kwargs = {k: v.to(self.device) for k, v in image_inputs.items() if k in accepted and torch.is_tensor(v)}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        out = mm.get_image_features(**kwargs, return_dict=True)

        def stacked(feats):
            return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

        return _ImageFeatures(features=stacked(out.pooler_output), kept=getattr(out, "kept_token_indices", None),
                              grid_thw=kwargs.get("image_grid_thw"),
                              deepstack=[stacked(level) for level in (getattr(out, "deepstack_features", None) or [])])

    def _image_rope(self, mask: torch.Tensor, image: "_ImageFeatures") -> tuple[torch.Tensor, int]:
        """M-RoPE positions of a prompt with one image (``mask``: its placeholders), and the delta."""
        where = mask.nonzero().flatten()
        n_prefix, n_suffix = int(where[0]), int(mask.shape[0] - where[-1] - 1)
        merge = int(self.model.config.vision_config.spatial_merge_size)
        rope, delta = qwen_vl.mrope_positions(n_prefix, n_suffix, image.grid_thw[0], merge,
                                              image.kept[0] if image.kept is not None else None)
        return rope.to(self.device), delta

    def _decode_positions(self, position: int, payload: _Stage1Payload) -> _Positions:
        text = torch.tensor([[position]], device=self.device)
        if not self._mrope:
            return _Positions(text=text)
        return _Positions(text=text, rope=qwen_vl.decode_positions(position, payload.rope_delta, self.device))

    def _run_blocks_rows(self, hidden: torch.Tensor, start: int, depths: Sequence[int], cache: DynamicCache,
                         positions: _Positions, routing) -> torch.Tensor:
        """Blocks ``start..`` on a batch whose row ``r`` stops after block ``depths[r]``.

        ``depths`` is non-increasing (deepest row first), so block ``i`` runs on the leading rows
        whose depth exceeds ``i``, and cache layer ``i`` holds those rows only. All rows share the
        ``positions`` (one prompt, no padding). Returns each row's output after its
        own last block (the input for a row whose depth is at most ``start``).
        """
        counts = [sum(d > i for d in depths) for i in range(start, max(depths[0], start) + 1)]
        pieces = []
        if counts[0] < len(depths):
            pieces.append(hidden[counts[0]:])
        if counts[0] == 0:
            return hidden
        if routing is not None:
            routing.tokens_per_row = hidden.shape[1]
        # every row sees the same causal mask and rotary embedding: computed for one row, broadcast
        mask = create_causal_mask(config=self._text_config, inputs_embeds=hidden[:1], attention_mask=None,
                                  past_key_values=cache, position_ids=positions.text, layer_idx=start)
        pos_emb = self._rotary(hidden[:1], positions.rotary) if self._rotary is not None else None
        cache_kw = "layer_past" if self._layer_takes_layer_past else "past_key_values"
        h = hidden[:counts[0]]
        for offset, layer in enumerate(list(self.parts.layers)[start:depths[0]]):
            out = layer(h, attention_mask=mask, position_ids=positions.text, use_cache=True,
                        position_embeddings=pos_emb, **{cache_kw: cache})
            h = out[0] if isinstance(out, tuple) else out
            if start + offset in positions.deepstack:
                h = qwen_vl.add_deepstack(h, *positions.deepstack[start + offset])
            n_next = counts[offset + 1]
            if n_next < h.shape[0]:  # rows whose depth is this block's: their output is final
                pieces.append(h[n_next:])
                h = h[:n_next]
        return torch.cat(pieces[::-1], dim=0)

    def _keep_rows(self, cache: DynamicCache, depths: Sequence[int], keep: Sequence[int]) -> None:
        """Drop finished rows from the cache: ``keep`` (sorted) indexes the rows of ``depths``;
        cache layer ``i`` holds the leading rows whose depth exceeds ``i``."""
        for i, layer in enumerate(cache.layers[:depths[0]]):
            rows_here = sum(d > i for d in depths)
            layer.batch_select_indices(torch.tensor([j for j in keep if j < rows_here], dtype=torch.long,
                                                    device=self.device))

    def _run_blocks(self, hidden: torch.Tensor, start: int, end: int, cache: DynamicCache,
                    positions: _Positions) -> torch.Tensor:
        """Run decoder blocks ``start..end-1`` on ``hidden`` at ``positions``, updating ``cache``."""
        if start >= end:
            return hidden
        # In stage 2 block 1's cache already holds the prompt while later blocks' do not: size the
        # mask from the first block being run.
        mask = create_causal_mask(config=self._text_config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=cache, position_ids=positions.text, layer_idx=start)
        pos_emb = self._rotary(hidden, positions.rotary) if self._rotary is not None else None
        cache_kw = "layer_past" if self._layer_takes_layer_past else "past_key_values"
        for index in range(start, min(end, len(self.parts.layers))):
            out = self.parts.layers[index](hidden, attention_mask=mask, position_ids=positions.text, use_cache=True,
                                           position_embeddings=pos_emb, **{cache_kw: cache})
            hidden = out[0] if isinstance(out, tuple) else out
            if index in positions.deepstack:
                hidden = qwen_vl.add_deepstack(hidden, *positions.deepstack[index])
        return hidden

