"""How a user fetches a missing model file, with the command-line tool the installed huggingface_hub ships.

huggingface_hub 1.x and later install the ``hf`` command (``hf download REPO [FILE]``); the older
``huggingface-cli`` is gone from them. :func:`download_command` names ``hf`` when it is on ``PATH``, else
the ``hf`` next to the running Python (a virtual environment that is not activated), so the printed
command runs as printed. Repositories in :data:`GATED_REPOS` are gated on the Hub: downloading them needs a
licence accepted on the repository's page and a logged-in client, which :func:`gated_note` says.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

# Hugging Face repositories that serve files only to logged-in accounts that accepted their licence (the
# one place that knows; every missing-weights message adds :func:`gated_note`).
GATED_REPOS = frozenset({
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large",
    "stabilityai/stable-diffusion-3-medium-diffusers",
})  # fmt: skip


def hf_cli() -> str:
    """``"hf"`` when it is on PATH, else the full path of the ``hf`` installed beside this Python."""
    if shutil.which("hf"):
        return "hf"
    beside = Path(sys.executable).parent / "hf"
    if beside.exists():
        return str(beside)
    return "hf"  # not installed: `pip install -U huggingface_hub` provides it


def login_command() -> str:
    """The shell command that stores a Hugging Face access token (``hf auth login``)."""
    return f"{shlex.quote(hf_cli())} auth login"


def gated_note(repo_id: str) -> str:
    """For a repo in :data:`GATED_REPOS`, a sentence (with a leading space) on how to get access; else ``""``."""
    if str(repo_id) not in GATED_REPOS:
        return ""
    return (f" {repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, then "
            f"log this machine in with `{login_command()}` (or set HF_TOKEN) before downloading.")  # fmt: skip


def download_command(
    repo_id: str, filename: str | None = None, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> str:
    """The shell command that puts ``repo_id`` (or one ``filename`` of it) into the Hugging Face cache.

    ``include`` / ``exclude``: glob patterns of the repo's files to fetch / skip (``hf download --include``).
    """
    parts = [hf_cli(), "download", str(repo_id)] + ([str(filename)] if filename else [])
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            parts += [flag, pattern]
    return " ".join(shlex.quote(p) for p in parts)


def in_hf_cache(repo_id: str, filename: str | None = None, *, cache_dir=None) -> bool:
    """Whether ``repo_id`` (a snapshot of it, or ``filename`` of it) is in the local Hugging Face cache.

    Never touches the network (``local_files_only=True``).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            hf_hub_download(repo_id, filename, local_files_only=True, cache_dir=cache_dir)
        else:
            snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir)
        return True
    except Exception:  # LocalEntryNotFoundError, an invalid repo id, a damaged cache entry
        return False
