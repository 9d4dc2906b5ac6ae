"""Train the tiny text LM v2: a GPT-NeoX on long sequences, resumable, for KV envs where sinks matter.

Why a v2: the shipped model (4 blocks, context 512, 30 min) shows neither of the effects the KV
envs trade (BENCHMARKS "KV-cache policies"): keeping the first tokens does nothing, and at 512
tokens attention is a small share of a step. v2 trains on sequences of ``--context`` tokens (default
2048, at least 1024) that always start with the ``<|endoftext|>`` token, and its tokenizer puts that
token before every document, so every stream begins with the same first token: the attention sink
StreamingLLM describes (a model trained like this dumps attention on it; evicting it is what makes
window-only attention collapse). Training at the streams' length also keeps the full-cache
reference inside the positions the model was trained on.
At this scale the sink does not grow by itself (MODEL_CARD_V2.md); ``--sink-logit L`` seeds it at
initialisation (:func:`seed_attention_sink`) and lets training keep or dismantle it.

Corpus: :mod:`backends.tiny_text.corpus` (CPython's bundled documentation topics and, by default, every standard
library source file (`--corpus stdlib`); nothing to download), held-out topics never trained on.

Resumable (``--work-dir``, default ``~/.cache/knobgym/train/text_v2/``):

* every ``--checkpoint-minutes`` (default 10) and at the end, ``<work-dir>/latest/`` is rewritten
  atomically (a staging folder swapped in: a kill leaves the old checkpoint or the new one):
  ``state.safetensors`` (weights, AdamW moments and step counts; checksummed; JSON metadata with
  the step, the optimiser's hyperparameters and the run's arguments) and the tokenizer;
* the data position and the learning-rate schedule are functions of the step alone (batch ``s`` is
  drawn from a generator seeded with ``(seed, s)``; warmup then cosine over ``--steps``), so a resumed
  run continues exactly where the checkpoint was taken;
* a new run in a work dir with a ``latest/`` resumes from it; its arguments must match the saved
  ones (one error line naming the first difference), ``--fresh`` discards it instead.

At the end the model and tokenizer are saved with ``save_pretrained`` to ``--out`` (default
``<work-dir>/final``), checked to be at most ``--max-mb`` (25) MB, with a ``training.json``.

Usage (the full run takes hours; ``--max-steps-this-run`` splits it into sessions)::

    nice -n 5 python -m backends.tiny_text.train_v2                     # start or resume
    python -m backends.tiny_text.train_v2 --max-steps-this-run 200       # one slice, then exit
    python -m backends.tiny_text.train_v2 --steps 60 --context 1024 --hidden 64 --layers 2 \\
        --max-corpus-chars 400000 --work-dir /tmp/text_v2_smoke           # a few-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import processors
from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

from backends.script_args import OneLineArgumentParser, at_least
from backends.io import CorruptFileError, load_tensors, save_tensors, write_directory_atomically
from backends.loading import check_checkpoint_out_dir
from backends.tiny_text.corpus import held_out_documents, training_documents
from backends.tiny_text.train import EOS_TOKEN, build_config, build_tokenizer

WORK_DIR = Path("~/.cache/knobgym/train/text_v2").expanduser()
STATE_FILE = "state.safetensors"
# Arguments a resumed run must share with its checkpoint (the rest only steer this process).
RUN_ARGS = ("seed", "vocab_size", "hidden", "layers", "heads", "context", "max_positions", "batch_size", "steps",
            "lr", "warmup", "weight_decay", "max_corpus_chars", "corpus", "init_from", "sink_logit", "pin_sink")
# The seeded sink's massive activation: the BOS's residual value in the sink dimension. Blocks add O(1)
# to every residual stream, so 30 keeps the BOS's normalised state on that dimension in every layer.
SINK_ACTIVATION = 30.0
# Run arguments added after checkpoints existed: the value a checkpoint without them was trained with.
RUN_ARG_DEFAULTS = {"sink_logit": 0.0, "pin_sink": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--vocab-size", type=at_least(1), default=4096)
    p.add_argument("--hidden", type=at_least(1), default=192)
    p.add_argument("--layers", type=at_least(1), default=6)
    p.add_argument("--heads", type=at_least(1), default=6)
    p.add_argument("--context", type=at_least(1), default=2048, help="training sequence length (>= 1024 for a real run)")
    p.add_argument("--max-positions", type=at_least(1), default=4096)
    p.add_argument("--batch-size", type=at_least(1), default=2)
    p.add_argument("--steps", type=at_least(1), default=3000, help="total optimiser steps (the schedule's length)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=at_least(0), default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--sink-logit", type=float, default=0.0, help="seed an attention sink at initialisation "
                   "(seed_attention_sink): every head's attention logit on the BOS, in nats above a typical token's; "
                   "0 = off (the sink must emerge by itself)")
    p.add_argument("--pin-sink", action="store_true", help="keep the seeded sink as seeded through training "
                   "(seed_attention_sink(pinned=True) after every step): training learns around it and cannot "
                   "dismantle it; needs --sink-logit > 0")
    p.add_argument("--corpus", choices=("stdlib", "listed"), default="stdlib",
                   help="training text besides the documentation topics: every standard-library source file "
                        "(about 4 M tokens) or the v1 model's listed modules (about 0.4 M)")
    p.add_argument("--max-corpus-chars", type=at_least(0), default=0, help="use only the first N characters of each "
                   "training document (0: all); for smoke runs and tests")
    p.add_argument("--threads", type=at_least(1), default=2, help="torch CPU threads")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="rewrite latest/ at least this often")
    p.add_argument("--max-steps-this-run", type=at_least(0), default=0, help="stop (after a checkpoint) once this many "
                   "steps ran in this process; 0: run to --steps")
    p.add_argument("--log-every", type=at_least(1), default=10)
    p.add_argument("--eval-max-tokens", type=at_least(0), default=0, help="held-out tokens scored per document at the "
                   "end (0: all)")
    p.add_argument("--work-dir", type=Path, default=WORK_DIR)
    p.add_argument("--init-from", default="", help="a later stage: start from this save_pretrained folder's "
                   "weights (a previous run's final model, same shape and tokenizer) with a fresh optimiser and "
                   "schedule; a different --work-dir and --seed keep the stages apart")
    p.add_argument("--fresh", action="store_true", help="discard <work-dir>/latest instead of resuming from it")
    p.add_argument("--out", type=Path, default=None, help="final save_pretrained folder (default <work-dir>/final)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to name an existing folder")
    p.add_argument("--max-mb", type=float, default=25.0, help="the final model's size limit")
    args = p.parse_args(argv)
    for name in ("vocab_size", "hidden", "layers", "heads", "context", "max_positions", "batch_size", "steps",
                 "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; accepted: an integer >= 1")
    for name in ("warmup", "max_corpus_chars", "max_steps_this_run", "eval_max_tokens"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; accepted: an integer >= 0")
    if args.hidden % args.heads:
        p.error(f"--hidden={args.hidden} is not a multiple of --heads={args.heads}; accepted: hidden = heads * head_dim")
    if args.context >= args.max_positions:
        p.error(f"--context={args.context} must be < --max-positions={args.max_positions}")
    if not (0 <= args.sink_logit <= 64):
        p.error(f"--sink-logit={args.sink_logit} is invalid; accepted: a number in [0, 64] (0 = off)")
    if args.sink_logit and args.init_from:
        p.error(f"--sink-logit={args.sink_logit} seeds a fresh model and --init-from would overwrite it; accepted: "
                "--sink-logit 0 with --init-from")
    if args.pin_sink and not args.sink_logit:
        p.error("--pin-sink keeps a seeded sink and --sink-logit is 0; accepted: --pin-sink with --sink-logit > 0")
    if not (args.lr > 0 and math.isfinite(args.lr)) or not args.checkpoint_minutes > 0:
        p.error("--lr and --checkpoint-minutes must be positive numbers")
    args.out = args.out if args.out is not None else args.work_dir / "final"
    return args


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine to 10% at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_at(data: torch.Tensor, step: int, args, bos_id: int) -> torch.Tensor:
    """Batch ``step``: ``batch_size`` windows of ``context - 1`` corpus tokens after a BOS (a function of the step)."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - args.context, (args.batch_size,), generator=generator).tolist()
    body = torch.stack([data[s:s + args.context - 1] for s in starts])
    return torch.cat([torch.full((args.batch_size, 1), bos_id, dtype=torch.long), body], dim=1)


@torch.no_grad()
def seed_attention_sink(model: GPTNeoXForCausalLM, bos_id: int, logit: float,
                        activation: float = SINK_ACTIVATION, pinned: bool = False) -> None:
    """Give a freshly initialised GPT-NeoX the attention sink that billion-token LMs grow by themselves.

    Large LMs park most of the attention of most heads on the first token, whose residual stream carries
    a "massive activation" in a few dimensions (Sun et al. 2024) and whose value is close to zero, so
    attending to it is a no-op; evicting it is what makes StreamingLLM's window-only attention collapse.
    A 4 M-parameter model trained for an hour on this CPU does not grow one (MODEL_CARD_V2.md, sink
    experiments), so this writes that state into the initial weights and lets training build on it:

    * one residual dimension (the last) is reserved for the sink: the BOS embedding is a massive
      activation there and zero elsewhere, every other token's embedding is zero there;
    * in every layer and head, the first non-rotary key dimension reads that residual dimension and the
      query bias of the same dimension points at it, so every query's logit on the BOS is about
      ``logit`` nats above a typical token's at any distance (non-rotary: no position dependence);
    * the value projections do not read it, so the BOS's value is the value bias (zero at init).

    Training may keep, strengthen or drop the sink; whether evicting it hurts is measured afterwards
    (``bench.attention_sink``, ``bench.kv_policies``). ``logit`` 0 leaves the model unchanged.

    ``pinned`` also makes the sink dimension the BOS's alone in every layer (no block writes to it; every
    input LayerNorm passes it with gain 1, shift 0). Called after every optimiser step with the same
    arguments, it puts back every entry it writes, so training learns around a sink it cannot remove
    (queries may still learn to look away from it: their other weights train)."""
    if logit <= 0:
        return
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    rotary = 2 * len(model.gpt_neox.rotary_emb.inv_freq)  # the rotated dimensions of each head (rotary_pct)
    if rotary >= head_dim:
        raise ValueError("seed_attention_sink needs non-rotary head dimensions (rotary_pct < 1)")
    sink_dim = hidden - 1
    embedding = model.get_input_embeddings().weight
    embedding[:, sink_dim] = 0.0
    embedding[bos_id] = 0.0
    # after every input LayerNorm about sqrt(hidden) in sink_dim and ~0 elsewhere, as long as the
    # activation dwarfs what the blocks add to the BOS's residual stream (they add O(1))
    embedding[bos_id, sink_dim] = activation
    # q_j * k_j / sqrt(head_dim) = logit with k_j = weight * sqrt(hidden) and q_j = bias = weight
    weight = math.sqrt(logit * math.sqrt(head_dim / hidden))
    for layer in model.gpt_neox.layers:
        projection = layer.attention.query_key_value
        for head in range(heads):
            query, key, value = (head * 3 * head_dim + part * head_dim for part in range(3))
            projection.weight[value:value + head_dim, sink_dim] = 0.0
            projection.weight[key + rotary, sink_dim] = weight
            projection.bias[query + rotary] = weight
        if pinned:
            layer.input_layernorm.weight[sink_dim] = 1.0
            layer.input_layernorm.bias[sink_dim] = 0.0
            for writer in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                writer.weight[sink_dim] = 0.0
                writer.bias[sink_dim] = 0.0


def with_bos(tokenizer, bos_id: int):
    """Make ``tokenizer(text)`` start every document with the BOS (``<|endoftext|>``) token: the sink."""
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B", special_tokens=[(EOS_TOKEN, bos_id)])
    return tokenizer


def corpus(args):
    """``(tokenizer, training token stream)``; documents separated by the BOS token."""
    docs = training_documents(all_stdlib=args.corpus == "stdlib")
    if args.max_corpus_chars:
        docs = [d[:args.max_corpus_chars] for d in docs]
    tokenizer = build_tokenizer(docs, args.vocab_size)
    bos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    tokenizer = with_bos(tokenizer, bos_id)
    stream = []
    for text in docs:
        stream.extend(tokenizer(text)["input_ids"])  # starts with the BOS
    data = torch.tensor(stream, dtype=torch.long)
    if len(data) <= args.context:
        raise ValueError(f"the corpus has {len(data)} tokens, not more than --context={args.context}; accepted: a "
                         "smaller --context or a larger --max-corpus-chars")
    return tokenizer, data, bos_id


# --- checkpoints ---------------------------------------------------------------------------------
def save_latest(work_dir: Path, model, optimizer, tokenizer, step: int, args, elapsed_s: float) -> None:
    """Rewrite ``<work_dir>/latest`` atomically: weights, AdamW state, step, run arguments, tokenizer."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, moments in state["state"].items():
        for key, value in moments.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    metadata = {"step": step, "param_groups": groups, "args": {k: getattr(args, k) for k in RUN_ARGS},
                "elapsed_s": elapsed_s, "torch": torch.__version__}

    def write(staging: Path) -> None:
        save_tensors(staging / STATE_FILE, tensors, metadata)
        tokenizer.save_pretrained(staging)

    write_directory_atomically(work_dir / "latest", write)


def load_latest(work_dir: Path, model, optimizer, args) -> tuple[int, float]:
    """Restore weights and optimiser from ``<work_dir>/latest``; ``(step, elapsed seconds)`` of the checkpoint."""
    path = work_dir / "latest" / STATE_FILE
    tensors, metadata = load_tensors(path)
    if not isinstance(metadata, dict) or "step" not in metadata or "args" not in metadata:
        raise CorruptFileError(path, "no training metadata (step, args)")
    saved = metadata["args"]
    for name in RUN_ARGS:
        saved_value = saved.get(name, RUN_ARG_DEFAULTS.get(name))
        if saved_value != getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r} differs from the checkpoint in "
                             f"{str(work_dir / 'latest')!r} ({saved_value!r}); accepted: the same value to "
                             "resume, or --fresh to start over")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": metadata["param_groups"]})
    return int(metadata["step"]), float(metadata.get("elapsed_s", 0.0))


def load_stage_weights(model, tokenizer, folder: Path) -> None:
    """Copy the weights of ``folder`` (a previous stage's ``save_pretrained`` output) into ``model``; a
    ``ValueError`` naming the folder when its shapes or tokenizer differ from this run's."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"--init-from={str(folder)!r} has no config.json; accepted: a previous run's final folder")
    try:
        previous = GPTNeoXForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        previous_vocab = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True).get_vocab()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"--init-from={str(folder)!r} is not a loadable GPT-NeoX folder ({first}); accepted: a "
                         "previous run's final folder") from None
    if previous_vocab != tokenizer.get_vocab():
        raise ValueError(f"--init-from={str(folder)!r} has another tokenizer than this run's corpus builds; "
                         "accepted: a stage of a run with the same --vocab-size, --corpus and --max-corpus-chars")
    try:
        model.load_state_dict(previous.state_dict())
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:200]
        raise ValueError(f"--init-from={str(folder)!r} does not fit this run's shape ({first}); accepted: the "
                         "same --hidden, --layers, --heads, --max-positions") from None


@torch.no_grad()
def held_out_perplexity(model, tokenizer, context: int, max_tokens: int = 0) -> float:
    """Token-weighted perplexity of the held-out documents in non-overlapping ``context`` blocks, each
    block starting with the BOS (as in training); ``max_tokens`` > 0 caps the tokens scored per document."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    bos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    for text in held_out_documents().values():
        ids = tokenizer(text)["input_ids"][1:]
        ids = ids[:max_tokens] if max_tokens else ids
        for start in range(0, len(ids) - 1, context - 1):
            block = torch.tensor([bos] + ids[start:start + context - 1])
            if len(block) < 3:
                continue
            logits = model(block[None, :-1]).logits[0, 1:]  # the BOS -> first token prediction is not scored
            total_nll += float(torch.nn.functional.cross_entropy(logits, block[2:], reduction="sum"))
            total_tokens += len(block) - 2
    model.train()
    return math.exp(total_nll / total_tokens)


def train(args) -> Path | None:
    """Train (resuming from ``<work-dir>/latest`` when present); the final folder, or ``None`` when the
    run stopped early (``--max-steps-this-run``) with the checkpoint saved."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.fresh:
        shutil.rmtree(args.work_dir / "latest", ignore_errors=True)
    tokenizer, data, bos_id = corpus(args)
    model = GPTNeoXForCausalLM(build_config(len(tokenizer), bos_id, args))
    seed_attention_sink(model, bos_id, args.sink_logit, pinned=args.pin_sink)
    if args.init_from:
        load_stage_weights(model, tokenizer, Path(args.init_from))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    if (args.work_dir / "latest" / STATE_FILE).is_file():
        step, elapsed = load_latest(args.work_dir, model, optimizer, args)
        print(f"resumed from {args.work_dir / 'latest'} at step {step}", flush=True)
    print(f"training tokens: {len(data)}, vocab: {len(tokenizer)}, parameters: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, context {args.context}", flush=True)
    model.train()
    started, last_save, ran = time.perf_counter(), time.perf_counter(), 0
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup)
        batch = batch_at(data, step, args, bos_id)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if args.pin_sink:
            seed_attention_sink(model, bos_id, args.sink_logit, pinned=True)
        step, ran = step + 1, ran + 1
        now = time.perf_counter()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{(now - started) / ran:.2f}s/step", flush=True)
        stop_early = args.max_steps_this_run and ran >= args.max_steps_this_run and step < args.steps
        if now - last_save >= 60 * args.checkpoint_minutes or step == args.steps or stop_early:
            save_latest(args.work_dir, model, optimizer, tokenizer, step, args, elapsed + now - started)
            last_save = time.perf_counter()
        if stop_early:
            print(f"stopped after {ran} steps at step {step}; run again to resume", flush=True)
            return None
    return save_final(model, tokenizer, args, elapsed + time.perf_counter() - started)


def save_final(model, tokenizer, args, elapsed_s: float) -> Path:
    ppl = held_out_perplexity(model, tokenizer, args.context, args.eval_max_tokens)
    metadata = {**{k: getattr(args, k) for k in RUN_ARGS}, "held_out_ppl": round(ppl, 3),
                "train_hours": round(elapsed_s / 3600, 2), "torch": torch.__version__, "bos_prefix": True}

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")

    write_directory_atomically(args.out, write)
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"held-out perplexity (context {args.context}): {ppl:.2f}; saved {size_mb:.1f} MB to {args.out}")
    if size_mb > args.max_mb:
        raise ValueError(f"the final model takes {size_mb:.1f} MB > --max-mb={args.max_mb}; accepted: a smaller "
                         "--hidden / --layers / --vocab-size")
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_checkpoint_out_dir(args.out, args.overwrite)
        train(args)
    except ValueError as error:  # bad arguments or checkpoint: one line, exit code 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
