"""CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning").

    CLIPScore(image, prompt) = w * max(cos(image_embedding, text_embedding), 0)

Two conventions are in use, and both are available through ``weight``:

- ``weight=2.5`` (default): the paper's definition (w = 2.5, which stretches the usual cosine range
  of about [0, 0.4] towards [0, 1]);
- ``weight=100``: the convention of ``torchmetrics.multimodal.CLIPScore`` and of most text-to-image
  papers that report "CLIP score" around 25-35.

``prefix`` is prepended to every prompt before tokenising: empty by default (torchmetrics and the
text-to-image papers), ``"A photo depicts "`` to match the paper exactly (Hessel et al. prefix captions
with it). The default model is the paper's, ``openai/clip-vit-base-patch32``; ``openai/clip-vit-large-patch14``
is the other common choice (torchmetrics' default). Preprocessing as the CLIP processor: shorter side
to the input size with bicubic resampling, centre crop, CLIP mean/std; text truncated to 77 tokens.
The model and its tokenizer come from one local directory or HF repo in the cache
(``hf download openai/clip-vit-base-patch32``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from rewards.base import RewardInfo
from rewards.clip_common import ClipTextImage
from rewards.pickscore import load_clip_model, load_tokenizer

CLIPSCORE_MODEL = "openai/clip-vit-base-patch32"
PAPER_WEIGHT = 2.5


class ClipScoreReward:
    """Reward = ``weight * max(cos, 0)`` (see the module docstring).

    ``model``: repo id / local directory / loaded ``CLIPModel``; ``tokenizer``: None (the model's own
    repo or directory), a repo id / directory, or a loaded tokenizer. ``weight`` and ``prefix``: see the
    module docstring. ``info``: ``cosine`` ``[B]``.
    """

    name = "clip_score"

    def __init__(
        self,
        model: Any = CLIPSCORE_MODEL,
        tokenizer: Any = None,
        *,
        weight: float = PAPER_WEIGHT,
        prefix: str = "",
        device: torch.device | str | None = None,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
    ):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            math.isfinite(weight) and weight > 0
        ):
            raise ValueError(f"weight={weight!r}; expected a positive number (2.5 as in the paper, or 100)")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix={prefix!r}; expected a string ('' or 'A photo depicts ')")
        if tokenizer is None:
            if not isinstance(model, (str, os.PathLike)):
                raise ValueError("tokenizer is None with a loaded model; expected a tokenizer or its repo id")
            tokenizer = model
        tok = load_tokenizer(tokenizer, what="CLIP tokenizer", arg="tokenizer", cache_dir=cache_dir)
        clip = load_clip_model(model, what="CLIPModel", arg="model", cache_dir=cache_dir)
        self.scorer = ClipTextImage(clip, tok, device=device, batch_size=batch_size)
        self.weight = float(weight)
        self.prefix = prefix

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        out_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        if self.prefix and not isinstance(prompts, str):
            prompts = [self.prefix + p if isinstance(p, str) else p for p in prompts]
        cos = self.scorer.cosine(images, prompts)
        return (self.weight * cos.clamp_min(0.0)).to(out_device, torch.float32), {"cosine": cos.to(out_device)}

    def __repr__(self) -> str:
        return f"ClipScoreReward(weight={self.weight:g}, device={self.device})"
