"""The one definition of answer scoring: VQA normalisation, exact match, VQAv2 soft accuracy.

* :func:`normalize_answer`: lowercase, common contractions restored (``whats`` -> ``what's``),
  punctuation removed (a full stop between digits is kept: ``1.5``), number words as digits,
  articles dropped, whitespace collapsed: the normalisation of the official VQA evaluation,
  simplified to word level.
* :func:`exact_match`: one reference, 1.0 or 0.0 after normalisation.
* :func:`vqa_soft_accuracy`: several references (VQAv2 keeps ten human answers per question):
  ``min(#references equal to the answer / 3, 1)``, so an answer three annotators gave is fully
  right and one a single annotator gave is a third right.
* :func:`score_answer`: exact match for one reference, soft accuracy for several.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                 "doesnt": "doesn't", "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
                 "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
                 "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's",
                 "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're"}
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCT = re.compile(f"[{re.escape(string.punctuation.replace(chr(39), ''))}]")
_DECIMAL_MARK = "\x00"


def normalize_answer(text: str) -> str:
    """VQA-style normalisation of an answer (see the module docstring)."""
    text = str(text).lower().replace("\n", " ").replace("\t", " ")
    text = _DECIMAL_POINT.sub(_DECIMAL_MARK, text)
    text = _PUNCT.sub(" ", text).replace(_DECIMAL_MARK, ".")
    words = []
    for word in text.split():
        word = _CONTRACTIONS.get(word.replace("'", ""), word).strip("'")
        if word and word not in _ARTICLES:
            words.append(_NUMBER_WORDS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when ``prediction`` equals ``reference`` after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def vqa_soft_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy: ``min(matches / 3, 1)`` over the human ``references`` (after normalisation)."""
    answer = normalize_answer(prediction)
    matches = sum(normalize_answer(r) == answer for r in references)
    return min(matches / 3.0, 1.0)


def score_answer(prediction: str, references: str | Sequence[str] | None) -> float:
    """Exact match for one reference, VQAv2 soft accuracy for several; 0.0 with none."""
    if references is None:
        return 0.0
    if isinstance(references, str):
        return exact_match(prediction, references)
    references = list(references)
    if len(references) == 1:
        return exact_match(prediction, references[0])
    return vqa_soft_accuracy(prediction, references) if references else 0.0
