"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H fine-tuned on human preferences.

Reference usage (the model card of ``yuvalkirstain/PickScore_v1``): the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (images: shorter side to 224 with bicubic resampling,
centre crop 224, CLIP mean/std; text: CLIP BPE, truncated to 77 tokens), the ``CLIPModel`` of
``yuvalkirstain/PickScore_v1``, and

    score = exp(logit_scale) * cos(image_embedding, text_embedding)

(``exp(logit_scale)`` is 100 for the published weights, so scores are roughly 18-24). The reward is that
score, computed in torch on the model's device (see :mod:`rewards.clip_common`); no softmax over a
group (the model card's "probabilities" compare images of one prompt, which a per-sample reward
does not).

Weights are read from a local directory or the HF cache only:
``hf download yuvalkirstain/PickScore_v1`` and, for the tokenizer only (not the 4 GB of weights),
``hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json tokenizer.json tokenizer_config.json
vocab.json merges.txt special_tokens_map.json`` (the missing-weights error prints this command).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from rewards.base import RewardInfo
from rewards.clip_common import ClipTextImage
from rewards.hub import from_pretrained_local

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_clip_model(name_or_path: Any, *, what: str, arg: str, cache_dir: str | os.PathLike | None = None):
    """A ``CLIPModel`` given as an object, a local directory or an HF repo id in the cache."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return name_or_path
    from transformers import CLIPModel

    return from_pretrained_local(CLIPModel, name_or_path, what=what, arg=arg, cache_dir=cache_dir).eval()


CLIP_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json")  # fmt: skip


def load_tokenizer(name_or_path: Any, *, what: str, arg: str, cache_dir: str | os.PathLike | None = None,
                   files: tuple[str, ...] = ()):  # fmt: skip
    """A tokenizer given as an object, a local directory or an HF repo id in the cache (``files``: the
    tokenizer files to name in the download command when it is absent)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return name_or_path
    from transformers import AutoTokenizer

    return from_pretrained_local(AutoTokenizer, name_or_path, what=what, arg=arg, cache_dir=cache_dir, files=files)


class PickScoreReward:
    """Reward = PickScore of each (image, prompt) pair: ``exp(logit_scale) * cos``.

    ``model``: repo id / local directory of a ``CLIPModel`` or a loaded one (default PickScore_v1).
    ``tokenizer``: repo id / local directory / loaded tokenizer (default the CLIP-H processor's).
    ``device`` (default: the model's), ``batch_size`` (images per forward pass).
    ``info``: ``cosine`` (float32 ``[B]``).
    """

    name = "pickscore"

    def __init__(
        self,
        model: Any = PICKSCORE_MODEL,
        tokenizer: Any = PICKSCORE_PROCESSOR,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
    ):
        # the tokenizer first: it is small, so a missing one is reported before loading 1 GB of weights
        tok = load_tokenizer(tokenizer, what="PickScore tokenizer (CLIP-H processor)", arg="tokenizer",
                             cache_dir=cache_dir, files=CLIP_TOKENIZER_FILES)  # fmt: skip
        clip = load_clip_model(model, what="PickScore CLIPModel", arg="model", cache_dir=cache_dir)
        self.scorer = ClipTextImage(clip, tok, device=device, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        out_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        cos = self.scorer.cosine(images, prompts)
        scores = self.scorer.logit_scale * cos
        return scores.to(out_device, torch.float32), {"cosine": cos.to(out_device)}

    def __repr__(self) -> str:
        return f"PickScoreReward(device={self.device}, batch_size={self.scorer.batch_size})"
