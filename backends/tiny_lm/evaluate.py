"""Accuracy per decoding strategy of the shipped tiny pair, written into each model's card (README.md).

    python -m backends.tiny_lm.evaluate [--samples 128]

The target is scored under every configuration of its decoding space (with the draft for
speculative decoding); the draft alone under greedy, beam and sampling (it has no chat template
and no draft of its own). Exact match on the first ``--samples`` questions of the test split.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from backends.script_args import OneLineArgumentParser, at_least
from backends.decoding.strategies import strategy
from backends.io import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parent


def label(k) -> str:
    """A configuration's short name in tables: its strategy's label, ``+chat`` with the chat template."""
    return f"{strategy(k.strategy).label(k)}{' +chat' if k.chat_template else ''}"


def uses_draft(k) -> bool:
    """Whether a configuration decodes with the draft (its rows report acceptance)."""
    return strategy(k.strategy).uses_draft


def accuracy_table(backend, n: int) -> list[dict]:
    """One row per configuration: accuracy, mean new tokens, and (speculative) mean acceptance."""
    samples = list(backend.samples("test")[:n])
    rows = []
    for k in backend.knob_space.configurations():
        outs = [backend.run(s, k) for s in samples]
        row = {"configuration": label(k), "accuracy": float(np.mean([o.score for o in outs])),
               "new_tokens": float(np.mean([o.new_tokens for o in outs]))}
        if uses_draft(k):
            row["acceptance_rate"] = float(np.mean([o.acceptance_rate for o in outs]))
            row["accepted_per_pass"] = float(np.mean([o.accepted_per_pass for o in outs]))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | accuracy | new tokens | acceptance | accepted / target pass |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else ""
        per = f"{r['accepted_per_pass']:.2f}" if "accepted_per_pass" in r else ""
        lines.append(f"| {r['configuration']} | {r['accuracy']:.3f} | {r['new_tokens']:.2f} | {acc} | {per} |")
    return "\n".join(lines)


CARD = """# tiny_lm {role}

{summary}

- Architecture: `LlamaForCausalLM`, {arch}; {params:,} parameters, fp16 safetensors.
- Tokenizer: one token per character (shared by target and draft); chat template: {template}.
- Task: the procedural QA of `backends/tiny_lm/task.py` (copy, reverse, add, sort; answers 2-8
  characters + `<eos>`), loss on answer tokens only. Trained by
  `nice -n 10 python -m backends.tiny_lm.train --model {role}` ({steps} steps of {batch} questions,
  seed {seed}; `training.json`).

## Accuracy per decoding strategy

Exact match on the first {n} test questions, measured {date} with `python -m backends.tiny_lm.evaluate`
(torch {torch}, CPU, fp32).

{table}
"""


def main(argv: list[str] | None = None) -> None:
    import torch

    from backends.decoding import load_decoding_backend

    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(1), default=128)
    args = parser.parse_args(argv)
    if args.samples < 1:
        raise ValueError(f"--samples={args.samples} is invalid; accepted: an integer >= 1")
    torch.set_num_threads(1)
    date = datetime.date.today().isoformat()
    summaries = {"target": "The target of the tiny decoding pair (with the chat template; 4 blocks).",
                 "draft": "The draft of the tiny decoding pair (no chat template; 1 block, a quarter of the "
                          "target's block compute per token)."}
    backends = {"target": load_decoding_backend(), "draft": load_decoding_backend(target=str(PACKAGE_DIR / "draft"),
                                                                                   draft=None)}
    for role, backend in backends.items():
        rows = accuracy_table(backend, args.samples)
        print(f"{role}\n{markdown(rows)}\n", flush=True)
        meta = json.loads((PACKAGE_DIR / role / "training.json").read_text())
        arch = meta["architecture"]
        card = CARD.format(role=role, summary=summaries[role], params=meta["parameters"], steps=meta["steps"],
                           batch=meta["batch_size"], seed=meta["seed"], n=args.samples, date=date,
                           torch=torch.__version__, table=markdown(rows),
                           arch=(f"{arch['num_hidden_layers']} blocks, width {arch['hidden_size']}, "
                                 f"{arch['num_attention_heads']} heads, MLP {arch['intermediate_size']}"),
                           template="yes (`<|user|>question<|assistant|>`)" if role == "target" else "none")
        atomic_write_text(PACKAGE_DIR / role / "README.md", card)


if __name__ == "__main__":
    main()
