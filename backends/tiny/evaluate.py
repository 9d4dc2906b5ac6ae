"""Accuracy table of the tiny reference model: ``python -m backends.tiny.evaluate [--model DIR]``.

Exact match on the held-out test split of the task the checkpoint was trained on (v1 or v2, from
its ``config.json``) for the full configuration (overall and per question type, next to the
question-only baseline), the cheapest configuration, and each knob reduced on its own (tier, token
budget, top-k, depth), then the accuracy targets (full >= 80%, cheapest >= 15 points below full,
each knob alone at its cheapest >= 3 points below full) with whether each holds, and the full /
cheapest / each-knob-alone accuracy per question type. ``--write-card`` puts the table into the
checkpoint's README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from backends.script_args import OneLineArgumentParser, at_least
from backends.io import atomic_write_text
from backends.knobs import KnobConfig, KnobSpace, knob_space_from_model
from backends.tiny.tasks import task_of
from backends.tiny.train import evaluate_config

from backends.tiny import CHECKPOINT_DIR
TABLE_BEGIN, TABLE_END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"


def tiny_knob_space(model) -> KnobSpace:
    """The knob space of a tiny checkpoint, tiers ordered from fewest to most vision tokens.

    (``config.json`` stores dict keys sorted by name, so the saved tier order is alphabetical.)
    """
    tiers = dict(sorted(model.config.knobgym["tiers"].items(), key=lambda kv: kv[1]))
    return knob_space_from_model(model, tiers=tiers)


def load_checkpoint(path=CHECKPOINT_DIR, experts_implementation: str | None = None):
    """``(model, tokenizer, knob_space)`` from a local checkpoint directory, offline, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a tiny checkpoint directory (no config.json); accepted: a directory "
                         f"written by `python -m backends.tiny.train`")
    kwargs = {"local_files_only": True}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = {"text_config": experts_implementation}
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, tiny_knob_space(model)


def knob_sweep(space: KnobSpace) -> list[tuple[str, KnobConfig]]:
    """Full, cheapest, and each knob reduced on its own (to each of its values) from full."""
    full = space.full()
    rows = [("full", full), ("cheapest", space.cheapest())]
    rows += [(f"tier={t}", full.replace(tier=t)) for t in reversed(space.tier_names[:-1])]
    rows += [(f"budget={b:g}", full.replace(token_budget=b)) for b in sorted(space.token_budgets, reverse=True)[1:]]
    rows += [(f"top_k={k}", full.replace(top_k=k)) for k in sorted(space.top_ks, reverse=True)[1:]]
    rows += [(f"depth={d}", full.replace(depth=d)) for d in sorted(space.depths, reverse=True)[1:]]
    return rows


def target_configs(space: KnobSpace) -> list[tuple[str, KnobConfig]]:
    """Full, cheapest, and each knob alone at its cheapest setting (the rows the targets name)."""
    full, cheap = space.full(), space.cheapest()
    return [("full", full), ("cheapest", cheap)] + [
        (f"budget={cheap.token_budget:g}" if knob == "token_budget" else f"{knob}={getattr(cheap, knob)}",
         full.replace(**{knob: getattr(cheap, knob)})) for knob in ("tier", "token_budget", "top_k", "depth")]


#: the accuracy targets of a reference checkpoint (points of exact match)
FULL_TARGET, CHEAPEST_GAP, KNOB_GAP = 80.0, 15.0, 3.0


def accuracy_table(model, tokenizer, space, n_test: int | None = None, n_train_baseline: int = 20000,
                   seed: int = 0, task=None) -> str:
    """Markdown accuracy table (full vs question-only per type, the knob sweep, the targets)."""
    task = task or task_of(getattr(model.config, "knobgym", None))
    question_types = task.QUESTION_TYPES
    test = task.generate_split("test", n_test, seed=seed)
    baseline = task.question_only_baseline(task.generate_split("train", n_train_baseline, seed=seed), test)
    configs = dict(knob_sweep(space) + target_configs(space))
    results = {name: (knobs, evaluate_config(model, tokenizer, test, knobs, space, question_types))
               for name, knobs in configs.items()}
    full = results["full"][1]
    lines = [f"Held-out test split: {len(test)} samples (seed {seed}); exact match after VQA normalisation. "
             f"Question-only baseline: most frequent train answer per question text ({n_train_baseline} train samples).",
             "", "| question type | n | full config | question-only | gap |", "|---|---|---|---|---|"]
    counts = {t: sum(question_types[s.question_type] == t for s in test) for t in question_types}
    for t in question_types:
        f, b = full["per_type"].get(t, float("nan")), baseline["per_type"].get(t, float("nan"))
        lines.append(f"| {t} | {counts[t]} | {100 * f:.1f} | {100 * b:.1f} | {100 * (f - b):+.1f} |")
    lines.append(f"| **overall** | {len(test)} | **{100 * full['overall']:.1f}** | **{100 * baseline['overall']:.1f}** "
                 f"| **{100 * (full['overall'] - baseline['overall']):+.1f}** |")
    lines += ["", "| configuration | knobs | vision tokens | exact match | vs full |", "|---|---|---|---|---|"]
    for name, (knobs, acc) in results.items():
        lines.append(f"| {name} | {knobs} | {space.vision_tokens(knobs)} | {100 * acc['overall']:.1f} | "
                     f"{100 * (acc['overall'] - full['overall']):+.1f} |")
    targets = target_configs(space)
    lines += ["", "| question type | " + " | ".join(name for name, _ in targets) + " |",
              "|---" * (len(targets) + 1) + "|"]
    for t in question_types:
        lines.append(f"| {t} | " + " | ".join(f"{100 * results[name][1]['per_type'].get(t, float('nan')):.1f}"
                                             for name, _ in targets) + " |")
    lines += ["", f"Targets ({len(test)} test samples" + ("; the targets are stated on at least 1000" if len(test) < 1000
                                                      else "") + "):"] + target_lines({name: 100 * results[name][1]["overall"] for name, _ in targets})
    return "\n".join(lines)


def target_lines(acc: dict) -> list[str]:
    """One line per accuracy target, with the measured figure and whether it holds."""
    full = acc["full"]
    lines = [f"- full {full:.1f}% >= {FULL_TARGET:g}%: {'met' if full >= FULL_TARGET else 'NOT met'}",
             f"- cheapest {acc['cheapest']:.1f}% is {full - acc['cheapest']:.1f} points below full "
             f"(>= {CHEAPEST_GAP:g}): {'met' if full - acc['cheapest'] >= CHEAPEST_GAP else 'NOT met'}"]
    for name, value in acc.items():
        if name not in ("full", "cheapest"):
            lines.append(f"- {name} alone {value:.1f}% is {full - value:.1f} points below full (>= {KNOB_GAP:g}): "
                         f"{'met' if full - value >= KNOB_GAP else 'NOT met'}")
    return lines


def write_table_into_card(card: Path, table: str) -> None:
    """Replace the text between the table markers of the model card (atomically)."""
    text = card.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"{card} has no {TABLE_BEGIN} ... {TABLE_END} markers to put the table between")
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    atomic_write_text(card, f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(CHECKPOINT_DIR))
    p.add_argument("--n-test", type=at_least(1), default=None, help="test samples (default: the whole split)")
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--write-card", action="store_true", help="write the table into <model>/README.md")
    args = p.parse_args(argv)
    if args.n_test is not None and args.n_test < 1:
        p.exit(2, f"error: --n-test={args.n_test} is invalid; accepted: an integer >= 1 (or omit it: the whole split)\n")
    if args.threads < 1:
        p.exit(2, f"error: --threads={args.threads} is invalid; accepted: an integer >= 1\n")
    if not (Path(args.model) / "config.json").is_file():
        p.exit(2, f"error: --model={args.model!r} is not a checkpoint folder; accepted: a folder with config.json "
                  f"written by the tiny model's training (default {CHECKPOINT_DIR})\n")
    torch.set_num_threads(args.threads)
    model, tokenizer, space = load_checkpoint(args.model)
    table = accuracy_table(model, tokenizer, space, n_test=args.n_test)
    print(table)
    if args.write_card:
        write_table_into_card(Path(args.model) / "README.md", table)


if __name__ == "__main__":
    main()
