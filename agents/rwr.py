"""RWR: reward-weighted regression on the model's own samples (DDPO §4.2, A.2, A.3, B.1).

Only the final samples x_0 and their rewards are used. The model is trained with the denoising loss of
its family (for SD v1 the DDPM ε loss) on its own samples, each weighted by a softmax of β times its
reward over the samples of the same prompt (appendix A.3: "computing the softmax over rewards for each
prompt independently"), so the weights of every prompt sum to 1:

    loss = Σ_c Σ_{i: c_i = c} w_i ‖target - pred_θ(x_t,i, t, c)‖² / #prompts,   x_t,i = noised(x_0,i, t, noise)
    w_i = softmax_{i: c_i = c}(β r_i)

β is an inverse temperature in the reward's units (appendix A.6: 0.2 for rewards of SD v1.4's tasks);
the tiny presets set it per task so that β × the base model's reward spread is about 1 (agents/config.py).
The prediction is the classifier-free-guided one at the policy's guidance scale ("CFG training",
appendix B.1, Figure 8: essential for more than one round of sampling and training);
``rwr_cfg_training=False`` trains the conditional prediction only, and ``rwr_weighting="advantage"``
weighs by β × the normalised, clipped advantage instead of the reward (both kept for ablations).

``rwr_updates_per_epoch`` optimizer steps each draw ``train_batch_size`` samples with one random
training timestep and noise each (from the model family).
"""

from __future__ import annotations

import torch

from agents.core import RolloutBuffer, optimizer_step, prompt_groups
from agents.distributed import all_reduce_sum


def per_prompt_softmax(prompts, scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores) within each group of equal prompts: weights of every prompt sum to 1."""
    weights = torch.empty_like(scores)
    for ix in prompt_groups(prompts, scores.device):
        weights[ix] = torch.softmax(scores[ix], dim=0)
    return weights


def weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator) -> dict[str, float]:
    """Steps of the weighted denoising loss on the rollout's x_0; ``weights`` [B] (normalised per prompt)."""
    buffer = RolloutBuffer(rollout, weights, cfg.micro_batch_size)
    family = policy.family
    B, device = buffer.num_samples, weights.device  # all processes' samples (global indices)
    latent_shape = tuple(buffer.local.latents.shape[2:])
    guided = getattr(cfg, "rwr_cfg_training", True)
    n_prompts = len(set(buffer.prompts))
    loss_sum, n_steps, skipped, norms = torch.zeros((), device=device), 0, 0, []
    policy.train()
    for _ in range(cfg.rwr_updates_per_epoch):
        idx = torch.randperm(B, generator=generator)[: cfg.train_batch_size]
        t, noise = family.training_inputs(len(idx), latent_shape, generator)
        t, noise = t.to(device), noise.to(device)  # idx stays on the CPU: prompts are looked up without a sync
        # Importance of each drawn sample: its weight rescaled so the expectation is the full loss.
        w = weights[idx] * (B / len(idx)) / n_prompts
        # Several processes: keep the drawn samples this process holds (one process: all of them).
        keep, x0, prompts = buffer.samples(idx)
        keep = keep.to(device)
        t, noise, w = t[keep], noise[keep], w[keep]
        x_t, target = family.noised(x0, t, noise)
        for m in range(0, len(t), cfg.micro_batch_size):
            sl = slice(m, m + cfg.micro_batch_size)
            pred = policy.prediction(x_t[sl], t[sl], prompts[sl], guided=guided)
            per_sample = ((pred - target[sl]) ** 2).mean(dim=(1, 2, 3))
            loss = (w[sl] * per_sample).sum()
            loss.backward()
            loss_sum += loss.detach()
        norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
        norms.append(norm)
        n_steps += 1
        skipped += not applied
    policy.eval()
    loss_sum = all_reduce_sum(loss_sum)
    return {"losses/policy_loss": float(loss_sum) / max(n_steps, 1), "losses/grad_norm": sum(norms) / max(len(norms), 1),
            "losses/optimizer_steps": n_steps - skipped, "losses/skipped_steps": skipped}  # fmt: skip


def rwr_weights(prompts, rewards: torch.Tensor, advantages: torch.Tensor, cfg) -> torch.Tensor:
    """A.2/A.3: per-prompt softmax of β × reward; ``rwr_weighting="advantage"``: of β × the normalised advantage."""
    scores = advantages if getattr(cfg, "rwr_weighting", "reward") == "advantage" else rewards.float()
    return per_prompt_softmax(prompts, cfg.rwr_beta * scores)


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    weights = rwr_weights(rollout.prompts, rollout.rewards, advantages, cfg)
    metrics = weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator)
    metrics["losses/weight_max"] = float(weights.max())
    return metrics
