"""How much attention a causal LM puts on the first token (StreamingLLM's attention sink), per layer.

Runs each held-out document's first ``--tokens`` tokens through the model in one forward with eager
attention and prints, per layer, the attention weight the queries at positions ``>= --from-position``
give to position 0, averaged over heads and queries, next to what a uniform spread over the visible
tokens would give it (``1 / (position + 1)``, averaged the same way). A sink is a weight far above
uniform: a layer that dumps its surplus attention there is what makes window-only eviction (which
drops position 0) collapse and ``SinkWindow`` (which keeps it) hold.

Usage: ``python -m bench.attention_sink [--model backends/tiny_text/checkpoint_v2] [--tokens 1024]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backends.script_args import OneLineArgumentParser, at_least, checkpoint_folder_arg
from backends.checks import check_int
from backends.tiny_text import held_out_token_documents, load_causal_lm, load_tiny_text_model


@torch.inference_mode()
def first_token_attention(model, ids: list[int], from_position: int) -> np.ndarray:
    """Per layer: mean attention weight on position 0 of the queries at ``from_position`` and later."""
    output = model(torch.tensor([ids]), output_attentions=True)
    return np.array([float(layer[0, :, from_position:, 0].mean()) for layer in output.attentions])


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, type=checkpoint_folder_arg, help="a causal LM checkpoint folder (default: the shipped tiny "
                        "text model)")
    parser.add_argument("--tokens", type=at_least(2), default=1024, help="tokens per held-out document (its first ones)")
    parser.add_argument("--from-position", type=at_least(0), default=128, help="first query position averaged")
    args = parser.parse_args(argv)
    try:
        check_int("--tokens", args.tokens, 2)
        check_int("--from-position", args.from_position, 1)
        if args.from_position >= args.tokens:
            raise ValueError(f"--from-position={args.from_position} must be < --tokens={args.tokens}")
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(args.model) if args.model else load_tiny_text_model()
    model.set_attn_implementation("eager")  # SDPA does not return the weights
    documents = held_out_token_documents(tokenizer, max_tokens=args.tokens)
    per_doc = np.stack([first_token_attention(model, ids, args.from_position) for ids in documents.values()
                        if len(ids) > args.from_position])
    uniform = float(np.mean(1.0 / (np.arange(args.from_position, args.tokens) + 1)))
    first = {name: tokenizer.convert_ids_to_tokens(ids[0]) for name, ids in documents.items()}
    print(f"{args.model or 'shipped tiny text model'}: {len(per_doc)} held-out documents, first {args.tokens} "
          f"tokens, queries at positions >= {args.from_position}; first tokens: {sorted(set(first.values()))}")
    print("| layer | attention on position 0 | uniform | ratio |\n|---|---|---|---|")
    for layer, weight in enumerate(per_doc.mean(axis=0)):
        print(f"| {layer} | {weight:.3f} | {uniform:.4f} | {weight / uniform:.1f}x |")


if __name__ == "__main__":
    main()
