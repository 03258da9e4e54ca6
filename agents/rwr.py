"""RWR: reward-weighted regression, the denoising problem seen as a one-step bandit (DDPO §4.2, A.2).

Only the prompt c, the final sample x_0 and its reward are used. The model is trained with the usual
DDPM loss on its own samples, each weighted by a softmax of β times its (normalised) reward over
the samples of the same prompt, so the weights of every prompt sum to 1:

    loss = Σ_c Σ_{i: c_i = c} w_i ‖ε - ε_θ(√ᾱ_t x_0,i + √(1-ᾱ_t) ε, t, c)‖² / #prompts,
    w_i = softmax_{i: c_i = c}(β A_i)

``rwr_updates_per_epoch`` optimizer steps each draw ``train_batch_size`` samples with one random
training timestep t ~ U{0, …, T-1} each. The conditional ε is used (no guidance: this is the
pretraining loss).
"""

from __future__ import annotations

import torch

from agents.core import optimizer_step, prompt_groups
from agents.distributed import all_reduce_sum, local_samples


def per_prompt_softmax(prompts, scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores) within each group of equal prompts: weights of every prompt sum to 1."""
    weights = torch.empty_like(scores)
    for ix in prompt_groups(prompts, scores.device):
        weights[ix] = torch.softmax(scores[ix], dim=0)
    return weights


def weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator) -> dict[str, float]:
    """Steps of the weighted DDPM loss on the rollout's x_0; ``weights`` [B] (normalised per prompt)."""
    env = policy.env
    B = rollout.num_samples  # all processes' samples (global indices)
    device = weights.device
    n_prompts = len(set(rollout.prompts))
    loss_sum, n_steps, skipped, norms = torch.zeros((), device=device), 0, 0, []
    policy.unet.train()
    for _ in range(cfg.rwr_updates_per_epoch):
        idx = torch.randperm(B, generator=generator)[: cfg.train_batch_size]
        t = torch.randint(0, env.num_train_timesteps, (len(idx),), generator=generator).to(device)
        noise = torch.randn((len(idx), *env.latent_shape), generator=generator).to(device)
        idx = idx.to(device)
        # Importance of each drawn sample: its weight rescaled so the expectation is the full loss.
        w = weights[idx] * (B / len(idx)) / n_prompts
        # Several processes: keep the drawn samples this process holds (one process: all of them).
        local, keep, lidx = local_samples(rollout, idx)
        idx, t, noise, w = idx[keep], t[keep], noise[keep], w[keep]
        a = env.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * local.latents[lidx, -1] + (1 - a).sqrt() * noise
        for m in range(0, len(idx), cfg.micro_batch_size):
            sl = slice(m, m + cfg.micro_batch_size)
            cond = policy.text_embeddings([rollout.prompts[i] for i in idx[sl].tolist()])
            eps = policy.unet(x_t[sl].to(policy.unet.dtype), t[sl], encoder_hidden_states=cond).sample.float()
            per_sample = ((eps - noise[sl]) ** 2).mean(dim=(1, 2, 3))
            loss = (w[sl] * per_sample).sum()
            loss.backward()
            loss_sum += loss.detach()
        norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
        norms.append(norm)
        n_steps += 1
        skipped += not applied
    policy.unet.eval()
    loss_sum = all_reduce_sum(loss_sum)
    return {"losses/policy_loss": float(loss_sum) / max(n_steps, 1), "losses/grad_norm": sum(norms) / max(len(norms), 1),
            "losses/optimizer_steps": n_steps - skipped, "losses/skipped_steps": skipped}  # fmt: skip


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    weights = per_prompt_softmax(rollout.prompts, cfg.rwr_beta * advantages)
    metrics = weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator)
    metrics["losses/weight_max"] = float(weights.max())
    return metrics
