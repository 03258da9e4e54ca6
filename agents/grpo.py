"""GRPO: group-relative policy optimisation with PPO's clip and a KL penalty to the base model (Flow-GRPO, DanceGRPO).

Each prompt is sampled G times (G = the shared ``samples_per_prompt``). A sample's advantage is its reward
normalised within its prompt's group, A = (r - mean_g) / (std_g + ε), clipped to ±adv_clip_max; the
trainer's running per-prompt statistics are not used. For each (sample, timestep) pair, with ratio
ρ = π_θ(a_t | s_t) / π_old(a_t | s_t) and the per-step KL to the reference policy (the base weights):

    loss = E[ max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)) + β KL(π_θ(· | s_t) ‖ π_ref(· | s_t)) ]
    KL   = ‖μ_θ - μ_ref‖² / (2 σ_t²), averaged over latent dimensions (log_prob_reduction="mean", as Flow-GRPO)
           or summed (="sum": the exact KL of the step); both Gaussians have the schedule's σ_t

β = 0 needs no reference policy and drops the term. With ``kl_target`` > 0, β adapts after every epoch
(PPO's adaptive-KL rule): × 1.5 when the epoch's mean KL exceeded 1.5 × kl_target, / 1.5 when it fell below
kl_target / 1.5; the running β is the algorithm's state (checkpointed, restored on resume).

Reading order: 1. group advantages; 2. every inner epoch the rollout buffer reshuffles samples, picks each
sample's trained timesteps and cuts optimizer steps of ``train_batch_size`` samples; 3. the pairs go through
the policy ``micro_batch_size`` at a time (and through the reference when β > 0), gradients accumulating;
4. clip, check for non-finite gradients, step; 5. adapt β.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from agents.config import SD14_COMMON, SD35_COMMON, TINY_COMMON
from agents.core import RolloutBuffer, clipped_surrogate, group_advantages, optimizer_step
from agents.distributed import all_reduce_sum
from agents.fields import (
    AlgoConfig,
    doc_field,
    finite_positive,
    grouped_samples,
    positive_int,
    train_batch_divides_epoch,
)

KL_ADAPT = 1.5  # the adaptive-KL rule's band and factor


@dataclass
class GRPOConfig(AlgoConfig):
    """GRPO's own settings (``cfg.algo_config``); the group size G is the shared ``samples_per_prompt``."""

    beta: float = doc_field(
        0.0,
        "KL coefficient β of the per-step KL to the reference policy (the base weights); 0: no KL term and "
        "no reference policy (Flow-GRPO: 0.04 on SD3.5).",
    )
    clip_range: float = doc_field(1e-4, "PPO clip range ε (of mean-reduced log-probs; Flow-GRPO: 1e-4).")
    num_inner_epochs: int = doc_field(1, "Passes over the epoch's samples (Flow-GRPO: 1).")
    adv_std_eps: float = doc_field(
        1e-4,
        "ε added to each group's reward std before dividing (a group of equal rewards gets advantage 0).",
    )
    kl_target: float = doc_field(
        0.0,
        "Adaptive β: after each epoch β is multiplied by 1.5 when the mean KL exceeded 1.5 × kl_target and "
        "divided by 1.5 when it fell below kl_target / 1.5 (0: β stays fixed). Needs beta > 0.",
    )

    def needs_reference(self) -> bool:
        return self.beta > 0

    def validate(self, shared) -> list[str]:
        errors = positive_int(self, "num_inner_epochs") + finite_positive(self, "clip_range", "adv_std_eps")
        errors += train_batch_divides_epoch(shared)
        for name in ("beta", "kl_target"):
            if not 0 <= getattr(self, name) < math.inf:
                errors.append(f"{name}={getattr(self, name)}: expected a finite number >= 0")
        if self.kl_target > 0 and not self.beta > 0:
            errors.append(f"kl_target={self.kl_target} with beta={self.beta}: an adaptive β starts from beta; "
                          "expected beta > 0 (e.g. 0.04)")  # fmt: skip
        return errors + grouped_samples(shared, "GRPO")


PRESETS = {
    # Untuned: DDPO-IS's SD v1.4 sizes (256 samples, steps of 64) in groups of 8 (two prompts per batch of 16).
    "sd14": dict(SD14_COMMON, samples_per_epoch=256, samples_per_prompt=8, train_batch_size=64, clip_range=1e-4,
                 beta=0.04),  # fmt: skip
    # Flow-GRPO on SD3.5-Medium: groups of 24, two optimizer steps per epoch, clip 1e-4, β 0.04, LoRA 32, lr 3e-4.
    "sd35": dict(SD35_COMMON, train_batch_size=24 * 24, num_inner_epochs=1, clip_range=1e-4, beta=0.04),
    # Untuned: 8 prompts × G = 8 per epoch, DDPO-IS's tiny clip (1e-3: 256 latent dimensions) and steps of 32
    # samples; Flow-GRPO's β. Full fine-tuning, so the reference is a frozen copy of the tiny network.
    "tiny": dict(TINY_COMMON, samples_per_prompt=8, train_batch_size=32, num_inner_epochs=1, clip_range=1e-3,
                 beta=0.04),  # fmt: skip
}


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None, *, state=None, ref=None) -> dict:
    ac = cfg.algo_config  # GRPOConfig
    state = {} if state is None else state  # the trainer passes the run's (checkpointed) state
    beta = float(state.setdefault("beta", ac.beta)) if ac.kl_target > 0 else ac.beta
    if beta > 0 and ref is None:
        raise ValueError(f"grpo with beta={beta} needs the reference policy; expected ref (the trainer passes it)")
    # 1. Advantages within each prompt's group (over all processes' samples: prompts and rewards are global).
    adv = group_advantages(rollout.prompts, rollout.rewards, ac.adv_std_eps).to(advantages.device)
    adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    buffer = RolloutBuffer(rollout, adv, cfg.micro_batch_size)
    device = adv.device
    acc = torch.zeros(4, device=device)  # policy loss, approx_kl, clipfrac, kl_ref sums: synced once
    n_pairs, n_steps, skipped, grad_norms = 0, 0, 0, []
    policy.train()
    for _ in range(ac.num_inner_epochs):
        # 2. This pass's optimizer steps (drawn before any network call).
        for step in buffer.train_steps(cfg.train_batch_size, generator, cfg.timestep_fraction):
            # 3. Micro-batches through the policy (and the reference); gradients accumulate.
            for batch in buffer.micro_batches(step):
                log_prob, gauss = policy.log_prob_and_distribution(batch.obs, batch.actions)
                log_ratio = log_prob - batch.old_log_probs
                policy_loss = clipped_surrogate(log_ratio, batch.advantages, ac.clip_range)
                kl = ref.kl(batch.obs, gauss) if beta > 0 else torch.zeros_like(policy_loss)
                ((policy_loss + beta * kl).sum() / batch.num_step_pairs).backward()
                with torch.no_grad():
                    acc += torch.stack([
                        policy_loss.sum(),
                        0.5 * (log_ratio**2).sum(),
                        ((log_ratio.exp() - 1.0).abs() > ac.clip_range).float().sum(),
                        kl.sum(),
                    ])  # fmt: skip
                n_pairs += len(batch.advantages)
            # 4. Clip, guard, step.
            norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
            grad_norms.append(norm)
            n_steps += 1
            skipped += not applied
    policy.eval()
    acc = all_reduce_sum(torch.cat([acc, torch.tensor([float(n_pairs)], device=device)]))  # over processes
    totals, n_pairs = acc[:4].tolist(), max(int(acc[4]), 1)
    kl_mean = totals[3] / n_pairs
    # 5. Adaptive β (PPO's rule), kept in the algorithm's state.
    if ac.kl_target > 0:
        if kl_mean > KL_ADAPT * ac.kl_target:
            state["beta"] = beta * KL_ADAPT
        elif kl_mean < ac.kl_target / KL_ADAPT:
            state["beta"] = beta / KL_ADAPT
    return {
        "losses/policy_loss": totals[0] / n_pairs,
        "losses/approx_kl": totals[1] / n_pairs,
        "losses/clipfrac": totals[2] / n_pairs,
        "losses/kl_ref": kl_mean,  # 0 when β = 0 (no reference: not computed)
        "losses/beta": beta,
        "losses/advantage_abs_mean": float(adv.abs().mean()),
        "losses/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        "losses/optimizer_steps": n_steps - skipped,
        "losses/skipped_steps": skipped,
    }
