"""NFT: DiffusionNFT, negative-aware fine-tuning on the forward process (Zheng et al. 2025, arXiv 2509.16117).

As RWR, NFT uses only the final samples x_0 and their rewards, and its loss is the family's denoising regression
on the model's own samples: no likelihoods, no sampler in the loss. Each prompt is sampled G times (G = the
shared ``samples_per_prompt``); a sample's advantage A is its reward normalised within its prompt's group,
clipped to ±A_max (``adv_clip_max``), and its "optimality probability" is

    r = 0.5 + 0.5 · clip(A / A_max, -1, 1)  ∈ [0, 1]

For a drawn timestep and noise, (x_t, target) = noised(x_0, t, ε). With v_old the prediction of the weights at
the start of the epoch (no gradient) and v_θ the current one, the implicit positive and negative policies and
the loss are

    v⁺ = (1 - β) v_old + β v_θ,   v⁻ = (1 + β) v_old - β v_θ
    loss = E[ r · D(v⁺) + (1 - r) · D(v⁻) ] / β

so v⁺ is pulled towards the good samples and v⁻ towards the bad ones; at θ = θ_old (the epoch's first step)
v⁺ = v⁻ = v_old and the gradient is (2r - 1) ∇_θ D(v_θ), whatever β. D is a prediction's regression error:
with ``adaptive_weight`` (DiffusionNFT's), in x_0 space and divided by its own size (sg: no gradient),

    D(v) = mean (x̂_0(v) - x_0)² / sg(max(mean |x̂_0(v) - x_0|, 1e-5))     (means over latent dimensions)

else the plain mean squared error of v against the target. β is the guidance strength (DiffusionNFT: 1).

The loss goes only through the family (``training_inputs``, ``noised``, ``predicted_x0``), so the same code
trains the flow models' velocity and SD v1's ε prediction sampled by DDIM: v⁺ and v⁻ are linear mixtures of
predictions and x̂_0 is affine in the prediction in either parameterisation, so the implicit-policy
construction carries over to DDIM through the ε-parameterisation unchanged. The prediction is the classifier-free-guided one at the run's guidance scale
(``guided``; DiffusionNFT itself is CFG-free: the shared ``cfg_free=True``).

On-policy (DiffusionNFT's soft-update decay η = 0): the old predictions of every drawn (sample, t, noise) of
the epoch are computed before its first optimizer step, and held until its end (nft_updates_per_epoch ×
train_batch_size latents on the device).

Reading order: 1. group advantages → r; 2. each optimizer step's samples, timesteps and noise; 3. the old
predictions, without gradients; 4. per step, micro-batches of the NFT loss, gradients accumulating; clip, guard,
step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from agents.config import SD14_COMMON, SD35_COMMON, TINY_COMMON
from agents.core import RolloutBuffer, group_advantages, optimizer_step
from agents.distributed import all_reduce_sum
from agents.fields import (
    AlgoConfig,
    doc_field,
    final_samples_only,
    finite_positive,
    grouped_samples,
    positive_int,
    train_batch_within_epoch,
)

ADAPTIVE_MIN = 1e-5  # floor of the adaptive weight's mean absolute x_0 error


@dataclass
class NFTConfig(AlgoConfig):
    """NFT's own settings (``cfg.algo_config``); the group size G is the shared ``samples_per_prompt``."""

    nft_beta: float = doc_field(
        1.0,
        "Guidance strength β > 0 of the implicit policies v± = v_old ± β (v_θ - v_old) (DiffusionNFT: 1).",
    )
    nft_updates_per_epoch: int = doc_field(
        8,
        "Optimizer steps per epoch (each on train_batch_size of the epoch's samples, one random timestep each).",
    )
    adaptive_weight: bool = doc_field(
        True,
        "DiffusionNFT's adaptive weighting: the error in x_0 space divided by its mean absolute size; off: the "
        "plain mean squared error of the prediction against the regression target.",
    )
    guided: bool = doc_field(
        True,
        "Regress the classifier-free-guided prediction at the run's guidance scale; off: the conditional "
        "prediction only (DiffusionNFT is CFG-free: set the shared cfg_free instead).",
    )

    def validate(self, shared) -> list[str]:
        errors = positive_int(self, "nft_updates_per_epoch") + finite_positive(self, "nft_beta")
        errors += train_batch_within_epoch(shared)
        return errors + grouped_samples(shared, "NFT") + final_samples_only(shared, "NFT")


PRESETS = {
    # Untuned: RWR's SD v1.4 shape (steps of 128, each sample regressed about 5 times) on a smaller epoch in
    # groups of 8, so that the epoch's old predictions (40 × 128 latents) stay small on the device.
    "sd14": dict(SD14_COMMON, samples_per_epoch=1024, samples_per_prompt=8, train_batch_size=128,
                 nft_updates_per_epoch=40, nft_beta=1.0),  # fmt: skip
    # Untuned: RWR's SD3.5 preset (Flow-GRPO's epoch of 48 prompts × 24, 45 steps of 128, a tenth of the lr).
    "sd35": dict(SD35_COMMON, train_batch_size=128, nft_updates_per_epoch=45, learning_rate=3e-5, nft_beta=1.0),
    # RWR's tiny shape: 8 prompts × G = 8, 8 steps of 64 samples, lr 3e-5.
    "tiny": dict(TINY_COMMON, train_batch_size=64, nft_updates_per_epoch=8, learning_rate=3e-5, samples_per_prompt=8,
                 nft_beta=1.0),  # fmt: skip
}


def optimality(prompts, rewards: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = 0.5 + 0.5 · clip(A / A_max, -1, 1) of the group advantages A: in [0, 1], 0.5 for a group's mean."""
    return 0.5 + 0.5 * (group_advantages(prompts, rewards) / adv_clip_max).clamp(-1.0, 1.0)


def regression_error(family, prediction, x_t, t, x0, target, adaptive: bool) -> torch.Tensor:
    """D of each row's prediction: adaptive (x_0 space, over its own stop-gradient scale) or the plain MSE."""
    dims = tuple(range(1, x0.ndim))
    if not adaptive:
        return ((prediction - target) ** 2).mean(dim=dims)
    err = family.predicted_x0(x_t, t, prediction) - x0
    return (err**2).mean(dim=dims) / err.detach().abs().mean(dim=dims).clamp(min=ADAPTIVE_MIN)


def nft_loss(family, pred, old, x_t, t, x0, target, r, beta: float, adaptive: bool):
    """Per row: ``([r D(v⁺) + (1 - r) D(v⁻)] / β, D(v⁺), D(v⁻))`` with v± the implicit policies of ``pred``
    (v_θ) and ``old`` (v_old, detached)."""
    pos = (1 - beta) * old + beta * pred
    neg = (1 + beta) * old - beta * pred
    d_pos = regression_error(family, pos, x_t, t, x0, target, adaptive)
    d_neg = regression_error(family, neg, x_t, t, x0, target, adaptive)
    return (r * d_pos + (1 - r) * d_neg) / beta, d_pos, d_neg


class Draw(NamedTuple):
    """One optimizer step's samples that this process holds, with their r, timesteps and noise."""

    total: int  # the step's sample count over all processes
    x0: torch.Tensor
    prompts: list[str]
    r: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    ac = cfg.algo_config  # NFTConfig
    family, device, mb = policy.family, advantages.device, cfg.micro_batch_size
    # 1. Optimality probabilities from group advantages (over all processes' samples: prompts and rewards are global).
    r = optimality(rollout.prompts, rollout.rewards, cfg.adv_clip_max).to(device)
    buffer = RolloutBuffer(rollout, r, mb)
    latent_shape = tuple(buffer.local.latents.shape[2:])
    # 2. The epoch's draws, before any network call (several processes: each keeps the samples it holds).
    draws = []
    for _ in range(ac.nft_updates_per_epoch):
        idx = torch.randperm(buffer.num_samples, generator=generator)[: cfg.train_batch_size]
        t, noise = family.training_inputs(len(idx), latent_shape, generator)
        keep, x0, prompts = buffer.samples(idx)
        draws.append(Draw(len(idx), x0, prompts, r[idx[keep]], t[keep].to(device), noise[keep].to(device)))

    def micro_batches(d: Draw):
        for m in range(0, len(d.t), mb):
            sl = slice(m, m + mb)
            yield sl, *family.noised(d.x0[sl], d.t[sl], d.noise[sl])

    def predict(d: Draw, sl: slice, x_t: torch.Tensor) -> torch.Tensor:
        return policy.prediction(x_t, d.t[sl], d.prompts[sl], guided=ac.guided)

    policy.train()
    # 3. v_old at the epoch's starting weights, for every draw (on-policy: η = 0).
    with torch.no_grad():
        old = [[predict(d, sl, x_t) for sl, x_t, _ in micro_batches(d)] for d in draws]
    # 4. The NFT loss, step by step.
    acc = torch.zeros(3, device=device)  # loss, D⁺, D⁻ sums: synced once
    n_steps, skipped, norms = 0, 0, []
    for d, olds in zip(draws, old):
        for (sl, x_t, target), v_old in zip(micro_batches(d), olds):
            loss, d_pos, d_neg = nft_loss(family, predict(d, sl, x_t), v_old, x_t, d.t[sl], d.x0[sl], target,
                                          d.r[sl], ac.nft_beta, ac.adaptive_weight)  # fmt: skip
            (loss.sum() / d.total).backward()  # summed over processes: the step's mean
            acc += torch.stack([loss.sum(), d_pos.sum(), d_neg.sum()]).detach()
        norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
        norms.append(norm)
        n_steps += 1
        skipped += not applied
    policy.eval()
    totals, n = all_reduce_sum(acc).tolist(), max(sum(d.total for d in draws), 1)
    return {
        "losses/policy_loss": totals[0] / n,
        "losses/positive_loss": totals[1] / n,
        "losses/negative_loss": totals[2] / n,
        "losses/r_mean": float(r.mean()),
        "losses/grad_norm": sum(norms) / max(len(norms), 1),
        "losses/optimizer_steps": n_steps - skipped,
        "losses/skipped_steps": skipped,
    }
