"""Resumable elastic training of the tiny reference model v2: ``python -m backends.tiny.train_v2``.

The v2 model (:data:`V2_SHAPE`: CLIP tower in ``tier_mode=resize``, LLaVA projector, OLMoE text
model) on the v2 task (:mod:`backends.tiny.data_v2`). Every batch runs under one knob
configuration drawn at random (the full one with probability ``--full-share``, else a uniform
tier and token budget and a top-k drawn in proportion to k), and the answer loss is put on every
exit depth from one forward pass, so every configuration of the action space is a usable model
(elastic training), the full one trained most.

Two stages, switched at step ``--stage2-at`` (default 0: the whole run is stage 2). Stage 1 is the
recipe the reference model's first 7158 steps followed (:data:`V2_STAGE1_SHAPE`: 8 experts of
192 units, top-4, exits at depths 3..8; the first :data:`~backends.tiny.data_v2.FIRST_STAGE_TYPES`
question types; top-k drawn uniformly). At the switch the model is upcycled to fine-grained
experts (:func:`split_experts`, OLMoE's design: 16 experts of 96 units, top-8; the same function,
so top-2/4/8 of the new model compute what top-1/2/4 did, and top-1, half an expert, is new), and
stage 2 adds ``relation_value`` (a three-step question: anchor, neighbour, value), the exit at
depth 2 and the top-k draw in proportion to k (a lower top-k is trained less often, as a MoE served
mostly at its native top-k). Why (``backends/tiny/MODEL_CARD_v2.md``): after stage 1 a lower
top-k or depth cost the full model under 2 points. The reference run: ``--stage2-at 7158``.

A later stage is a new run folder started from another run's newest training state
(``--init-from RUN``: its weights and auxiliary head; a fresh optimiser, step count and schedule):
for example a fine-tune that draws the full configuration more often (``--full-share``) and weighs
the full depth's answer loss more (``--full-depth-weight``), so that the computation a question
type needs is trained where it is served (model card, stage 3).

Resumable and deterministic: the batch of step ``s`` is train samples ``s*B .. s*B+B-1``, its knobs
are drawn from ``default_rng([seed, s])`` and the learning rate is a function of ``s``, so a run
stopped anywhere and resumed from its last training state computes what an unstopped run does.
The training state (weights, optimiser, the auxiliary head, the step) is written atomically at
most every ``--checkpoint-minutes`` to ``<out>/state/`` (the two newest are kept), on SIGTERM /
SIGINT and at the end; starting the same command again resumes from the newest one. ``<out>``
defaults to ``~/.cache/knobgym/train/vlm_v2`` (outside the work tree: intermediate checkpoints
never go to git). Every ``--val-every`` steps the model is validated at the full and cheapest
configuration and each knob alone at its cheapest (``<out>/log.jsonl``) and exported as a
``from_pretrained`` checkpoint to ``<out>/model/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backends.script_args import OneLineArgumentParser, at_least
from backends.io import atomic_write, atomic_write_json, atomic_write_text, read_json
from backends.knobs import KnobConfig, apply_knobs, knob_space_from_model, model_parts
from backends.tiny import data_v2
from backends.tiny.evaluate import target_configs
from backends.tiny.model import TinyShape, build_image_processor, build_model, build_tokenizer
from backends.tiny.train import (PATCH_CLASSES, evaluate_config, exit_losses, lr_at, make_batch, patch_labels,
                                 patch_loss, save_checkpoint)

V2_SHAPE = TinyShape(hidden_size=128, expert_size=96, num_layers=8, num_heads=4, num_experts=16, top_k=8,
                     vision_hidden=96, vision_layers=3, vision_heads=4, patch_size=6,
                     tiers=(("low", 4), ("medium", 16), ("high", 64)), top_ks=(1, 2, 4, 8), depths=(2, 3, 4, 5, 6, 7, 8),
                     tier_mode="resize", task="v2")
#: the shape of the first training stage (see the module docstring): upcycled to :data:`V2_SHAPE`
V2_STAGE1_SHAPE = dataclasses.replace(V2_SHAPE, expert_size=192, num_experts=8, top_k=4, top_ks=(1, 2, 3, 4),
                                      depths=(3, 4, 5, 6, 7, 8))
DEFAULT_OUT = Path("~/.cache/knobgym/train/vlm_v2")
MAX_CHECKPOINT_MINUTES = 10.0
#: the options that define what is trained: a resumed run must repeat them
RUN_DEFINING = ("seed", "steps", "batch_size", "lr", "warmup", "full_share", "patch_loss_weight",
                "position_loss_weight", "stage2_at", "full_depth_weight", "init_from", "min_top_k")
#: values of run-defining options added after the reference run started (its run.json lacks them)
LATER_DEFAULTS = {"full_depth_weight": 2.0, "init_from": "", "min_top_k": 1}
STATES_KEPT = 2


def draw_knobs(step_rng: np.random.Generator, space, full_share: float, stage: int = 2,
               min_top_k: int = 1) -> KnobConfig:
    """One training configuration: the full one with probability ``full_share``, else a uniform tier
    and token budget and a top-k drawn in proportion to k among those >= ``min_top_k`` (stage 1:
    uniform). Every depth is trained at once through the exits."""
    if step_rng.random() < full_share:
        return space.full().replace(depth=None)
    tier = space.tier_names[step_rng.integers(len(space.tiers))]
    budget = float(space.token_budgets[step_rng.integers(len(space.token_budgets))])
    top_ks = np.asarray(space.top_ks)
    if stage == 1:
        top_k = top_ks[step_rng.integers(len(top_ks))]
    else:
        top_ks = top_ks[top_ks >= min_top_k]
        top_k = step_rng.choice(top_ks, p=top_ks / top_ks.sum())
    return KnobConfig(tier=tier, token_budget=budget, top_k=int(top_k))


def split_experts(tensors: dict, moment: int = 1) -> dict:
    """Upcycle OLMoE blocks to fine-grained experts, computing the same function: every expert is
    split into two of half its intermediate size (SwiGLU's units are independent, so the halves'
    outputs add up to the expert's), each half's router row is the expert's (the two tie, so top-2k
    of the new experts selects the k old ones whole, and the renormalised top-k weights halve), and
    the down projections double (making up the halved weights). ``tensors`` maps parameter names to
    weights, or to an AdamW moment of them: ``moment`` 1 (weights, first moments) or 2 (second
    moments: the doubling squares). Other entries pass through."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.gate.weight"):  # [E, H] router rows
            out[name] = t.repeat_interleave(2, dim=0)
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            gate, up = t.chunk(2, dim=1)
            halves = [torch.cat([g, u], dim=1) for g, u in zip(gate.chunk(2, dim=1), up.chunk(2, dim=1))]
            out[name] = torch.stack(halves, dim=1).flatten(0, 1)
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            out[name] = torch.stack(t.chunk(2, dim=2), dim=1).flatten(0, 1) * (2.0 ** moment)
        else:
            out[name] = t
    return out


class Trainer:
    """The model, its optimiser and the step counter, with save / restore of all three."""

    def __init__(self, args):
        self.args = args
        torch.manual_seed(args.seed)
        self.tokenizer = build_tokenizer(data_v2.vocabulary())
        self.image_processor = build_image_processor()
        self.shape = V2_STAGE1_SHAPE if args.stage2_at > 0 else V2_SHAPE
        model = build_model(self.tokenizer, self.shape, seed=args.seed)
        self.grid = data_v2.IMAGE_SIZE // V2_SHAPE.patch_size
        torch.manual_seed(args.seed + 1)
        self.patch_head = torch.nn.Linear(V2_SHAPE.hidden_size, PATCH_CLASSES + 2 * self.grid)
        self._attach(model)
        self.step = 0
        self.elapsed_s = 0.0  # training wall time over all sessions

    def _attach(self, model) -> None:
        """Make ``model`` the trained one: its knob space, parts and a fresh optimiser."""
        self.model = model
        self.space = knob_space_from_model(model, tiers=dict(self.shape.tiers))
        self.parts = model_parts(model)
        weights = torch.tensor([1.0] * (len(self.space.depths) - 1) + [self.args.full_depth_weight])
        self.exit_weights = weights / weights.sum()
        self.opt = torch.optim.AdamW(list(model.parameters()) + list(self.patch_head.parameters()),
                                     lr=self.args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def param_names(self) -> list[str]:
        """The optimiser's parameters by name, in its order."""
        return [n for n, _ in self.model.named_parameters()] + [f"patch_head.{n}" for n, _ in
                                                                 self.patch_head.named_parameters()]

    def upcycle(self) -> None:
        """Stage 1 -> stage 2 (:func:`split_experts`): the weights and the AdamW moments, carried over."""
        names = self.param_names()
        optimizer = self.opt.state_dict()
        weights = split_experts(self.model.state_dict())
        moments = {key: split_experts({names[i]: st[key] for i, st in optimizer["state"].items()}, moment)
                   for key, moment in (("exp_avg", 1), ("exp_avg_sq", 2))}
        self.shape = V2_SHAPE
        model = build_model(self.tokenizer, V2_SHAPE, seed=self.args.seed)
        model.load_state_dict(weights)
        self._attach(model)
        for i, st in optimizer["state"].items():
            st["exp_avg"], st["exp_avg_sq"] = moments["exp_avg"][names[i]], moments["exp_avg_sq"][names[i]]
        self.opt.load_state_dict(optimizer)

    # ------------------------------------------------------------------ one step
    def stage(self, step: int) -> int:
        return 1 if step < self.args.stage2_at else 2

    def train_step(self) -> dict:
        a, step = self.args, self.step
        stage = self.stage(step)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        if stage == 2 and self.shape is V2_STAGE1_SHAPE:
            self.upcycle()
        n_types = data_v2.FIRST_STAGE_TYPES if stage == 1 else len(data_v2.QUESTION_TYPES)
        samples = [data_v2.make_sample("train", step * a.batch_size + i, seed=a.seed, n_types=n_types)
                   for i in range(a.batch_size)]
        knobs = draw_knobs(np.random.default_rng([a.seed, step]), self.space, a.full_share, stage, a.min_top_k)
        batch = make_batch(samples, self.tokenizer, self.space.vision_tokens(knobs))
        self.model.train()
        with apply_knobs(self.model, knobs, self.space):
            losses = exit_losses(self.model, self.parts, *batch, self.space.depths)
        labels = torch.from_numpy(np.stack([patch_labels(x, self.grid) for x in samples]))
        aux = patch_loss(self.model, self.patch_head, batch[2], labels, a.position_loss_weight)
        loss = (torch.stack(losses) * self.exit_weights).sum() + a.patch_loss_weight * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        return {"loss": loss.item(), "final": losses[-1].item(), "patch": aux.item(), "knobs": str(knobs)}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, samples) -> dict:
        self.model.eval()
        return {name: evaluate_config(self.model, self.tokenizer, samples, knobs, self.space, data_v2.QUESTION_TYPES)
                for name, knobs in target_configs(self.space)}

    def export(self, out_dir: Path, history: list) -> None:
        """The model as a ``from_pretrained`` checkpoint (written atomically)."""
        save_checkpoint(self.model, self.tokenizer, self.image_processor, out_dir,
                        {"task": "v2", "step": self.step, "elapsed_s": round(self.elapsed_s, 1),
                         "args": {k: getattr(self.args, k) for k in RUN_DEFINING}, "history": history})

    # ------------------------------------------------------------------ training state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "patch_head": self.patch_head.state_dict(),
                "optimizer": self.opt.state_dict(), "step": self.step, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict) -> None:
        experts = next(t.shape[0] for n, t in state["model"].items() if n.endswith("mlp.gate.weight"))
        shape = {V2_STAGE1_SHAPE.num_experts: V2_STAGE1_SHAPE, V2_SHAPE.num_experts: V2_SHAPE}.get(experts)
        if shape is None:
            raise ValueError(f"a training state with {experts} experts per block; accepted: "
                             f"{V2_STAGE1_SHAPE.num_experts} (stage 1) or {V2_SHAPE.num_experts} (stage 2)")
        if shape is not self.shape:  # a state of the other stage's shape
            self.shape = shape
            self._attach(build_model(self.tokenizer, shape, seed=self.args.seed))
        self.model.load_state_dict(state["model"])
        self.patch_head.load_state_dict(state["patch_head"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed_s = float(state["elapsed_s"])


def state_paths(out: Path) -> list[Path]:
    """Saved training states, oldest first."""
    return sorted((out / "state").glob("step-*.pt"))


def save_state(trainer: Trainer, out: Path) -> Path:
    """Write the training state atomically (temporary file + rename), then drop all but the newest
    :data:`STATES_KEPT`: a process killed mid-save leaves the previous state intact."""
    path = out / "state" / f"step-{trainer.step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(trainer.state_dict(), tmp))
    for old in state_paths(out)[:-STATES_KEPT]:
        old.unlink()
    return path


def load_latest_state(trainer: Trainer, out: Path) -> Path | None:
    """Restore the newest readable training state (weights only, no unpickling of objects)."""
    for path in reversed(state_paths(out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file from a crash outside atomic_write: try the older one
            print(f"skipping unreadable training state {path} ({type(exc).__name__})", flush=True)
            continue
        trainer.load_state_dict(state)
        return path
    return None


def check_init_from(run: Path) -> None:
    """``--init-from`` names a train_v2 run folder with a saved state (checked before anything is written)."""
    if not run.is_dir() or not state_paths(run):
        raise ValueError(f"--init-from={str(run)!r} holds no training state; accepted: a train_v2 run folder "
                         f"(with state/step-*.pt)")


def init_from(trainer: Trainer, run: Path) -> None:
    """A later stage: the model and auxiliary head of the newest training state of another train_v2
    run folder, with a fresh optimiser, step 0 and this run's own schedule and knob draws."""
    source = Trainer(trainer.args)
    if load_latest_state(source, run) is None:
        raise ValueError(f"--init-from={str(run)!r}: no readable training state; accepted: a train_v2 run folder")
    if source.shape is not V2_SHAPE:
        raise ValueError(f"--init-from={str(run)!r} holds a stage-1 state; accepted: a run past its stage 2")
    trainer.shape = V2_SHAPE
    trainer.patch_head.load_state_dict(source.patch_head.state_dict())
    trainer._attach(source.model)
    print(f"initialised from {run} (its step {source.step}); fresh optimiser, step 0", flush=True)


def check_run_file(out: Path, args) -> None:
    """First start: record the run-defining options; a resume must repeat them."""
    run_file = out / "run.json"
    defining = {k: getattr(args, k) for k in RUN_DEFINING}
    if run_file.exists():
        saved = {**LATER_DEFAULTS, **read_json(run_file)}
        diff = {k: (saved.get(k), v) for k, v in defining.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--out={str(out)!r} holds a run started with other options "
                             f"({', '.join(f'{k}: saved {a!r}, given {b!r}' for k, (a, b) in diff.items())}); "
                             f"accepted: the same options to resume it, or another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, defining)


def export_latest(args) -> Path:
    """Export the newest training state of ``--out`` to ``--export-to`` (no training): a look at a
    run in progress without stopping it."""
    out = Path(args.out).expanduser()
    check_run_file(out, args)
    trainer = Trainer(args)
    path = load_latest_state(trainer, out)
    if path is None:
        raise ValueError(f"--out={str(out)!r} holds no training state to export; accepted: a run folder of train_v2")
    target = Path(args.export_to).expanduser()
    trainer.export(target, [])
    print(f"exported {path} (step {trainer.step}) -> {target}", flush=True)
    return target


def train(args) -> Trainer:
    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    if args.init_from and not state_paths(out):  # a resume continues its own state, whatever became of the source
        check_init_from(Path(args.init_from).expanduser())
    check_run_file(out, args)
    trainer = Trainer(args)
    resumed = load_latest_state(trainer, out)
    if resumed is None and args.init_from:
        init_from(trainer, Path(args.init_from).expanduser())
    print(f"{'resumed from ' + str(resumed) if resumed else 'new run'} at step {trainer.step}/{args.steps} "
          f"-> {out}", flush=True)
    val = data_v2.generate_split("validation", args.val_samples, seed=args.seed)
    log_path = out / "log.jsonl"
    history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    history = [h for h in history if h["step"] <= trainer.step]  # entries past the restored state are redone

    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the step, save, exit
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _run(trainer, args, out, val, history, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return trainer


def _run(trainer: Trainer, args, out: Path, val, history: list, stop: dict) -> None:
    """The training loop of one session (until the last step, a signal or ``--session-steps``)."""
    log_path = out / "log.jsonl"
    session_start = time.time()
    last_save = time.time()
    session_steps = 0
    while trainer.step < args.steps and stop["signal"] is None and session_steps < args.session_steps:
        t0 = time.time()
        info = trainer.train_step()
        trainer.elapsed_s += time.time() - t0
        session_steps += 1
        if trainer.step % args.log_every == 0 or trainer.step == 1:
            print(f"step {trainer.step} loss {info['loss']:.4f} final {info['final']:.4f} patch {info['patch']:.4f} "
                  f"knobs {info['knobs']} {(time.time() - session_start) / session_steps:.2f}s/step", flush=True)
        if trainer.step % args.val_every == 0 or trainer.step == args.steps:
            acc = trainer.validate(val)
            entry = {"step": trainer.step, "elapsed_s": round(trainer.elapsed_s, 1), "loss": info["loss"],
                     "val": {name: {"overall": r["overall"], "per_type": r["per_type"]} for name, r in acc.items()}}
            history.append(entry)
            atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
            print(f"step {trainer.step} val " + " | ".join(f"{k} {v['overall']:.3f}" for k, v in acc.items()), flush=True)
            print(f"  full per type: {json.dumps({k: round(v, 3) for k, v in acc['full']['per_type'].items()})}",
                  flush=True)
            trainer.export(out / "model", history)
        if time.time() - last_save >= args.checkpoint_minutes * 60:
            save_state(trainer, out)
            last_save = time.time()
    if session_steps:
        print(f"saved {save_state(trainer, out)}", flush=True)
    if trainer.step < args.steps:
        why = f"signal {stop['signal']}" if stop["signal"] is not None else "--session-steps"
        print(f"stopped ({why}) at step {trainer.step}; run the same command to resume", flush=True)
    else:
        print(f"done: {trainer.step} steps, {trainer.elapsed_s:.0f}s of training -> {out / 'model'}", flush=True)


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="run folder: training states, log, exported model (resumed when it holds a state)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--steps", type=at_least(1), default=12000, help="optimizer steps (the LR schedule spans them)")
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=at_least(0), default=200)
    p.add_argument("--full-share", type=float, default=0.3,
                   help="share of batches at the full configuration (the rest: uniform tier and budget, "
                        "top-k in proportion to k)")
    p.add_argument("--stage2-at", type=at_least(0), default=0,
                   help="the step stage 2 starts at (before it: stage 1, the reference run's first recipe; "
                        "the reference run used 7158)")
    p.add_argument("--full-depth-weight", type=float, default=2.0,
                   help="weight of the full depth's answer loss (every other exit weighs 1)")
    p.add_argument("--min-top-k", type=at_least(1), default=1,
                   help="stage 2: the lowest top-k drawn for the non-full batches (lower ones are served untrained, "
                        "as a MoE served below the top-k it was trained at)")
    p.add_argument("--init-from", default="",
                   help="a later stage: start from the newest training state of this train_v2 run folder (weights "
                        "and auxiliary head; fresh optimiser and schedule; needs --stage2-at 0)")
    p.add_argument("--patch-loss-weight", type=float, default=0.5, help="weight of the auxiliary patch loss")
    p.add_argument("--position-loss-weight", type=float, default=0.5,
                   help="weight of the patch row/column targets inside the auxiliary loss")
    p.add_argument("--threads", type=at_least(1), default=2, help="torch CPU threads")
    p.add_argument("--checkpoint-minutes", type=float, default=MAX_CHECKPOINT_MINUTES,
                   help=f"save the training state at most this often (0 < m <= {MAX_CHECKPOINT_MINUTES:g})")
    p.add_argument("--val-every", type=at_least(1), default=500, help="validate and export the model every N steps")
    p.add_argument("--val-samples", type=at_least(1), default=350)
    p.add_argument("--log-every", type=at_least(1), default=25)
    p.add_argument("--export-to", default=None,
                   help="export the newest state of --out as a from_pretrained checkpoint to this folder and exit")
    p.add_argument("--session-steps", type=at_least(1), default=10 ** 9,
                   help="stop this session after N steps, saving the state (the same command resumes)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "val_every", "val_samples", "log_every", "session_steps",
                 "min_top_k"):
        if getattr(args, name) < 1:
            p.exit(2, f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; accepted: an integer >= 1\n")
    if not 0 < args.checkpoint_minutes <= MAX_CHECKPOINT_MINUTES:
        p.exit(2, f"--checkpoint-minutes={args.checkpoint_minutes} is invalid; accepted: 0 < m <= "
                  f"{MAX_CHECKPOINT_MINUTES:g}\n")
    if not 0.0 <= args.full_share <= 1.0:
        p.exit(2, f"--full-share={args.full_share} is invalid; accepted: a fraction in [0, 1]\n")
    if args.min_top_k > max(V2_SHAPE.top_ks):
        p.exit(2, f"--min-top-k={args.min_top_k} is invalid; accepted: an integer in [1, {max(V2_SHAPE.top_ks)}]\n")
    if args.init_from and args.stage2_at:
        p.exit(2, f"--init-from with --stage2-at={args.stage2_at} is invalid; accepted: --stage2-at 0 (the "
                  f"initial weights are past stage 2)\n")
    for name in ("lr", "patch_loss_weight", "position_loss_weight", "full_depth_weight"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            p.exit(2, f"--{name.replace('_', '-')}={value} is invalid; accepted: a finite number >= 0\n")
    for name in ("warmup", "stage2_at"):
        if getattr(args, name) < 0:
            p.exit(2, f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; accepted: an integer >= 0\n")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        export_latest(args) if args.export_to else train(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
