"""Loading the frozen parts of a Stable-Diffusion-layout model: scheduler, VAE, tokenizer, text encoder.

A model is a folder laid out like a diffusers Stable Diffusion repository (``scheduler/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``unet/``). It is resolved from a local path or from the Hugging Face
cache; it is downloaded only when the caller asks (``download=True``). The UNet is not loaded here: the
environment never owns it (the policy does, see :mod:`agents.policy`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rewards.downloads import download_command

SD14_REPO = "CompVis/stable-diffusion-v1-4"
TINY_MODEL_PATH = Path(__file__).resolve().parent / "assets" / "tiny"
_FROZEN_SUBFOLDERS = ("scheduler", "vae", "text_encoder", "tokenizer")


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model is neither a local folder nor in the Hugging Face cache."""


def resolve_model_path(model: str | os.PathLike, *, download: bool = False, revision: str | None = None) -> Path:
    """Return a local folder for ``model`` (a path, or a Hugging Face repo id found in the cache).

    Raises:
        ModelNotFoundError: with the repo id and how to fetch it, when absent and ``download`` is False.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [s for s in _FROZEN_SUBFOLDERS if not (path / s).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"model folder {str(path)!r} lacks {missing}; expected a diffusers Stable-Diffusion layout "
                f"with subfolders {list(_FROZEN_SUBFOLDERS) + ['unet']}"
            )
        return path
    repo_id = str(model)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model {repo_id!r} is not a folder; expected a local path or a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [f"{s}/*" for s in (*_FROZEN_SUBFOLDERS, "unet")] + ["model_index.json"]
    try:
        local = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=not download
        )
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(
            f"the weights of {repo_id!r} are not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and no local folder has that name. "
            f"Fetch them once with `{download_command(repo_id)}`, or pass download=True to "
            f"gym.make, or pass model=<path to a local copy>."
        ) from exc
    return Path(local)


@dataclass
class FrozenComponents:
    """The environment's frozen modules, in eval mode with gradients off."""

    scheduler: object  # diffusers.DDIMScheduler
    vae: torch.nn.Module  # diffusers.AutoencoderKL
    text_encoder: torch.nn.Module  # transformers.CLIPTextModel
    tokenizer: object  # transformers.CLIPTokenizer
    model_path: Path | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> FrozenComponents:
        for m in (self.vae, self.text_encoder):
            m.to(device=device)
            if m.dtype != dtype:
                m.to(dtype=dtype)
            m.eval()
            m.requires_grad_(False)
        return self


def load_components(
    model: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    download: bool = False,
    revision: str | None = None,
) -> FrozenComponents:
    """Load scheduler (as DDIM), VAE, tokenizer and text encoder of ``model``."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(model, download=download, revision=revision)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    return FrozenComponents(scheduler, vae, text_encoder, tokenizer, model_path=path).to(device, dtype)


def load_unet(model: str | os.PathLike, *, download: bool = False, revision: str | None = None):
    """Load the UNet of ``model`` (used by policies; the environment never loads it)."""
    from diffusers import UNet2DConditionModel

    path = resolve_model_path(model, download=download, revision=revision)
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")
