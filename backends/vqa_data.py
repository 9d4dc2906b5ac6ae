"""Question-answering data as users keep it, read through Hugging Face ``datasets``.

Accepted forms of ``DatasetSpec.path``:

* a JSON-lines file (``.jsonl`` / ``.json``), one object per line::

      {"image": "images/0001.png", "question": "what color is the circle?", "answer": "red",
       "type": "color", "id": "q1"}

  ``image`` is a path relative to the file (omit it for text-only data); ``answer`` is one
  reference or ``answers`` a list of them (VQAv2's ten human answers); ``type`` and ``id`` are
  optional;
* a mapping ``{train: file, validation: file, test: file}`` of such files (images relative to each);
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (an ``image``
  column of the ``Image`` feature, or paths relative to the directory).

Column names are configurable (``columns={"question": "query", ...}``). Splits come from the data
when it has ``train``, ``validation`` and ``test`` (other names through ``splits={"validation":
"val"}``); data with one split (one file) is split by a seeded permutation into
``split_fractions`` (default 0.8 / 0.1 / 0.1).

Bad data: a missing file, directory or column is one :class:`DataError` naming it; an image that
cannot be read skips its sample, counted in :attr:`VQADataset.skipped` and logged once per split
through :mod:`logging` (never a crash); an empty split is a :class:`DataError`.

Scoring (:mod:`backends.scoring`): exact match after VQA normalisation for one reference, VQAv2
soft accuracy ``min(matches/3, 1)`` for several.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from backends.base import SPLITS, Sample, check_split
from backends.progress import quiet_library_bars
from backends.scoring import score_answer

log = logging.getLogger(__name__)

COLUMN_KEYS = ("image", "question", "answer", "answers", "type", "id")
_SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "train": ("train",), "test": ("test",)}


class DataError(ValueError):
    """Bad dataset input: names the file, column or split and what is accepted."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where the data is and how to read it.

    Args:
        path: a JSON-lines file, a ``{split: file}`` mapping, or a ``save_to_disk`` directory.
        columns: our column name (``image``, ``question``, ``answer``, ``answers``, ``type``,
            ``id``) -> the data's column name; unnamed ones keep our names.
        splits: our split name -> the data's split name (``save_to_disk`` dataset dicts).
        split_fractions: train / validation / test fractions of a seeded split of one-split data.
        split_seed: seed of that split's permutation (default 0).
        max_samples: read at most this many rows per split (its first ones); ``None`` = all.
    """

    path: Any
    columns: Mapping[str, str] = field(default_factory=dict)
    splits: Mapping[str, str] = field(default_factory=dict)
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path, Mapping)) or (isinstance(self.path, str) and not self.path.strip()):
            raise DataError(f"dataset={self.path!r} is invalid; accepted: a JSON-lines file, a "
                            f"{{train: file, validation: file, test: file}} mapping, or a save_to_disk directory")
        unknown = sorted(set(self.columns) - set(COLUMN_KEYS))
        if unknown:
            raise DataError(f"unknown dataset column key(s) {unknown}; accepted: {', '.join(COLUMN_KEYS)}")
        bad_splits = sorted(set(self.splits) - set(SPLITS))
        if bad_splits:
            raise DataError(f"unknown split key(s) {bad_splits} in splits; accepted: {', '.join(SPLITS)}")
        fr = tuple(self.split_fractions)
        if len(fr) != 3 or any(not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0) for f in fr) \
                or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise DataError(f"split_fractions={list(fr)!r} is invalid; accepted: three positive fractions "
                            f"(train, validation, test) summing to 1")
        if self.max_samples is not None and not (isinstance(self.max_samples, int) and self.max_samples >= 1):
            raise DataError(f"max_samples={self.max_samples!r} is invalid; accepted: an integer >= 1 or null")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise DataError(f"split_seed={self.split_seed!r} is invalid; accepted: an integer")

    def column(self, key: str) -> str:
        return self.columns.get(key, key)


def _describe(path: Any) -> str:
    return str(dict(path)) if isinstance(path, Mapping) else repr(str(path))


#: what ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top of their directory
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")


def check_dataset_paths(spec: DatasetSpec) -> None:
    """A :class:`DataError` naming the first path of ``spec`` that is missing or of a kind no reader
    takes. Cheap (no file is read), so a command checks it before any work."""
    if isinstance(spec.path, Mapping):
        files = {str(k): Path(str(v)).expanduser() for k, v in spec.path.items()}
    else:
        path = Path(str(spec.path)).expanduser()
        if path.is_dir():
            if not any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
                raise DataError(f"dataset directory {str(path)!r} is not a save_to_disk dataset (no "
                                f"{' or '.join(SAVE_TO_DISK_MARKERS)}); accepted: a directory written by "
                                f"Dataset.save_to_disk or DatasetDict.save_to_disk, or a JSON-lines file")
            return
        if path.suffix not in (".jsonl", ".json"):
            if not path.exists():
                raise DataError(f"dataset {str(path)!r} does not exist; accepted: a JSON-lines file (.jsonl), a "
                                f"{{train: file, validation: file, test: file}} mapping, or a save_to_disk directory")
            raise DataError(f"dataset {str(path)!r} is neither a JSON-lines file (.jsonl / .json) nor a "
                            f"save_to_disk directory; accepted: one of those")
        files = {"train": path}
    for split, f in files.items():
        if not f.is_file():
            raise DataError(f"dataset file {str(f)!r} (split {split!r}) does not exist; accepted: an existing "
                            f"JSON-lines file")


def _load_json_files(files: Mapping[str, Path]):
    """A ``DatasetDict`` of JSON-lines files (checked by :func:`check_dataset_paths`), one split each."""
    import datasets

    try:
        return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    except Exception as exc:  # the json builder raises several types for a malformed file
        raise DataError(f"dataset file(s) {', '.join(str(v) for v in files.values())} could not be read as JSON "
                        f"lines ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); accepted: "
                        f"one JSON object per line") from None


def _open_raw(spec: DatasetSpec) -> tuple[dict, dict]:
    """The data's splits (name -> ``datasets.Dataset``) and the base directory of each split's image paths."""
    import datasets

    quiet_library_bars("datasets")  # no "Generating ... split" bar states in a piped log
    check_dataset_paths(spec)
    if isinstance(spec.path, Mapping):
        files = {str(k): Path(str(v)).expanduser() for k, v in spec.path.items()}
        return dict(_load_json_files(files)), {k: f.parent for k, f in files.items()}
    path = Path(str(spec.path)).expanduser()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"dataset directory {str(path)!r} is not a save_to_disk dataset ({exc}); accepted: a "
                            f"directory written by Dataset.save_to_disk or DatasetDict.save_to_disk, or a "
                            f"JSON-lines file") from None
        raw = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return raw, {k: path for k in raw}
    return {"train": _load_json_files({"train": path})["train"]}, {"train": path.parent}


def _data_split_name(raw: dict, spec: DatasetSpec, split: str) -> str | None:
    if split in spec.splits:
        name = spec.splits[split]
        if name not in raw:
            raise DataError(f"splits.{split}={name!r} is not a split of dataset {_describe(spec.path)}; accepted: "
                            f"{', '.join(sorted(raw))}")
        return name
    return next((a for a in _SPLIT_ALIASES[split] if a in raw), None)


class VQADataset:
    """The samples of a user's dataset per split, and the scoring of answers (a backend ``Task``).

    Args:
        spec: the :class:`DatasetSpec`.
        needs_image: the model has a vision tower (the image column is then required).
    """

    def __init__(self, spec: DatasetSpec, needs_image: bool):
        self.spec, self.needs_image = spec, needs_image
        raw, base = _open_raw(spec)
        names = {s: _data_split_name(raw, spec, s) for s in SPLITS}
        if all(names.values()):
            self._rows = {s: (raw[names[s]], None) for s in SPLITS}
            self._base = {s: base[names[s]] for s in SPLITS}
        elif len(raw) == 1 and not spec.splits:
            (only, data), = raw.items()
            self._rows = {s: (data, idx) for s, idx in self._seeded_split(len(data)).items()}
            self._base = {s: base[only] for s in SPLITS}
        else:
            missing = [s for s in SPLITS if not names[s]]
            raise DataError(f"dataset {_describe(spec.path)} has splits {sorted(raw)} but no {', '.join(missing)}; "
                            f"accepted: train, validation and test splits (name others with "
                            f"splits={{{missing[0]}: <split>}}), or one split to be divided by split_fractions")
        self._check_columns()
        self.question_types = self._question_types()
        self.skipped: dict[str, int] = {}
        self._samples: dict[str, list[Sample]] = {}

    # ------------------------------------------------------------------------------- splits
    def _seeded_split(self, n: int) -> dict[str, np.ndarray]:
        return seeded_split(n, self.spec.split_fractions, self.spec.split_seed)

    def _check_columns(self) -> None:
        spec = self.spec
        for split in SPLITS:
            data = self._rows[split][0]
            present = list(data.column_names)
            required = ["question"] + (["image"] if self.needs_image else [])
            for key in required:
                if spec.column(key) not in present:
                    raise DataError(f"dataset {_describe(spec.path)} (split {split!r}) has no column "
                                    f"{spec.column(key)!r} ({key}); columns present: {', '.join(present)}; "
                                    f"accepted: name it with columns.{key}=<column>")
            if spec.column("answer") not in present and spec.column("answers") not in present:
                raise DataError(f"dataset {_describe(spec.path)} (split {split!r}) has neither an "
                                f"{spec.column('answer')!r} nor an {spec.column('answers')!r} column; columns "
                                f"present: {', '.join(present)}; accepted: name one with columns.answer=<column> "
                                f"or columns.answers=<column>")

    def _question_types(self) -> tuple[str, ...]:
        col = self.spec.column("type")
        found: set[str] = set()
        for split in SPLITS:
            data, idx = self._rows[split]
            if col in data.column_names:
                column = list(data[col])
                values = column if idx is None else [column[int(i)] for i in idx]
                found.update(str(v) for v in values if v is not None and str(v) != "")
        return tuple(sorted(found))

    # ------------------------------------------------------------------------------- samples
    def samples(self, split: str) -> list[Sample]:
        check_split(split)
        if split not in self._samples:
            self._samples[split] = self._read_split(split)
        return self._samples[split]

    def score(self, answer: str, sample: Sample) -> float:
        """Exact match for one reference, VQAv2 soft accuracy for several (``sample.meta['answers']``)."""
        return score_answer(answer, sample.meta.get("answers") or sample.reference)

    def _read_split(self, split: str) -> list[Sample]:
        import datasets

        spec = self.spec
        data, idx = self._rows[split]
        image_col = spec.column("image")
        if image_col in data.column_names and isinstance(data.features[image_col], datasets.Image):
            data = data.cast_column(image_col, datasets.Image(decode=False))  # decoded here, errors counted
        rows = range(len(data)) if idx is None else [int(i) for i in idx]
        if spec.max_samples is not None:
            rows = list(rows)[: spec.max_samples]
        out: list[Sample] = []
        skipped: dict[str, list[str]] = {}  # why -> the rows skipped for it (a question-less row scores nothing)
        for row_index in rows:
            row = data[row_index]
            where = f"row {row_index} (id {row.get(spec.column('id'), row_index)!r})"
            question = row.get(spec.column("question"))
            answers = self._answers(row)
            problem = ("no question" if question is None or not str(question).strip() else
                       "no reference answer" if not answers else None)
            image = None
            if problem is None and self.needs_image:
                image, unreadable = self._read_image(row.get(image_col), self._base[split])
                problem, where = ("unreadable image", unreadable) if unreadable is not None else (None, where)
            if problem is not None:
                skipped.setdefault(problem, []).append(where)
                continue
            qtype = row.get(spec.column("type"))
            out.append(Sample(
                sample_id=len(out), split=split, question=str(question),
                reference=Counter(answers).most_common(1)[0][0], image=image,
                question_type=self.question_types.index(str(qtype)) if qtype not in (None, "") and
                str(qtype) in self.question_types else -1,
                meta={"id": row.get(spec.column("id"), row_index), "answers": answers}))
        total = sum(len(v) for v in skipped.values())
        self.skipped[split] = total
        why = "; ".join(f"{len(v)} with {k} (first: {v[0]})" for k, v in skipped.items())
        if skipped:
            log.warning("dataset %s split %r: skipped %d of %d samples: %s", _describe(spec.path), split, total,
                        total + len(out), why)
        if not out:
            raise DataError(f"split {split!r} of dataset {_describe(spec.path)} is empty"
                            + (f" ({total} samples skipped: {why})" if skipped else "")
                            + "; accepted: a split with at least one sample with a question, a reference answer "
                              "and (for a vision model) a readable image (check split_fractions, splits, max_samples "
                              "and columns)")
        return out

    def _answers(self, row: dict) -> list[str]:
        many = row.get(self.spec.column("answers"))
        if many is None:
            one = row.get(self.spec.column("answer"))
            many = [] if one is None else [one]
        values = [a.get("answer") if isinstance(a, Mapping) else a for a in many]
        return [str(a) for a in values if a is not None and str(a).strip()]  # None is no answer, not "None"

    @staticmethod
    def _read_image(value: Any, base: Path) -> tuple[np.ndarray | None, str | None]:
        """The image as HxWx3 uint8, or ``(None, reason)`` when it cannot be read."""
        from PIL import Image, UnidentifiedImageError

        try:
            if value is None:
                return None, "no image"
            if isinstance(value, Mapping):  # the Image feature, undecoded: bytes and/or a path
                if value.get("bytes"):
                    source = io.BytesIO(value["bytes"])
                elif value.get("path"):
                    source = base / value["path"]
                else:
                    return None, "empty image entry"
            elif isinstance(value, (str, Path)):
                source = base / str(value)
            else:
                return None, f"image value of type {type(value).__name__}"
            with Image.open(source) as im:
                return to_rgb(im), None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            where = str(source) if "source" in locals() and not isinstance(source, io.BytesIO) else "<bytes>"
            return None, f"{where}: {type(exc).__name__}: {exc}"


def to_rgb(im) -> np.ndarray:
    """A PIL image as HxWx3 uint8 with its intensities kept: 16-bit modes (``I;16*``, ``I`` holding
    16-bit values) are scaled from 0-65535, transparent pixels are composited on white; a mode
    whose range is unknown (``F``, ``I`` beyond 16 bits) is a ``ValueError`` (the row is skipped,
    counted and named)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"image mode {im.mode} with values beyond 16 bits ({values.min():g}..{values.max():g}); "
                             f"accepted: 8- or 16-bit images")
        gray = np.round(values / 257.0).astype(np.uint8)  # 65535 -> 255
        return np.repeat(gray[..., None], 3, axis=2).copy()
    if im.mode == "F":
        raise ValueError("image mode F (floating point, range unknown); accepted: 8- or 16-bit images")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
def seeded_split(n: int, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Row indices ``0..n-1`` divided into train / validation / test by a seeded permutation, in
    proportions ``fractions`` (each split's indices sorted): one-split data made into three."""
    order = np.random.default_rng(seed).permutation(n)
    _, f_val, f_test = fractions
    n_val, n_test = round(f_val * n), round(f_test * n)
    n_train = n - n_val - n_test
    return {"train": np.sort(order[:n_train]), "validation": np.sort(order[n_train:n_train + n_val]),
            "test": np.sort(order[n_train + n_val:])}


def dataset_spec_from_options(dataset: Any, **options: Any) -> DatasetSpec:
    """A :class:`DatasetSpec` from the backend options (unknown keys: one error listing the accepted ones)."""
    accepted = [f.name for f in dataclasses.fields(DatasetSpec) if f.name != "path"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"unknown dataset option(s) {unknown}; accepted: {', '.join(accepted)}")
    options = {k: v for k, v in options.items() if v is not None or k == "max_samples"}
    for key in ("columns", "splits"):
        if key in options:
            options[key] = dict(options[key] or {})
    if "split_fractions" in options:
        options["split_fractions"] = tuple(options["split_fractions"])
    return DatasetSpec(path=dict(dataset) if isinstance(dataset, Mapping) else dataset, **options)
