"""Load the shipped tiny model and sample it through the environment and its model family.

The model lives in :data:`ASSET_DIR` in the folder layout of a Stable Diffusion repository and loads
with the same diffusers/transformers classes (nothing is fetched from the network). Sampling runs one
episode of :class:`~diffusion_env.vector_env.DenoisingEnv` whose steps are the family's Gaussian
(classifier-free guidance, DDIM η): the same math and the same code as the agents' policy, without a
second sampler.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_env.models import TINY_MODEL_PATH, SD1Family

ASSET_DIR = TINY_MODEL_PATH


@dataclass
class TinyModel:
    """The loaded tiny model: its family (frozen parts) and its network (the UNet), eval mode, no gradients."""

    family: SD1Family
    unet: torch.nn.Module

    @property
    def vae(self):
        return self.family.vae

    @property
    def text_encoder(self):
        return self.family.text_encoder

    @property
    def tokenizer(self):
        return self.family.tokenizer

    @property
    def scheduler(self):
        return self.family.scheduler


def load_tiny(path: str | Path = ASSET_DIR) -> TinyModel:
    """Load the model at ``path`` (offline), in eval mode with gradients off."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} has no model_index.json; expected a tiny-model folder such as {ASSET_DIR}")
    family = SD1Family.load(path)
    unet = family.load_network().eval().requires_grad_(False)
    return TinyModel(family, unet)


@torch.no_grad()
def sample_images(env, network: torch.nn.Module, prompts: Sequence[str], seed: int) -> torch.Tensor:
    """One episode of ``env`` (a DenoisingEnv with ``num_envs == len(prompts)``) stepped by ``network``'s
    Gaussian at the env's guidance scale; the images ``[B, 3, H, W]`` in [0, 1]. Deterministic in ``seed``."""
    family = env.family
    forward = family.plain_forward(network)
    gen = torch.Generator(device=family.device).manual_seed(int(seed))
    obs, _ = env.reset(seed=int(seed), options={"prompts": list(prompts)})
    info: dict = {}
    while "images" not in info:
        action, _ = family.sample(forward, obs, family.guidance_scale, gen)
        obs, _, _, _, info = env.step(action)
    return info["images"]


def sample(model: TinyModel, prompts: Sequence[str], seed: int = 0, steps: int = 20, guidance: float = 5.0,
           eta: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Images for ``prompts`` as ``uint8 [B, 3, 32, 32]``, a deterministic function of ``seed``."""
    from diffusion_env.vector_env import DenoisingEnv

    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of strings")
    if steps < 1:
        raise ValueError(f"steps={steps}; expected a positive number of denoising steps")
    env = DenoisingEnv(len(prompts), model=model.family, reward="none", prompts=list(prompts), num_steps=steps,
                       eta=eta, guidance_scale=guidance)  # fmt: skip
    images = sample_images(env, model.unet, prompts, seed)
    env.close()
    return (images * 255).round().to(torch.uint8)


def timed_sample(model: TinyModel, prompts: Sequence[str], **kwargs) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = sample(model, prompts, **kwargs)
    return out, time.perf_counter() - t0
