"""CLIP image–text similarity shared by PickScore, HPSv2.1 and CLIPScore.

:class:`ClipTextImage` holds a ``transformers.CLIPModel`` and its tokenizer and computes, batched on
the model's device,

- image embeddings: preprocessing (default :func:`rewards.aesthetic.clip_preprocess`: shorter side to
  the model's input size with antialiased bicubic resampling, centre crop, CLIP mean/std), vision
  tower, visual projection, L2 normalisation;
- text embeddings: the tokenizer with truncation to ``max_length`` (77, CLIP's context) and padding to
  the longest prompt, text tower (causal, pooled at the end-of-text token, so padding never changes
  the result), text projection, L2 normalisation; repeated prompts are embedded once per call;
- ``cosine(images, prompts)``: the per-pair cosine similarity ``[B]``.

With ``device=None`` the model stays where it is until images arrive on an accelerator; it then moves
there once (so a reward built on the CPU scores on the env's GPU without a host round trip).

Each reward then maps the cosine to its published scale (PickScore: ``exp(logit_scale) * cos``;
HPSv2.1: ``cos``; CLIPScore: ``w * max(cos, 0)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rewards.aesthetic import CLIP_MEAN, CLIP_STD, clip_preprocess
from rewards.base import FollowsImages, as_float_images, check_prompts

Preprocess = Callable[..., torch.Tensor]


def _is_clip(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("vision_model", "visual_projection", "text_model", "text_projection"))


class ClipTextImage(FollowsImages):
    """Normalised CLIP image/text embeddings and their cosine (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        max_length: int = 77,
        preprocess: Preprocess = clip_preprocess,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if not _is_clip(model):
            raise ValueError(
                f"model is {type(model).__name__}; expected a transformers CLIPModel "
                "(vision_model, visual_projection, text_model, text_projection)"
            )
        if not callable(tokenizer):
            raise ValueError(f"tokenizer is {type(tokenizer).__name__}; expected a transformers tokenizer")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}; expected an int >= 2 (77 for CLIP)")
        self._place(model, device)  # device None: follow images that arrive on an accelerator
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        # never longer than the text tower's position table (77 for CLIP; less for small test models)
        self.max_length = min(max_length, int(model.config.text_config.max_position_embeddings))
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.mean = tuple(mean)
        self.std = tuple(std)

    @torch.inference_mode()
    def embed_images(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings, float32 ``[B, D]`` on ``self.device``."""
        x = images if isinstance(images, torch.Tensor) else as_float_images(images)
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            pix = self.preprocess(x[start : start + self.batch_size], self.image_size, mean=self.mean,
                                  std=self.std, device=self.device)  # fmt: skip
            pooled = self.model.vision_model(pixel_values=pix.to(self.dtype)).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        e = torch.cat(out)
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 ``[B, D]`` on ``self.device`` (one row per prompt)."""
        unique = list(dict.fromkeys(prompts))
        rows = []
        for start in range(0, len(unique), self.batch_size):
            tok = self.tokenizer(unique[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")  # fmt: skip
            pooled = self.model.text_model(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            ).pooler_output
            rows.append(self.model.text_projection(pooled).float())
        e = torch.cat(rows)
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        index = {p: i for i, p in enumerate(unique)}
        return e[torch.tensor([index[p] for p in prompts], device=e.device)]

    def cosine(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt, float32 ``[B]`` on ``self.device``."""
        x = images if isinstance(images, torch.Tensor) else as_float_images(images)
        if x.ndim != 4 or x.shape[1] != 3:
            as_float_images(x)  # raises the canonical ValueError
        prompts = check_prompts(prompts, x.shape[0])
        self.follow(x.device)
        return (self.embed_images(x) * self.embed_texts(prompts)).sum(-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` of the model as a float32 scalar tensor on its device (100 for trained CLIPs)."""
        return self.model.logit_scale.detach().float().exp()
