"""Adaptive training of the tiny reference model: ``python -m backends.tiny.train --seed 0``.

Every batch runs under one randomly drawn knob configuration (vision tier, vision-token budget,
MoE top-k, applied with :func:`backends.knobs.apply_knobs`) and puts the answer-token loss on the
early exits at every depth choice (the final norm and LM head applied to the hidden states after
blocks 12..16), so that the model degrades gracefully when any knob is reduced, as budget-adaptive
models are trained. A share of batches uses the full configuration so the full model learns fastest.

Reproducible from ``--seed``: the data stream, knob draws and initialisation all derive from it and
the learning-rate schedule is step-based (``--minutes`` only stops early, saving what it has). The
checkpoint directory is rewritten atomically every ``--save-every`` steps, so a stopped run still
leaves a usable model.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backends.script_args import OneLineArgumentParser, at_least
from backends.knobs import KnobConfig, apply_knobs, knob_space_from_model, model_parts
from backends.io import atomic_write_json, write_directory_atomically
from backends.loading import check_checkpoint_out_dir
from backends.tiny.data import (COLORS, IMAGE_SIZE, QUESTION_TYPES, SHAPES, generate_split, make_sample, object_mask,
                                per_type_accuracy, score_answer)
from backends.tiny.model import (TinyShape, answer_ids, build_image_processor, build_model, build_tokenizer,
                                 pixel_values, prompt_ids)

FULL_CONFIG_SHARE = 0.25  # share of batches trained at the full configuration
PATCH_CLASSES = 1 + len(COLORS) * len(SHAPES)  # background, then (colour, shape) pairs


def patch_labels(sample, grid: int) -> np.ndarray:
    """Auxiliary target per vision patch: the (colour, shape) class of the object covering most of
    the patch, 0 for background. ``[grid * grid]`` int64.

    Why: the answer loss reaches the vision tower only through 16 MoE blocks and a few answer
    tokens, and alone it leaves the model at the question-only baseline for hundreds of steps;
    dense per-patch supervision teaches the tower to encode objects from the first steps.
    """
    cell = IMAGE_SIZE // grid
    votes = np.zeros((grid, grid, PATCH_CLASSES))
    for obj in sample.meta["objects"]:
        label = 1 + COLORS.index(obj["color"]) * len(SHAPES) + SHAPES.index(obj["shape"])
        covered = object_mask(obj).reshape(grid, cell, grid, cell).sum(axis=(1, 3))
        votes[:, :, label] += covered
    labels = votes.argmax(-1)
    labels[votes.max(-1) == 0] = 0
    return labels.reshape(-1).astype(np.int64)


def patch_loss(model, head, pixels, labels, position_weight: float = 0.5) -> torch.Tensor:
    """Cross-entropy of the auxiliary patch classifier on the projected (unpooled) vision features:
    the patch's (colour, shape) class plus its grid row and column.

    Why the row and column: the OLMoE text model only has rotary (relative) positions, so "is the
    circle left of the square" needs each vision token to say where it is. A linear probe of the
    first shipped checkpoint's vision features found the column at chance (26% for 4 columns) and
    the model answered every ``left_of`` question "yes".
    """
    feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    logits = head(feats)  # [B, grid*grid, classes + grid + grid]
    grid = math.isqrt(feats.shape[1])
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    batch = feats.shape[0]
    content = F.cross_entropy(logits[..., :PATCH_CLASSES].flatten(0, 1), labels.flatten())
    row = F.cross_entropy(logits[..., PATCH_CLASSES:PATCH_CLASSES + grid].flatten(0, 1), rows.repeat(batch))
    col = F.cross_entropy(logits[..., PATCH_CLASSES + grid:].flatten(0, 1), cols.repeat(batch))
    return content + position_weight * (row + col)


def make_batch(samples, tokenizer, n_vision_tokens: int, with_answers: bool = True):
    """Right-padded ``input_ids``, ``attention_mask``, ``pixel_values`` and the answer-loss targets.

    ``targets[b, t]`` is the token to predict from position ``t`` (``-100`` outside the answer).
    """
    rows, targets = [], []
    for s in samples:
        prompt = prompt_ids(tokenizer, s.question, n_vision_tokens)
        answer = answer_ids(tokenizer, s.reference) if with_answers else []
        rows.append(prompt + answer)
        targets.append([-100] * (len(prompt) - 1) + answer + [-100])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = 1
        target[i, :len(t)] = torch.tensor(t)
    return input_ids, attention, pixel_values([s.image for s in samples]), target


def exit_losses(model, parts, input_ids, attention, pixels, target, depths) -> list[torch.Tensor]:
    """Answer-token cross-entropy at each exit depth from one forward pass (run under ``apply_knobs``)."""
    out = model.model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels,
                      output_hidden_states=True, use_cache=False)
    mask = target != -100
    labels = target[mask]
    n_layers = len(parts.layers)
    losses = []
    for d in depths:
        # hidden_states[d] is block d's output; the last entry already has the final norm applied.
        h = out.last_hidden_state if d == n_layers else parts.final_norm(out.hidden_states[d])
        logits = parts.lm_head(h[mask])
        losses.append(F.cross_entropy(logits.float(), labels))
    return losses


@torch.no_grad()
def greedy_answers(model, tokenizer, samples, knobs: KnobConfig, space, max_new_tokens: int = 5,
                   batch_size: int = 200) -> list[str]:
    """Batched greedy decoding with a KV cache: prompts left-padded, positions counted from each
    prompt's first real token (so every row sees exactly what it would see alone)."""
    n_vis = space.vision_tokens(knobs)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answers = []
    with apply_knobs(model, knobs, space):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, s.question, n_vis) for s in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        pixel_values=pixel_values([s.image for s in chunk]), use_cache=True)
            generated = torch.empty((len(chunk), 0), dtype=torch.long)
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                generated = torch.cat([generated, nxt[:, None]], dim=1)
                done |= nxt == eos
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                            past_key_values=out.past_key_values, use_cache=True)
            for row in generated.tolist():
                row = row[:row.index(eos)] if eos in row else row
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def evaluate_config(model, tokenizer, samples, knobs, space, question_types=QUESTION_TYPES) -> dict:
    """Exact match of greedy answers under ``knobs``: overall and per question type (the names
    ``question_types``, v1's by default), plus the per-sample ``scores``."""
    preds = greedy_answers(model, tokenizer, samples, knobs, space)
    scores = [score_answer(p, s.reference) for p, s in zip(preds, samples)]
    return {"overall": float(np.mean(scores)), "per_type": per_type_accuracy(samples, scores, question_types),
            "scores": scores}


def save_checkpoint(model, tokenizer, image_processor, out_dir: Path, extra: dict) -> None:
    """Rewrite the whole checkpoint directory atomically, keeping its model card (README.md)."""
    out_dir = Path(out_dir)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        if (out_dir / "README.md").exists():
            shutil.copy2(out_dir / "README.md", staging / "README.md")
        atomic_write_json(staging / "training_state.json", extra)

    write_directory_atomically(out_dir, write)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def draw_knobs(rng: np.random.Generator, space, full_share: float = FULL_CONFIG_SHARE) -> KnobConfig:
    """One training configuration: the full one with probability ``full_share``, else uniform."""
    if rng.random() < full_share:
        return space.full().replace(depth=None)
    return KnobConfig(tier=space.tier_names[rng.integers(len(space.tiers))],
                      token_budget=float(space.token_budgets[rng.integers(len(space.token_budgets))]),
                      top_k=int(space.top_ks[rng.integers(len(space.top_ks))]))


def train(args) -> Path:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    tokenizer = build_tokenizer()
    image_processor = build_image_processor()
    grid = IMAGE_SIZE // args.patch_size
    # Tiers pool the patch grid to about a third, half and all of its side (6x6: 2x2, 3x3, 6x6).
    tiers = (("low", max(1, grid // 3) ** 2), ("medium", max(1, grid // 2) ** 2), ("high", grid * grid))
    shape = TinyShape(hidden_size=args.hidden, expert_size=args.expert_size, patch_size=args.patch_size,
                      tiers=tiers)
    model = build_model(tokenizer, shape, seed=args.seed)
    if args.init_from:
        # Continue from an earlier checkpoint of the same shape (its weights, a fresh optimiser).
        from transformers import LlavaForConditionalGeneration

        init = LlavaForConditionalGeneration.from_pretrained(args.init_from, local_files_only=True)
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as exc:  # missing / unexpected keys or tensor sizes
            lines = str(exc).splitlines()  # line 0 is a generic header, line 1 the first mismatch
            detail = lines[1].strip() if len(lines) > 1 else str(exc)
            raise ValueError(f"--init-from={args.init_from!r} does not match the shape {shape} ({detail}); "
                             f"accepted: a checkpoint trained with the same --hidden/--expert-size/--patch-size") from None
        del init
    space = knob_space_from_model(model, tiers=dict(shape.tiers))
    parts = model_parts(model)
    depths = space.depths
    exit_weights = torch.tensor([1.0] * (len(depths) - 1) + [2.0])
    exit_weights = exit_weights / exit_weights.sum()
    grid = IMAGE_SIZE // shape.patch_size
    patch_head = torch.nn.Linear(shape.hidden_size, PATCH_CLASSES + 2 * grid)  # training only, not saved
    opt = torch.optim.AdamW(list(model.parameters()) + list(patch_head.parameters()), lr=args.lr,
                            weight_decay=0.01, betas=(0.9, 0.98))
    val = generate_split("validation", args.val_samples, seed=args.seed)
    out_dir = Path(args.out)
    log = {"args": vars(args), "shape": shape.__dict__, "history": []}
    started = time.time()
    model.train()
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        first = args.first_sample + step * args.batch_size
        samples = [make_sample("train", first + i, seed=args.seed) for i in range(args.batch_size)]
        knobs = draw_knobs(rng, space, args.full_share)
        batch = make_batch(samples, tokenizer, space.vision_tokens(knobs))
        with apply_knobs(model, knobs, space):
            losses = exit_losses(model, parts, *batch, depths)
        labels = torch.from_numpy(np.stack([patch_labels(x, grid) for x in samples]))
        aux = patch_loss(model, patch_head, batch[2], labels, args.position_loss_weight)
        loss = (torch.stack(losses) * exit_weights).sum() + args.patch_loss_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.time() - started
        if step % args.log_every == 0:
            print(f"step {step} loss {loss.item():.4f} final {losses[-1].item():.4f} patch {aux.item():.4f} knobs {knobs} "
                  f"{elapsed / (step + 1):.3f}s/step", flush=True)
        last = step == args.steps - 1 or elapsed > args.minutes * 60
        if (step + 1) % args.save_every == 0 or last:
            model.eval()
            acc = evaluate_config(model, tokenizer, val, space.full(), space)
            model.train()
            log["history"].append({"step": step + 1, "elapsed_s": round(elapsed, 1), "loss": loss.item(),
                                   "val_full": {k: acc[k] for k in ("overall", "per_type")}})
            print(f"step {step + 1} val full {acc['overall']:.3f} {acc['per_type']}", flush=True)
            save_checkpoint(model, tokenizer, image_processor, out_dir, log)
        if last:
            break
    print(f"done: {step + 1} steps in {time.time() - started:.0f}s -> {out_dir}", flush=True)
    return out_dir


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--steps", type=at_least(1), default=3000, help="optimizer steps (the LR schedule spans them)")
    p.add_argument("--minutes", type=float, default=float("inf"), help="stop early after this wall time")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=at_least(0), default=100)
    p.add_argument("--hidden", type=at_least(1), default=TinyShape.hidden_size)
    p.add_argument("--expert-size", type=at_least(1), default=TinyShape.expert_size)
    p.add_argument("--patch-size", type=at_least(1), default=TinyShape.patch_size,
                   help="vision patch size in pixels (12 = one patch per layout cell of the generator)")
    p.add_argument("--patch-loss-weight", type=float, default=0.5, help="weight of the auxiliary patch loss")
    p.add_argument("--position-loss-weight", type=float, default=0.5,
                   help="weight of the patch row/column targets inside the auxiliary loss (0: colour/shape only)")
    p.add_argument("--full-share", type=float, default=FULL_CONFIG_SHARE,
                   help="share of batches trained at the full configuration (the rest: uniform knobs)")
    p.add_argument("--init-from", default=None, help="checkpoint directory of the same shape to continue from")
    p.add_argument("--first-sample", type=at_least(0), default=0,
                   help="index of the first train sample (a continuation passes the samples already seen)")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    p.add_argument("--save-every", type=at_least(1), default=250)
    p.add_argument("--log-every", type=at_least(1), default=25)
    p.add_argument("--val-samples", type=at_least(1), default=300)
    p.add_argument("--out", default=None,
                   help="checkpoint directory (default: runs/tiny-train/<time>); the shipped model is "
                        "backends/tiny/checkpoint, replaced only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow --out to name an existing checkpoint")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.save_every, args.log_every, args.val_samples = 3, 4, 3, 1, 8
    if not 0.0 <= args.full_share <= 1.0:
        raise ValueError(f"--full-share={args.full_share} is invalid; accepted: a fraction in [0, 1]")
    if not (math.isfinite(args.position_loss_weight) and args.position_loss_weight >= 0):
        raise ValueError(f"--position-loss-weight={args.position_loss_weight} is invalid; accepted: a number >= 0")
    if args.first_sample < 0:
        raise ValueError(f"--first-sample={args.first_sample} is invalid; accepted: >= 0")
    if args.out is None:
        args.out = str(Path("runs") / "tiny-train" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    check_checkpoint_out_dir(args.out, args.overwrite)
    for name in ("steps", "batch_size", "save_every", "log_every", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; accepted: >= 1")
    return args


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
