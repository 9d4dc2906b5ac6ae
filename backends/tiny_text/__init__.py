"""The tiny reference text model (a 4-block GPT-NeoX, the Pythia architecture) and its documents.

The checkpoint in ``backends/tiny_text/checkpoint/`` is produced by
``python -m backends.tiny_text.train``. :func:`load_causal_lm` loads it, or any other causal LM
folder with the same layout (a real Pythia checkpoint a user has on disk), without network access.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.progress import quiet_library_bars
from backends.tiny_text.corpus import held_out_documents
from backends.checks import check_int

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def load_causal_lm(path: str | Path, device: str = "cpu", local_files_only: bool = True):
    """Load ``(model, tokenizer)`` from a ``save_pretrained`` folder (or a cached hub id), in eval mode.

    Args:
        path: the checkpoint folder (e.g. a Pythia checkpoint on disk).
        device: torch device for the model.
        local_files_only: never touch the network (default).
    """
    path_text = str(path)
    if isinstance(path, Path) and not path.is_dir():
        raise ValueError(f"checkpoint folder {path_text!r} does not exist; accepted: a save_pretrained folder "
                         "(run `python -m backends.tiny_text.train` to build the tiny model)")
    quiet_library_bars("transformers")  # no "Loading weights" bar states in a piped log
    tokenizer = AutoTokenizer.from_pretrained(path_text, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(path_text, local_files_only=local_files_only, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def load_tiny_text_model(device: str = "cpu"):
    """The committed tiny GPT-NeoX and its tokenizer, loaded offline."""
    return load_causal_lm(CHECKPOINT_DIR, device=device)


def held_out_token_documents(tokenizer, max_tokens: int | None = None) -> dict[str, list[int]]:
    """Held-out documents tokenized (name -> ids), optionally truncated to ``max_tokens``."""
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 2, where="or None: whole documents")
    docs = {}
    for name, text in held_out_documents().items():
        ids = tokenizer(text)["input_ids"]
        docs[name] = ids[:max_tokens] if max_tokens is not None else ids
    return docs


__all__ = ["CHECKPOINT_DIR", "load_causal_lm", "load_tiny_text_model", "held_out_token_documents"]
