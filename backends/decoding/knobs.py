"""Decoding knobs: one configuration (:class:`DecodingKnobs`) and the space a backend offers (:class:`DecodingSpace`).

The space is derived from the loaded models, so an env only offers what applies: speculative
decoding only with a draft model, the chat-template switch only when the target's tokenizer has a
template (``tokenizer.chat_template is not None``; every fast tokenizer has an
``apply_chat_template`` method, so its presence says nothing), beam widths only up to the
backend's limit. Every bad knob is one :class:`DecodingKnobError` naming the value and what is
accepted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from backends.decoding.strategies import DECODING_STRATEGIES, NEUTRAL_KNOBS, strategy

STRATEGIES = tuple(DECODING_STRATEGIES)


class DecodingKnobError(ValueError):
    """A decoding configuration the backend cannot run (one line: the value and what is accepted)."""


@dataclass(frozen=True)
class DecodingKnobs:
    """How one answer is decoded.

    Args:
        strategy: ``greedy``, ``beam``, ``sampling`` or ``speculative`` (greedy target verified
            against greedy draft proposals: the output equals the target's greedy output).
        num_beams: beam width (``beam`` only).
        temperature: sampling temperature (``sampling`` only; ``top_k`` / ``top_p`` are off).
        num_assistant_tokens: draft lookahead per target pass (``speculative`` only), fixed
            (schedule ``constant``, no confidence cut-off).
        chat_template: render the prompt with the target's chat template instead of plain text.
    """

    strategy: str = "greedy"
    num_beams: int = 1
    temperature: float = 0.0
    num_assistant_tokens: int = 0
    chat_template: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodingSpace:
    """The decoding configurations one backend (target, optional draft) can run.

    Attributes:
        strategies: offered strategies (``speculative`` only with a draft).
        beams: offered beam widths; ``max_beams`` is the backend's limit.
        temperatures: offered sampling temperatures.
        lookaheads: offered draft lookaheads (``num_assistant_tokens``).
        chat_options: ``(False, True)`` when the target has a chat template, else ``(False,)``.
        model: the target's name, for error messages.
    """

    strategies: tuple[str, ...]
    beams: tuple[int, ...]
    temperatures: tuple[float, ...]
    lookaheads: tuple[int, ...]
    chat_options: tuple[bool, ...]
    max_beams: int
    model: str = "model"

    def __post_init__(self) -> None:
        for s in self.strategies:
            if s not in STRATEGIES:
                raise DecodingKnobError(f"strategy {s!r} is invalid; accepted: {', '.join(STRATEGIES)}")
        if not self.beams or any(int(b) < 2 for b in self.beams):
            raise DecodingKnobError(f"beams={self.beams!r} is invalid; accepted: a non-empty list of widths >= 2")
        if max(self.beams) > self.max_beams:
            raise DecodingKnobError(f"num_beams={max(self.beams)} is above the model's limit max_beams="
                                    f"{self.max_beams}; accepted: beam widths 2..{self.max_beams}")
        if not self.temperatures or any(not (math.isfinite(t) and t > 0) for t in self.temperatures):
            raise DecodingKnobError(f"temperatures={self.temperatures!r} is invalid; accepted: finite values > 0")
        if not self.lookaheads or any(int(k) < 1 for k in self.lookaheads):
            raise DecodingKnobError(f"lookaheads={self.lookaheads!r} is invalid; accepted: integers >= 1")

    def as_dict(self) -> dict:
        """The offered values of each knob (JSON-able, for run records)."""
        return {"strategies": list(self.strategies), "beams": list(self.beams),
                "temperatures": list(self.temperatures), "lookaheads": list(self.lookaheads),
                "chat_options": list(self.chat_options), "max_beams": int(self.max_beams), "model": self.model}

    @property
    def has_chat_template(self) -> bool:
        return True in self.chat_options

    @property
    def fields(self) -> tuple[tuple[str, tuple], ...]:
        """``(name, values)`` of each action field, in action order (chat only where offered)."""
        out = [("strategy", self.strategies)] + [(s.knob, getattr(self, s.offered))
                                                 for s in DECODING_STRATEGIES.values() if s.knob is not None]
        if self.has_chat_template:
            out.append(("chat_template", self.chat_options))
        return tuple(out)

    @property
    def nvec(self) -> list[int]:
        return [len(values) for _, values in self.fields]

    def from_indices(self, indices: Sequence[int]) -> DecodingKnobs:
        """The (resolved) configuration an action vector of field indices names."""
        chosen = {name: values[int(i)] for (name, values), i in zip(self.fields, indices)}
        return self.resolve(DecodingKnobs(**chosen))

    def validate(self, knobs: DecodingKnobs) -> None:
        """Raise :class:`DecodingKnobError` for a configuration this backend cannot run."""
        if knobs.strategy not in STRATEGIES:
            raise DecodingKnobError(f"strategy={knobs.strategy!r} is invalid; accepted: {', '.join(STRATEGIES)}")
        if knobs.strategy not in self.strategies:
            raise DecodingKnobError(f"strategy={knobs.strategy!r} needs a draft model and {self.model} was loaded "
                                    f"without one; accepted: {', '.join(self.strategies)}")
        decoding = strategy(knobs.strategy)
        problem = decoding.invalid(getattr(knobs, decoding.knob), self) if decoding.knob is not None else None
        if problem is not None:
            raise DecodingKnobError(problem)
        if knobs.chat_template and not self.has_chat_template:
            raise DecodingKnobError(f"chat_template=True is invalid: {self.model} has no chat template "
                                    f"(tokenizer.chat_template is None); accepted: chat_template=False")

    def resolve(self, knobs: DecodingKnobs) -> DecodingKnobs:
        """``knobs`` validated, with the fields its strategy ignores set to their neutral values.

        So two actions that decode identically are one configuration (one run, one latency row).
        """
        self.validate(knobs)
        decoding = strategy(knobs.strategy)
        own = {} if decoding.knob is None else {decoding.knob: decoding.cast(getattr(knobs, decoding.knob))}
        return DecodingKnobs(strategy=decoding.name, chat_template=bool(knobs.chat_template),
                             **{**NEUTRAL_KNOBS, **own})

    def configurations(self) -> list[DecodingKnobs]:
        """Every distinct resolved configuration, in a fixed order."""
        out = []
        for chat in self.chat_options:
            for s in map(strategy, self.strategies):
                if s.knob is None:
                    out.append(DecodingKnobs(s.name, chat_template=chat))
                else:
                    out += [DecodingKnobs(s.name, chat_template=chat, **{s.knob: v}) for v in getattr(self, s.offered)]
        return out

    def cheapest(self) -> DecodingKnobs:
        """Plain-prompt greedy decoding: one target pass per token, nothing extra."""
        return DecodingKnobs("greedy")

    def full(self) -> DecodingKnobs:
        """The widest beam: the most target compute per answer."""
        return DecodingKnobs("beam", num_beams=max(self.beams))
