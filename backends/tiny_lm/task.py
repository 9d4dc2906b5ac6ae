"""The procedural question-answering task of the tiny decoding pair, and its character tokenizer.

Four question types whose answers are several tokens long (one token per character), so the
decoding strategy changes both how long an answer takes and whether it comes out right:

======= ===================== ==========
type    question              answer
======= ===================== ==========
copy    ``copy kqzbtw``       ``kqzbtw``
reverse ``reverse kqzb``      ``bzqk``
add     ``add 47 85``         ``132``
sort    ``sort 5291``         ``1259``
======= ===================== ==========

Two prompt formats: plain (``q: add 47 85\\na:``) and the chat template of the target model
(``<|user|>add 47 85<|assistant|>``). Both end where the answer starts; an answer
ends with ``<eos>``. Samples are a pure function of (split, index): splits use disjoint seeds.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

QUESTION_TYPES = ("copy", "reverse", "add", "sort")
EOS_TOKEN, PAD_TOKEN = "<eos>", "<pad>"
USER_TOKEN, ASSISTANT_TOKEN = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
CHARACTERS = tuple(string.digits + string.ascii_lowercase + " :\n")
PLAIN_PREFIX, PLAIN_SUFFIX = "q: ", "\na:"
#: the target's chat template (Jinja, as ``tokenizer.chat_template``): one user turn, then the answer
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}" + USER_TOKEN
                 + "{{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 + ASSISTANT_TOKEN + "{% endif %}")
MAX_ANSWER_CHARS = 8
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
SPLIT_SIZES = {"train": 2048, "validation": 256, "test": 256}


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    question_type: int


def make_item(rng: np.random.Generator) -> QAItem:
    """One random question of a random type."""
    qtype = int(rng.integers(len(QUESTION_TYPES)))
    name = QUESTION_TYPES[qtype]
    letters = list(string.ascii_lowercase)
    if name == "copy":
        word = "".join(rng.choice(letters, size=int(rng.integers(4, MAX_ANSWER_CHARS + 1))))
        return QAItem(f"copy {word}", word, qtype)
    if name == "reverse":
        word = "".join(rng.choice(letters, size=int(rng.integers(3, 7))))
        return QAItem(f"reverse {word}", word[::-1], qtype)
    if name == "add":
        a, b = int(rng.integers(10, 100)), int(rng.integers(1, 100))
        return QAItem(f"add {a} {b}", str(a + b), qtype)
    digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 7))))
    return QAItem(f"sort {digits}", "".join(sorted(digits)), qtype)


def split_items(split: str) -> list[QAItem]:
    """The fixed items of ``split`` (``train`` / ``validation`` / ``test``)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split={split!r} is invalid; accepted: {', '.join(SPLIT_SEEDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], 7919])
    return [make_item(rng) for _ in range(SPLIT_SIZES[split])]


def plain_prompt(question: str) -> str:
    return f"{PLAIN_PREFIX}{question}{PLAIN_SUFFIX}"


def chat_prompt(question: str) -> str:
    """What the target's chat template renders for one user turn (used to build training text)."""
    return f"{USER_TOKEN}{question}{ASSISTANT_TOKEN}"


def build_tokenizer(chat_template: str | None):
    """The shared character-level tokenizer (special tokens first, then one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        unk_token=PAD_TOKEN, bos_token=EOS_TOKEN)
    tokenizer.chat_template = chat_template
    return tokenizer


def normalise_answer(text: str) -> str:
    """What exact match compares: the text with surrounding white space removed."""
    return text.strip()
