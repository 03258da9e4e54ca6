"""LAION aesthetic reward (DDPO paper, section 6.1): an MLP head on CLIP ViT-L/14 image embeddings.

Pipeline, all in torch on the model's device, batched, with no PIL round trip:

1. images (uint8 or float ``[B, 3, H, W]``, or PIL) → float in [0, 1];
2. :func:`clip_preprocess`: resize the shorter side to the CLIP input size (224 for ViT-L/14) with
   antialiased bicubic interpolation, centre crop, normalise with the CLIP mean/std;
3. CLIP vision tower + visual projection (``transformers.CLIPModel``) → image embedding (768-d);
4. L2 normalisation, then the "improved aesthetic predictor" head: an MLP 768→1024→128→64→16→1 with
   dropout between the first layers and no nonlinearities (:class:`AestheticHead`, state-dict keys
   ``layers.{0,2,4,6,7}.{weight,bias}`` as published).

Weights are read from local files only (never downloaded here):

- CLIP: a local directory or a Hugging Face repo id already in the HF cache
  (``hf download openai/clip-vit-large-patch14``);
- head: an explicit path, else the file named by the ``DENOISE_GYM_AESTHETIC_HEAD`` environment
  variable, else ``sac+logos+ava1-l14-linearMSE.pth`` from the HF repo
  ``camenduru/improved-aesthetic-predictor`` if it is in the HF cache
  (``hf download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth``).

A missing file raises :class:`rewards.base.MissingModelError` saying which and how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import MissingModelError, RewardInfo, as_float_images, check_prompts

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
HEAD_ENV = "DENOISE_GYM_AESTHETIC_HEAD"
DEFAULT_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
DEFAULT_HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HEAD_HIDDEN = (1024, 128, 64, 16)
HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: ``in_dim``→1024→128→64→16→1, dropout, no nonlinearities.

    ``in_dim`` is 768 for CLIP ViT-L/14; tests build it for a tiny CLIP's projection size.
    """

    def __init__(self, in_dim: int = 768):
        super().__init__()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"in_dim={in_dim!r}; expected a positive int (768 for CLIP ViT-L/14)")
        self.in_dim = in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` (already L2-normalised) → scores ``[B]``."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> AestheticHead:
        """Build a head from a state dict with the published keys; the input size is read from it."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"aesthetic head checkpoint holds {type(state_dict).__name__}; expected a state dict "
                f"with keys {list(HEAD_KEYS)}"
            )
        keys = set(state_dict)
        if keys != set(HEAD_KEYS):
            raise ValueError(
                f"aesthetic head state dict has keys {sorted(keys)}; expected exactly {list(HEAD_KEYS)} "
                "(the published improved-aesthetic-predictor layout)"
            )
        w0 = state_dict["layers.0.weight"]
        if w0.ndim != 2:
            raise ValueError(f"layers.0.weight has shape {tuple(w0.shape)}; expected [1024, in_dim]")
        head = cls(in_dim=int(w0.shape[1]))
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        for k, shape in expected.items():
            if tuple(state_dict[k].shape) != shape:
                raise ValueError(f"{k} has shape {tuple(state_dict[k].shape)}; expected {shape}")
        head.load_state_dict({k: v.float() for k, v in state_dict.items()})
        return head.eval()


def resolve_head_path(
    path: str | os.PathLike | None = None,
    *,
    repo_id: str = DEFAULT_HEAD_REPO,
    filename: str = DEFAULT_HEAD_FILENAME,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Find the head file: ``path``, else ``$DENOISE_GYM_AESTHETIC_HEAD``, else the HF cache (no download)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingModelError(
                f"aesthetic head file {str(p)!r} does not exist; expected a .pth state dict"
            )
        return p
    env = os.environ.get(HEAD_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise MissingModelError(
                f"{HEAD_ENV}={env!r} does not name an existing file; expected the aesthetic head .pth"
            )
        return p
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # LocalEntryNotFoundError and friends
        raise MissingModelError(
            f"aesthetic head {filename!r} of {repo_id!r} is not in the Hugging Face cache "
            f"({type(e).__name__}). Get it with `hf download {repo_id} {filename}`, "
            f"or set {HEAD_ENV}=/path/to/{filename}, or pass head=<path>."
        ) from e


def load_aesthetic_head(path: str | os.PathLike | None = None, **resolve_kwargs: Any) -> AestheticHead:
    """Load the head (see :func:`resolve_head_path`); the file may hold CUDA tensors."""
    p = resolve_head_path(path, **resolve_kwargs)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read aesthetic head {str(p)!r} as a torch state dict: {e}") from e
    return AestheticHead.from_state_dict(state)


def load_clip(name_or_path: str | os.PathLike = DEFAULT_CLIP, *, cache_dir: str | os.PathLike | None = None):
    """``CLIPModel.from_pretrained`` from a local directory or the HF cache only (never downloads)."""
    from transformers import CLIPModel

    name = str(name_or_path)
    looks_like_path = os.sep in name and not Path(name).exists() and name.count("/") != 1
    try:
        return CLIPModel.from_pretrained(name, local_files_only=True, cache_dir=cache_dir).eval()
    except OSError as e:
        how = (
            "expected an existing local directory with a saved CLIPModel"
            if looks_like_path or Path(name).exists()
            else f"get it with `hf download {name}`"
        )
        raise MissingModelError(
            f"CLIP model {name!r} is neither a loadable local directory nor in the Hugging Face cache; "
            f"{how}, "
            "or pass clip_model=<local directory or CLIPModel>."
        ) from e


def clip_preprocess(
    images: Any,
    size: int = 224,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    mode: str = "bicubic",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """CLIP preprocessing in torch: shorter side → ``size`` (antialiased), centre crop, mean/std.

    Runs on ``device`` (default: the images' own device); returns float32 ``[B, 3, size, size]``.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode={mode!r}; expected 'bicubic' or 'bilinear'")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r}; expected a positive int")
    x = images
    if device is not None and isinstance(x, torch.Tensor):
        x = x.to(device)  # move before converting: uint8 is 4x cheaper to transfer
    x = as_float_images(x)
    if device is not None:
        x = x.to(device)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class AestheticReward:
    """Reward = LAION aesthetic score of each image (roughly 1-10; higher is prettier).

    ``clip_model``: HF repo id / local directory (loaded with ``local_files_only=True``) or a loaded
    ``CLIPModel``. ``head``: None (see :func:`resolve_head_path`), a path, a state dict or an
    :class:`AestheticHead`. ``device``: where to run (default: the CLIP model's device).
    ``batch_size``: images per forward pass.
    """

    name = "aesthetic"

    def __init__(
        self,
        clip_model: Any = DEFAULT_CLIP,
        head: Any = None,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        resize_mode: str = "bicubic",
        cache_dir: str | os.PathLike | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        if resize_mode not in ("bicubic", "bilinear"):
            raise ValueError(f"resize_mode={resize_mode!r}; expected 'bicubic' or 'bilinear'")
        # the head first: it is small, so a missing head is reported before loading CLIP
        if head is None or isinstance(head, (str, os.PathLike)):
            head = load_aesthetic_head(head, cache_dir=cache_dir)
        elif isinstance(head, Mapping):
            head = AestheticHead.from_state_dict(head)
        elif not isinstance(head, AestheticHead):
            raise ValueError(
                f"head is {type(head).__name__}; expected None, a path, a state dict or an AestheticHead"
            )
        if isinstance(clip_model, (str, os.PathLike)):
            clip_model = load_clip(clip_model, cache_dir=cache_dir)
        if not (hasattr(clip_model, "vision_model") and hasattr(clip_model, "visual_projection")):
            raise ValueError(
                f"clip_model is {type(clip_model).__name__}; expected a transformers CLIPModel, "
                "a local directory or a Hugging Face repo id"
            )
        proj = int(clip_model.config.projection_dim)
        if head.in_dim != proj:
            raise ValueError(
                f"aesthetic head expects {head.in_dim}-d embeddings but the CLIP model projects to {proj}; "
                "expected matching sizes (768 for ViT-L/14)"
            )
        if device is None:
            device = next(clip_model.parameters()).device
        self.device = torch.device(device)
        self.clip = clip_model.eval().to(self.device)
        self.head = head.eval().to(self.device)
        self.dtype = next(self.clip.parameters()).dtype
        self.image_size = int(clip_model.config.vision_config.image_size)
        self.batch_size = batch_size
        self.resize_mode = resize_mode

    @torch.inference_mode()
    def embed(self, images: Any) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, float32 ``[B, projection_dim]`` on ``self.device``."""
        x = images if isinstance(images, torch.Tensor) else as_float_images(images)
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = clip_preprocess(
                x[start : start + self.batch_size], self.image_size, mode=self.resize_mode, device=self.device
            )
            pooled = self.clip.vision_model(pixel_values=chunk.to(self.dtype)).pooler_output
            out.append(self.clip.visual_projection(pooled).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.inference_mode()
    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Head scores ``[B]`` of embeddings ``[B, D]`` (L2-normalised here)."""
        e = embeddings.to(self.device, torch.float32)
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(e)

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        x = images if isinstance(images, torch.Tensor) else as_float_images(images)
        if x.ndim != 4 or x.shape[1] != 3:
            as_float_images(x)  # raises the canonical ValueError
        check_prompts(prompts, x.shape[0])
        out_device = x.device
        scores = self.score_embeddings(self.embed(x))
        return scores.to(out_device, torch.float32), {}

    def __repr__(self) -> str:
        return (
            f"AestheticReward(image_size={self.image_size}, device={self.device}, "
            f"batch_size={self.batch_size})"
        )
