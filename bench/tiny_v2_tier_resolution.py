"""What each vision tier of the tiny v2 model can resolve: a hand-written reader per tier.

    python bench/tiny_v2_tier_resolution.py [--samples 700]

An analytic check of the v2 task's tier dependence, independent of any trained model: each test
image is resized to a tier's size exactly as ``tier_mode=resize`` does before the vision tower
(``backends.knobs.resize_for_tier``: antialiased bilinear, 12 / 24 / 48 px), then a simple reader
answers from the pixels alone: every pixel is labelled background or the nearest of the four
colours (by RGB distance, after the resize blended it with the background), 4-connected blobs of
one colour are objects, a blob's shape comes from how much of its bounding box it fills (square
~1, circle ~0.79, triangle ~0.5), the big object is the largest blob and the quadrant objects are
the largest blob of each quadrant; the question's logic (counting, neighbour, value table) is then
applied exactly. Prints the reader's exact match per question type and tier: where it collapses
at a tier, that tier has lost the information (the model, which learns its own reader, may do
better or worse than this one, but not better than the pixels allow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from backends.script_args import OneLineArgumentParser, at_least
from backends.knobs import resize_for_tier  # noqa: E402
from backends.tiny import data_v2  # noqa: E402
from backends.tiny.data import _RGB, COLORS  # noqa: E402
from backends.tiny.train_v2 import V2_SHAPE  # noqa: E402

BACKGROUND = np.array([25.0, 25.0, 25.0])
PALETTE = np.stack([BACKGROUND] + [np.array(_RGB[c], dtype=float) for c in COLORS])


def resized(image: np.ndarray, side: int) -> np.ndarray:
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    return resize_for_tier(x, side, V2_SHAPE.patch_size)[0].permute(1, 2, 0).numpy()


def blobs(image: np.ndarray) -> list[dict]:
    """Colour blobs of a (resized) image: colour, pixel count, fill of the bounding box, centre."""
    labels = np.argmin(((image[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1), axis=-1)
    side = image.shape[0]
    out = []
    for k, colour in enumerate(COLORS, start=1):
        comp, n = ndimage.label(labels == k)
        for i in range(1, n + 1):
            ys, xs = np.nonzero(comp == i)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            out.append({"color": colour, "area": len(ys) / side ** 2, "fill": len(ys) / box,
                        "cx": (xs.mean() + 0.5) / side, "cy": (ys.mean() + 0.5) / side, "pixels": len(ys)})
    return out


def shape_of(blob: dict) -> str:
    if blob["fill"] > 0.9:
        return "square"
    return "circle" if blob["fill"] > 0.64 else "triangle"


def answer(sample, image: np.ndarray) -> str:
    qtype = data_v2.QUESTION_TYPES[sample.question_type]
    found = blobs(image)
    words = sample.question.rstrip("?").split()
    if qtype in ("big_color", "big_shape"):
        if not found:
            return ""
        big = max(found, key=lambda b: b["area"])
        return big["color"] if qtype == "big_color" else shape_of(big)
    if qtype == "count_color":
        return str(sum(b["color"] == words[2] for b in found))
    if qtype == "small_shape":
        same = [b for b in found if b["color"] == words[4]]
        return shape_of(max(same, key=lambda b: b["area"])) if same else ""
    quads = {}
    for b in found:
        q = (int(b["cy"] >= 0.5), int(b["cx"] >= 0.5))
        if q not in quads or b["area"] > quads[q]["area"]:
            quads[q] = b
    if qtype == "relation":
        direction = " ".join(words[5:-2]) if words[5] in ("left", "right") else words[5]
        anchor_shape = words[-1]
        anchors = [q for q, b in quads.items() if shape_of(b) == anchor_shape]
        if not anchors:
            return ""
        dr, dc = data_v2.DIRECTIONS[direction]
        target = quads.get((anchors[0][0] + dr, anchors[0][1] + dc))
        return target["color"] if target else ""
    value = lambda b: data_v2.VALUES[(b["color"], shape_of(b))]  # noqa: E731
    if qtype == "value":
        same = [b for b in quads.values() if b["color"] == words[6]]
        return str(value(same[0])) if same else ""
    return str(sum(value(b) for b in quads.values()))  # value_sum


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=at_least(1), default=700)
    args = p.parse_args(argv)
    if args.samples < 1:
        p.exit(2, f"--samples={args.samples} is invalid; accepted: an integer >= 1\n")
    samples = data_v2.generate_split("test", args.samples)
    sizes = {name: int(np.sqrt(n)) * V2_SHAPE.patch_size for name, n in V2_SHAPE.tiers}
    hits = {t: {name: [] for name in sizes} for t in data_v2.QUESTION_TYPES}
    for s in samples:
        for name, side in sizes.items():
            hits[data_v2.QUESTION_TYPES[s.question_type]][name].append(
                data_v2.score_answer(answer(s, resized(s.image, side)), s.reference))
    print(f"{len(samples)} test samples; reader exact match (%) per tier (image side the tower sees)")
    print("| question type | n | " + " | ".join(f"{n} ({s} px)" for n, s in sizes.items()) + " |")
    print("|---" * (len(sizes) + 2) + "|")
    for t, row in hits.items():
        print(f"| {t} | {len(row['high'])} | " + " | ".join(f"{100 * np.mean(v):.1f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
