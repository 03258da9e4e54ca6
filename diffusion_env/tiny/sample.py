"""Load a shipped tiny model and sample it through the environment and its model family.

The DDIM model lives in :data:`ASSET_DIR` (Stable Diffusion v1 layout), the flow-matching one in
:data:`FLOW_ASSET_DIR` (SD3 layout); both load with the same diffusers/transformers classes as the real
models (nothing is fetched from the network). Sampling runs one episode of
:class:`~diffusion_env.vector_env.DenoisingEnv` whose steps are the family's Gaussian (classifier-free
guidance, DDIM η or the flow SDE's noise level), or its deterministic step (``deterministic=True``: the
flow ODE): the same math and the same code as the agents' policy, without a second sampler. Unless given,
steps, guidance and η are those of the model's registered ``Denoise-Tiny*`` IDs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_env.models import TINY_MODEL_PATH, TINYFLOW_MODEL_PATH, ModelFamily, load_family
from diffusion_env.registration import TINY_DEFAULTS, TINYFLOW_DEFAULTS

ASSET_DIR = TINY_MODEL_PATH
FLOW_ASSET_DIR = TINYFLOW_MODEL_PATH
# Sampling settings by family: those of the registered IDs on each tiny model.
SAMPLING = {
    "sd1-ddim": dict(steps=TINY_DEFAULTS["num_steps"], guidance=TINY_DEFAULTS["guidance_scale"], eta=TINY_DEFAULTS["eta"]),
    "sd3-flow": dict(steps=TINYFLOW_DEFAULTS["num_steps"], guidance=TINYFLOW_DEFAULTS["guidance_scale"],
                     eta=TINYFLOW_DEFAULTS["eta"]),
}  # fmt: skip


@dataclass
class TinyModel:
    """A loaded tiny model: its family (frozen parts) and its network (UNet or transformer), eval mode, no
    gradients."""

    family: ModelFamily
    network: torch.nn.Module

    @property
    def unet(self) -> torch.nn.Module:
        return self.network

    @property
    def vae(self):
        return self.family.vae

    @property
    def scheduler(self):
        return self.family.scheduler

    @property
    def text_encoder(self):
        """SD v1's text encoder (an SD3-layout model has two: ``family.text_encoders``)."""
        return self.family.text_encoder

    @property
    def tokenizer(self):
        """SD v1's tokenizer (an SD3-layout model has two: ``family.tokenizers``)."""
        return self.family.tokenizer

    def settings(self, steps: int | None, guidance: float | None, eta: float | None) -> dict:
        """``steps``, ``guidance``, ``eta`` with None replaced by this model's registered defaults."""
        base = SAMPLING.get(self.family.name, SAMPLING["sd1-ddim"])
        given = dict(steps=steps, guidance=guidance, eta=eta)
        return {k: base[k] if v is None else v for k, v in given.items()}


def load_tiny(path: str | Path = ASSET_DIR) -> TinyModel:
    """Load the model at ``path`` (offline), in eval mode with gradients off."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} has no model_index.json; expected a tiny-model folder such as {ASSET_DIR}")
    family = load_family(path)
    return TinyModel(family, family.load_network().eval().requires_grad_(False))


@torch.no_grad()
def sample_images(env, network: torch.nn.Module, prompts: Sequence[str], seed: int,
                  deterministic: bool = False) -> torch.Tensor:  # fmt: skip
    """One episode of ``env`` (a DenoisingEnv with ``num_envs == len(prompts)``) stepped by ``network``'s
    Gaussian (or the family's deterministic step) at the env's guidance scale; the images ``[B, 3, H, W]``
    in [0, 1]. Deterministic in ``seed``."""
    family = env.family
    forward = family.plain_forward(network)
    gen = torch.Generator(device=family.device).manual_seed(int(seed))
    obs, _ = env.reset(seed=int(seed), options={"prompts": list(prompts)})
    info: dict = {}
    while "images" not in info:
        action, _ = family.sample(forward, obs, family.guidance_scale, gen, deterministic)
        obs, _, _, _, info = env.step(action)
    return info["images"]


def sample(model: TinyModel, prompts: Sequence[str], seed: int = 0, steps: int | None = None,
           guidance: float | None = None, eta: float | None = None, deterministic: bool = False) -> torch.Tensor:  # fmt: skip
    """Images for ``prompts`` as ``uint8 [B, 3, 32, 32]``, a deterministic function of ``seed`` (settings left
    None are the model's registered ones)."""
    from diffusion_env.vector_env import DenoisingEnv

    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of strings")
    steps, guidance, eta = model.settings(steps, guidance, eta).values()
    if steps < 1:
        raise ValueError(f"steps={steps}; expected a positive number of denoising steps")
    env = DenoisingEnv(len(prompts), model=model.family, reward="none", prompts=list(prompts), num_steps=steps,
                       eta=eta, guidance_scale=guidance)  # fmt: skip
    images = sample_images(env, model.network, prompts, seed, deterministic)
    env.close()
    return (images * 255).round().to(torch.uint8)


def timed_sample(model: TinyModel, prompts: Sequence[str], **kwargs) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = sample(model, prompts, **kwargs)
    return out, time.perf_counter() - t0
