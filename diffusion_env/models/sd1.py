"""The Stable Diffusion v1 family: a UNet predicting ε, sampled by DDIM with stochasticity η.

Frozen parts: ``DDIMScheduler`` (its ᾱ table), ``AutoencoderKL``, ``CLIPTokenizer`` + ``CLIPTextModel``;
the trainable network is the ``UNet2DConditionModel`` of the folder's ``unet/``. The step Gaussian is
:func:`diffusion_env.step_math.ddim_step_gaussian` (notation table there); the training target is
DDPM's: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε with target ε, t ~ U{0, …, T-1}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_env.models.base import Cond, ModelFamily, register_family
from diffusion_env.models.loading import resolve_model_path
from diffusion_env.prompts import warn_if_truncated
from diffusion_env.step_math import (
    StepGaussian,
    check_std,
    ddim_step_gaussian,
    previous_timestep,
    schedule_std,
)

SD14_REPO = "CompVis/stable-diffusion-v1-4"
FROZEN_SUBFOLDERS = ("scheduler", "vae", "text_encoder", "tokenizer")
SUBFOLDERS = (*FROZEN_SUBFOLDERS, "unet")


class SD1Family(ModelFamily):
    """SD-v1 layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), ε-prediction, DDIM(η)."""

    name = "sd1-ddim"
    subfolders = SUBFOLDERS

    def __init__(self, scheduler: Any, vae: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any,
                 *, model_path: Path | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self._pooled: dict[str, torch.Tensor] = {}  # prompt -> pooled text vector (shared by schedule copies)
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon":
            raise ValueError(f"scheduler prediction_type={cfg.prediction_type!r}; only 'epsilon' is supported")
        if getattr(cfg, "thresholding", False):
            raise ValueError("scheduler thresholding=True is not supported; use a scheduler without thresholding")
        self.scheduler, self.vae, self.text_encoder, self.tokenizer = scheduler, vae, text_encoder, tokenizer
        self.model_path = model_path
        self.device, self.dtype = torch.device(device), dtype
        self._freeze(vae, text_encoder)
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.clip_sample_range = float(cfg.clip_sample_range) if cfg.clip_sample else None
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)
        self.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=self.device)
        self._vae_geometry(vae)
        self.hidden_size = int(text_encoder.config.hidden_size)
        self.set_schedule(1, 1.0, 1.0)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             download: bool = False, revision: str | None = None) -> SD1Family:  # fmt: skip
        from diffusers import AutoencoderKL, DDIMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        path = resolve_model_path(model, SUBFOLDERS, layout="Stable-Diffusion", download=download, revision=revision)
        return cls(
            DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
            AutoencoderKL.from_pretrained(path, subfolder="vae"),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            model_path=path, device=device, dtype=dtype,
        )  # fmt: skip

    def load_network(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        if self.model_path is None:
            raise ValueError("this family was built from in-memory parts; pass the network to the policy explicitly")
        return UNet2DConditionModel.from_pretrained(self.model_path, subfolder="unet")

    # ------------------------------------------------------------------ schedule
    def _build_schedule(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"eta={self.eta}; the DDIM step has no density for eta <= 0. Use eta > 0 (DDPO uses 1)")
        if self.num_steps > self.num_train_timesteps:
            raise ValueError(
                f"num_steps={self.num_steps} exceeds the scheduler's {self.num_train_timesteps} training timesteps"
            )
        self.scheduler.set_timesteps(self.num_steps)
        self.timesteps = self.scheduler.timesteps.to(device=self.device, dtype=torch.long)
        self.prev_timesteps = previous_timestep(self.timesteps, self.num_train_timesteps, self.num_steps)
        check_std(schedule_std(self.timesteps, self.prev_timesteps, self.alphas_cumprod, self.final_alpha_cumprod,
                               self.eta))  # fmt: skip

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    # ------------------------------------------------------------------ conditioning
    def _tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)  # fmt: skip

    def _encode(self, prompt: str) -> Cond:
        warn_if_truncated(self.tokenizer, prompt)  # once per prompt, with its token count
        out = self.text_encoder(self._tokens([prompt]))
        self._pooled[prompt] = out.pooler_output  # kept apart: the UNet's conditioning is the hidden states alone
        return {"encoder_hidden_states": out.last_hidden_state}

    def pooled_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        for p in prompts:
            self._cached(p)  # encodes (and pools) a prompt not seen yet
        return torch.cat([self._pooled[p] for p in prompts])

    # ------------------------------------------------------------------ network and step
    def call_network(self, fn: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return fn(x, t, encoder_hidden_states=cond["encoder_hidden_states"].to(x.dtype)).sample

    def step_gaussian(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> StepGaussian:
        t_prev = previous_timestep(t, self.num_train_timesteps, self.num_steps)
        return ddim_step_gaussian(prediction, x_t, t, t_prev, self.alphas_cumprod, self.final_alpha_cumprod,
                                  self.eta, self.clip_sample_range)  # fmt: skip

    # ------------------------------------------------------------------ training target
    def training_inputs(self, n: int, latent_shape: Sequence[int], generator: torch.Generator):
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t, torch.randn((n, *latent_shape), generator=generator)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise

    def predicted_x0(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t."""
        a = self.alphas_cumprod[t.to(self.device)].reshape(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()


def _is_sd1_folder(path: Path) -> bool:
    return (path / "unet").is_dir() and (path / "text_encoder").is_dir()


register_family(SD1Family.name, SD1Family, _is_sd1_folder)
