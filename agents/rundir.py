"""One process per run directory: an exclusive lock held for the run's whole life.

:func:`lock_run_dir` takes ``RUN_DIR/.lock``; a second process that tries to train, resume, evaluate
or sample from the same run directory meanwhile is refused with :class:`RunDirLockedError`, one line
naming the holder (pid, host, start time and command). The lock is released by
:meth:`RunDirLock.release` (the :class:`~agents.trainer.Trainer` does that in ``close()``, and when it
is garbage-collected) and, whatever happens, when the holding process ends.

Mechanism: an advisory ``flock`` on the lock file, which the kernel drops when the process dies
(a SIGKILL included), so a lock left by a killed run is no lock at all: the next process takes it
over and says so (:attr:`RunDirLock.took_over` holds the dead holder's record). Unlike a pid check
this cannot be fooled by a reused pid and has no takeover race: two processes that find the same
stale file cannot both get the ``flock``. The record (JSON: pid, host, started, command) is only
for the message. Releasing unlinks the file while still holding the lock; a process that opened
the old file meanwhile notices (its descriptor no longer names ``RUN_DIR/.lock``) and tries again.

Within one process the lock is re-entrant (counted): a process is trusted to order its own
trainers (e.g. train, then resume in the same notebook). Where ``fcntl`` does not exist (Windows)
the lock falls back to create-exclusive plus a liveness check of the recorded pid on this host.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

_HELD: dict[str, RunDirLock] = {}  # realpath of a run directory -> this process's lock on it
_HELD_GUARD = threading.Lock()


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory's lock. ``holder``: its record (may be empty)."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv)[:300],
    }


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-01-01T00:00:00Z (command: ...)``, from a lock record."""
    if not holder:
        return "another process (its record is not written yet)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
    if holder.get("command"):
        text += f" (command: {holder['command']})"
    return text


def _read_record(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass
class RunDirLock:
    """A held lock on ``run_dir`` (see the module docstring). ``took_over``: the record of a dead
    holder whose lock file was found and replaced (empty when there was none)."""

    run_dir: Path
    fd: int
    record: dict[str, Any]
    took_over: dict[str, Any] = field(default_factory=dict)
    count: int = 1

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        """Drop one hold; the last one unlinks the file and unlocks (idempotent after that)."""
        with _HELD_GUARD:
            if self.fd < 0:
                return
            self.count -= 1
            if self.count > 0:
                return
            _HELD.pop(os.path.realpath(self.run_dir), None)
            try:  # unlink while still locked: whoever opened this file meanwhile will see it is gone
                if _same_file(self.fd, self.path):
                    os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _refused(run_dir: Path, holder: dict[str, Any]) -> RunDirLockedError:
    return RunDirLockedError(
        f"run directory {run_dir} is in use by {describe_holder(holder)}; wait for that run to finish "
        "(or stop it), or choose another run directory",
        holder,
    )


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


def _acquire_flock(run_dir: Path, timeout_s: float) -> RunDirLock:
    path = run_dir / LOCK_NAME
    deadline = time.monotonic() + timeout_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = _read_record(fd)
            for _ in range(20):  # the holder may be between taking the lock and writing its record
                if holder:
                    break
                time.sleep(0.025)
                holder = _read_record(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise _refused(run_dir, holder) from None
        if not _same_file(fd, path):  # the previous holder unlinked it between our open and flock
            os.close(fd)
            continue
        previous = _read_record(fd)  # a record in an unlocked file: its process died without releasing
        record = _record()
        _write_record(fd, record)
        return RunDirLock(run_dir, fd, record, took_over=previous)


def _acquire_exclusive(run_dir: Path, timeout_s: float) -> RunDirLock:  # pragma: no cover - no fcntl
    path = run_dir / LOCK_NAME
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
                stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.replace(path, stale)
                    os.unlink(stale)
                except OSError:
                    pass
                continue
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise _refused(run_dir, holder) from None
        record = _record()
        _write_record(fd, record)
        return RunDirLock(run_dir, fd, record)


def lock_run_dir(run_dir: str | os.PathLike, *, timeout_s: float = 0.0) -> RunDirLock:
    """Create ``run_dir`` if needed and take its lock, waiting up to ``timeout_s`` for a live holder.

    Raises :class:`RunDirLockedError` (one line naming the holder) when another live process holds it.
    Call :meth:`RunDirLock.release` when done (the process ending releases it too).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held.held:
            held.count += 1
            return held
    lock = (_acquire_flock if fcntl is not None else _acquire_exclusive)(run_dir, timeout_s)
    with _HELD_GUARD:
        _HELD[key] = lock
    if lock.took_over and lock.took_over.get("pid") != os.getpid():
        warnings.warn(f"run directory {run_dir}: took over the lock of {describe_holder(lock.took_over)}, which "
                      "is no longer running", UserWarning, stacklevel=2)  # fmt: skip
    return lock
