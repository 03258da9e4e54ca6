"""``GaussianDenoisingPolicy``: a diffusion model as a stochastic policy over the denoising MDP.

π_θ(x_{t-1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I), with μ_θ and σ_t formed by the model family
(:meth:`diffusion_env.models.ModelFamily.step_distribution`) from the classifier-free-guided prediction
of the policy's network. Guidance is used in training as well as in sampling ("CFG training", DDPO
appendix B.1): the log-density being optimised is that of the guided sampler. The conditional and
unconditional halves are batched into one network call.

The policy owns the trainable network, its speed settings and LoRA; it knows nothing of the family's
internals (UNet or transformer, DDIM or flow matching): it hands the family a ``forward(x, t, cond)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from diffusion_env.models import Cond, ModelFamily
from diffusion_env.step_math import Reduction, StepGaussian, step_log_prob

AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_IMPLS = ("sdpa", "math")  # fused scaled_dot_product_attention kernels, or matmuls + softmax


def add_lora(network: nn.Module, rank: int, targets: Sequence[str]) -> None:
    """Freeze ``network`` and add rank-``rank`` LoRA adapters (peft, α = rank, Gaussian A and zero B: the
    adapted network starts equal to the base) on the modules named ``targets``."""
    from peft import LoraConfig

    network.requires_grad_(False)
    network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))


class GaussianDenoisingPolicy(nn.Module):
    """A network-backed Gaussian policy for :class:`~diffusion_env.vector_env.DenoisingEnv`, over any model family.

    Args:
        network: the family's trainable network (a diffusers ``UNet2DConditionModel`` for SD v1); the
            only trainable part (``self.network``).
        family: the :class:`~diffusion_env.models.ModelFamily` the environment was built with (its
            ``env.family``): conditioning, guidance, the step Gaussian, the regression target.
        guidance_scale: classifier-free guidance weight (default: the family's schedule, i.e. the env's).
        reduction: how the per-dimension log-densities are combined: ``"mean"`` (the reference
            implementations' convention, for which DDPO's clip range 1e-4 was tuned) or ``"sum"``.
        lora_rank: if set, freeze the network and train rank-``r`` LoRA adapters on its attention
            projections (the family's ``lora_targets``; peft); otherwise every parameter is trained.
        channels_last: store the network's weights and feed its inputs in channels-last memory format
            (faster convolutions with oneDNN on CPUs and with tensor cores). Same numbers up to rounding.
        autocast_dtype: run network calls under ``torch.autocast`` in ``"bf16"`` or ``"fp16"`` (None: the
            network's own dtype). The step Gaussian and log-densities are always computed in fp32.
        compile_network: call the network through ``torch.compile(network, dynamic=False)``: each new batch
            shape and grad mode compiles once (seconds to minutes); ``self.network`` stays the plain
            module, so parameter names and checkpoints are unchanged.
        attention: None (keep the network's attention processors as they are), ``"sdpa"`` (diffusers'
            default: ``F.scaled_dot_product_attention``'s fused kernels; the choice for long sequences
            such as SD v1.4's 4,096 latent positions) or ``"math"`` (diffusers' ``AttnProcessor``:
            batched matmuls and a softmax that autograd and ``torch.compile`` see through). On CPUs, for
            short sequences (the tiny model's 64 and 16 positions), "math" trains faster, and under
            bf16 autocast much faster: torch's CPU flash-attention backward in bf16 took half of a
            whole training step of the tiny UNet (measured on a Xeon with AMX, torch 2.13).
            Same numbers up to rounding.
        gradient_checkpointing: recompute the network's activations in the backward pass instead of keeping
            them (diffusers' ``enable_gradient_checkpointing``, per block): training memory falls
            from every block's activations to one block's, for about one more forward per training call.
            Same numbers up to rounding. Sampling (no gradients) is unaffected.
    """

    def __init__(
        self,
        network: nn.Module,
        family: ModelFamily,
        *,
        guidance_scale: float | None = None,
        reduction: Reduction = "mean",
        lora_rank: int | None = None,
        channels_last: bool = False,
        autocast_dtype: str | None = None,
        compile_network: bool = False,
        attention: str | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if not isinstance(family, ModelFamily):
            raise ValueError(f"family is {type(family).__name__}; expected a diffusion_env.models.ModelFamily "
                             "(an env's .family), or build the policy with GaussianDenoisingPolicy.from_env(env)")  # fmt: skip
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction={reduction!r}; expected 'sum' or 'mean'")
        self.family = family
        self.guidance_scale = float(family.guidance_scale if guidance_scale is None else guidance_scale)
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale={self.guidance_scale}; expected >= 1 (1 disables guidance)")
        self.reduction = reduction
        self.lora_rank = lora_rank
        network.to(family.device)
        if lora_rank is not None:
            if lora_rank < 1:
                raise ValueError(f"lora_rank={lora_rank}; expected a positive integer or None for full fine-tuning")
            add_lora(network, lora_rank, family.lora_targets)
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype={autocast_dtype!r}; expected one of {sorted(AUTOCAST_DTYPES, key=str)}")
        self.autocast_dtype = AUTOCAST_DTYPES[autocast_dtype]
        if attention is not None:
            if attention not in ATTENTION_IMPLS:
                raise ValueError(f"attention={attention!r}; expected None or one of {list(ATTENTION_IMPLS)}")
            family.set_attention(network, attention)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            if not callable(getattr(network, "enable_gradient_checkpointing", None)):
                raise ValueError(f"gradient_checkpointing=True, but the network ({type(network).__name__}) has no "
                                 "enable_gradient_checkpointing(); expected a diffusers model, or turn it off")  # fmt: skip
            network.enable_gradient_checkpointing()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            network.to(memory_format=torch.channels_last)
        self.network = network
        # A bound method, not a submodule: the compiled wrapper must not add "_orig_mod." parameter names.
        self._network_fn = torch.compile(network, dynamic=False).__call__ if compile_network else network.__call__

    @classmethod
    def from_env(cls, env: Any, network: nn.Module | None = None, **kwargs: Any) -> GaussianDenoisingPolicy:
        """The policy over ``env``'s model family, with the family's network unless ``network`` is given."""
        family = getattr(getattr(env, "unwrapped", env), "family", None)
        if not isinstance(family, ModelFamily):
            raise ValueError(f"env is {type(env).__name__}; expected a DenoisingEnv or DenoisingSingleEnv (or a wrapper)")
        return cls(family.load_network() if network is None else network, family, **kwargs)

    # ------------------------------------------------------------------ model evaluation
    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def unet(self) -> nn.Module:
        """The network under its SD-v1 name (kept for code written before the model seam)."""
        return self.network

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (the network's own names), detached, on the CPU."""
        return {n: p.detach().contiguous().cpu() for n, p in self.network.named_parameters() if p.requires_grad}

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One network call with this policy's speed settings (memory format, autocast, compile); fp32 out."""
        return self.forward_with(self._network_fn, self.network.dtype, x, t, cond)

    def forward_with(self, fn: Any, dtype: torch.dtype, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """A call of the network function ``fn`` (weights of ``dtype``) with this policy's memory format and
        autocast; fp32 out. :meth:`forward_network` calls the policy's own network."""
        x = x.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            out = self.family.call_network(fn, x, t, cond)
        return out.float()

    def prediction(self, x: torch.Tensor, t: torch.Tensor, prompts: Sequence[str], guided: bool = True) -> torch.Tensor:
        """The network's prediction for noised latents ``x`` at timesteps ``t``: classifier-free guided at the
        policy's scale (``guided=True``, what sampling uses) or conditional only (regression losses)."""
        scale = self.guidance_scale if guided else 1.0
        return self.family.guided_prediction(self.forward_network, x, t.to(self.device), self.family.condition(prompts),
                                             scale)  # fmt: skip

    def distribution(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> StepGaussian:
        """The Gaussian π(· | x_t, t, c) for a batch (``t`` may differ per row)."""
        cond = self.family.condition(prompts)
        return self.family.step_distribution(self.forward_network, x_t, t.to(self.device), cond, self.guidance_scale)

    # ------------------------------------------------------------------ policy API
    @torch.no_grad()
    def act(
        self, obs: dict[str, Any], generator: torch.Generator | None = None, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x_{t-1} for a batched observation; returns ``(action, log_prob)`` (fp32)."""
        action, gauss = self.family.sample(self.forward_network, obs, self.guidance_scale, generator, deterministic)
        return action, step_log_prob(action, gauss.mean, gauss.std, self.reduction)

    def log_prob(self, obs: dict[str, Any], action: torch.Tensor) -> torch.Tensor:
        """Differentiable log π(action | obs); ``obs`` rows may come from different timesteps."""
        gauss = self.distribution(obs["x_t"], obs["t"], obs["prompt"])
        return step_log_prob(action.float(), gauss.mean, gauss.std, self.reduction)

    def log_prob_and_distribution(self, obs: dict[str, Any], action: torch.Tensor) -> tuple[torch.Tensor, StepGaussian]:
        """:meth:`log_prob` and the Gaussian it was computed from (one network call), e.g. for a KL term."""
        gauss = self.distribution(obs["x_t"], obs["t"], obs["prompt"])
        return step_log_prob(action.float(), gauss.mean, gauss.std, self.reduction), gauss


GaussianUNetPolicy = GaussianDenoisingPolicy  # the name before the model seam

REFERENCE_PLACEMENTS = ("device", "offload")


@contextmanager
def adapters_disabled(network: nn.Module) -> Iterator[None]:
    """The network with its LoRA adapters switched off (diffusers' ``disable_adapters`` over peft's layers), then
    on again: its base weights. The adapters' parameters are the same objects afterwards, trainable again."""
    network.disable_adapters()
    try:
        yield
    finally:
        network.enable_adapters()


class ReferencePolicy:
    """The policy's base weights, frozen: the reference policy of a KL penalty (π_ref).

    With LoRA it is the policy's own network with the adapters switched off while it runs (no copy, nothing
    to offload). With full fine-tuning it is a frozen deep copy of the network taken when the reference is
    built (the trainer builds it before any update and before a checkpoint is loaded, so it holds the base
    weights on resume too), kept on the device (``placement="device"``) or on the CPU and moved to the device
    for each call (``"offload"``: less device memory between calls, a weight transfer per call). Guidance,
    memory format and autocast are the policy's; calls run without gradients.
    """

    def __init__(self, policy: GaussianDenoisingPolicy, placement: str = "device"):
        if placement not in REFERENCE_PLACEMENTS:
            raise ValueError(f"placement={placement!r}; expected one of {list(REFERENCE_PLACEMENTS)}")
        self.policy, self.placement = policy, placement
        self.network: nn.Module | None = None
        if policy.lora_rank is None:
            network = copy.deepcopy(policy.network).requires_grad_(False).eval()
            self.network = network.to("cpu") if placement == "offload" else network

    @contextmanager
    def _weights(self) -> Iterator[Any]:
        """The reference's network function and weight dtype, for the duration of one call."""
        if self.network is None:
            with adapters_disabled(self.policy.network):
                yield self.policy.network.__call__, self.policy.network.dtype
            return
        offload = self.placement == "offload"
        if offload:
            self.network.to(self.policy.device)
        try:
            yield self.network.__call__, self.network.dtype
        finally:
            if offload:
                self.network.to("cpu")

    @torch.no_grad()
    def distribution(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> StepGaussian:
        """π_ref(· | x_t, t, c) for a batch, as :meth:`GaussianDenoisingPolicy.distribution` (no gradients)."""
        p = self.policy
        with self._weights() as (fn, dtype):
            forward = lambda x, tt, cond: p.forward_with(fn, dtype, x, tt, cond)  # noqa: E731
            return p.family.step_distribution(forward, x_t, t.to(p.device), p.family.condition(prompts), p.guidance_scale)

    def kl(self, obs: dict[str, Any], gauss: StepGaussian) -> torch.Tensor:
        """Per-pair KL(π_θ ‖ π_ref) of the policy's step Gaussians ``gauss`` (same σ_t as the reference's) at the
        observations ``obs``: :func:`agents.core.gaussian_kl` with the policy's log-prob reduction.
        Differentiable in ``gauss.mean``."""
        from agents.core import gaussian_kl

        ref = self.distribution(obs["x_t"], obs["t"], obs["prompt"])
        return gaussian_kl(gauss.mean, ref.mean, gauss.std, self.policy.reduction)
