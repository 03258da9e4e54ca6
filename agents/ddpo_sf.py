"""DDPO-SF: the score-function (REINFORCE) policy gradient (DDPO eq. 3).

    ∇J = E[ A(x_0, c) Σ_t ∇ log π_θ(x_{t-1} | x_t, c) ]

On-policy: one optimizer step per epoch's collection over all samples and their chosen timesteps
(so the data is never reused after the policy changed). The loss is -A · log π averaged over the
(sample, timestep) pairs; its gradient is the estimator above divided by the number of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.config import SD14_COMMON, SD35_COMMON, TINY_COMMON
from agents.core import RolloutBuffer, optimizer_step
from agents.distributed import all_reduce_sum
from agents.fields import AlgoConfig, train_batch_divides_epoch


@dataclass
class DDPOSFConfig(AlgoConfig):
    """DDPO-SF has no settings of its own: it is on-policy (one pass, one optimizer step per epoch)."""

    def validate(self, shared) -> list[str]:
        return train_batch_divides_epoch(shared)


PRESETS = {
    "sd14": dict(SD14_COMMON, samples_per_epoch=256, train_batch_size=256),
    "sd35": dict(SD35_COMMON, train_batch_size=48 * 24),  # on-policy: one step
    "tiny": dict(TINY_COMMON, train_batch_size=64),
}


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    buffer = RolloutBuffer(rollout, advantages, cfg.micro_batch_size)
    # 1. All samples × their chosen timesteps, in order: one optimizer step.
    (step,) = buffer.train_steps(buffer.num_samples, generator, cfg.timestep_fraction, shuffle=False)
    loss_sum = torch.zeros((), device=advantages.device)
    policy.train()
    # 2. Micro-batches; gradients accumulate into one step.
    for batch in buffer.micro_batches(step):
        loss = -(batch.advantages * policy.log_prob(batch.obs, batch.actions)).sum() / batch.num_step_pairs
        loss.backward()
        loss_sum += loss.detach()
    # 3. Clip, guard, step.
    norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
    policy.eval()
    loss_sum = all_reduce_sum(loss_sum)
    return {"losses/policy_loss": float(loss_sum), "losses/grad_norm": norm,
            "losses/optimizer_steps": int(applied), "losses/skipped_steps": int(not applied)}  # fmt: skip
