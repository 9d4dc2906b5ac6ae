"""Write tiny-task samples as a user's dataset would be kept: PNG images and one ``data.jsonl``.

    python -m backends.tiny.export_dataset OUT_DIR [--n 40] [--split test] [--seed 0]

Each line is ``{"image": "images/0000.png", "question": ..., "answer": ..., "type": ..., "id": ...}``
with the image path relative to the file, so
``python train.py backend=hf backend.model=backends/tiny/checkpoint backend.dataset=OUT_DIR/data.jsonl``
runs the shipped tiny model through the generic ``backend=hf`` path (a seeded 80/10/10 split of
the file). Samples come from the generator's held-out ``test`` split by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backends.script_args import OneLineArgumentParser, at_least
from backends.checks import check_int
from backends.base import check_split
from backends.tiny import data


def export_dataset(out_dir: str | Path, n: int = 40, split: str = "test", seed: int = data.DEFAULT_SEED) -> Path:
    """Write ``n`` samples of ``split`` under ``out_dir`` (``images/`` and ``data.jsonl``); returns the file."""
    from PIL import Image

    check_split(split)
    check_int("n", n, 1)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in data.generate_split(split, n, seed):
        rel = f"images/{sample.sample_id:04d}.png"
        Image.fromarray(sample.image).save(out / rel)
        lines.append(json.dumps({"image": rel, "question": sample.question, "answer": sample.reference,
                                 "type": data.QUESTION_TYPES[sample.question_type], "id": f"{split}-{sample.sample_id}"}))
    target = out / "data.jsonl"
    target.write_text("\n".join(lines) + "\n")
    return target


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=at_least(1), default=40, help="samples to write (default 40)")
    parser.add_argument("--split", default="test", help="generator split to draw from (default test)")
    parser.add_argument("--seed", type=at_least(0), default=data.DEFAULT_SEED)
    args = parser.parse_args(argv)
    try:
        path = export_dataset(args.out_dir, args.n, args.split, args.seed)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)


if __name__ == "__main__":
    main()
