"""The run-folder lock: one training process writes a run folder at a time.

``<run>/run.lock`` is created and held with ``fcntl.flock`` for as long as a process trains in the
folder, and holds who that is (pid, host, start time, command) as JSON. The kernel drops an
``flock`` when its process ends, however it ends, so a lock file left by a killed process is
stale: the next process takes it over and says so. A second process while the first still holds
it gets :class:`RunFolderLocked`, naming the holder.

    with RunLock(run_dir) as lock:      # RunFolderLocked if another process trains here
        ...                             # lock.took_over: the stale holder's record, if any

Where ``flock`` is not supported (some network file systems) the lock falls back to the record:
a holder on this host whose pid is no longer running is stale; one on another host is taken as
alive (delete ``run.lock`` by hand once that process is gone).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from backends.io import open_no_follow
from knobgym_cli.usage import UsageError

LOCK_NAME = "run.lock"


class RunFolderLocked(UsageError):
    """Another live process trains in this run folder."""


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def describe_holder(record: dict[str, Any]) -> str:
    """``pid N on host H since T (command)`` from a lock record."""
    if not record.get("pid"):
        return "another process (its lock record is not written yet)"
    return (f"pid {record.get('pid')} on host {record.get('host')!r} since {record.get('started')}"
            + (f" ({record.get('command')})" if record.get("command") else ""))


class RunLock:
    """The lock of one run folder (see the module docstring); a context manager.

    Attributes:
        path: ``<run_dir>/run.lock``.
        took_over: the record of a stale holder this lock replaced (``None`` when there was none).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunFolderLocked` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)  # a planted link is refused, not followed
            try:
                locked = self._flock(fd)
                previous = self._read(fd)
                if locked is False or (locked is None and self._held_by_other(previous)):
                    raise RunFolderLocked(
                        f"run folder {str(self.path.parent)!r} is in use by {describe_holder(previous or {})}; "
                        f"accepted: wait for that run to finish (or stop it), or train in another folder "
                        f"(resume=<another run>, or a fresh run)")
                if locked and not self._same_file(fd):  # the holder released (and deleted) it meanwhile
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            break
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
        self._fd = fd
        self._write(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                         "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]})
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (a folder removed meanwhile is fine)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()

    def stale_message(self) -> str | None:
        """One line saying which stale lock was taken over, or ``None``."""
        if not self.took_over:
            return None
        return (f"took over the stale lock of run folder {str(self.path.parent)!r} left by "
                f"{describe_holder(self.took_over)}, which is no longer running")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: flock unsupported here."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise

    @staticmethod
    def _held_by_other(record: dict[str, Any] | None) -> bool:
        """Without flock: whether ``record`` names a live process other than this one."""
        if not record or record.get("pid") == os.getpid():
            return False
        if record.get("host") != socket.gethostname():
            return True
        return pid_alive(record.get("pid"))

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        if not data.strip():
            return None
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return {"pid": None, "host": None, "started": None, "command": "an unreadable lock record"}
        return record if isinstance(record, dict) else None

    @staticmethod
    def _write(fd: int, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)
