"""Where a KV env's model and documents come from: the tiny reference model, a checkpoint folder, or
any model spec the HF backend accepts; the shipped held-out text, or the user's text through HF ``datasets``.

Documents (:func:`read_text_documents`), as the VQA backend reads data (:mod:`backends.vqa_data`):

* a plain-text file (``.txt`` / ``.text`` / ``.md``): the whole file is one document;
* a JSON-lines file (``.jsonl`` / ``.json``): one document per row, its text in ``column``;
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: one document per
  row (every split of a dict, in its order), its text in ``column``.

A missing path, an unknown column, a non-text value or no text at all is one
:class:`~backends.vqa_data.DataError` naming it, raised before any model is loaded.

Model (:func:`load_kv_model`): ``model_spec`` is what ``backend.model`` and its siblings are for the
HF backend (a dict of :class:`~backends.loading.ModelSpec` keys: ``model``, ``revision``,
``precision``, ``device``, ``device_map``, ``quantization``, ``attn_implementation``, ...; or just the
model string), loaded by :func:`backends.loading.load_model` (offline, revision recorded); a
``model_path`` is a causal LM folder loaded in fp32 on the CPU as before; neither is the tiny
reference model. Loaded once per process per spec.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from backends.checks import checkpoint_folder
from backends.vqa_data import DataError, _load_json_files

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


def read_text_documents(dataset: Any, column: str = "text") -> list[str]:
    """The documents of ``dataset`` (see the module docstring), in file / row order."""
    import datasets

    path, kind = dataset_kind(dataset, column)
    if kind == "text":
        return _non_empty([path.read_text(encoding="utf-8", errors="replace")], path)
    if kind == "save_to_disk":
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"dataset directory {str(path)!r} is not a save_to_disk dataset ({exc}); accepted: a "
                            "directory written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
        parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    else:
        parts = [_load_json_files({"train": path})["train"]]
    texts = []
    for part in parts:
        if column not in part.column_names:
            raise DataError(f"text_column={column!r} is not a column of dataset {str(path)!r}; accepted: "
                            f"{', '.join(part.column_names)}")
        for row, value in enumerate(part[column]):
            if not isinstance(value, str):
                raise DataError(f"dataset {str(path)!r} row {row} column {column!r} is {type(value).__name__}, "
                                "not text; accepted: a string per row")
            texts.append(value)
    return _non_empty(texts, path)


def dataset_kind(dataset: Any, column: str = "text") -> tuple[Path, str]:
    """``(path, kind)`` of ``dataset``, kind ``"text"``, ``"jsonl"`` or ``"save_to_disk"``, from the path
    alone (no text read): a bad value, a missing path or a file of another kind is a :class:`DataError`."""
    if not isinstance(dataset, (str, Path)) or not str(dataset).strip():
        raise DataError(f"dataset={dataset!r} is invalid; accepted: a text file, a JSON-lines file or a "
                        "save_to_disk directory")
    if not isinstance(column, str) or not column:
        raise DataError(f"text_column={column!r} is invalid; accepted: a column name")
    path = Path(str(dataset)).expanduser()
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise DataError(f"dataset file {str(path)!r} does not exist; accepted: an existing text file")
        return path, "text"
    if path.is_dir():
        return path, "save_to_disk"
    if path.suffix in JSON_SUFFIXES and path.is_file():
        return path, "jsonl"
    if not path.exists():
        raise DataError(f"dataset {str(path)!r} does not exist; accepted: a text file ({', '.join(TEXT_SUFFIXES)}), "
                        f"a JSON-lines file ({', '.join(JSON_SUFFIXES)}) or a save_to_disk directory")
    raise DataError(f"dataset {str(path)!r} is none of a text file ({', '.join(TEXT_SUFFIXES)}), a JSON-lines "
                    f"file ({', '.join(JSON_SUFFIXES)}) or a save_to_disk directory; accepted: one of those")


def _non_empty(texts: list[str], path: Path) -> list[str]:
    kept = [text for text in texts if text.strip()]
    if not kept:
        raise DataError(f"dataset {str(path)!r} holds no text; accepted: at least one non-empty document")
    return kept


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens added beyond what the tokenizer adds itself)."""
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def check_kv_sources(model_path: Any = None, model_spec: Mapping | str | None = None, dataset: Any = None,
                     text_column: str = "text") -> None:
    """The cheap checks of a KV env's sources (no weights or text read), which loading makes too: a
    command runs them before any work, so a missing model folder or dataset is one line. A
    ``ValueError`` (``DataError``, ``ModelNotAvailableError``) naming the value and what is accepted."""
    if model_spec is not None:
        from backends.loading import resolve_model_path

        resolve_model_path(_model_spec(model_path, model_spec))  # a local folder, or a hub id in the cache
    elif model_path is not None:
        model_folder(model_path)
    if dataset is not None:
        dataset_kind(dataset, text_column)


def model_folder(model_path: Any) -> Path:
    """``model_path`` as an existing checkpoint folder (:func:`backends.checks.checkpoint_folder`); a hub id
    is refused with a pointer to ``model_spec``."""
    return checkpoint_folder("model_path", model_path, not_a_folder_hint=" (a hub id goes in model_spec=<id>)")


def _model_spec(model_path: Any, model_spec: Mapping | str):
    """The :class:`~backends.loading.ModelSpec` of ``model_spec`` (validated; no file read)."""
    from backends.loading import model_spec_from_dict

    if model_path is not None:
        raise ValueError("model_path and model_spec were both given; accepted: one of them (model_spec takes the "
                         "HF backend's keys: model, precision, device, quantization, ...)")
    options = {"model": model_spec} if isinstance(model_spec, (str, Path)) else model_spec
    if not isinstance(options, Mapping):
        raise ValueError(f"model_spec={model_spec!r} is invalid; accepted: a model string or a dict of the HF "
                         "backend's model keys (model, precision, device, quantization, ...)")
    options = dict(options)
    if isinstance(options.get("quantization"), str):  # the CLI's short form: quantization=nf4
        options["quantization"] = {"enabled": True, "quant_type": options["quantization"]}
    return model_spec_from_dict(options)


def load_kv_model(model_path: str | None = None, model_spec: Mapping | str | None = None):
    """``(model, tokenizer)`` of a KV env (see the module docstring); a bad spec is a one-line ``ValueError``."""
    if model_spec is None:
        return _load_path(None if model_path is None else str(model_folder(model_path)))
    spec = _model_spec(model_path, model_spec)  # checked here, before any loading
    return _load_spec(json.dumps(spec.as_dict(), sort_keys=True, default=str))


@lru_cache(maxsize=2)
def _load_path(model_path: str | None):
    # Loaded once per process and path: every env instance shares the weights (read-only use).
    from backends.tiny_text import CHECKPOINT_DIR, load_causal_lm

    return load_causal_lm(model_path if model_path is not None else CHECKPOINT_DIR)


@lru_cache(maxsize=2)
def _load_spec(spec_json: str):
    from backends.loading import ModelSpec, QuantizationSpec, load_model

    options = json.loads(spec_json)
    spec = ModelSpec(quantization=QuantizationSpec(**options.pop("quantization")), **options)
    loaded = load_model(spec)
    return loaded.model, loaded.tokenizer
