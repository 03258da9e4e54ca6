"""Expected failures of a command-line run, as one line ("what failed; what to do") and an exit code.

:func:`classify` maps an exception to a :class:`Failure` when it is one a user can meet and fix without
reading code — missing weights, no checkpoint, a locked run directory, permission denied, a full disk,
an unreachable reward server, a bad config or reward option — and returns None for anything else (a
bug: the CLI then shows the traceback). It looks through the exception's chain (``__cause__`` /
``__context__``), so a :class:`rewards.RewardError` caused by a server failure, or a ``ValueError``
caused by a ``PermissionError``, is recognised by its cause.

Exit codes (distinct, so scripts can react): see :data:`EXIT_CODES`. Nothing a run wrote before the
failure is touched here; each message says how to continue.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

EXIT_CONFIG = 2  # also argparse's code for bad usage
EXIT_MISSING_MODEL = 3
EXIT_NO_CHECKPOINT = 4
EXIT_LOCKED = 5
EXIT_PERMISSION = 6
EXIT_DISK_FULL = 7
EXIT_REWARD_SERVER = 8
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

EXIT_CODES = {
    "bad config or option": EXIT_CONFIG,
    "missing model weights": EXIT_MISSING_MODEL,
    "no checkpoint to resume": EXIT_NO_CHECKPOINT,
    "run directory in use": EXIT_LOCKED,
    "permission denied": EXIT_PERMISSION,
    "disk full": EXIT_DISK_FULL,
    "reward server unreachable": EXIT_REWARD_SERVER,
    "interrupted": EXIT_INTERRUPTED,
}


@dataclass(frozen=True)
class Failure:
    """An expected failure: ``message`` is one line; ``code`` the process exit status."""

    message: str
    code: int


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (line breaks and list bullets joined with '; '), shortened to ``limit``."""
    parts = [p.strip().lstrip("- ").strip() for p in str(text).splitlines()]
    line = "; ".join(p for p in parts if p).replace(":;", ":")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(exc)  # safetensors' SafetensorError, torch's RuntimeError: only a message
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def _is_permission(exc: BaseException) -> bool:
    if isinstance(exc, PermissionError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return True
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and ("PermissionDenied" in text or "Permission denied" in text)


def _where(exc: BaseException) -> str:
    name = getattr(exc, "filename", None)
    return f" ({name})" if name else ""


def _resume_hint(run_dir: str | None) -> str:
    return f"`denoise-gym train --resume {run_dir}`" if run_dir else "`denoise-gym train --resume RUN_DIR`"


def classify(exc: BaseException, run_dir: str | None = None) -> Failure | None:
    """The :class:`Failure` for an expected failure, or None for an unexpected one (see module doc).

    ``run_dir``: the run directory concerned, when known (used in "resume with ..." advice).
    """
    from agents.rundir import RunDirLockedError
    from agents.trainer import NoCheckpointError
    from diffusion_env.models import ModelNotFoundError
    from rewards.alignment import RewardServerError
    from rewards.base import MissingModelError

    chain = _chain(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Failure(f"interrupted; the last complete checkpoint is intact: continue with {_resume_hint(run_dir)}",
                       EXIT_INTERRUPTED)  # fmt: skip
    for e in chain:
        if isinstance(e, RunDirLockedError):
            return Failure(one_line(str(e)), EXIT_LOCKED)
    for e in chain:
        if isinstance(e, NoCheckpointError):
            return Failure(one_line(str(e)), EXIT_NO_CHECKPOINT)
    for e in chain:
        if isinstance(e, (ModelNotFoundError, MissingModelError)):
            # every missing piece with its command, uncut: the line is what the user copies from
            return Failure(f"missing model weights: {one_line(str(e), 4000)}", EXIT_MISSING_MODEL)
    for e in chain:
        if _is_disk_full(e):
            return Failure(
                f"disk full while writing{_where(e)}: {one_line(str(e), 200)}; free some space (or choose another "
                f"--output-dir), then continue with {_resume_hint(run_dir)}: the last complete checkpoint is intact",
                EXIT_DISK_FULL,
            )
    for e in chain:
        if _is_permission(e):
            return Failure(
                f"permission denied{_where(e)}: {one_line(getattr(e, 'strerror', None) or str(e), 200)}; make the "
                "folder writable for this user (or choose another --run-dir / --output-dir); nothing written "
                f"before was changed, continue with {_resume_hint(run_dir)}",
                EXIT_PERMISSION,
            )
    for e in chain:
        if isinstance(e, RewardServerError):
            return Failure(
                f"reward server unreachable: {one_line(str(e), 300)}; start the server (e.g. `python -m "
                "rewards.server`) or fix base_url / the API key, then continue with "
                f"{_resume_hint(run_dir)}",
                EXIT_REWARD_SERVER,
            )
    if isinstance(exc, ValueError) or (isinstance(exc, TypeError) and "argument" in str(exc)):
        return Failure(f"bad config or option: {one_line(str(exc))}", EXIT_CONFIG)
    return None
