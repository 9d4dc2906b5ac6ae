"""The decoding backend: a target causal LM (and optionally a draft sharing its tokenizer) answering QA.

``backend=decoding`` loads the shipped tiny pair (``backends/tiny_lm/{target,draft}``) on the
procedural QA task by default; ``conf/backend/*-decoding.yaml`` name real pairs (Qwen2.5-3B with
a 0.5B draft), loaded offline from a local directory or the local Hugging Face cache only.

Every answer is decoded by ``transformers`` ``generate`` with the keyword arguments of its strategy
(:mod:`backends.decoding.strategies`: greedy, beam, sampling, speculative; each says what it sets
up before ``generate`` and what it reads from the output after).

The draft sees the same token ids as the target (one shared tokenizer). The chat-template switch
is offered only when the target's tokenizer has one (``tokenizer.chat_template is not None``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.base import SPLITS, Sample
from backends.threads import DEFAULT_TORCH_THREADS, set_torch_threads
from backends.decoding.knobs import STRATEGIES, DecodingKnobError, DecodingKnobs, DecodingSpace
from backends.decoding.strategies import strategy
from backends.checks import check_int

TINY_DIR = Path(__file__).resolve().parent.parent / "tiny_lm"


class DraftTokenizerMismatchError(ValueError):
    """A draft model whose tokenizer is not the target's (speculative decoding compares token ids)."""


@dataclass(frozen=True)
class DecodingTokenCounts:
    """Token counts of one answer: prompt tokens and generated tokens (what latency scales with)."""

    prompt_tokens: int
    new_tokens: int


@dataclass(frozen=True)
class DecodingOutcome:
    """One decoded answer and what it cost.

    ``beam_sources`` (beam only): for each generated token of the returned sequence, the index of
    the beam (at the previous step) it extended. ``target_passes`` / ``draft_passes``: forward
    calls of each model; ``accepted_tokens``, ``acceptance_rate`` and ``accepted_per_pass``
    (speculative only, else ``None``).
    """

    answer: str
    reference: str | None
    score: float
    knobs: DecodingKnobs
    token_counts: DecodingTokenCounts
    measured_ms: float
    sequence: tuple[int, ...]
    target_passes: int
    draft_passes: int = 0
    beam_sources: tuple[int, ...] | None = None
    accepted_tokens: int | None = None
    acceptance_rate: float | None = None
    accepted_per_pass: float | None = None

    @property
    def new_tokens(self) -> int:
        return self.token_counts.new_tokens

    @property
    def empty_output(self) -> bool:
        return not self.answer.strip()


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@dataclass
class QAData:
    """Question / answer samples per split, with their question-type names."""

    splits: dict[str, list[Sample]]
    question_types: tuple[str, ...]
    source: str

    @classmethod
    def procedural(cls) -> "QAData":
        from backends.tiny_lm.task import QUESTION_TYPES, split_items

        splits = {s: [Sample(i, s, it.question, it.answer, question_type=it.question_type)
                      for i, it in enumerate(split_items(s))] for s in SPLITS}
        return cls(splits, QUESTION_TYPES, "procedural:tiny_lm.task")

    @classmethod
    def from_json_lines(cls, directory: str | Path) -> "QAData":
        """``<directory>/{train,validation,test}.jsonl``, one ``{"question", "answer", "type"?}`` per line,
        read through ``datasets``."""
        from datasets import load_dataset

        directory = Path(directory).expanduser()
        files = {s: directory / f"{s}.jsonl" for s in SPLITS}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"dataset {str(directory)!r} lacks {', '.join(missing)}; accepted: a folder with "
                                    f"train.jsonl, validation.jsonl and test.jsonl ({{question, answer, type?}} per line)")
        data = load_dataset("json", data_files={s: str(p) for s, p in files.items()})
        types: list[str] = []
        splits = {}
        for s in SPLITS:
            rows = []
            for i, row in enumerate(data[s]):
                t = str(row.get("type") or "qa")
                if t not in types:
                    types.append(t)
                rows.append(Sample(i, s, str(row["question"]), str(row["answer"]), question_type=types.index(t)))
            splits[s] = rows
        return cls(splits, tuple(types), str(directory))


# ------------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------------
def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


class HFDecodingBackend:
    """The :class:`~backends.decoding.base.DecodingBackend` of ``transformers`` models: a target, an
    optional draft sharing its tokenizer, QA data, and ``run(sample, knobs)`` through ``generate``.

    Args:
        target, draft: ``(model, tokenizer)`` pairs (draft ``None``: no speculative decoding).
        data: the QA samples.
        max_new_tokens: answer length cap.
        beams, temperatures, lookaheads: the offered values of each knob.
        max_beams: the largest beam width this backend accepts.
        instruction: text put before each question in both prompt formats ("" for the tiny pair).
        identity: name, model ids and revisions (for caches and run logs).
        options: the keyword arguments that rebuild this backend with :func:`load_decoding_backend`.

    Raises:
        DraftTokenizerMismatchError: the draft's vocabulary or end-of-sequence id differs from the target's.
    """

    def __init__(self, target: tuple[Any, Any], draft: tuple[Any, Any] | None, data: QAData, *,
                 max_new_tokens: int = 10, beams: Sequence[int] = (2, 4), temperatures: Sequence[float] = (0.5, 1.0),
                 lookaheads: Sequence[int] = (2, 4, 8), max_beams: int = 4, instruction: str = "",
                 identity: dict | None = None, options: dict | None = None):
        self.model, self.tokenizer = target
        self.draft_model, draft_tokenizer = draft if draft is not None else (None, None)
        if draft is not None:
            check_same_tokenizer(self.tokenizer, draft_tokenizer, str((identity or {}).get("draft", "draft")))
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; accepted: an integer >= 1")
        self.max_new_tokens = int(max_new_tokens)
        self.data = data
        self.instruction = str(instruction)
        self._identity = {"backend": "decoding", **(identity or {})}
        self.options = dict(options or {})
        self.knob_space = DecodingSpace(
            strategies=tuple(s for s in STRATEGIES if not strategy(s).uses_draft or self.draft_model is not None),
            beams=tuple(int(b) for b in beams), temperatures=tuple(float(t) for t in temperatures),
            lookaheads=tuple(int(k) for k in lookaheads),
            chat_options=(False, True) if self.tokenizer.chat_template is not None else (False,),
            max_beams=int(max_beams), model=str(self._identity.get("target", "the target model")))
        self.question_types = tuple(data.question_types)
        self._expected_new = self._expected_new_tokens()

    def __deepcopy__(self, memo: dict) -> "HFDecodingBackend":
        # A loaded backend (models in memory) is shared, never copied: Gymnasium deep-copies env kwargs.
        return self

    # ---------------------------------------------------------------- identity / data
    def identity(self) -> dict:
        return dict(self._identity)

    @property
    def device(self):
        return self.model.device

    def samples(self, split: str) -> Sequence[Sample]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid; accepted: {', '.join(SPLITS)}")
        return self.data.splits[split]

    def sample(self, split: str, sample_id: int) -> Sample:
        items = self.samples(split)
        return items[check_int("sample_id", sample_id, 0, len(items), where=f"samples of split {split!r}")]

    # ---------------------------------------------------------------- prompts and token counts
    def prompt_ids(self, sample: Sample, chat_template: bool) -> list[int]:
        """The prompt's token ids: the target's chat template for one user turn, or plain text."""
        from backends.tiny_lm.task import plain_prompt

        question = f"{self.instruction}{sample.question}"
        if chat_template:
            if self.tokenizer.chat_template is None:
                raise DecodingKnobError(f"chat_template=True is invalid: {self.knob_space.model} has no chat "
                                        f"template (tokenizer.chat_template is None); accepted: chat_template=False")
            out = self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(out["input_ids"])
        return list(self.tokenizer(plain_prompt(question), add_special_tokens=False)["input_ids"])

    def _expected_new_tokens(self) -> dict:
        """Mean generated tokens (answer + end-of-sequence) per question type over the training split."""
        per_type: dict[int, list[int]] = {}
        for s in self.data.splits["train"][:512]:
            n = len(self.tokenizer(str(s.reference), add_special_tokens=False)["input_ids"]) + 1
            per_type.setdefault(s.question_type, []).append(min(n, self.max_new_tokens))
        out: dict = {t: float(np.mean(v)) for t, v in per_type.items()}
        out[None] = float(np.mean([x for v in per_type.values() for x in v]))
        return out

    def expected_token_counts(self, sample: Sample, knobs: DecodingKnobs) -> DecodingTokenCounts:
        """Prompt tokens (exact) and the question type's mean answer length (before running)."""
        expected = self._expected_new.get(sample.question_type, self._expected_new[None])
        return DecodingTokenCounts(len(self.prompt_ids(sample, knobs.chat_template)), int(round(expected)))

    # ---------------------------------------------------------------- running
    def generate_kwargs(self, knobs: DecodingKnobs) -> dict:
        """The ``generate`` keyword arguments of a resolved configuration."""
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, return_dict_in_generate=True,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        kw.update(strategy(knobs.strategy).generate_kwargs(knobs, self.draft_model))
        return kw

    def run(self, sample: Sample, knobs: DecodingKnobs) -> DecodingOutcome:
        """Decode one answer under ``knobs`` (validated first), score it, and time it."""
        import torch

        knobs = self.knob_space.resolve(knobs)
        ids = self.prompt_ids(sample, knobs.chat_template)
        kwargs = self.generate_kwargs(knobs)
        decoding = strategy(knobs.strategy)
        counts = {"target": 0, "draft": 0}
        hooks = [self.model.register_forward_hook(lambda *a: counts.__setitem__("target", counts["target"] + 1))]
        if self.draft_model is not None:
            hooks.append(self.draft_model.register_forward_hook(
                lambda *a: counts.__setitem__("draft", counts["draft"] + 1)))
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        try:
            with rng, torch.inference_mode():
                decoding.prepare(self, sample, knobs)
                input_ids = torch.tensor([ids], device=self.device)
                attention_mask = torch.ones_like(input_ids)
                self._synchronize()
                start = time.perf_counter()
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                self._synchronize()
                elapsed_ms = (time.perf_counter() - start) * 1000.0
        finally:
            for h in hooks:
                h.remove()
        generated = out.sequences[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        answer_ids = generated[:generated.index(eos)] if eos in generated else generated
        new_tokens = len(answer_ids) + (1 if eos in generated else 0)
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        score = float(sample.reference is not None and _normalise(answer) == _normalise(str(sample.reference)))
        return DecodingOutcome(answer=answer, reference=sample.reference, score=score, knobs=knobs,
                               token_counts=DecodingTokenCounts(len(ids), new_tokens), measured_ms=elapsed_ms,
                               sequence=tuple(generated), target_passes=counts["target"],
                               draft_passes=counts["draft"],
                               **decoding.outcome_extras(out, generated, counts, knobs))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def check_same_tokenizer(target_tokenizer, draft_tokenizer, draft_name: str = "draft") -> None:
    """Raise :class:`DraftTokenizerMismatchError` unless both tokenizers map text to the same ids."""
    if (target_tokenizer.get_vocab() != draft_tokenizer.get_vocab()
            or target_tokenizer.eos_token_id != draft_tokenizer.eos_token_id):
        raise DraftTokenizerMismatchError(
            f"draft {draft_name!r} has a different tokenizer than the target (vocabulary of "
            f"{len(draft_tokenizer)} vs {len(target_tokenizer)} tokens, eos {draft_tokenizer.eos_token_id} vs "
            f"{target_tokenizer.eos_token_id}); accepted: a draft sharing the target's tokenizer")


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _load(model: str, revision: str, precision: str, device: str, attn_implementation: str, quantization: dict):
    from backends.loading import load_model, model_spec_from_dict

    loaded = load_model(model_spec_from_dict({"model": model, "revision": revision, "local_files_only": True,
                                              "precision": precision, "device": device,
                                              "attn_implementation": attn_implementation,
                                              "quantization": quantization}))
    return loaded.model, loaded.tokenizer, loaded.revision_loaded


def load_decoding_backend(target: str | None = None, draft: str | None = "default", *, revision: str = "main",
                          draft_revision: str = "main", precision: str = "fp32", device: str = "cpu",
                          attn_implementation: str = "sdpa", dataset: str | None = None, max_new_tokens: int = 10,
                          beams: Sequence[int] = (2, 4), temperatures: Sequence[float] = (0.5, 1.0),
                          lookaheads: Sequence[int] = (2, 4, 8), max_beams: int = 4,
                          instruction: str = "", num_threads: int | None = DEFAULT_TORCH_THREADS,
                          quantization: Any = None) -> HFDecodingBackend:
    """``backend=decoding``: load a target (and draft) offline, with QA data.

    Args:
        target: a local ``save_pretrained`` directory or a hub id already in the local Hugging Face
            cache (``local_files_only=True``; a miss is one error saying how to make it available).
            ``None``: the shipped tiny target (``backends/tiny_lm/target``).
        draft: the same for the draft; ``"default"``: the shipped tiny draft when ``target`` is the
            tiny one, else none; ``None``: no draft (no speculative decoding).
        dataset: ``None`` (the procedural task) or a folder of ``{train,validation,test}.jsonl``.
        num_threads: torch intra-op threads for the process (default
            :data:`backends.threads.DEFAULT_TORCH_THREADS`, as every backend and the CLI; the
            profile's CPU-time clock sums all threads); ``None`` leaves torch's setting alone.
        quantization: ``nf4``, ``fp4``, ``int8`` (bitsandbytes, target and draft alike) or null.
        Other arguments: see :class:`HFDecodingBackend` and :class:`backends.loading.ModelSpec`.
    """
    if num_threads is not None:
        set_torch_threads(num_threads)
    options = dict(target=target, draft=draft, revision=revision, draft_revision=draft_revision, precision=precision,
                   device=device, attn_implementation=attn_implementation, dataset=dataset,
                   max_new_tokens=max_new_tokens, beams=list(beams), temperatures=list(temperatures),
                   lookaheads=list(lookaheads), max_beams=max_beams, instruction=instruction,
                   quantization=quantization)
    from backends.loading import quantization_options

    quant = quantization_options(quantization)
    tiny = target is None
    target_path = str(TINY_DIR / "target") if tiny else str(target)
    if draft == "default":
        draft = str(TINY_DIR / "draft") if tiny else None
    model, tokenizer, target_rev = _load(target_path, revision, precision, device, attn_implementation, quant)
    pair = None
    identity = {"name": "tiny-decoding" if tiny else "decoding", "target": target_path if not tiny else "tiny_lm/target",
                "target_revision": target_rev, "precision": precision, "device": device,
                "max_new_tokens": int(max_new_tokens), "quantization": quant or None}
    if draft is not None:
        d_model, d_tokenizer, draft_rev = _load(str(draft), draft_revision, precision, device, attn_implementation, quant)
        pair = (d_model, d_tokenizer)
        identity.update(draft=str(draft) if not tiny else "tiny_lm/draft", draft_revision=draft_rev)
    data = QAData.procedural() if dataset is None else QAData.from_json_lines(dataset)
    identity["dataset"] = data.source
    return HFDecodingBackend((model, tokenizer), pair, data, max_new_tokens=max_new_tokens, beams=beams,
                           temperatures=temperatures, lookaheads=lookaheads, max_beams=max_beams,
                           instruction=instruction, identity=identity, options=options)
