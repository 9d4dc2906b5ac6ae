"""How much a tiny model's MoE blocks carry: accuracy with their MLP output zeroed.

    python bench/moe_ablation.py [--model DIR] [--samples 400] [--threads 1]

Runs the full configuration on the first ``--samples`` test samples of the checkpoint's task, then
again with a forward hook that replaces the output of the MoE MLP (``mlp``) of blocks 2-8, 2-4
and 5-8 with zeros (block 1 keeps its own top-k in every configuration, so it is left alone);
prints exact match overall and per question type. A large drop with the MLPs zeroed and a small
one at top-1 (``backends.tiny.evaluate``) means the blocks compute something that fits in one
expert.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backends.script_args import OneLineArgumentParser, at_least
from backends.tiny import CHECKPOINT_DIR  # noqa: E402
from backends.tiny.evaluate import load_checkpoint  # noqa: E402
from backends.tiny.tasks import task_of  # noqa: E402
from backends.tiny.train import evaluate_config  # noqa: E402


def zero_output(module, inputs, output):
    if isinstance(output, tuple):  # (hidden, router logits)
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def ablation_rows(model, tokenizer, space, samples, question_types) -> list[tuple[str, dict]]:
    """``[(label, evaluate_config result)]``: the full configuration, then MoE MLPs zeroed per block range."""
    layers = model.model.language_model.layers
    n = len(layers)
    ranges = [(1, n), (1, n // 2), (n // 2, n)]
    rows = [("full", evaluate_config(model, tokenizer, samples, space.full(), space, question_types))]
    for start, stop in ranges:
        hooks = [layers[i].mlp.register_forward_hook(zero_output) for i in range(start, stop)]
        try:
            rows.append((f"MoE MLPs of blocks {start + 1}-{stop} zeroed",
                         evaluate_config(model, tokenizer, samples, space.full(), space, question_types)))
        finally:
            for h in hooks:
                h.remove()
    return rows


def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(CHECKPOINT_DIR), help="a tiny checkpoint folder")
    p.add_argument("--samples", type=at_least(1), default=400, help="test samples (>= 1)")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads (>= 1)")
    args = p.parse_args(argv)
    for name in ("samples", "threads"):
        if getattr(args, name) < 1:
            p.exit(2, f"--{name}={getattr(args, name)} is invalid; accepted: an integer >= 1\n")
    torch.set_num_threads(args.threads)
    try:
        model, tokenizer, space = load_checkpoint(args.model)
    except (OSError, ValueError) as exc:
        p.exit(2, f"error: --model={args.model!r} is not a loadable tiny checkpoint ({str(exc).splitlines()[0]}); "
                  f"accepted: a folder written by backends.tiny.train or train_v2\n")
    task = task_of(getattr(model.config, "knobgym", None))
    samples = task.generate_split("test", args.samples, seed=0)
    for label, result in ablation_rows(model, tokenizer, space, samples, task.QUESTION_TYPES):
        per_type = ", ".join(f"{k} {100 * v:.0f}" for k, v in result["per_type"].items())
        print(f"{label:<32} {100 * result['overall']:5.1f}   ({per_type})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
