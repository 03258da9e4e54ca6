"""The exact Gaussian of one denoising step: p_θ(x_{t-1} | x_t, c) for DDIM with stochasticity η.

DDPO (Black et al., 2023, section 4.3) treats every sampler step as a policy. With DDIM's η = 1 (the
paper's ancestral sampler) the step is an isotropic Gaussian whose mean depends on the ε prediction,
so its log-density is differentiable in the UNet's parameters. The functions here are small, pure
and batched: every per-sample quantity is gathered from a table that lives on the caller's device,
so nothing synchronises with the host.

Notation (paper / DDIM paper ↔ code):

=====================  ==========================  ==============================================
symbol                 code                        meaning
=====================  ==========================  ==============================================
t, t-1                 ``t``, ``t_prev``            training-timestep indices of this and the next
                                                    step; ``t_prev < 0`` means "after the last step"
ᾱ_t                    ``alpha_bar_t``              cumulative product of (1 - β) up to t
ᾱ_{t-1}                ``alpha_bar_prev``           same at t_prev; ``final_alpha_bar`` when t_prev<0
ε_θ(x_t, t, c)         ``eps``                      the (classifier-free guided) noise prediction
x̂_0                    ``x0_pred``                  (x_t - √(1-ᾱ_t) ε) / √ᾱ_t
σ_t(η)                 ``std``                      η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1})
μ_θ(x_t, t, c)         ``mean``                     √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}-σ_t²) ε
x_{t-1}                ``x_prev``                   the action: μ + σ z, z ~ N(0, I)
log p_θ(x_{t-1}|…)     ``log_prob``                 Σ_d log N(x_{t-1,d}; μ_d, σ²)  (or the mean)
=====================  ==========================  ==============================================

Two reductions of the log-density are offered, both exact per-dimension Gaussian log-densities:

- ``reduction="sum"`` sums over the latent dimensions: the true log-likelihood of x_{t-1}.
- ``reduction="mean"`` averages over them: the convention of the reference implementations
  (ddpo-pytorch, TRL). It is the sum divided by the number of latent dimensions, so importance
  ratios computed from it are the D-th root of the true ratio; PPO's clip range of 1e-4 in the paper
  was tuned for this convention.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Reduction = Literal["sum", "mean", "none"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepGaussian(NamedTuple):
    """Mean and (per-sample) standard deviation of p(x_{t-1} | x_t, c).

    ``mean`` has the latent's shape ``[B, C, H, W]``; ``std`` has shape ``[B, 1, 1, 1]`` so that it
    broadcasts against the mean (the Gaussian is isotropic).
    """

    mean: torch.Tensor
    std: torch.Tensor


def previous_timestep(t: torch.Tensor, num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """The timestep DDIM steps to from ``t``: ``t - T // n`` (as ``DDIMScheduler.step`` computes it)."""
    return t - num_train_timesteps // num_inference_steps


def _gather(table: torch.Tensor, index: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """table[index] where index >= 0, else ``fallback``; shaped [B, 1, 1, 1]. No host sync."""
    safe = index.clamp(min=0)
    values = torch.where(index >= 0, table[safe], fallback)
    return values.reshape(-1, 1, 1, 1)


def ddim_step_gaussian(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    eta: float = 1.0,
    clip_sample_range: float | None = None,
) -> StepGaussian:
    """Mean and standard deviation of the DDIM(η) step from x_t to x_{t-1}.

    Args:
        eps: ε prediction ``[B, C, H, W]`` (after classifier-free guidance).
        x_t: the current latent ``[B, C, H, W]``.
        t: integer timesteps ``[B]`` (or a scalar tensor, broadcast over the batch).
        t_prev: the timesteps stepped to, same shape as ``t``; negative means the final step.
        alphas_cumprod: the scheduler's ᾱ table ``[T]``, on the same device as ``x_t``.
        final_alpha_cumprod: ᾱ used after the last step (scalar tensor, same device).
        eta: DDIM's η; must be > 0 (η = 1 is the paper's ancestral sampler).
        clip_sample_range: if set, clamp x̂_0 to ±range (``clip_sample=True`` schedulers).

    Returns:
        :class:`StepGaussian` with mean ``[B, C, H, W]`` and std ``[B, 1, 1, 1]``, in the dtype of
        ``eps`` promoted with the ᾱ table (pass an fp32 table to get fp32 statistics).

    Raises:
        ValueError: if ``eta <= 0``: the step is then deterministic and has no density.
    """
    if not eta > 0:
        raise ValueError(
            f"eta={eta}: the DDIM step has no density for eta <= 0 (deterministic sampling); "
            "use eta > 0 (eta=1 is DDPO's ancestral sampler)"
        )
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).expand(batch) if torch.as_tensor(t).ndim == 0 else t
    t_prev = torch.as_tensor(t_prev, device=x_t.device)
    t_prev = t_prev.expand(batch) if t_prev.ndim == 0 else t_prev

    # 1. ᾱ_t and ᾱ_{t-1} for every sample.
    alpha_bar_t = _gather(alphas_cumprod, t, final_alpha_cumprod)
    alpha_bar_prev = _gather(alphas_cumprod, t_prev, final_alpha_cumprod)
    beta_bar_t = 1.0 - alpha_bar_t
    beta_bar_prev = 1.0 - alpha_bar_prev

    # 2. Predicted x_0 ("predicted original sample").
    x0_pred = (x_t - beta_bar_t.sqrt() * eps) / alpha_bar_t.sqrt()
    if clip_sample_range is not None:
        x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)

    # 3. σ_t(η), DDIM eq. (16).
    variance = (beta_bar_prev / beta_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)
    std = eta * variance.clamp(min=0.0).sqrt()

    # 4. The mean: the "direction pointing to x_t" plus the rescaled x̂_0, DDIM eq. (12).
    direction = (beta_bar_prev - std**2).clamp(min=0.0).sqrt() * eps
    mean = alpha_bar_prev.sqrt() * x0_pred + direction
    return StepGaussian(mean=mean, std=std)


def step_log_prob(
    x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "sum"
) -> torch.Tensor:
    """Exact log-density of ``x_prev`` under N(mean, std² I).

    Args:
        x_prev: the action x_{t-1}, ``[B, C, H, W]``.
        mean, std: from :func:`ddim_step_gaussian`; ``std`` broadcasts against ``mean``.
        reduction: ``"sum"`` over latent dimensions (exact log-likelihood, shape ``[B]``), ``"mean"``
            over them (reference implementations' convention, shape ``[B]``), or ``"none"``
            (per-dimension, the input's shape).

    Raises:
        ValueError: if any standard deviation is zero. The check runs here when ``std`` is on the
            CPU; on accelerators it would cost a host sync per call, so there the schedule is
            validated once with :func:`check_std` (the model family does this when it builds its schedule).
    """
    if std.device.type == "cpu" and bool((std <= 0).any()):
        raise ValueError(
            "a standard deviation is zero: the log-density is undefined at that step "
            "(eta=0, or a scheduler with set_alpha_to_one=True at the final step)"
        )
    z = (x_prev - mean) / std
    log_density = -0.5 * z**2 - std.log() - _LOG_SQRT_2PI
    if reduction == "none":
        return log_density
    dims = tuple(range(1, log_density.ndim))
    if reduction == "sum":
        return log_density.sum(dim=dims)
    if reduction == "mean":
        return log_density.mean(dim=dims)
    raise ValueError(f"reduction={reduction!r}; expected 'sum', 'mean' or 'none'")


def check_std(std: torch.Tensor) -> None:
    """Raise ``ValueError`` if any step's standard deviation is zero (one host sync; call once)."""
    if bool((std <= 0).any()):
        raise ValueError(
            "a standard deviation in the sampling schedule is zero: the log-density is undefined there "
            "(eta=0, or a scheduler with set_alpha_to_one=True at the final step); use eta > 0 and "
            "set_alpha_to_one=False"
        )


def schedule_std(
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """σ_t(η) for every step of a sampling schedule, shape ``[num_steps]`` (used to validate it)."""
    a_t = _gather(alphas_cumprod, timesteps, final_alpha_cumprod).flatten()
    a_prev = _gather(alphas_cumprod, prev_timesteps, final_alpha_cumprod).flatten()
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    return eta * variance.clamp(min=0.0).sqrt()


def sample_step(gaussian: StepGaussian, noise: torch.Tensor) -> torch.Tensor:
    """x_{t-1} = μ + σ z for standard-normal ``noise`` z of the latent's shape."""
    return gaussian.mean + gaussian.std * noise


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε_uncond + w (ε_cond - ε_uncond); w = 1 returns the conditional prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------------------------
# Flow matching made stochastic (Flow-GRPO, Liu et al. 2025; CPS, "coefficients-preserving sampling").
#
# Notation (flow-matching papers ↔ code). A rectified-flow model interpolates x_σ = (1 - σ) x_0 + σ ε
# (σ = 1: pure noise, σ = 0: data) and predicts the velocity v = ε - x_0; the ODE sampler is Euler's
# x_{σ'} = x_σ + (σ' - σ) v̂. Flow-GRPO replaces it with the reverse SDE of the same marginals, whose
# Euler–Maruyama step is an isotropic Gaussian:
#
# =====================  ===================  ==========================================================
# symbol                 code                 meaning
# =====================  ===================  ==========================================================
# σ_t, σ_{t-1}           ``sigma``,           noise level of x_t and of the latent stepped to (σ_{t-1} < σ_t)
#                        ``sigma_next``
# Δ                      ``dt``               σ_{t-1} - σ_t (< 0)
# v̂                      ``v``                the (classifier-free guided) velocity prediction
# a                      ``noise_level``      the SDE's noise level (Flow-GRPO uses 0.7 on SD3.5)
# g_t                    ``g``                a √(σ_t / (1 - σ_t)); at σ_t = 1 the denominator uses σ_max,
#                                             the schedule's second σ (as Flow-GRPO does)
# μ (SDE)                ``mean``             x_t + Δ [v̂ + g²/(2σ_t) (x_t + (1 - σ_t) v̂)]
# s (SDE)                ``std``              g √(-Δ)
# x̂_0, ε̂                 ``x0``, ``eps``      x_t - σ_t v̂ and x_t + (1 - σ_t) v̂
# s (CPS)                ``std``              σ_{t-1} sin(a π / 2)
# μ (CPS)                ``mean``             (1 - σ_{t-1}) x̂_0 + √(σ_{t-1}² - s²) ε̂
# =====================  ===================  ==========================================================
#
# Log-densities of either step are :func:`step_log_prob` of the returned Gaussian (exact, sum or mean).
# ---------------------------------------------------------------------------------------------------------


def _column(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar (``[B]``, 0-d or float) as ``[B, 1, 1, 1]`` in fp32 on ``like``'s device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.ndim - 1))).expand(like.shape[0], *([1] * (like.ndim - 1)))


def flow_sde_step_gaussian(
    v: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    sigma_max: torch.Tensor | float,
) -> StepGaussian:
    """Flow-GRPO's SDE step from x_t (noise level σ_t) to σ_{t-1}: mean and std, fp32.

    Args:
        v: velocity prediction ``[B, C, H, W]`` (after guidance).
        x_t: the current latent, same shape.
        sigma, sigma_next: σ_t and σ_{t-1} per sample (``[B]``) or shared (0-d / float).
        noise_level: a > 0.
        sigma_max: the schedule's second σ, used in g's denominator where σ_t = 1.

    Raises:
        ValueError: if ``noise_level <= 0`` (the step is then the deterministic ODE, without density).
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level={noise_level}; the flow SDE step has no density for a <= 0 "
                         "(that is the ODE sampler). Use a > 0 (Flow-GRPO uses 0.7)")  # fmt: skip
    v, x_t = v.float(), x_t.float()
    # 1. σ_t, σ_{t-1} and Δ per sample.
    sigma, sigma_next = _column(sigma, x_t), _column(sigma_next, x_t)
    dt = sigma_next - sigma
    # 2. The diffusion coefficient g_t (σ_max stands in for σ_t = 1 in the denominator).
    denom = 1.0 - torch.where(sigma >= 1.0, _column(sigma_max, x_t), sigma)
    g = noise_level * (sigma / denom).sqrt()
    # 3. Drift: the ODE velocity plus the score correction that keeps the marginals.
    mean = x_t + dt * (v + g**2 / (2.0 * sigma) * (x_t + (1.0 - sigma) * v))
    return StepGaussian(mean=mean, std=g * (-dt).sqrt())


def flow_cps_step_gaussian(
    v: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
) -> StepGaussian:
    """The coefficients-preserving step: x̂_0 and ε̂ re-mixed at σ_{t-1} with noise of std σ_{t-1} sin(aπ/2).

    The std is 0 where σ_{t-1} = 0 (the last step of a full schedule): the model family decides what that
    step does (see :class:`diffusion_env.models.sd3.SD3Family`).
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level={noise_level}; the CPS step has no density for a <= 0. Use 0 < a <= 1")
    v, x_t = v.float(), x_t.float()
    sigma, sigma_next = _column(sigma, x_t), _column(sigma_next, x_t)
    # 1. The model's estimates of the clean latent and of the noise.
    x0 = x_t - sigma * v
    eps = x_t + (1.0 - sigma) * v
    # 2. Noise std at σ_{t-1} and the deterministic share of ε̂ that keeps the total noise at σ_{t-1}.
    std = sigma_next * math.sin(noise_level * math.pi / 2.0)
    mean = (1.0 - sigma_next) * x0 + (sigma_next**2 - std**2).clamp(min=0.0).sqrt() * eps
    return StepGaussian(mean=mean, std=std)


def flow_ode_step(v: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor | float,
                  sigma_next: torch.Tensor | float) -> torch.Tensor:  # fmt: skip
    """The deterministic Euler step of the flow ODE: x_t + (σ_{t-1} - σ_t) v̂ (fp32)."""
    x_t = x_t.float()
    return x_t + (_column(sigma_next, x_t) - _column(sigma, x_t)) * v.float()
