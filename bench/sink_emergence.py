"""Does an attention sink emerge? A small GPT-NeoX trained here, with optional Bigram-Backcopy rows.

The KV envs trade keeping the first tokens (``SinkWindow``) against evicting them, which matters
only if the model dumps attention on them (StreamingLLM). The tiny text LM v2 has no sink
(``backends/tiny_text/MODEL_CARD_V2.md``); this bench is how candidate training recipes are tried
at small scale before a long run. It trains a small model with :mod:`backends.tiny_text.train_v2`'s
corpus, tokenizer, batches and schedule (every row starts with ``<|endoftext|>``), optionally with a
share of each batch replaced by synthetic **Bigram-Backcopy** rows (Guo et al. 2024, "Active-Dormant
Attention Heads": tokens follow a bigram chain, except that after a *trigger* token the next token
repeats the token before the trigger; a head that copies on triggers has to do nothing everywhere
else, and in their 1-3 layer models such heads learned to park that attention on the first token),
then prints, on the held-out documents and on fresh synthetic rows:

* per layer and head, the attention the queries at positions ``>= --attention-from`` give to
  position 0, as a multiple of a uniform spread (``1 / (position + 1)``, averaged alike);
* the perplexity of the tokens from ``--from-position`` on, streamed token by token under the full
  cache, ``SinkWindow(4, W)`` and window-only ``SinkWindow(0, W)`` for each ``--windows`` W (every
  window has evicted by then), and window-only / sink (StreamingLLM's collapse is a ratio >> 1).

``--sink-logit L`` seeds the sink at initialisation instead of waiting for it
(:func:`backends.tiny_text.train_v2.seed_attention_sink`: every head's logit on the BOS about ``L``
nats above a typical token's, the BOS's value zero); training then keeps or dismantles it;
``--pin-sink`` keeps it as seeded through training (``seed_attention_sink(pinned=True)`` after every step).

Deterministic for its arguments (seeded batches, synthetic rows and initialisation); one thread per
``--threads``. It trains, so it takes minutes (defaults: about 0.55 s a step on two threads here).

Usage: ``python -m bench.sink_emergence [--share 0.5] [--steps 3000] [--lr 2e-3] [--sink-logit 24 [--pin-sink]]``
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from backends.script_args import OneLineArgumentParser, at_least
from backends.kv import DocumentStreamer, FullCache, SinkWindow
from backends.tiny_text import held_out_token_documents
from backends.tiny_text import train_v2

TRANSITION_SEED = 99  # the synthetic bigram chain (fixed: one task, whatever --seed)
EVAL_SEED = 12345  # the synthetic rows scored after training


class BigramBackcopy:
    """Synthetic rows over ``vocab`` token ids: a bigram chain (each row of its transition matrix drawn
    from a Dirichlet(0.1), so a few successors dominate), and with probability ``rate`` at each
    position a trigger (one of ``triggers``) whose successor is the token before it."""

    def __init__(self, vocab: np.ndarray, triggers: np.ndarray, rate: float, bos_id: int):
        self.vocab, self.triggers, self.rate, self.bos_id = vocab, triggers, rate, bos_id
        self.trigger_set = set(triggers.tolist())
        self.transition = np.random.default_rng(TRANSITION_SEED).dirichlet(np.full(len(vocab), 0.1), size=len(vocab))

    def row(self, rng: np.random.Generator, length: int) -> list[int]:
        """One row of ``length`` ids: the BOS, then the chain with triggers and their back-copies."""
        row = [self.bos_id]
        state = int(rng.integers(len(self.vocab)))
        row.append(int(self.vocab[state]))
        while len(row) < length:
            if rng.random() < self.rate and row[-1] != self.bos_id and row[-1] not in self.trigger_set:
                previous = row[-1]
                row.append(int(rng.choice(self.triggers)))
                row.append(previous)  # the back-copy: the token before the trigger
                state = int(np.nonzero(self.vocab == previous)[0][0])
                continue
            state = int(rng.choice(len(self.vocab), p=self.transition[state]))
            row.append(int(self.vocab[state]))
        return row[:length]


def synthetic_task(data: torch.Tensor, vocab_size: int, bos_id: int, args) -> BigramBackcopy:
    """The chain's tokens are corpus tokens of frequency rank 100.. (ordinary, not special); the
    triggers are the corpus' rarest tokens (they almost never occur in natural text, so a head that
    acts on them is dormant on it)."""
    counts = np.bincount(data.numpy(), minlength=vocab_size)
    present = np.nonzero(counts)[0]
    triggers = present[np.argsort(counts[present], kind="stable")][:args.triggers]
    by_frequency = present[np.argsort(-counts[present], kind="stable")]
    vocab = np.array([t for t in by_frequency[100:] if t != bos_id and t not in set(triggers.tolist())][:args.bb_vocab])
    if len(vocab) < args.bb_vocab:
        raise ValueError(f"--bb-vocab={args.bb_vocab} exceeds the corpus' ordinary tokens ({len(vocab)}); accepted: "
                         "a smaller --bb-vocab or a larger corpus")
    return BigramBackcopy(vocab, triggers, args.trigger_rate, bos_id)


def train(args, data: torch.Tensor, bos_id: int, config, task: BigramBackcopy | None) -> GPTNeoXForCausalLM:
    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(config)
    train_v2.seed_attention_sink(model, bos_id, args.sink_logit, pinned=args.pin_sink)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    synthetic_rows = int(round(args.share * args.batch_size))
    started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * train_v2.lr_factor(step, args.steps, args.warmup)
        batch = train_v2.batch_at(data, step, args, bos_id)
        if synthetic_rows:
            rng = np.random.default_rng([7 + args.seed, step])
            batch[:synthetic_rows] = torch.tensor([task.row(rng, args.context) for _ in range(synthetic_rows)])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if args.pin_sink:
            train_v2.seed_attention_sink(model, bos_id, args.sink_logit, pinned=True)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} "
                  f"{(time.perf_counter() - started) / (step + 1):.2f}s/step", flush=True)
    return model.eval()


@torch.inference_mode()
def first_token_attention(model, documents: list[list[int]], from_position: int) -> np.ndarray:
    """(layers, heads): mean attention on position 0 of the queries at ``from_position``.., over
    documents, divided by a uniform spread's."""
    model.set_attn_implementation("eager")  # SDPA does not return the weights
    per_document = []
    for ids in documents:
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions
        per_document.append(np.stack([layer[0, :, from_position:, 0].mean(-1).numpy() for layer in attentions]))
    model.set_attn_implementation("sdpa")
    uniform = float(np.mean(1.0 / (np.arange(from_position, len(documents[0])) + 1)))
    return np.mean(per_document, axis=0) / uniform


def perplexities(model, documents: list[list[int]], windows: list[int], from_position: int) -> dict[str, float]:
    """PPL of the tokens predicted from ``from_position`` on, streamed under each policy."""
    policies = {"full cache": FullCache()}
    for window in windows:
        policies[f"SinkWindow(4, {window})"] = SinkWindow(n_sink=4, window=window)
        policies[f"window only (0, {window})"] = SinkWindow(n_sink=0, window=window)
    result = {}
    for name, policy in policies.items():
        nll = [DocumentStreamer(model, ids, policy).advance(len(ids) - 1).nll[from_position:] for ids in documents]
        result[name] = math.exp(float(np.concatenate(nll).mean()))
    return result


def parse_args(argv: list[str] | None):
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--share", type=float, default=0.5, help="share of each batch's rows that are Bigram-Backcopy "
                   "rows (0: the corpus only)")
    p.add_argument("--bb-vocab", type=at_least(1), default=64, help="tokens of the synthetic bigram chain")
    p.add_argument("--triggers", type=at_least(1), default=3, help="trigger tokens")
    p.add_argument("--trigger-rate", type=float, default=0.1, help="chance of a trigger at each position")
    p.add_argument("--windows", type=at_least(1), nargs="+", default=[64, 128], help="cache sizes W compared")
    p.add_argument("--eval-tokens", type=at_least(2), default=512, help="tokens per held-out document and synthetic row")
    p.add_argument("--from-position", type=at_least(0), default=192, help="first predicted position scored in the PPL")
    p.add_argument("--attention-from", type=at_least(0), default=128, help="first query position of the attention table")
    p.add_argument("--log-every", type=at_least(1), default=50)
    # the model and training: train_v2's options, small-scale defaults
    train_argv = ["--hidden", "128", "--layers", "4", "--heads", "4", "--context", "512", "--batch-size", "4",
                  "--steps", "600", "--warmup", "50"]
    args, rest = p.parse_known_args(argv)
    model_args = train_v2.parse_args(train_argv + rest)  # its own checks: one line, exit 2
    for name in ("steps", "context", "hidden", "layers", "heads", "batch_size", "lr", "warmup", "weight_decay",
                 "threads", "seed", "max_corpus_chars", "vocab_size", "max_positions", "corpus", "sink_logit",
                 "pin_sink"):
        setattr(args, name, getattr(model_args, name))
    problems = []
    if not 0 <= args.share <= 1:
        problems.append(f"--share={args.share} is invalid; accepted: a number in [0, 1]")
    if args.bb_vocab < 2 or args.triggers < 1 or args.log_every < 1:
        problems.append(f"--bb-vocab={args.bb_vocab} / --triggers={args.triggers} / --log-every={args.log_every} "
                        "invalid; accepted: >= 2 / >= 1 / >= 1")
    if not 0 < args.trigger_rate < 1:
        problems.append(f"--trigger-rate={args.trigger_rate} is invalid; accepted: a number in (0, 1)")
    if not 1 <= args.attention_from < args.eval_tokens:
        problems.append(f"--attention-from={args.attention_from} is invalid; accepted: 1 <= it < --eval-tokens")
    if not all(5 <= w < args.from_position for w in args.windows) or not args.from_position < args.eval_tokens:
        problems.append(f"--windows={args.windows}, --from-position={args.from_position}, --eval-tokens="
                        f"{args.eval_tokens}: accepted 5 <= every window < from-position < eval-tokens (so every "
                        "window has evicted before the scored tokens)")
    if problems:
        p.error(problems[0])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        tokenizer, data, bos_id = train_v2.corpus(args)
        task = synthetic_task(data, len(tokenizer), bos_id, args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    natural = [ids for ids in held_out_token_documents(tokenizer, max_tokens=args.eval_tokens).values()
               if len(ids) == args.eval_tokens]
    if not natural:
        print(f"error: --eval-tokens={args.eval_tokens} is longer than every held-out document; accepted: at most "
              f"{max(len(ids) for ids in held_out_token_documents(tokenizer).values())}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(EVAL_SEED)
    synthetic = [task.row(rng, args.eval_tokens) for _ in range(4)]
    print(f"{len(data)} corpus tokens; synthetic rows: {args.share:.0%} of each batch, chain of {len(task.vocab)} "
          f"tokens, triggers {task.triggers.tolist()} at rate {args.trigger_rate}", flush=True)
    started = time.perf_counter()
    model = train(args, data, bos_id, train_v2.build_config(len(tokenizer), bos_id, args), task)
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s ({torch.get_num_threads()} threads)")
    for label, documents in (("held-out documents", natural), ("synthetic rows", synthetic)):
        ratio = first_token_attention(model, documents, args.attention_from)
        print(f"\n{label} ({len(documents)} x {args.eval_tokens} tokens): attention on position 0 / uniform, "
              f"queries at positions >= {args.attention_from}")
        print("| layer | " + " | ".join(f"head {h}" for h in range(ratio.shape[1])) + " |")
        print("|---|" + "---|" * ratio.shape[1])
        for layer, row in enumerate(ratio):
            print(f"| {layer} | " + " | ".join(f"{x:.1f}x" for x in row) + " |")
        ppl = perplexities(model, documents, args.windows, args.from_position)
        print("PPL of positions >= {}: ".format(args.from_position)
              + ", ".join(f"{name} {value:.2f}" for name, value in ppl.items()))
        print("window only / SinkWindow: " + ", ".join(
            f"W={w} {ppl[f'window only (0, {w})'] / ppl[f'SinkWindow(4, {w})']:.2f}x" for w in args.windows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
