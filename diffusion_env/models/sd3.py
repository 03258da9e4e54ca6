"""The Stable Diffusion 3 / 3.5 family: an MMDiT predicting the flow velocity, sampled by Flow-GRPO's SDE.

Frozen parts: ``FlowMatchEulerDiscreteScheduler`` (its shifted σ schedule), ``AutoencoderKL`` (16 latent
channels, ``shift_factor``), two ``CLIPTextModelWithProjection`` + ``CLIPTokenizer`` and, when the folder
has it, the T5 encoder (``text_encoder_3``); the trainable network is the folder's
``SD3Transformer2DModel`` (``transformer/``).

Text conditioning follows the SD3 pipeline: each CLIP's penultimate hidden states, concatenated along the
features and zero-padded to the transformer's ``joint_attention_dim``, then T5's states along the sequence
(zeros of ``max_sequence_length`` tokens when T5 is not loaded, as diffusers does; a model without T5 in its
``model_index.json``, such as the embedded tiny one, has no T5 tokens at all); the pooled projection is the
two CLIPs' projected text embeddings side by side.

The step Gaussian is Flow-GRPO's SDE (:func:`~diffusion_env.step_math.flow_sde_step_gaussian`) with noise
level a = the schedule's ``eta``, or the coefficients-preserving variant under the family name
``sd3-flow-cps`` (:func:`~diffusion_env.step_math.flow_cps_step_gaussian`; its last step, where
σ_{t-1} = 0 and CPS would add no noise, takes the SDE's Gaussian so every step keeps a density).
Deterministic sampling is the flow ODE's Euler step. The training target is rectified flow's:
x_σ = (1 - σ) x_0 + σ ε with target ε - x_0.

Timesteps. Observations carry ``t = round(1000 σ)`` (int64, ``Discrete(1001)``): a label of the step. The
family keeps each schedule step's exact σ, σ_{t-1} and transformer timestep (the scheduler's, ``1000 σ``)
in tables indexed by that label, so nothing is rounded; a label outside the schedule (random training
timesteps) means σ = t / 1000.
"""

from __future__ import annotations

import json
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
    flow_cps_step_gaussian,
    flow_ode_step,
    flow_sde_step_gaussian,
)

SD35_REPO = "stabilityai/stable-diffusion-3.5-medium"
SUBFOLDERS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
T5_SUBFOLDERS = ("text_encoder_3", "tokenizer_3")
T5_MAX_SEQUENCE_LENGTH = 256  # the SD3 pipeline's default T5 sequence length
# The transformer's attention projections, image and text streams (Flow-GRPO's LoRA targets).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Family(ModelFamily):
    """SD3 layout, velocity prediction, the Flow-GRPO SDE with noise level ``eta`` (or CPS)."""

    name = "sd3-flow"
    subfolders = SUBFOLDERS
    lora_targets = LORA_TARGETS
    variant = "sde"

    def __init__(self, scheduler: Any, vae: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                 tokenizers: Sequence[Any], *, joint_attention_dim: int, t5_tokens: int = 0,
                 model_path: Path | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        """``text_encoders``/``tokenizers``: the two CLIPs, then optionally T5; ``t5_tokens``: T5 positions
        (zeros when T5 is not among the encoders; 0 for a model trained without T5)."""
        super().__init__()
        if len(text_encoders) not in (2, 3) or len(tokenizers) != len(text_encoders):
            raise ValueError(f"{len(text_encoders)} text encoders and {len(tokenizers)} tokenizers; expected two CLIP "
                             "encoders with projection (and optionally T5), each with its tokenizer")  # fmt: skip
        cfg = scheduler.config
        if getattr(cfg, "use_dynamic_shifting", False):
            raise ValueError("scheduler use_dynamic_shifting=True (FLUX-style, resolution-dependent shift) is not "
                             "supported; use a fixed `shift` as SD3 does")  # fmt: skip
        self.scheduler, self.vae = scheduler, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.joint_attention_dim, self.t5_tokens = int(joint_attention_dim), int(t5_tokens)
        self.model_path = model_path
        self.device, self.dtype = torch.device(device), dtype
        self._freeze(vae, *self.text_encoders)
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self._vae_geometry(vae)
        self.set_schedule(1, 0.7, 1.0)

    @property
    def timestep_count(self) -> int:
        return self.num_train_timesteps + 1  # labels 0 … T (σ = 1 is t = T)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             download: bool = False, revision: str | None = None) -> SD3Family:  # fmt: skip
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        path = resolve_model_path(model, SUBFOLDERS, layout="Stable-Diffusion-3", download=download,
                                  revision=revision)  # fmt: skip
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=s) for s in ("text_encoder", "text_encoder_2")]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
        uses_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        if uses_t5 and all((path / s).is_dir() for s in T5_SUBFOLDERS):
            from transformers import T5EncoderModel, T5TokenizerFast

            encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3"))
            tokenizers.append(T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3"))
        transformer_cfg = json.loads((path / "transformer" / "config.json").read_text())
        return cls(
            FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            AutoencoderKL.from_pretrained(path, subfolder="vae"), encoders, tokenizers,
            joint_attention_dim=transformer_cfg["joint_attention_dim"],
            t5_tokens=T5_MAX_SEQUENCE_LENGTH if uses_t5 else 0,
            model_path=path, device=device, dtype=dtype,
        )  # fmt: skip

    def load_network(self) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        if self.model_path is None:
            raise ValueError("this family was built from in-memory parts; pass the network to the policy explicitly")
        return SD3Transformer2DModel.from_pretrained(self.model_path, subfolder="transformer")

    # ------------------------------------------------------------------ schedule
    def _build_schedule(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"eta={self.eta}; the flow SDE has no density for a noise level <= 0. "
                             "Use eta > 0 (Flow-GRPO uses 0.7 on SD3.5)")  # fmt: skip
        if self.variant == "cps" and not self.eta <= 1:
            raise ValueError(f"eta={self.eta}; the CPS step's noise level is in (0, 1]")
        T = self.num_train_timesteps
        self.scheduler.set_timesteps(self.num_steps)
        # 1. The scheduler's σ_0 > … > σ_{n-1} > σ_n = 0 and transformer timesteps, exactly.
        sigmas = self.scheduler.sigmas.to(dtype=torch.float32)
        labels = (sigmas[:-1] * T).round().long()
        if len(set(labels.tolist())) != len(labels):
            raise ValueError(f"num_steps={self.num_steps}: two steps of the shifted schedule round to the same "
                             f"timestep label (of {T}); use fewer steps")  # fmt: skip
        # 2. Tables indexed by label: σ, σ_{t-1} and the network's timestep (σ = t / T off the schedule).
        self.sigma_table = torch.arange(T + 1, dtype=torch.float32) / T
        self.sigma_table[labels] = sigmas[:-1]
        self.next_sigma_table = torch.zeros(T + 1, dtype=torch.float32)
        self.next_sigma_table[labels] = sigmas[1:]
        self.model_timestep_table = self.sigma_table * T
        self.model_timestep_table[labels] = self.scheduler.timesteps.to(torch.float32)
        self.sigma_max = float(sigmas[1]) if len(sigmas) > 1 else 1.0
        self.sigmas = sigmas.to(self.device)
        for name in ("sigma_table", "next_sigma_table", "model_timestep_table"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.timesteps = labels.to(self.device)
        # 3. Every step must have a density.
        check_std(self.step_gaussian(torch.zeros(len(labels), 1), torch.zeros(len(labels), 1), self.timesteps).std)

    # ------------------------------------------------------------------ conditioning
    def _encode(self, prompt: str) -> Cond:
        clip_states, pooled = [], []
        for encoder, tokenizer in zip(self.text_encoders[:2], self.tokenizers[:2]):
            warn_if_truncated(tokenizer, prompt)
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            out = encoder(ids, output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])  # penultimate layer, as the SD3 pipeline
            pooled.append(out.text_embeds)
        states = torch.cat(clip_states, dim=-1)
        if states.shape[-1] > self.joint_attention_dim:
            raise ValueError(f"the CLIP states have {states.shape[-1]} features; the transformer's "
                             f"joint_attention_dim is {self.joint_attention_dim}")  # fmt: skip
        states = torch.nn.functional.pad(states, (0, self.joint_attention_dim - states.shape[-1]))
        if self.t5_tokens:
            if len(self.text_encoders) == 3:
                tok = self.tokenizers[2]
                ids = tok([prompt], padding="max_length", max_length=self.t5_tokens, truncation=True,
                          add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip
                t5 = self.text_encoders[2](ids)[0]
            else:
                t5 = states.new_zeros(1, self.t5_tokens, self.joint_attention_dim)
            states = torch.cat([states, t5.to(states.dtype)], dim=1)
        return {"encoder_hidden_states": states, "pooled_projections": torch.cat(pooled, dim=-1)}

    def pooled_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.condition(list(prompts))["pooled_projections"]

    # ------------------------------------------------------------------ network and step
    def call_network(self, fn: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        timestep = self.model_timestep_table[t.to(self.device)].to(x.dtype)
        return fn(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(x.dtype),
                  pooled_projections=cond["pooled_projections"].to(x.dtype)).sample  # fmt: skip

    def set_attention(self, network: torch.nn.Module, impl: str) -> None:
        if impl != "sdpa":
            raise ValueError(f"attention={impl!r}; SD3 transformers use joint attention, for which only 'sdpa' "
                             "(diffusers' JointAttnProcessor2_0) exists. Use attention='sdpa' or None")  # fmt: skip
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        network.set_attn_processor(JointAttnProcessor2_0())

    def _sigmas(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.to(self.device)
        return self.sigma_table[t], self.next_sigma_table[t]

    def step_gaussian(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> StepGaussian:
        t = torch.as_tensor(t, device=self.device).expand(x_t.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        sigma, sigma_next = self._sigmas(t)
        sde = flow_sde_step_gaussian(prediction, x_t, sigma, sigma_next, self.eta, self.sigma_max)
        if self.variant == "sde":
            return sde
        cps = flow_cps_step_gaussian(prediction, x_t, sigma, sigma_next, self.eta)
        last = (sigma_next == 0).reshape(-1, *([1] * (x_t.ndim - 1)))  # CPS adds no noise there: the SDE's step
        return StepGaussian(torch.where(last, sde.mean, cps.mean), torch.where(last, sde.std, cps.std))

    def deterministic_step(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self._sigmas(t)
        return flow_ode_step(prediction, x_t, sigma, sigma_next)

    # ------------------------------------------------------------------ training target
    def training_inputs(self, n: int, latent_shape: Sequence[int], generator: torch.Generator):
        t = torch.randint(1, self.num_train_timesteps + 1, (n,), generator=generator)  # σ = t / T in (0, 1]
        return t, torch.randn((n, *latent_shape), generator=generator)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma_table[t.to(self.device)].reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    def predicted_x0(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x̂_0 = x_σ - σ v̂ (x_σ = (1 - σ) x_0 + σ ε and v = ε - x_0)."""
        sigma = self.sigma_table[t.to(self.device)].reshape(-1, *([1] * (x_t.ndim - 1)))
        return x_t - sigma * prediction


class SD3CPSFamily(SD3Family):
    """:class:`SD3Family` with the coefficients-preserving step (CPS) instead of Flow-GRPO's SDE."""

    name = "sd3-flow-cps"
    variant = "cps"


def _is_sd3_folder(path: Path) -> bool:
    return (path / "transformer").is_dir() and (path / "text_encoder_2").is_dir()


register_family(SD3Family.name, SD3Family, _is_sd3_folder)
register_family(SD3CPSFamily.name, SD3CPSFamily, lambda path: False)  # chosen by name only
