"""The tiny reference vision-language MoE model the project trains and ships (the default backend).

- :mod:`backends.tiny.data`: the procedural VQA task (splits, scoring, question-only baseline).
- :mod:`backends.tiny.model`: tokenizer / image processor / model builders and the input format.
- :mod:`backends.tiny.train`: adaptive training (``python -m backends.tiny.train``).
- :mod:`backends.tiny.evaluate`: the accuracy table (``python -m backends.tiny.evaluate``).
- ``CHECKPOINT_DIR``: the committed, trained checkpoint (loads with ``from_pretrained``, offline).
"""

from pathlib import Path

from backends.tiny.data import (QUESTION_TYPES, generate_split, make_sample, normalize_answer,
                                question_only_baseline, score_answer)

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

__all__ = ["CHECKPOINT_DIR", "QUESTION_TYPES", "generate_split", "make_sample", "normalize_answer",
           "score_answer", "question_only_baseline"]
