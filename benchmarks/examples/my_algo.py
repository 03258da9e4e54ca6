"""Put your own algorithm on the leaderboard: plain REINFORCE with a baseline, registered from outside.

python -m benchmarks.examples.my_algo --quick          # or any benchmarks.leaderboard option
"""

import sys

import torch

from agents.core import flat_pairs, optimizer_step
from agents.registry import register_algo
from benchmarks import leaderboard


def reinforce(policy, optimizer, rollout, advantages, cfg, generator, tracker=None):
    """Loss -A · Σ_t log π(a_t | s_t) per sample; A is the per-prompt-normalised reward (the baseline)."""
    B, S, dev = rollout.num_samples, rollout.num_steps, rollout.latents.device
    policy.unet.train()
    order, norm = torch.randperm(B, generator=generator), 0.0
    for start in range(0, B, cfg.train_batch_size):
        idx = order[start : start + cfg.train_batch_size]
        s, j = idx.repeat_interleave(S).to(dev), torch.arange(S).repeat(len(idx)).to(dev)
        for m in range(0, len(s), cfg.micro_batch_size):
            sm, jm = s[m : m + cfg.micro_batch_size], j[m : m + cfg.micro_batch_size]
            batch = flat_pairs(rollout, sm, jm)
            (-(advantages[sm] * policy.log_prob(batch, batch["action"])).sum() / len(idx)).backward()
        norm, _ = optimizer_step(policy, optimizer, cfg.max_grad_norm)
    policy.unet.eval()
    return {"losses/grad_norm": norm}


register_algo("reinforce", reinforce, override=True)

if __name__ == "__main__":
    leaderboard.main(["--algos", "reinforce", "ddpo-is", *sys.argv[1:]])
