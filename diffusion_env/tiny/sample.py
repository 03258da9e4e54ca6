"""Load the shipped tiny model and sample it: DDIM with classifier-free guidance, written out explicitly.

The model lives in :data:`ASSET_DIR` in the folder layout of a Stable Diffusion repository and loads
with the same diffusers/transformers classes (nothing is fetched from the network).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"


@dataclass
class TinyModel:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler: object


def load_tiny(path: str | Path = ASSET_DIR) -> TinyModel:
    """Load the five components from ``path`` (offline), in eval mode with gradients off."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} has no model_index.json; expected a tiny-model folder such as {ASSET_DIR}")
    p = str(path)
    unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(p, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(p, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(p, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return TinyModel(unet, vae, text_encoder, tokenizer, scheduler)


@torch.no_grad()
def encode_prompts(model: TinyModel, prompts: Sequence[str]) -> torch.Tensor:
    ids = model.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return model.text_encoder(ids).last_hidden_state


@torch.no_grad()
def sample(
    model: TinyModel,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    eta: float = 1.0,
) -> torch.Tensor:
    """Images for ``prompts`` as ``uint8 [B, 3, 32, 32]``, a deterministic function of ``seed``.

    Each step runs the UNet once on the unconditional and conditional halves stacked together and mixes
    the noise predictions as ``uncond + guidance * (cond - uncond)``; ``scheduler.step`` (DDIM, ``eta``)
    draws its noise from the same seeded generator.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of strings")
    if steps < 1:
        raise ValueError(f"steps={steps}; expected a positive number of denoising steps")
    gen = torch.Generator().manual_seed(int(seed))
    b = len(prompts)
    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, [""]).expand(b, -1, -1)
    context = torch.cat([uncond, cond])
    cfg = model.unet.config
    latents = torch.randn((b, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen)
    sched = model.scheduler
    sched.set_timesteps(steps)
    latents = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps = model.unet(inp, t, encoder_hidden_states=context).sample
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        latents = sched.step(eps, t, latents, eta=eta, generator=gen).prev_sample
    images = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def timed_sample(model: TinyModel, prompts: Sequence[str], **kwargs) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = sample(model, prompts, **kwargs)
    return out, time.perf_counter() - t0
