"""``GaussianUNetPolicy``: the diffusion model as a stochastic policy over the denoising MDP.

π_θ(x_{t-1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I) with μ_θ built from the classifier-free-guided ε
prediction of a UNet (:mod:`diffusion_env.step_math`). Guidance is used in training as well as in
sampling ("CFG training", DDPO appendix B.1): the log-density being optimised is that of the guided
sampler. The conditional and unconditional halves are batched into one UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from agents.config import ATTENTION_IMPLS
from diffusion_env.step_math import (
    Reduction,
    StepGaussian,
    classifier_free_guidance,
    ddim_step_gaussian,
    previous_timestep,
    sample_step,
    step_log_prob,
)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class GaussianUNetPolicy(nn.Module):
    """A UNet-backed Gaussian policy for :class:`~diffusion_env.vector_env.DenoisingEnv`.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (the only trainable part).
        env: the environment (vector, single or wrapped); the policy borrows its frozen parts: the
            cached text encoder, the ᾱ table and the schedule. Nothing of the env is trained.
        guidance_scale: classifier-free guidance weight (default: the env's).
        eta: DDIM η (default: the env's).
        reduction: how the per-dimension log-densities are combined: ``"mean"`` (the reference
            implementations' convention, for which DDPO's clip range 1e-4 was tuned) or ``"sum"``.
        lora_rank: if set, freeze the UNet and train rank-``r`` LoRA adapters on its attention
            projections (peft); otherwise every UNet parameter is trained.
        channels_last: store the UNet's weights and feed its inputs in channels-last memory format
            (faster convolutions with oneDNN on CPUs and with tensor cores). Same numbers up to rounding.
        autocast_dtype: run UNet calls under ``torch.autocast`` in ``"bf16"`` or ``"fp16"`` (None: the
            UNet's own dtype). The step Gaussian and log-densities are always computed in fp32.
        compile_unet: call the UNet through ``torch.compile(unet, dynamic=False)``: each new batch
            shape and grad mode compiles once (seconds to minutes); ``self.unet`` stays the plain
            module, so parameter names and checkpoints are unchanged.
        attention: None (keep the UNet's attention processors as they are), ``"sdpa"`` (diffusers'
            default: ``F.scaled_dot_product_attention``'s fused kernels; the choice for long sequences
            such as SD v1.4's 4,096 latent positions) or ``"math"`` (diffusers' ``AttnProcessor``:
            batched matmuls and a softmax that autograd and ``torch.compile`` see through). On CPUs, for
            short sequences (the tiny model's 64 and 16 positions), "math" trains faster, and under
            bf16 autocast much faster: torch's CPU flash-attention backward in bf16 took half of a
            whole training step of the tiny UNet (measured on a Xeon with AMX, torch 2.13).
            Same numbers up to rounding.
    """

    def __init__(
        self,
        unet: nn.Module,
        env: Any,
        *,
        guidance_scale: float | None = None,
        eta: float | None = None,
        reduction: Reduction = "mean",
        lora_rank: int | None = None,
        channels_last: bool = False,
        autocast_dtype: str | None = None,
        compile_unet: bool = False,
        attention: str | None = None,
    ):
        super().__init__()
        core = getattr(env, "unwrapped", env)
        core = getattr(core, "vector_env", core)  # a DenoisingSingleEnv delegates to its vector env
        if not hasattr(core, "encode_prompts"):
            raise ValueError(f"env is {type(core).__name__}; expected a DenoisingEnv (or a wrapper of one)")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction={reduction!r}; expected 'sum' or 'mean'")
        self.env = core
        self.guidance_scale = float(core.guidance_scale if guidance_scale is None else guidance_scale)
        self.eta = float(core.eta if eta is None else eta)
        if not self.eta > 0:
            raise ValueError(f"eta={self.eta}; the policy has no density for eta <= 0. Use eta > 0 (DDPO: 1)")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale={self.guidance_scale}; expected >= 1 (1 disables guidance)")
        self.reduction = reduction
        self.lora_rank = lora_rank
        unet.to(core.device)
        if lora_rank is not None:
            if lora_rank < 1:
                raise ValueError(f"lora_rank={lora_rank}; expected a positive integer or None for full fine-tuning")
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                           target_modules=list(LORA_TARGETS))
            )  # fmt: skip
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype={autocast_dtype!r}; expected one of {sorted(AUTOCAST_DTYPES, key=str)}")
        self.autocast_dtype = AUTOCAST_DTYPES[autocast_dtype]
        if attention is not None:
            if attention not in ATTENTION_IMPLS:
                raise ValueError(f"attention={attention!r}; expected None or one of {list(ATTENTION_IMPLS)}")
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor() if attention == "math" else AttnProcessor2_0())
        self.channels_last = bool(channels_last)
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        self.unet = unet
        # A bound method, not a submodule: the compiled wrapper must not add "_orig_mod." parameter names.
        self._unet_fn = torch.compile(unet, dynamic=False).__call__ if compile_unet else unet.__call__
        self._uncond: torch.Tensor | None = None
        self._episode_prompts: tuple[str, ...] | None = None
        self._episode_embeds: torch.Tensor | None = None

    @classmethod
    def from_env(cls, env: Any, unet: nn.Module | None = None, **kwargs: Any) -> GaussianUNetPolicy:
        """Build the policy from the env's model (its ``unet/`` subfolder) unless ``unet`` is given."""
        if unet is None:
            from diffusion_env.components import load_unet

            core = getattr(getattr(env, "unwrapped", env), "vector_env", getattr(env, "unwrapped", env))
            if core.model_path is None:
                raise ValueError("the env was built from in-memory components; pass unet= explicitly")
            unet = load_unet(core.model_path)
        return cls(unet, env, **kwargs)

    # ------------------------------------------------------------------ model evaluation
    @property
    def device(self) -> torch.device:
        return self.env.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[B, L, D]``; an episode's prompt tuple (the same object every step) is stacked once."""
        if prompts is self._episode_prompts:
            return self._episode_embeds
        embeds = self.env.encode_prompts(prompts)
        if isinstance(prompts, tuple):  # immutable: safe to key on identity
            self._episode_prompts, self._episode_embeds = prompts, embeds
        return embeds

    def uncond_embedding(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self.env.encode_prompts([""])
        return self._uncond

    def unet_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One UNet call with this policy's speed settings (memory format, autocast, compile); fp32 ε."""
        dtype = self.unet.dtype
        x = x.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            out = self._unet_fn(x, t, encoder_hidden_states=cond.to(dtype)).sample
        return out.float()

    def guided_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Guided ε for latents ``[B, C, H, W]``, timesteps ``[B]`` and text embeddings ``[B, L, D]``."""
        if self.guidance_scale == 1.0:
            return self.unet_eps(x_t, t, cond)
        batch = x_t.shape[0]
        uncond = self.uncond_embedding().expand(batch, -1, -1)
        eps = self.unet_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        eps_uncond, eps_cond = eps.chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.guidance_scale)

    def distribution(
        self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str] | None = None, embeds: torch.Tensor | None = None
    ) -> StepGaussian:
        """The Gaussian π(· | x_t, t, c) for a batch (``t`` may differ per row)."""
        if embeds is None:
            if prompts is None:
                raise ValueError("pass prompts or embeds")
            embeds = self.text_embeddings(prompts)
        t = t.to(self.device)
        eps = self.guided_eps(x_t, t, embeds)
        env = self.env
        t_prev = previous_timestep(t, env.num_train_timesteps, env.num_steps)
        return ddim_step_gaussian(
            eps, x_t.float(), t, t_prev, env.alphas_cumprod, env.final_alpha_cumprod, self.eta, env.clip_sample_range
        )

    # ------------------------------------------------------------------ policy API
    @torch.no_grad()
    def act(
        self, obs: dict[str, Any], generator: torch.Generator | None = None, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x_{t-1} for a batched observation; returns ``(action, log_prob)`` (fp32)."""
        gauss = self.distribution(obs["x_t"], obs["t"], obs["prompt"])
        if deterministic:
            action = gauss.mean
        else:
            noise = torch.randn(gauss.mean.shape, generator=generator, device=self.device, dtype=torch.float32)
            action = sample_step(gauss, noise)
        return action, step_log_prob(action, gauss.mean, gauss.std, self.reduction)

    def log_prob(self, obs: dict[str, Any], action: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable log π(action | obs); ``obs`` rows may come from different timesteps."""
        gauss = self.distribution(obs["x_t"], obs["t"], obs.get("prompt"), embeds=embeds)
        return step_log_prob(action.float(), gauss.mean, gauss.std, self.reduction)
