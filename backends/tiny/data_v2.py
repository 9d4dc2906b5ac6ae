"""Procedural VQA, version 2: question types that need different knobs.

Same conventions as :mod:`backends.tiny.data` (48 px images, sample = pure function of
``(split, index, seed)``, exact match after VQA normalisation), but each question type belongs to
one of three scene families chosen so that the knobs a question needs differ, and the question
(hence the type, which the controller observes) says which family it is:

- **big** (``big_color``, ``big_shape``): one large object (18-24 px) among small distractors. At
  the low tier (the tower sees the image at 16 px: 2x2 patches) the large object still covers
  several pixels of one colour and a recognisable outline: answerable cheaply.
- **small** (``count_color``, ``small_shape``): 2-6 small objects (3-6 px), one per cell of a 6x6
  grid aligned with the high tier's 8 px patches. At 16 px an object is 1-2 px and sizes vary, so
  neither shape nor count survives; these need the high tier.
- **quad** (``relation``, ``value``, ``value_sum``, ``relation_value``): 2-4 medium objects
  (11-15 px), one per quadrant, so each low-tier token sees one object. Questions compose several
  steps: find an anchor, move to a neighbouring quadrant, read a colour; or look up each object's
  value in a fixed (colour, shape) -> 0..5 table (``VALUES``) and add two of them; or both (find
  the anchor, move, look the neighbour's value up). Cheap in vision tokens, they are meant to need
  the depth and the experts.

Every answer is one token, so generation is one prefill and one decode step (the ``<eos>``).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from backends.base import Sample, check_split
from backends.scoring import normalize_answer, score_answer  # one definition, re-exported here
from backends.tiny import data as v1
from backends.tiny.data import COLORS, IMAGE_SIZE, SHAPES, SPLIT_CODES, object_mask, render

TASK = "v2"
QUESTION_TYPES = ("big_color", "big_shape", "count_color", "small_shape", "relation", "value", "value_sum",
                  "relation_value")
"""Question types, indexed by ``Sample.question_type`` (all answers are one token)."""
FIRST_STAGE_TYPES = 7
"""The reference model's first training stage drew its questions from the first 7 types only
(``relation_value`` came with the second; see ``backends/tiny/MODEL_CARD_v2.md``)."""
FAMILY = {"big_color": "big", "big_shape": "big", "count_color": "small", "small_shape": "small",
          "relation": "quad", "value": "quad", "value_sum": "quad", "relation_value": "quad"}
DEFAULT_SEED = 0
SMALL_GRID = 6  # 8 px cells = the high tier's patches
SMALL_CELL = IMAGE_SIZE // SMALL_GRID
QUAD = IMAGE_SIZE // 2
MAX_COUNT = 6

# A fixed, arbitrary (colour, shape) -> 0..5 table: the "knowledge" the quad questions look up.
# Each value appears twice and a colour's three shapes have three different values, so neither
# the colour nor the shape alone gives the answer.
_PERMUTATION = (3, 0, 5, 1, 4, 2)
VALUES = {(c, s): _PERMUTATION[(i + 2 * j) % 6] for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES)}
MAX_VALUE_SUM = 2 * max(_PERMUTATION)

DIRECTIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def _obj(rng, size: int, cx: float, cy: float, **extra) -> dict:
    return {"shape": SHAPES[rng.integers(len(SHAPES))], "color": COLORS[rng.integers(len(COLORS))],
            "size": int(size), "cx": float(cx), "cy": float(cy), **extra}


def _small_scene(rng, n: int, lo: int, hi: int, avoid: tuple | None = None, colors=None) -> list[dict]:
    """``n`` small objects (``lo``-``hi`` px) in distinct cells of the 6x6 grid (cells overlapping
    ``avoid`` = (x0, y0, x1, y1) skipped), coloured ``colors[i]`` when given."""
    cells = [c for c in range(SMALL_GRID * SMALL_GRID)
             if avoid is None or not _cell_overlaps(c, avoid)]
    chosen = rng.choice(len(cells), size=min(n, len(cells)), replace=False)
    objects = []
    for k in chosen:
        row, col = divmod(int(cells[k]), SMALL_GRID)
        size = int(rng.integers(lo, hi + 1))
        slack = max(0.0, (SMALL_CELL - size) / 2.0 - 0.5)
        obj = _obj(rng, size, col * SMALL_CELL + SMALL_CELL / 2 + rng.uniform(-slack, slack),
                   row * SMALL_CELL + SMALL_CELL / 2 + rng.uniform(-slack, slack), kind="small")
        if colors is not None:
            obj["color"] = colors[len(objects)]
        objects.append(obj)
    return objects


def _cell_overlaps(cell: int, box: tuple) -> bool:
    row, col = divmod(cell, SMALL_GRID)
    x0, y0 = col * SMALL_CELL, row * SMALL_CELL
    return not (x0 + SMALL_CELL <= box[0] or x0 >= box[2] or y0 + SMALL_CELL <= box[1] or y0 >= box[3])


def _big_scene(rng) -> list[dict]:
    size = int(rng.integers(18, 25))
    r = size / 2
    cx, cy = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2)
    big = _obj(rng, size, cx, cy, kind="big")
    small = _small_scene(rng, int(rng.integers(1, 4)), 3, 5, avoid=(cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1))
    return [big] + small


def _quad_scene(rng, n: int) -> list[dict]:
    quads = rng.choice(4, size=n, replace=False)
    objects = []
    for q in quads:
        row, col = divmod(int(q), 2)
        size = int(rng.integers(11, 16))
        slack = (QUAD - size) / 2.0 - 1
        objects.append(_obj(rng, size, col * QUAD + QUAD / 2 + rng.uniform(-slack, slack),
                            row * QUAD + QUAD / 2 + rng.uniform(-slack, slack), kind="quad", quad=(row, col)))
    return objects


# --------------------------------------------------------------------------------------------
# Questions: each builder draws a scene and returns (objects, question, answer) or None to retry
# --------------------------------------------------------------------------------------------
def _q_big_color(rng):
    objs = _big_scene(rng)
    return objs, "what color is the big object?", objs[0]["color"]


def _q_big_shape(rng):
    objs = _big_scene(rng)
    return objs, "what shape is the big object?", objs[0]["shape"]


def _q_count_color(rng):
    # the answer first (uniform 0..4), then 1..(6 - answer) objects of other colours: 3-5 px
    # objects that blur into faint specks of varying size at the low tier
    colour = COLORS[rng.integers(len(COLORS))]
    count = int(rng.integers(0, 5))
    others = [c for c in COLORS if c != colour]
    colors = [colour] * count + [others[rng.integers(len(others))] for _ in range(int(rng.integers(1, MAX_COUNT - count + 1)))]
    objs = _small_scene(rng, len(colors), 3, 5, colors=colors)
    return objs, f"how many {colour} objects are there?", str(count)


def _q_small_shape(rng):
    objs = _small_scene(rng, int(rng.integers(2, 6)), 4, 6)
    counts = Counter(o["color"] for o in objs)
    unique = [c for c in COLORS if counts[c] == 1]
    if not unique:
        return None
    colour = unique[rng.integers(len(unique))]
    return objs, f"what shape is the {colour} object?", next(o for o in objs if o["color"] == colour)["shape"]


def _neighbours(objs) -> list[tuple[str, str, dict]]:
    """``(anchor shape, direction, neighbour)`` for every anchor whose shape is unique in the scene."""
    counts = Counter(o["shape"] for o in objs)
    by_quad = {o["quad"]: o for o in objs}
    options = []
    for o in objs:
        if counts[o["shape"]] != 1:
            continue
        for name, (dr, dc) in DIRECTIONS.items():
            target = by_quad.get((o["quad"][0] + dr, o["quad"][1] + dc))
            if target is not None:
                options.append((o["shape"], name, target))
    return options


def _anchor_and_neighbour(rng):
    """A quadrant scene, an anchor of unique shape and one of its neighbours: ``(objects, anchor shape,
    direction, neighbour)``, or ``None`` when the scene has no such pair (the caller retries)."""
    objs = _quad_scene(rng, int(rng.integers(2, 5)))
    options = _neighbours(objs)
    if not options:
        return None
    return (objs, *options[rng.integers(len(options))])


def _q_relation(rng):
    picked = _anchor_and_neighbour(rng)
    if picked is None:
        return None
    objs, shape, direction, target = picked
    return objs, f"what color is the object {direction} the {shape}?", target["color"]


def _q_relation_value(rng):
    # three steps: the anchor (unique shape), its neighbour, the neighbour's (colour, shape) value
    picked = _anchor_and_neighbour(rng)
    if picked is None:
        return None
    objs, shape, direction, target = picked
    value = VALUES[(target["color"], target["shape"])]
    return objs, f"what is the value of the object {direction} the {shape}?", str(value)


def _q_value(rng):
    objs = _quad_scene(rng, int(rng.integers(2, 5)))
    counts = Counter(o["color"] for o in objs)
    unique = [o for o in objs if counts[o["color"]] == 1]
    if not unique:
        return None
    o = unique[rng.integers(len(unique))]
    return objs, f"what is the value of the {o['color']} object?", str(VALUES[(o["color"], o["shape"])])


def _q_value_sum(rng):
    objs = _quad_scene(rng, 2)
    return objs, "what is the total value?", str(sum(VALUES[(o["color"], o["shape"])] for o in objs))


_BUILDERS = {"big_color": _q_big_color, "big_shape": _q_big_shape, "count_color": _q_count_color,
             "small_shape": _q_small_shape, "relation": _q_relation, "value": _q_value, "value_sum": _q_value_sum,
             "relation_value": _q_relation_value}


def make_sample(split: str, index: int, seed: int = DEFAULT_SEED, n_types: int = len(QUESTION_TYPES)) -> Sample:
    """The sample at ``index`` of ``split`` (pure function of ``(split, index, seed, n_types)``), its
    question type drawn among the first ``n_types`` of :data:`QUESTION_TYPES`."""
    check_split(split)
    if index < 0:
        raise ValueError(f"sample index {index!r} is invalid; accepted: an integer >= 0")
    # a stream of its own (the 100 tags v2), disjoint from v1's samples of the same index
    rng = np.random.default_rng([100 + SPLIT_CODES[split], int(index), int(seed)])
    qtype_id = int(rng.integers(n_types))
    qtype = QUESTION_TYPES[qtype_id]
    while True:  # rejection sampling until the scene supports the question (a few tries at most)
        built = _BUILDERS[qtype](rng)
        if built is not None:
            break
    objects, question, answer = built
    image = render(objects, rng)
    return Sample(sample_id=int(index), split=split, question=question, reference=answer, image=image,
                  question_type=qtype_id, meta={"objects": objects, "seed": int(seed), "task": TASK})


def generate_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED, start: int = 0) -> list[Sample]:
    """Samples ``start .. start+n-1`` of a split (``n`` defaults to the split's size)."""
    return v1.generate_split(split, n, seed, start, make=make_sample)


def per_type_accuracy(samples: Sequence[Sample], scores: Sequence[float]) -> dict:
    """Mean score per v2 question type name (types absent from ``samples`` are left out)."""
    return v1.per_type_accuracy(samples, scores, QUESTION_TYPES)


def question_only_baseline(train: Sequence[Sample], test: Sequence[Sample]) -> dict:
    """The most frequent train answer per question text (see :func:`backends.tiny.data.question_only_baseline`)."""
    return v1.question_only_baseline(train, test, QUESTION_TYPES)


def vocabulary() -> list[str]:
    """Every word the generator can put in a question or an answer (for the word-level tokenizer)."""
    words = {"what", "color", "is", "the", "big", "object", "shape", "how", "many", "objects", "are", "there",
             "value", "of", "total", "left", "right", "above", "below", "answer", "?", ":"}
    words.update(str(i) for i in range(max(MAX_COUNT, MAX_VALUE_SUM) + 1))
    words.update(COLORS + SHAPES)
    return sorted(words)


__all__ = ["TASK", "QUESTION_TYPES", "FAMILY", "VALUES", "IMAGE_SIZE", "make_sample", "generate_split",
           "normalize_answer", "score_answer", "question_only_baseline", "per_type_accuracy", "vocabulary",
           "object_mask"]
