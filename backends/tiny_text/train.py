"""Train the tiny reference text model: a 4-block GPT-NeoX (the Pythia architecture) on offline text.

Run ``python -m backends.tiny_text.train`` (about 15 minutes on one CPU thread with the defaults).
It builds a byte-level BPE tokenizer with the ``tokenizers`` package, trains the model on the
documents of :mod:`backends.tiny_text.corpus`, reports held-out perplexity, and saves model and
tokenizer with ``save_pretrained`` to ``backends/tiny_text/checkpoint/`` (atomically: written to
a temporary folder, then swapped in). Everything is deterministic from ``--seed`` on one thread.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from backends.script_args import OneLineArgumentParser, at_least
from backends.io import atomic_write_json, write_directory_atomically
from backends.loading import check_checkpoint_out_dir
from backends.tiny_text.corpus import held_out_documents, training_documents

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
EOS_TOKEN = "<|endoftext|>"


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as in GPT-2/Pythia): any text encodes, nothing maps to an unknown token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def build_config(vocab_size: int, eos_id: int, args: argparse.Namespace) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=args.max_positions, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


@torch.no_grad()
def held_out_perplexity(model: GPTNeoXForCausalLM, tokenizer, context: int) -> float:
    """Token-weighted perplexity of the held-out documents, in non-overlapping ``context`` blocks."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for text in held_out_documents().values():
        ids = torch.tensor(tokenizer(text)["input_ids"])
        for start in range(0, len(ids) - 1, context):
            block = ids[start:start + context + 1]
            if len(block) < 2:
                continue
            logits = model(block[None, :-1]).logits[0]
            nll = torch.nn.functional.cross_entropy(logits, block[1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += len(block) - 1
    model.train()
    return math.exp(total_nll / total_tokens)


def save_atomically(model, tokenizer, metadata: dict, target: Path) -> None:
    """Rewrite the checkpoint directory atomically, so a reader never sees half a checkpoint."""
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "training.json", metadata)

    write_directory_atomically(target, write)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--vocab-size", type=at_least(1), default=2048)
    parser.add_argument("--hidden", type=at_least(1), default=128)
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--heads", type=at_least(1), default=4)
    parser.add_argument("--context", type=at_least(1), default=512, help="training sequence length")
    parser.add_argument("--max-positions", type=at_least(1), default=4096)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--steps", type=at_least(1), default=1200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=at_least(1), default=1, help="CPU threads (1 keeps the run deterministic)")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--overwrite", action="store_true", help="allow --out to name an existing checkpoint")
    args = parser.parse_args(argv)
    check_checkpoint_out_dir(args.out, args.overwrite)  # the default --out is the shipped model
    for name in ("vocab_size", "hidden", "layers", "heads", "context", "batch_size", "steps", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; accepted: an integer >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    docs = training_documents()
    tokenizer = build_tokenizer(docs, args.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    stream = []
    for text in docs:
        stream.extend(tokenizer(text)["input_ids"])
        stream.append(eos_id)
    data = torch.tensor(stream, dtype=torch.long)
    print(f"training tokens: {len(data)}, vocab: {len(tokenizer)}")

    config = build_config(len(tokenizer), eos_id, args)
    model = GPTNeoXForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([data[s:s + args.context + 1] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss  # the model shifts labels by one itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} elapsed {time.perf_counter() - started:.0f}s", flush=True)

    ppl = held_out_perplexity(model, tokenizer, args.context)
    minutes = (time.perf_counter() - started) / 60
    print(f"held-out perplexity (context {args.context}): {ppl:.2f}; trained {minutes:.1f} min")
    metadata = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "context": args.context,
                "lr": args.lr, "training_tokens": len(data), "held_out_ppl": round(ppl, 3),
                "train_minutes": round(minutes, 1), "torch": torch.__version__}
    save_atomically(model, tokenizer, metadata, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
