"""Procedural visual question answering: coloured shapes on a dark canvas.

Every sample is a pure function of ``(split, index, seed)``: its random stream is
``numpy.random.default_rng([split_code, index, seed])``, so splits are fixed, disjoint (different
streams) and reproducible without storing any data.

Scenes place 1-5 objects (circle / square / triangle in red / green / blue / yellow) in distinct
cells of a 4x4 layout grid, each with its own size (4-11 px) and jitter inside its cell. Objects
are small next to the 8x8 patch grid the vision tower sees: a 4-px object covers one patch at the
high tier but a sixteenth of a token at the low tier, so counting, small-object colour and
left/right questions need the higher tiers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from backends.checks import check_int
from backends.base import SPLITS, Sample, check_split
from backends.scoring import normalize_answer, score_answer  # one definition, re-exported here

IMAGE_SIZE = 48
GRID_CELLS = 4  # layout grid: objects never share a cell, so they never overlap
CELL = IMAGE_SIZE // GRID_CELLS
MIN_SIZE, MAX_SIZE = 4, 11  # object diameter / side in pixels
MAX_OBJECTS = 5

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
_RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}

QUESTION_TYPES = ("color", "shape", "count", "exists", "left_of", "largest", "list_shapes")
"""Question types, indexed by ``Sample.question_type``. ``largest`` and ``list_shapes`` have
multi-token answers ("red circle", "circle square triangle")."""

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
SPLIT_SIZES = {"train": 20000, "validation": 500, "test": 1000}
"""Default sizes when ``n`` is not given (the train stream can be indexed beyond its size)."""
DEFAULT_SEED = 0

_ANSWER_WORDS = tuple(str(i) for i in range(MAX_OBJECTS + 1)) + ("yes", "no") + COLORS + SHAPES


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------
_PIXEL_Y, _PIXEL_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres


def _mask(shape: str, cx: float, cy: float, size: int) -> np.ndarray:
    """Boolean HxW mask of one object centred at (cx, cy) with the given diameter / side."""
    ys, xs = _PIXEL_Y, _PIXEL_X
    r = size / 2.0
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    # triangle: apex at the top, base at the bottom
    rel = (ys - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
    return (rel >= 0) & (rel <= 1) & (np.abs(xs - cx) <= rel * r)


def _sample_scene(rng: np.random.Generator, n_objects: int, sizes: Sequence[int] | None = None) -> list[dict]:
    cells = rng.choice(GRID_CELLS * GRID_CELLS, size=n_objects, replace=False)
    objects = []
    for i, cell in enumerate(cells):
        size = int(sizes[i]) if sizes is not None else int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        slack = (CELL - size) / 2.0
        row, col = divmod(int(cell), GRID_CELLS)
        cx = col * CELL + CELL / 2 + rng.uniform(-slack, slack)
        cy = row * CELL + CELL / 2 + rng.uniform(-slack, slack)
        objects.append({"shape": SHAPES[rng.integers(len(SHAPES))], "color": COLORS[rng.integers(len(COLORS))],
                        "size": size, "cx": float(cx), "cy": float(cy), "col": col})
    return objects


def render(objects: Sequence[dict], rng: np.random.Generator) -> np.ndarray:
    """Draw objects on a dark, slightly noisy canvas; returns HxWx3 uint8."""
    img = rng.normal(25.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    for obj in objects:
        m = _mask(obj["shape"], obj["cx"], obj["cy"], obj["size"])
        colour = np.array(_RGB[obj["color"]], dtype=float) + rng.normal(0.0, 12.0, size=3)
        img[m] = colour + rng.normal(0.0, 6.0, size=(int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def object_mask(obj: dict) -> np.ndarray:
    """Boolean HxW mask of one scene object (a ``Sample.meta["objects"]`` entry)."""
    return _mask(obj["shape"], obj["cx"], obj["cy"], obj["size"])


def _area(obj: dict) -> int:
    return int(object_mask(obj).sum())


# --------------------------------------------------------------------------------------------
# Questions: each builder returns (question, answer) or None when the scene does not fit
# --------------------------------------------------------------------------------------------
def _unique_object(objs, rng, key: str, values) -> dict | None:
    """A random object among those whose ``key`` (shape or color) no other object shares, or None."""
    counts = Counter(o[key] for o in objs)
    unique = [v for v in values if counts[v] == 1]
    if not unique:
        return None
    value = unique[rng.integers(len(unique))]
    return next(o for o in objs if o[key] == value)


def _q_color(objs, rng):
    obj = _unique_object(objs, rng, "shape", SHAPES)
    return None if obj is None else (f"what color is the {obj['shape']}?", obj["color"])


def _q_shape(objs, rng):
    obj = _unique_object(objs, rng, "color", COLORS)
    return None if obj is None else (f"what shape is the {obj['color']} object?", obj["shape"])


def _q_count(objs, rng):
    if rng.random() < 0.5:
        shape = SHAPES[rng.integers(len(SHAPES))]
        return f"how many {shape}s are there?", str(sum(o["shape"] == shape for o in objs))
    colour = COLORS[rng.integers(len(COLORS))]
    return f"how many {colour} objects are there?", str(sum(o["color"] == colour for o in objs))


def _q_exists(objs, rng):
    present = sorted({(o["color"], o["shape"]) for o in objs})
    if rng.random() < 0.5:
        colour, shape = present[rng.integers(len(present))]
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[rng.integers(len(absent))]
    answer = "yes" if (colour, shape) in present else "no"
    return f"is there a {colour} {shape}?", answer


def _q_left_of(objs, rng):
    counts = Counter(o["shape"] for o in objs)
    unique = [o for o in objs if counts[o["shape"]] == 1]
    pairs = [(a, b) for a in unique for b in unique if a is not b and a["col"] != b["col"]]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    return f"is the {a['shape']} left of the {b['shape']}?", "yes" if a["cx"] < b["cx"] else "no"


def _q_largest(objs, rng):
    areas = sorted(((_area(o), i) for i, o in enumerate(objs)), reverse=True)
    if len(areas) > 1 and areas[0][0] < 1.5 * areas[1][0]:
        return None  # no clear winner
    obj = objs[areas[0][1]]
    return "what is the largest object?", f"{obj['color']} {obj['shape']}"


def _q_list_shapes(objs, rng):
    colours = sorted({o["color"] for o in objs})
    colour = colours[rng.integers(len(colours))]
    shapes = [s for s in SHAPES if any(o["shape"] == s and o["color"] == colour for o in objs)]
    return f"what shapes are {colour}?", " ".join(shapes)


_BUILDERS = {"color": _q_color, "shape": _q_shape, "count": _q_count, "exists": _q_exists,
             "left_of": _q_left_of, "largest": _q_largest, "list_shapes": _q_list_shapes}


def _scene_sizes(qtype: str, n_objects: int, rng: np.random.Generator) -> list[int] | None:
    """For ``largest``: one clearly larger object, the rest drawn from the small half of sizes."""
    if qtype != "largest":
        return None
    big = int(rng.integers(MAX_SIZE - 2, MAX_SIZE + 1))
    return [big] + [int(rng.integers(MIN_SIZE, big - 2)) for _ in range(n_objects - 1)]


def make_sample(split: str, index: int, seed: int = DEFAULT_SEED) -> Sample:
    """The sample at ``index`` of ``split`` (pure function of ``(split, index, seed)``)."""
    check_split(split)
    if index < 0:
        raise ValueError(f"sample index {index!r} is invalid; accepted: an integer >= 0")
    rng = np.random.default_rng([SPLIT_CODES[split], int(index), int(seed)])
    qtype_id = int(rng.integers(len(QUESTION_TYPES)))
    qtype = QUESTION_TYPES[qtype_id]
    while True:  # rejection sampling until the scene supports the question (a few tries at most)
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
        objects = _sample_scene(rng, n_objects, _scene_sizes(qtype, n_objects, rng))
        qa = _BUILDERS[qtype](objects, rng)
        if qa is not None:
            break
    image = render(objects, rng)
    return Sample(sample_id=int(index), split=split, question=qa[0], reference=qa[1], image=image,
                  question_type=qtype_id, meta={"objects": objects, "seed": int(seed)})


def generate_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED, start: int = 0,
                   make=None) -> list[Sample]:
    """Samples ``start .. start+n-1`` of a split (``n`` defaults to the split's size), made by
    ``make(split, index, seed)`` (default: this task's :func:`make_sample`)."""
    check_split(split)
    n = SPLIT_SIZES[split] if n is None else n
    check_int("n", n, 0)
    return [(make or make_sample)(split, start + i, seed) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def question_only_baseline(train: Sequence[Sample], test: Sequence[Sample],
                           question_types: Sequence[str] = QUESTION_TYPES) -> dict:
    """The best a model can do without the image: the most frequent train answer per question text.

    Unseen question texts fall back to the most frequent answer of their question type. Returns
    ``{"overall": acc, "per_type": {type: acc}, "n": len(test)}``.
    """
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[int, Counter] = defaultdict(Counter)
    for s in train:
        ref = normalize_answer(s.reference)
        by_question[s.question][ref] += 1
        by_type[s.question_type][ref] += 1
    scores = []
    for s in test:
        counts = by_question.get(s.question) or by_type.get(s.question_type) or Counter({"": 1})
        scores.append(score_answer(counts.most_common(1)[0][0], s.reference))
    return {"overall": float(np.mean(scores)) if scores else 0.0,
            "per_type": per_type_accuracy(test, scores, question_types), "n": len(test)}


def per_type_accuracy(samples: Sequence[Sample], scores: Sequence[float],
                      question_types: Sequence[str] = QUESTION_TYPES) -> dict:
    """Mean score per question type name (types absent from ``samples`` are left out)."""
    groups: dict[str, list] = defaultdict(list)
    for s, v in zip(samples, scores):
        groups[question_types[s.question_type]].append(v)
    return {t: float(np.mean(groups[t])) for t in question_types if groups[t]}


def vocabulary() -> list[str]:
    """Every word the generator can put in a question or an answer (for the word-level tokenizer)."""
    words = {"what", "color", "is", "the", "shape", "object", "how", "many", "are", "there", "left", "of",
             "largest", "shapes", "objects", "answer", "?", ":", "a"}
    words.update(_ANSWER_WORDS)
    words.update(f"{s}s" for s in SHAPES)
    return sorted(words)


__all__ = ["QUESTION_TYPES", "SPLITS", "IMAGE_SIZE", "SHAPES", "COLORS", "make_sample", "generate_split",
           "normalize_answer", "score_answer", "question_only_baseline", "per_type_accuracy", "vocabulary"]
