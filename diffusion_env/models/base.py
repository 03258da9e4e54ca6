"""The model seam: one object owns everything that depends on the diffusion model family.

A :class:`ModelFamily` holds a text-to-image model's frozen parts (text encoder, VAE, the scheduler's
tables) and its sampling schedule, and answers every model-specific question the environment and the
agents ask. The environment uses it for the latent shape, the schedule's timesteps, the initial noise
and decoding; the policy uses it to call its network, combine classifier-free guidance, form the step
Gaussian, and (for regression-style losses) noise clean latents and get the regression target. Neither
the environment nor the policy reaches into the other: both take the family.

Ownership at a glance:

=========================  ==================================================================
question                   answered by
=========================  ==================================================================
where are the weights?     :meth:`ModelFamily.load` (local folder or Hugging Face cache)
the trainable network      :meth:`ModelFamily.load_network` (loaded for the policy, not kept)
text conditioning          :meth:`ModelFamily.condition` (each prompt encoded alone, once)
schedule, initial noise    :attr:`timesteps`, :meth:`initial_latents`
one step's Gaussian        :meth:`step_distribution` (guidance + :meth:`step_gaussian`)
regression target          :meth:`training_inputs`, :meth:`noised`, :meth:`predicted_x0`
latents → images           :meth:`decode`
=========================  ==================================================================

A family's conditioning is a ``dict`` of the network's keyword arguments (for SD v1:
``{"encoder_hidden_states": [B, L, D]}``; a family with pooled projections adds its own keys), so
the generic code here can batch, index and concatenate it without knowing what it holds.

Adding a family: subclass :class:`ModelFamily`, implement the abstract methods, and register it with
:func:`register_family` under a name and a test of a model folder's layout (see :mod:`.sd1`).
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_env.step_math import StepGaussian, classifier_free_guidance, sample_step

Cond = dict[str, torch.Tensor]
# forward(x, t, cond) -> the network's fp32 output for a batch; the policy wraps its speed settings in it.
Forward = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def cat_conditions(a: Cond, b: Cond) -> Cond:
    """Row-wise concatenation of two conditionings."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def expand_condition(cond: Cond, batch: int) -> Cond:
    """A one-row conditioning broadcast to ``batch`` rows (a view)."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


class ModelFamily(ABC):
    """A loaded text-to-image model family plus its sampling schedule.

    Subclasses set, in ``__init__``: ``device``, ``dtype``, ``model_path``, ``num_train_timesteps``,
    ``latent_channels``, ``vae_scale_factor``, ``default_size``, and call :meth:`set_schedule`.

    Attributes of the schedule (set by :meth:`set_schedule`):
        num_steps: denoising steps per episode.
        eta: the sampler's stochasticity (DDIM η; a flow family's SDE noise level).
        guidance_scale: the classifier-free guidance weight policies default to.
        timesteps: ``[num_steps]`` int64 on ``device``: the observation's ``t`` at each step.
    """

    name: str = "abstract"
    subfolders: tuple[str, ...] = ()  # the folders of a model repo this family loads (checked, downloaded)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the network's modules LoRA adapts
    device: torch.device
    dtype: torch.dtype
    model_path: Path | None
    num_train_timesteps: int
    latent_channels: int
    vae_scale_factor: int
    default_size: int

    def __init__(self) -> None:
        self._cache: dict[str, Cond] = {}  # prompt -> its one-row conditioning (shared by copies)
        self._episode: tuple[tuple[str, ...], Cond] | None = None

    def _freeze(self, *modules: torch.nn.Module) -> None:
        """Move frozen parts to the family's device and dtype, in eval mode, without gradients."""
        for m in modules:
            m.to(device=self.device)
            if m.dtype != self.dtype:
                m.to(dtype=self.dtype)
            m.eval()
            m.requires_grad_(False)

    def _vae_geometry(self, vae: torch.nn.Module) -> None:
        """``latent_channels``, ``vae_scale_factor`` and ``default_size`` from an ``AutoencoderKL``'s config."""
        self.latent_channels = int(vae.config.latent_channels)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_size = int(vae.config.sample_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    @abstractmethod
    def load(cls, model: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             download: bool = False, revision: str | None = None) -> ModelFamily:  # fmt: skip
        """Load the frozen parts of ``model`` (local folder or Hugging Face repo id in the cache)."""

    @abstractmethod
    def load_network(self) -> torch.nn.Module:
        """A fresh copy of the model's trainable network (for a policy; the family does not keep it)."""

    # ------------------------------------------------------------------ schedule
    def set_schedule(self, num_steps: int, eta: float, guidance_scale: float) -> None:
        """Validate and build the sampling schedule's tables on the device (no host sync later)."""
        self.num_steps, self.eta, self.guidance_scale = int(num_steps), float(eta), float(guidance_scale)
        self._build_schedule()

    @abstractmethod
    def _build_schedule(self) -> None:
        """Fill ``self.timesteps`` and the tables :meth:`step_gaussian` reads; refuse a schedule without density."""

    def with_schedule(self, num_steps: int, eta: float, guidance_scale: float) -> ModelFamily:
        """This family with another schedule; the loaded modules and the prompt cache are shared."""
        if (num_steps, eta, guidance_scale) == (self.num_steps, self.eta, self.guidance_scale):
            return self
        other = copy.copy(self)
        other._episode = None
        other.set_schedule(num_steps, eta, guidance_scale)
        return other

    @property
    def timestep_count(self) -> int:
        """How many values the observation's ``t`` can take (``Discrete(timestep_count)``)."""
        return self.num_train_timesteps

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}; expected multiples of the VAE factor {f}")
        return (self.latent_channels, height // f, width // f)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from standard-normal ``noise`` (scaled by the scheduler's initial sigma)."""
        return noise

    # ------------------------------------------------------------------ conditioning
    @abstractmethod
    def _encode(self, prompt: str) -> Cond:
        """One prompt's conditioning, each tensor with a leading dimension of 1."""

    @abstractmethod
    def pooled_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """One vector per prompt ``[B, D]`` (observation features for libraries such as SB3)."""

    def _cached(self, prompt: str) -> Cond:
        cond = self._cache.get(prompt)
        if cond is None:
            with torch.no_grad():
                cond = self._cache[prompt] = self._encode(prompt)
        return cond

    def condition(self, prompts: Sequence[str]) -> Cond:
        """The conditioning of a batch of prompts, each prompt encoded alone and once per family.

        Encoding each prompt on its own keeps an embedding independent of the batch it came with
        (batched kernels round differently with batch size), so runs and resumed runs see bit-identical
        conditioning. An episode's prompt tuple (the same object at every step) is stacked once.
        """
        if self._episode is not None and self._episode[0] is prompts:
            return self._episode[1]
        rows = [self._cached(p) for p in prompts]
        cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else {}
        if isinstance(prompts, tuple):  # immutable: safe to key on identity
            self._episode = (prompts, cond)
        return cond

    def null_condition(self, batch: int) -> Cond:
        """The unconditional (empty prompt) conditioning, ``batch`` rows."""
        return expand_condition(self._cached(""), batch)

    # ------------------------------------------------------------------ the network and the step
    @abstractmethod
    def call_network(self, fn: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Call the network (or a compiled wrapper of it) ``fn`` the way this family's network expects."""

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance: ``uncond + scale (cond - uncond)`` (:func:`~diffusion_env.step_math.classifier_free_guidance`)."""
        return classifier_free_guidance(uncond, cond, scale)

    def guided_prediction(self, forward: Forward, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                          guidance_scale: float) -> torch.Tensor:  # fmt: skip
        """The network's (classifier-free guided) prediction; both halves go through one call."""
        if guidance_scale == 1.0:
            return forward(x, t, cond)
        out = forward(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(self.null_condition(x.shape[0]), cond))
        uncond, conditional = out.chunk(2)
        return self.guide(uncond, conditional, guidance_scale)

    def set_attention(self, network: torch.nn.Module, impl: str) -> None:
        """Set the network's attention processors: ``"sdpa"`` (fused kernels) or ``"math"`` (matmuls + softmax)."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        network.set_attn_processor(AttnProcessor() if impl == "math" else AttnProcessor2_0())

    @abstractmethod
    def step_gaussian(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> StepGaussian:
        """p(x_{t-1} | x_t) given the (guided) prediction; statistics in fp32."""

    def deterministic_step(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sampler's noise-free step (evaluation): the step Gaussian's mean unless the family has an ODE."""
        return self.step_gaussian(prediction, x_t, t).mean

    def step_distribution(self, forward: Forward, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                          guidance_scale: float) -> StepGaussian:  # fmt: skip
        """The policy's Gaussian π(x_{t-1} | x_t, t, c) for a batch (``t`` may differ per row)."""
        return self.step_gaussian(self.guided_prediction(forward, x_t, t, cond, guidance_scale), x_t.float(), t)

    def sample(self, forward: Forward, obs: dict[str, Any], guidance_scale: float,
               generator: torch.Generator | None = None, deterministic: bool = False,
               ) -> tuple[torch.Tensor, StepGaussian]:  # fmt: skip
        """One sampler step from a batched observation: ``(x_{t-1}, its Gaussian)``; the noise is drawn in
        fp32 on the family's device from ``generator`` (:meth:`deterministic_step` when ``deterministic``)."""
        x_t, t = obs["x_t"], obs["t"].to(self.device)
        prediction = self.guided_prediction(forward, x_t, t, self.condition(obs["prompt"]), guidance_scale)
        gauss = self.step_gaussian(prediction, x_t.float(), t)
        if deterministic:
            return self.deterministic_step(prediction, x_t.float(), t), gauss
        noise = torch.randn(gauss.mean.shape, generator=generator, device=self.device, dtype=torch.float32)
        return sample_step(gauss, noise), gauss

    def plain_forward(self, network: torch.nn.Module) -> Forward:
        """``forward(x, t, cond)`` of a bare network in its own dtype, fp32 out (tools that sample without a
        policy; the policy adds its speed settings)."""
        return lambda x, t, cond: self.call_network(network, x.to(network.dtype), t, cond).float()

    # ------------------------------------------------------------------ training target
    @abstractmethod
    def training_inputs(self, n: int, latent_shape: Sequence[int], generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Random training timesteps ``[n]`` and standard-normal noise ``[n, *latent_shape]`` (drawn on the
        CPU from ``generator``, in that order)."""

    @abstractmethod
    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward process: ``(x_t, target)`` — the noised latents and the network's regression target."""

    @abstractmethod
    def predicted_x0(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean latents x̂_0 that ``prediction`` (the network's output at ``x_t``, timesteps ``t`` ``[n]``)
        implies: the inverse of :meth:`noised` in x_0, so the exact target gives back x_0 (pure, differentiable)."""

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents to images ``[B, 3, H, W]`` float32 in [0, 1], in chunks of ``batch_size`` (the family's
        ``vae``: latents / scaling_factor + shift_factor, as diffusers' pipelines)."""
        scale = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        out = [self.vae.decode(chunk.to(self.dtype) / scale + shift).sample.float() for chunk in latents.split(batch_size)]
        return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------- registry
_FAMILIES: dict[str, tuple[type[ModelFamily], Callable[[Path], bool]]] = {}


def register_family(name: str, cls: type[ModelFamily], detect: Callable[[Path], bool]) -> None:
    """Register a family class; ``detect(folder)`` says whether a local model folder is of its layout."""
    _FAMILIES[name] = (cls, detect)


def registered_families() -> list[str]:
    return sorted(_FAMILIES)


def family_class(name: str) -> type[ModelFamily]:
    if name not in _FAMILIES:
        raise ValueError(f"model family {name!r} is not registered; expected one of {registered_families()}")
    return _FAMILIES[name][0]


def load_family(
    model: str | os.PathLike | ModelFamily,
    *,
    family: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    download: bool = False,
    revision: str | None = None,
) -> ModelFamily:
    """Load ``model`` with the family named ``family``, or the one whose layout a local folder has
    (a repo id needs ``family`` unless only one family is registered). A loaded family is returned as is."""
    if isinstance(model, ModelFamily):
        return model
    if family is None:
        path = Path(model).expanduser()
        found = [n for n, (_, detect) in _FAMILIES.items() if path.is_dir() and detect(path)]
        family = found[0] if found else ("sd1-ddim" if "sd1-ddim" in _FAMILIES else registered_families()[0])
    return family_class(family).load(model, device=device, dtype=dtype, download=download, revision=revision)
