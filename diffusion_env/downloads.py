"""Everything an environment needs to download, checked at once before anything heavy loads.

An environment built from Hugging Face repo ids needs up to three kinds of files: the diffusion model
(``model``), and the reward's own models (the aesthetic reward: CLIP ViT-L/14 and the LAION head; the
prompt-alignment reward: the BERTScore model, roberta-large by default). :func:`missing_pieces` lists
those that are neither local folders nor in the Hugging Face cache; :func:`check_downloads` raises one
:class:`MissingDownloadsError` naming all of them with the commands that fetch them (``hf download``,
see :mod:`rewards.downloads`), instead of one traceback per missing piece. Nothing touches the network.

The prompt-alignment reward also needs a vision-language model behind an OpenAI-compatible endpoint
(LLaVA in the paper); that is a server, not a download, and is not checked here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_env.models import ModelNotFoundError
from rewards.base import MissingModelError
from rewards.downloads import download_command, gated_note, in_hf_cache

# TensorFlow and Flax copies of the weights, which torch never reads.
_OTHER_FRAMEWORKS = ("*.h5", "*.msgpack")


class MissingDownloadsError(ModelNotFoundError, MissingModelError):
    """Some model files an environment needs are neither local nor in the Hugging Face cache."""


@dataclass(frozen=True)
class MissingPiece:
    """One missing download: what it is for, its repo (and file), and how to point at a local copy."""

    what: str
    repo_id: str
    filename: str | None = None
    instead: str = ""
    include: tuple[str, ...] = ()  # only these files of the repo (glob patterns)
    exclude: tuple[str, ...] = ()  # not these (other frameworks' weights)

    @property
    def command(self) -> str:
        return download_command(self.repo_id, self.filename, include=self.include, exclude=self.exclude)

    def line(self) -> str:
        alt = f" (or {self.instead})" if self.instead else ""
        name = f"{self.repo_id}{' ' + self.filename if self.filename else ''}"
        note = gated_note(self.repo_id)
        return f"{self.what}: {name} → `{self.command}`{alt}" + (f".{note}" if note else "")


def _is_repo_id(name: Any) -> bool:
    text = str(name)
    return isinstance(name, str) and text.count("/") == 1 and not text.startswith(("/", ".", "~")) and not Path(
        text
    ).expanduser().exists()


def _model_pieces(model: Any, download: bool, family: str | None = None) -> list[MissingPiece]:
    from diffusion_env.models import SD14_REPO, SD35_REPO, family_class

    if download or not _is_repo_id(model) or in_hf_cache(model):
        return []
    what = {SD14_REPO: "Stable Diffusion v1.4 weights (UNet, VAE, text encoder)",
            SD35_REPO: "Stable Diffusion 3.5 Medium weights (transformer, VAE, the two CLIP text encoders)",
            }.get(model, "diffusion model")  # fmt: skip
    # The folders the model family loads, not the repo's multi-GB single-file checkpoints.
    subfolders = family_class(family or "sd1-ddim").subfolders
    include = ("model_index.json", *(f"{s}/*" for s in subfolders))
    return [MissingPiece(what, model, instead="model=<local folder>", include=include, exclude=("*.msgpack",))]


def _reward_pieces(reward: Any, kwargs: Mapping[str, Any]) -> list[MissingPiece]:
    if reward == "aesthetic":
        from rewards.aesthetic import DEFAULT_CLIP, DEFAULT_HEAD_FILENAME, DEFAULT_HEAD_REPO, HEAD_ENV

        cache = kwargs.get("cache_dir")
        pieces = []
        head = kwargs.get("head")
        if head is None and not os.environ.get(HEAD_ENV) and not in_hf_cache(
            DEFAULT_HEAD_REPO, DEFAULT_HEAD_FILENAME, cache_dir=cache
        ):
            pieces.append(MissingPiece("aesthetic reward: LAION aesthetic head", DEFAULT_HEAD_REPO,
                                       DEFAULT_HEAD_FILENAME, f"{HEAD_ENV}=/path/to/{DEFAULT_HEAD_FILENAME}"))  # fmt: skip
        clip = kwargs.get("clip_model", DEFAULT_CLIP)
        if _is_repo_id(clip) and not in_hf_cache(clip, cache_dir=cache):
            pieces.append(MissingPiece("aesthetic reward: CLIP ViT-L/14 image encoder", clip, exclude=_OTHER_FRAMEWORKS,
                                       instead="reward_kwargs={'clip_model': <local folder>}"))  # fmt: skip
        return pieces
    if reward == "prompt_alignment":
        from rewards.alignment import DEFAULT_BERTSCORE_MODEL

        if kwargs.get("scorer") is not None:
            return []
        name = kwargs.get("bertscore_model") or DEFAULT_BERTSCORE_MODEL
        if name != "minilm" and not Path(str(name)).expanduser().is_dir() and not in_hf_cache(
            str(name), cache_dir=kwargs.get("cache_dir")
        ):
            return [MissingPiece("prompt-alignment reward: BERTScore model", str(name), exclude=_OTHER_FRAMEWORKS,
                                 instead="reward_kwargs={'bertscore_model': 'minilm'} (offline, smaller)")]  # fmt: skip
    return []


def missing_pieces(
    *, model: Any = None, reward: Any = None, reward_kwargs: Mapping[str, Any] | None = None, download: bool = False,
    family: str | None = None,
) -> list[MissingPiece]:
    """The downloads that ``DenoisingEnv(model=..., reward=..., reward_kwargs=...)`` needs and lacks.

    ``model=None``, a loaded model family or a local folder needs nothing; ``download=True`` fetches the
    diffusion model itself, so only the reward's pieces are checked then.
    """
    return _model_pieces(model, download, family) + _reward_pieces(reward, dict(reward_kwargs or {}))


def format_missing(pieces: list[MissingPiece], subject: str = "this environment") -> str:
    """One message listing every missing piece with its download command."""
    from huggingface_hub import constants

    lines = [f"{subject} needs {len(pieces)} download(s) that are neither local nor in the Hugging Face cache "
             f"({constants.HF_HUB_CACHE}); nothing was loaded. Fetch them once with:"]  # fmt: skip
    lines += [f"  - {p.line()}" for p in pieces]
    return "\n".join(lines)


def check_downloads(**kwargs: Any) -> None:
    """Raise :class:`MissingDownloadsError` listing every piece :func:`missing_pieces` finds missing."""
    pieces = missing_pieces(**kwargs)
    if pieces:
        raise MissingDownloadsError(format_missing(pieces))


def missing_for_id(env_id: str, **overrides: Any) -> list[MissingPiece]:
    """The missing downloads of a registered ID (with ``gym.make`` keyword overrides)."""
    import gymnasium as gym

    import diffusion_env  # noqa: F401  (registers the IDs)

    kw = {**gym.spec(env_id).kwargs, **overrides}
    return missing_pieces(model=kw.get("model"), reward=kw.get("reward"), reward_kwargs=kw.get("reward_kwargs"),
                          download=bool(kw.get("download", False)), family=kw.get("family"))  # fmt: skip
