"""Requests as users keep them: a JSON-lines file (read and checked before any model loads), or the
fields of an HTTP request (an uploaded or base64 image).

A requests file has the datasets format of :mod:`backends.vqa_data`, one object per line::

    {"image": "images/0001.png", "question": "what color is the circle?", "answer": "red", "type": "color", "id": "q1"}

``image`` is relative to the file; ``answer`` (one reference) or ``answers`` (several) are optional
and only make the report give a score; ``type``, ``id`` and ``budget`` (this request's own budget)
are optional. A bad line (not JSON, no question, an image that is missing or unreadable, a bad
budget) is one :class:`RequestError` naming the file, the line and what is accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from backends.vqa_data import VQADataset
from serving.controller import Request, parse_request_budget

FIELDS = ("image", "question", "answer", "answers", "type", "id", "budget")


class RequestError(ValueError):
    """A bad request or requests file: names the file and line (or the field) and what is accepted."""


def read_requests(path: str | Path, needs_image: bool = True) -> list[Request]:
    """The requests of JSON-lines file ``path`` (images decoded, budgets parsed), or a :class:`RequestError`."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"requests={str(path)!r} does not exist; accepted: a JSON-lines file (one request per "
                           f"line: image, question, optional answer / answers, type, id, budget)")
    requests = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError(f"requests={str(path)!r} cannot be read ({type(exc).__name__}); accepted: a UTF-8 "
                           f"JSON-lines file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{where} is not JSON ({exc.msg}); accepted: one JSON object per line") from None
        requests.append(request_from_fields(row, where, image_base=path.parent, needs_image=needs_image,
                                            default_id=number))
    if not requests:
        raise RequestError(f"requests={str(path)!r} holds no request; accepted: at least one JSON line")
    return requests


def request_from_fields(row: Any, where: str, *, image_base: Path | None = None, image: np.ndarray | None = None,
                        needs_image: bool = True, default_id: Any = None) -> Request:
    """A :class:`Request` from one JSON object (a requests-file line or an HTTP body), checked.

    ``image`` (already decoded pixels) replaces the row's ``image`` field; otherwise the field is a
    path relative to ``image_base`` (a requests file) or, without a base, base64 bytes (HTTP).
    """
    if not isinstance(row, dict):
        raise RequestError(f"{where} is a {type(row).__name__}; accepted: a JSON object with question and image")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise RequestError(f"{where} has unknown field(s) {unknown}; accepted: {', '.join(FIELDS)}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(f"{where}: question={question!r} is missing or empty; accepted: a non-empty string")
    if image is None and row.get("image") is not None:
        image = (_image_file(row["image"], image_base, where) if image_base is not None
                 else decode_image_base64(row["image"], where))
    if needs_image and image is None:
        raise RequestError(f"{where} has no image; accepted: an image (this model has a vision tower)")
    answers = row.get("answers", [row["answer"]] if row.get("answer") is not None else [])
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) for a in answers):
        raise RequestError(f"{where}: answers={answers!r} is invalid; accepted: a list of strings")
    budget = row.get("budget")
    if budget is not None:
        try:
            parse_request_budget(budget)
        except ValueError as exc:
            raise RequestError(f"{where}: {exc}") from None
    qtype = row.get("type")
    return Request(question=question, image=image, budget=budget, answers=tuple(str(a) for a in answers),
                   question_type=None if qtype is None else str(qtype), id=row.get("id", default_id))


def _image_file(value: Any, base: Path, where: str) -> np.ndarray:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: image={value!r} is invalid; accepted: a path relative to the requests file")
    pixels, problem = VQADataset._read_image(value, base)  # the datasets format's one image reader
    if problem is not None:
        raise RequestError(f"{where}: image {value!r} cannot be read ({problem}); accepted: an image file "
                           f"(PNG, JPEG, ...) relative to the requests file")
    return pixels


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """HxWx3 uint8 pixels of encoded image bytes (PNG, JPEG, ...), or a :class:`RequestError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RequestError(f"{where}: the image cannot be read ({type(exc).__name__}); accepted: an image file "
                           f"(PNG, JPEG, ...)") from None


def decode_image_base64(value: Any, where: str) -> np.ndarray:
    """Pixels of a base64 string of image bytes (a ``data:image/...;base64,`` prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: image is not a base64 string; accepted: the image file's bytes in base64")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: image is not valid base64; accepted: the image file's bytes in base64") from None
    return decode_image_bytes(data, where)
