"""The one I/O module: atomic writes, checksummed files, and data-only tensor files.

Every file knobgym writes for later reading (run checkpoints, reports, latency profiles and
estimators, traces, model-training checkpoints) goes through here, so that:

- a killed process leaves either the old file or the new one, never half of one (each write goes
  to a temporary file in the target folder, then ``os.replace``);
- a file that was cut short or edited is detected on read (:class:`CorruptFileError`, naming the
  file) instead of being used as is: checksummed files carry the SHA-256 of their payload;
- nothing is ever unpickled: tensors are stored with safetensors, everything else as JSON.

It lives in ``backends`` (the lowest layer) so that backends, latency_model, envs, agents and the
CLI can all use it without an upward dependency.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

CHECKSUM_KEY = "sha256"


class CorruptFileError(ValueError):
    """A file that is not what knobgym wrote: truncated, edited, or of another format.

    A ``ValueError`` so the CLI reports it as one line naming the file.
    """

    def __init__(self, path: str | Path, why: str):
        self.path = Path(path)
        super().__init__(f"{str(path)!r} is not a valid knobgym file: {why}")


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
class SymlinkRefused(ValueError):
    """A write aimed at a symbolic link (knobgym never writes through one, nor replaces one)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        super().__init__(f"refusing to write {str(path)!r}: it is a symbolic link (to {os.readlink(path)!r}); "
                         f"accepted: a regular file or no file there (remove the link)")


def refuse_symlink(path: str | Path) -> Path:
    """``path``, or :class:`SymlinkRefused` when it is a symbolic link (checked with ``lstat``)."""
    path = Path(path)
    if path.is_symlink():
        raise SymlinkRefused(path)
    return path


def open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``: :class:`SymlinkRefused` when ``path`` is a symbolic link."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefused(path) from None
        raise


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it onto ``path``.

    On any exception the temporary file is removed and ``path`` keeps its previous content. A
    ``path`` that is a symbolic link is refused (:class:`SymlinkRefused`), not replaced.
    """
    path = refuse_symlink(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Pretty, key-sorted JSON (values JSON cannot hold are written with ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_savefig(figure, path: str | Path, **kwargs: Any) -> Path:
    """``figure.savefig`` atomically (format from the target's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format=fmt, **kwargs))


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh staging folder with ``write(staging)``, then swap it in for ``target``.

    A write that raises leaves the previous ``target`` untouched and no staging folder behind.
    """
    target = refuse_symlink(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp creates it private; a written folder (a checkpoint) is meant to be shared
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------
# checksums
# ------------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True).encode("utf-8")


def write_checksummed_json(path: str | Path, payload: Any) -> Path:
    """Write ``{"payload": payload, "sha256": <digest of the canonical payload>}`` atomically."""
    wrapped = {"payload": payload, CHECKSUM_KEY: sha256_bytes(_canonical_json(payload))}
    return atomic_write_text(path, json.dumps(wrapped, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """The parsed JSON of ``path``; :class:`CorruptFileError` naming it when missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "file does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"not JSON ({exc.__class__.__name__}: cut short or edited)") from None


def read_checksummed_json(path: str | Path) -> Any:
    """The payload of a :func:`write_checksummed_json` file; :class:`CorruptFileError` otherwise."""
    wrapped = read_json(path)
    if not isinstance(wrapped, dict) or "payload" not in wrapped or CHECKSUM_KEY not in wrapped:
        raise CorruptFileError(path, "no checksummed payload")
    if sha256_bytes(_canonical_json(wrapped["payload"])) != wrapped[CHECKSUM_KEY]:
        raise CorruptFileError(path, "checksum mismatch (the file was edited or damaged)")
    return wrapped["payload"]


# ------------------------------------------------------------------------------------------------
# tensors: safetensors + JSON metadata, never pickle
# ------------------------------------------------------------------------------------------------
_META_KEY = "knobgym"


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: Any = None) -> Path:
    """Write torch tensors and JSON ``metadata`` to one safetensors file, atomically, with a checksum.

    The checksum covers the tensor bytes and the metadata, so a truncated or edited file is
    detected by :func:`load_tensors`.
    """
    import torch
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(metadata, sort_keys=True, default=str)
    digest = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        digest.update(name.encode("utf-8"))
        digest.update(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes() if tensors[name].numel() else b"")
    data = save(tensors, metadata={_META_KEY: meta_json, CHECKSUM_KEY: digest.hexdigest()})
    return atomic_write_bytes(path, data)


#: the largest safetensors header read (a header names tensors and holds the JSON metadata)
MAX_HEADER_BYTES = 100 << 20


def _safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its header alone, after checking that
    the header's length and the tensors' extents add up to the file's size exactly;
    :class:`CorruptFileError` otherwise (nothing but the header has been read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CorruptFileError(path, f"not a safetensors file ({size} bytes, header length {length}: cut short "
                                         f"or of another format)")
        try:
            header = json.loads(f.read(length))
            extents = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            raise CorruptFileError(path, "not a safetensors file (unreadable header: cut short or of another "
                                         "format)") from None
    if 8 + length + max(extents, default=0) != size:
        raise CorruptFileError(path, f"not a safetensors file ({size} bytes, its header describes "
                                     f"{8 + length + max(extents, default=0)}: cut short or extended)")
    return header.get("__metadata__") or {}


def load_tensors(path: str | Path) -> tuple[dict[str, Any], Any]:
    """``(tensors, metadata)`` of a :func:`save_tensors` file; :class:`CorruptFileError` otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "file does not exist")
    header = _safetensors_metadata(path)  # sizes and header first: a file of another kind is never read whole
    data = path.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise CorruptFileError(path, f"not a safetensors file ({exc.__class__.__name__}: cut short or "
                                     f"of another format)") from None
    if _META_KEY not in header or CHECKSUM_KEY not in header:
        raise CorruptFileError(path, "no knobgym metadata or checksum")
    digest = hashlib.sha256(header[_META_KEY].encode("utf-8"))
    for name in sorted(tensors):
        digest.update(name.encode("utf-8"))
        digest.update(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes() if tensors[name].numel() else b"")
    if digest.hexdigest() != header[CHECKSUM_KEY]:
        raise CorruptFileError(path, "checksum mismatch (the file was edited or damaged)")
    return tensors, json.loads(header[_META_KEY])
