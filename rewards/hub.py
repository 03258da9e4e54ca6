"""Local-only model loading shared by the weight-based rewards (PickScore, HPSv2.1, ImageReward, CLIPScore).

Nothing here downloads. A model is named by a local path or a Hugging Face repo id that must already
be in the HF cache (``local_files_only=True``); when it is not, :class:`rewards.base.MissingModelError`
says which repository (and file) is missing and the ``hf download`` command that fetches it (the ``hf``
CLI ships with ``huggingface_hub``), or how to pass a local path instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rewards.base import MissingModelError
from rewards.downloads import download_command


def _looks_like_path(name: str) -> bool:
    """True for names that can only be file-system paths (absolute, ``./x``, ``~/x``, ``a/b/c``)."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") != 1 or Path(name).exists()


def resolve_file(
    path: str | os.PathLike | None,
    *,
    repo_id: str,
    filename: str,
    what: str,
    env: str | None = None,
    arg: str = "path",
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Find one weights file: ``path``, else ``$env`` (when given and set), else ``filename`` of
    ``repo_id`` in the HF cache. Raises :class:`MissingModelError` naming the repo and the command."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingModelError(f"{what} file {str(p)!r} does not exist; expected {filename} of {repo_id}")
        return p
    if env and os.environ.get(env):
        p = Path(os.environ[env]).expanduser()
        if not p.is_file():
            raise MissingModelError(f"{env}={os.environ[env]!r} does not name an existing file; expected {what}")
        return p
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # LocalEntryNotFoundError, EntryNotFoundError, offline errors, ...
        alt = f", or set {env}=/path/to/{filename}" if env else ""
        raise MissingModelError(
            f"{what} ({filename!r} of {repo_id!r}) is not in the Hugging Face cache ({type(e).__name__}). "
            f"Get it with `{download_command(repo_id, filename)}`{alt}, or pass {arg}=<path>."
        ) from e


def from_pretrained_local(
    cls: Any,
    name_or_path: str | os.PathLike,
    *,
    what: str,
    arg: str,
    cache_dir: str | os.PathLike | None = None,
    files: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(name_or_path, local_files_only=True)`` with one clear error when absent.

    ``cls`` is any transformers class (a model, ``AutoTokenizer``, ``AutoImageProcessor``). ``files``:
    the only files needed from the repo (e.g. a tokenizer's), named in the download command so that
    it does not fetch the whole repository.
    """
    name = str(name_or_path)
    try:
        return cls.from_pretrained(name, local_files_only=True, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as e:
        if _looks_like_path(name):
            how = f"expected an existing local directory with a saved {what}"
        else:
            how = f"get it with `{download_command(name)}{''.join(' ' + f for f in files)}`"
        raise MissingModelError(
            f"{what} {name!r} is neither a loadable local directory nor in the Hugging Face cache "
            f"({type(e).__name__}); {how}, or pass {arg}=<local directory or loaded object>."
        ) from e
