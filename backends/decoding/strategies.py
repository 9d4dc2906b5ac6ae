"""Decoding strategies: one small class per strategy, one registry (:data:`DECODING_STRATEGIES`).

Each strategy is the one place that says what it means, for everyone who reads a configuration:
the knob space (which :class:`~backends.decoding.knobs.DecodingKnobs` field it reads, which
:class:`~backends.decoding.knobs.DecodingSpace` field offers its values, what a valid value is),
the backend (its ``generate`` keyword arguments, what to set up before and what to read from the
output after), the latency estimator (the cost terms it implies) and the tables (its label).
The base class is plain greedy-like decoding; each strategy overrides only what differs.

Strategies are looked up by the name a configuration carries (:func:`strategy`); the registry's
order is the order of :data:`~backends.decoding.knobs.STRATEGIES`, of the knob space's
configurations and of the estimator's one-hot features, so it is part of the cache format.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, ClassVar

#: neutral value of each strategy-specific knob (what a strategy that ignores it resolves it to)
NEUTRAL_KNOBS: dict[str, Any] = {"num_beams": 1, "temperature": 0.0, "num_assistant_tokens": 0}


class DecodingStrategy:
    """One decoding strategy (the base is greedy: one target pass per token, no extra knob).

    Class attributes:
        name: the ``DecodingKnobs.strategy`` value.
        knob: the ``DecodingKnobs`` field it reads (``None``: none); the others resolve to
            :data:`NEUTRAL_KNOBS`.
        offered: the ``DecodingSpace`` field listing the values offered for ``knob``.
        uses_draft: decodes with the draft model (offered only with one; measures acceptance).
    """

    name: ClassVar[str] = ""
    knob: ClassVar[str | None] = None
    offered: ClassVar[str | None] = None
    uses_draft: ClassVar[bool] = False
    cast: ClassVar[type] = int

    def invalid(self, value: Any, space: Any) -> str | None:
        """One line naming ``value`` of :attr:`knob` and what is accepted, or ``None`` when it is valid."""
        return None

    def generate_kwargs(self, knobs: Any, draft_model: Any) -> dict:
        """The strategy's ``generate`` keyword arguments (beside the backend's common ones)."""
        return dict(do_sample=False, num_beams=1)

    def prepare(self, backend: Any, sample: Any, knobs: Any) -> None:
        """Set up before ``generate`` (inside the backend's forked random state)."""

    def outcome_extras(self, out: Any, generated: list[int], passes: dict, knobs: Any) -> dict:
        """The strategy's fields of the outcome, read from ``generate``'s output and the forward-pass
        counts ``passes`` (``{"target": n, "draft": n}``)."""
        return {}

    def cost(self, knobs: Any, prompt: float, new: float, acceptance: float) -> dict:
        """The estimator's strategy-dependent features of one answer (``acceptance``: accepted draft
        tokens per target pass, 0 unless :attr:`uses_draft`)."""
        return {"num_beams": 1, "temperature": 0.0, "lookahead": 0, "target_passes": float(new),
                "draft_passes": 0.0, "beam_token_work": 0.0, "prompt_work": prompt, "speculative_rounds": 0.0}

    def label(self, knobs: Any) -> str:
        """Short name of a configuration in tables (without the chat-template suffix)."""
        return self.name


class Greedy(DecodingStrategy):
    """``do_sample=False, num_beams=1``."""

    name = "greedy"


class Beam(DecodingStrategy):
    """``num_beams=b`` (length penalty 1, ``early_stopping=False``: the library defaults); the outcome
    carries the source beam of every returned token, read from the search's own back-pointers
    (:func:`beam_sources`)."""

    name, knob, offered = "beam", "num_beams", "beams"

    def invalid(self, value, space):
        if not 2 <= int(value) <= space.max_beams:
            return f"num_beams={value} is outside the model's limit; accepted: beam widths 2..{space.max_beams}"
        return None

    def generate_kwargs(self, knobs, draft_model):
        return dict(do_sample=False, num_beams=knobs.num_beams, output_scores=True, length_penalty=1.0,
                    early_stopping=False)

    def outcome_extras(self, out, generated, passes, knobs):
        return {"beam_sources": beam_sources(out, len(generated), knobs.num_beams)}

    def cost(self, knobs, prompt, new, acceptance):
        beams = int(knobs.num_beams)
        return {**super().cost(knobs, prompt, new, acceptance), "num_beams": beams,
                "beam_token_work": beams * new, "prompt_work": prompt * beams}

    def label(self, knobs):
        return f"beam {knobs.num_beams}"


class Sampling(DecodingStrategy):
    """``do_sample=True, temperature=t``, ``top_k=0``, ``top_p=1``; the random stream is seeded from
    (split, sample id, knobs), so a configuration on a sample always gives the same answer."""

    name, knob, offered, cast = "sampling", "temperature", "temperatures", float

    def invalid(self, value, space):
        if not (math.isfinite(value) and value > 0):
            return f"temperature={value!r} is invalid for sampling; accepted: > 0"
        return None

    def generate_kwargs(self, knobs, draft_model):
        return dict(do_sample=True, num_beams=1, temperature=knobs.temperature, top_k=0, top_p=1.0)

    def prepare(self, backend, sample, knobs):
        import torch

        torch.manual_seed(stable_seed(sample.split, sample.sample_id, knobs.as_dict()))

    def cost(self, knobs, prompt, new, acceptance):
        return {**super().cost(knobs, prompt, new, acceptance), "temperature": float(knobs.temperature)}

    def label(self, knobs):
        return f"sampling T={knobs.temperature:g}"


class Speculative(DecodingStrategy):
    """``assistant_model=draft``, the draft decoding greedily with a fixed lookahead (schedule
    ``constant``, no confidence cut-off); the target verifies greedily, so the output is the
    target's greedy output. The outcome carries the acceptance rate and the accepted draft tokens per
    target pass, counted with forward hooks (target passes ``R``, draft passes ``D``, new tokens
    ``N``: every target pass adds one token of its own, so ``accepted = N - R``, ``acceptance =
    accepted / D``)."""

    name, knob, offered, uses_draft = "speculative", "num_assistant_tokens", "lookaheads", True

    def invalid(self, value, space):
        if int(value) < 1:
            return (f"num_assistant_tokens={value!r} is invalid for speculative decoding; accepted: an "
                    f"integer >= 1")
        return None

    def generate_kwargs(self, knobs, draft_model):
        return dict(do_sample=False, num_beams=1, assistant_model=draft_model)

    def prepare(self, backend, sample, knobs):
        config = backend.draft_model.generation_config
        config.num_assistant_tokens = int(knobs.num_assistant_tokens)
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        config.do_sample = False

    def outcome_extras(self, out, generated, passes, knobs):
        accepted = max(0, len(generated) - passes["target"])
        return {"accepted_tokens": accepted,
                "acceptance_rate": accepted / passes["draft"] if passes["draft"] else 0.0,
                "accepted_per_pass": accepted / max(1, passes["target"])}

    def cost(self, knobs, prompt, new, acceptance):
        look = int(knobs.num_assistant_tokens)
        target_passes = new / (1.0 + acceptance)
        return {**super().cost(knobs, prompt, new, acceptance), "lookahead": look, "target_passes": target_passes,
                "draft_passes": target_passes * look, "speculative_rounds": target_passes}

    def label(self, knobs):
        return f"speculative k={knobs.num_assistant_tokens}"


#: every strategy by name, in the fixed order (see the module docstring)
DECODING_STRATEGIES: dict[str, DecodingStrategy] = {s.name: s for s in (Greedy(), Beam(), Sampling(), Speculative())}


def strategy(name: str) -> DecodingStrategy:
    """The strategy named ``name`` (a ``KeyError`` for an unknown one: callers validate names first)."""
    return DECODING_STRATEGIES[name]


def stable_seed(*parts: Any) -> int:
    """A seed that depends only on ``parts`` (their JSON form), the same in every process."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts, default=str).encode()).digest()[:8], "little") >> 1


def beam_sources(out, generated_len: int, num_beams: int) -> tuple[int, ...]:
    """Source beam of each generated token of the returned sequence, from the search's ``beam_indices``.

    Raises ``RuntimeError`` when the library did not return a usable trace (missing, shorter than
    the sequence, or out of range): a trace reconstructed from ``scores`` would only be a guess.
    """
    indices = getattr(out, "beam_indices", None)
    if indices is None:
        raise RuntimeError("generate returned no beam_indices for a beam search; this transformers version "
                           "cannot trace source beams (accepted: transformers >= 4.50 beam search)")
    row = [int(i) for i in indices[0].tolist() if int(i) >= 0]
    if len(row) != generated_len or any(not 0 <= i < num_beams for i in row):
        raise RuntimeError(f"generate returned a beam_indices trace of {len(row)} steps for {generated_len} generated "
                           f"tokens (or beams outside 0..{num_beams - 1}); refusing to guess the trace from scores")
    return tuple(row)
