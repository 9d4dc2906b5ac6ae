"""Train the tiny decoding pair: a target and a draft Llama sharing one character tokenizer.

    nice -n 10 python -m backends.tiny_lm.train --model target   # about 15 min on one shared CPU thread
    nice -n 10 python -m backends.tiny_lm.train --model draft    # about 6 min
    python -m backends.tiny_lm.evaluate                          # accuracy per strategy -> model cards

Both learn the procedural QA task of :mod:`backends.tiny_lm.task`. The target (4 blocks, width
128) sees half its questions through its chat template and half as plain text, and ships the
template in its tokenizer; the draft (1 block of the same width: a quarter of the target's
block compute per token) sees plain text only and ships no template. The loss covers answer tokens only.

Resumable: every ``--save-every`` steps the model, optimizer, schedule and step are written to
``--work-dir/<model>/`` (atomically, through :func:`backends.io.write_directory_atomically`,
tensors loaded back with ``weights_only=True``); a rerun continues from there. Batches are a
pure function of (seed, step), so a resumed run sees the same data as an uninterrupted one. The
final model is saved with ``save_pretrained`` (fp16 safetensors) to ``--out`` (default
``backends/tiny_lm/<model>/``), atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from backends.script_args import OneLineArgumentParser, at_least
from backends.io import write_directory_atomically
from backends.tiny_lm.task import (CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, build_tokenizer, chat_prompt, make_item,
                                   plain_prompt)

PACKAGE_DIR = Path(__file__).resolve().parent
#: architecture per role: (hidden, layers, heads, intermediate), and whether it has the chat template
ARCHITECTURES = {"target": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
                 "draft": dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=384)}
CHAT_SHARE = {"target": 0.5, "draft": 0.0}
DEFAULT_STEPS = {"target": 2000, "draft": 1500}
MAX_NEW_TOKENS = 10


def default_work_dir() -> Path:
    root = os.environ.get("KNOBGYM_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "knobgym") / "tiny_lm_train"


def build_model(role: str, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **ARCHITECTURES[role])
    return LlamaForCausalLM(config)


def batch(tokenizer, role: str, seed: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of training step ``step``: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    rows, labels = [], []
    for _ in range(size):
        item = make_item(rng)
        prompt = chat_prompt(item.question) if rng.random() < CHAT_SHARE[role] else plain_prompt(item.question)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(item.answer + EOS_TOKEN, add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def save_training_state(path: Path, model, optimizer, step: int, args: argparse.Namespace) -> None:
    def write(staging: Path) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, staging / "state.pt")
        (staging / "progress.json").write_text(json.dumps({"step": step, "args": vars(args)}, default=str))

    write_directory_atomically(path, write)


def load_training_state(path: Path, model, optimizer) -> int:
    """The step a saved run reached (0 when there is none); loads model and optimizer in place."""
    if not (path / "progress.json").is_file():
        return 0
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(json.loads((path / "progress.json").read_text())["step"])


def save_final(model, tokenizer, role: str, metadata: dict, out: Path) -> None:
    def write(staging: Path) -> None:
        model.to(torch.float16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    write_directory_atomically(out, write)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--steps", type=at_least(1), default=None, help="default: 2000 (target) / 1500 (draft)")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--save-every", type=at_least(1), default=200)
    parser.add_argument("--work-dir", type=Path, default=None, help="resumable training state (default: "
                        "$KNOBGYM_CACHE/tiny_lm_train or ~/.cache/knobgym/tiny_lm_train)")
    parser.add_argument("--out", type=Path, default=None, help="default: backends/tiny_lm/<model>")
    args = parser.parse_args(argv)
    role = args.model
    steps = args.steps or DEFAULT_STEPS[role]
    for name, value in (("steps", steps), ("batch-size", args.batch_size), ("threads", args.threads),
                        ("save-every", args.save_every)):
        if value < 1:
            raise ValueError(f"--{name}={value} is invalid; accepted: an integer >= 1")
    out = args.out or PACKAGE_DIR / role
    work = (args.work_dir or default_work_dir()) / f"{role}-seed{args.seed}"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(CHAT_TEMPLATE if role == "target" else None)
    model = build_model(role, tokenizer)
    print(f"{role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        return args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    start = load_training_state(work, model, optimizer)
    if start:
        print(f"resuming from step {start} ({work})", flush=True)
    model.train()
    started = time.perf_counter()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = batch(tokenizer, role, args.seed, step, args.batch_size)
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} elapsed {time.perf_counter() - started:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0:
            save_training_state(work, model, optimizer, step + 1, args)
    save_training_state(work, model, optimizer, steps, args)
    metadata = {"role": role, "seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
                "chat_share": CHAT_SHARE[role], "architecture": ARCHITECTURES[role],
                "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    save_final(model.eval(), tokenizer, role, metadata, out)
    print(f"saved {role} to {out}", flush=True)


if __name__ == "__main__":
    main()
