"""DDPO-SF: the score-function (REINFORCE) policy gradient (DDPO eq. 3).

    ∇J = E[ A(x_0, c) Σ_t ∇ log π_θ(x_{t-1} | x_t, c) ]

On-policy: one optimizer step per epoch's collection over all samples and their chosen timesteps
(so the data is never reused after the policy changed). The loss is -A · log π averaged over the
(sample, timestep) pairs; its gradient is the estimator above divided by the number of pairs.
"""

from __future__ import annotations

import torch

from agents.core import flat_pairs, optimizer_step, subsample_steps
from agents.distributed import all_reduce_sum, local_pairs


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    B, S = rollout.num_samples, rollout.num_steps
    device = advantages.device
    # 1. All samples × their chosen timesteps, flattened.
    steps = subsample_steps(B, S, cfg.timestep_fraction, generator)
    sample_idx = torch.arange(B).repeat_interleave(steps.shape[1]).to(device)
    step_idx = steps.reshape(-1).to(device)
    total = len(sample_idx)
    # Several processes: keep the pairs of this process's samples (``total`` stays global).
    local, sample_idx, step_idx, pair_adv = local_pairs(rollout, sample_idx, step_idx, advantages)
    loss_sum = torch.zeros((), device=device)
    policy.unet.train()
    # 2. Micro-batches; gradients accumulate into one step.
    for m in range(0, len(sample_idx), cfg.micro_batch_size):
        sl = slice(m, m + cfg.micro_batch_size)
        batch = flat_pairs(local, sample_idx[sl], step_idx[sl])
        adv = pair_adv[sl]
        log_prob = policy.log_prob(batch, batch["action"])
        loss = -(adv * log_prob).sum() / total
        loss.backward()
        loss_sum += loss.detach()
    # 3. Clip, guard, step.
    norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
    policy.unet.eval()
    loss_sum = all_reduce_sum(loss_sum)
    return {"losses/policy_loss": float(loss_sum), "losses/grad_norm": norm,
            "losses/optimizer_steps": int(applied), "losses/skipped_steps": int(not applied)}  # fmt: skip
