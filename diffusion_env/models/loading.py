"""Finding a model's folder: a local path, or a Hugging Face repo id resolved from the cache.

Nothing is downloaded unless the caller asks (``download=True``); when the weights are absent the
error names the repository and how to fetch it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rewards.downloads import download_command, gated_note

TINY_MODEL_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny"  # the embedded tiny SD-v1 model
TINYFLOW_MODEL_PATH = TINY_MODEL_PATH.parent / "tinyflow"  # the embedded tiny flow-matching (SD3-layout) model


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model is neither a local folder nor in the Hugging Face cache."""


def resolve_model_path(
    model: str | os.PathLike,
    subfolders: Sequence[str],
    *,
    layout: str,
    download: bool = False,
    revision: str | None = None,
    extra_files: Sequence[str] = ("model_index.json",),
) -> Path:
    """Return a local folder for ``model`` (a path, or a Hugging Face repo id found in the cache).

    ``subfolders`` are the folders the model family needs (checked in a local folder, fetched from the
    cache); ``layout`` names the expected layout in errors.

    Raises:
        ModelNotFoundError: with the repo id and how to fetch it, when absent and ``download`` is False.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [s for s in subfolders if not (path / s).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"model folder {str(path)!r} lacks {missing}; expected a diffusers {layout} layout "
                f"with subfolders {list(subfolders)}"
            )
        return path
    repo_id = str(model)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model {repo_id!r} is not a folder; expected a local path or a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [f"{s}/*" for s in subfolders] + list(extra_files)
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=not download)
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(
            f"the weights of {repo_id!r} are not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and no local folder has that name. "
            f"Fetch them once with `{download_command(repo_id)}`, or pass download=True to "
            f"gym.make, or pass model=<path to a local copy>.{gated_note(repo_id)}"
        ) from exc
    return Path(local)
