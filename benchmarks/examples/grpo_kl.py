"""GRPO with a KL penalty to the base model, written over the public API (the lines between the markers).

python -m benchmarks.examples.grpo_kl --quick          # or any benchmarks.leaderboard option
"""

import sys
from dataclasses import dataclass

from agents.config import TINY_COMMON
from agents.core import RolloutBuffer, clipped_surrogate, group_advantages, optimizer_step
from agents.fields import doc_field
from agents.registry import register_algo
from benchmarks import leaderboard


# --- the algorithm ---
@dataclass
class GRPOExampleConfig:
    beta: float = doc_field(0.04, "KL coefficient β (per-step KL to the base model).")
    clip_range: float = doc_field(1e-3, "PPO clip range ε.")


def grpo_kl(policy, optimizer, rollout, advantages, cfg, generator, tracker=None, *, ref):
    """GRPO (example): group-normalised advantages, PPO clip, β × per-step KL to the base model."""
    ac, norm = cfg.algo_config, 0.0
    adv = group_advantages(rollout.prompts, rollout.rewards).to(advantages.device).clamp(-5, 5)
    buffer = RolloutBuffer(rollout, adv, cfg.micro_batch_size)  # shuffles, batches, shards
    policy.train()
    for step in buffer.train_steps(cfg.train_batch_size, generator, cfg.timestep_fraction):
        for b in buffer.micro_batches(step):
            log_prob, gauss = policy.log_prob_and_distribution(b.obs, b.actions)  # one network call
            loss = clipped_surrogate(log_prob - b.old_log_probs, b.advantages, ac.clip_range)
            ((loss + ac.beta * ref.kl(b.obs, gauss)).sum() / b.num_step_pairs).backward()
        norm, _ = optimizer_step(policy, optimizer, cfg.max_grad_norm)
    policy.eval()
    return {"losses/grad_norm": norm}


tiny = dict(TINY_COMMON, samples_per_prompt=8, train_batch_size=32)  # 8 prompts × 8 samples per epoch
register_algo("grpo-example", grpo_kl, config=GRPOExampleConfig, presets={"tiny": tiny}, reference="device",
              override=True)  # fmt: skip
# --- end ---

if __name__ == "__main__":
    leaderboard.main(["--algos", "grpo-example", "grpo", *sys.argv[1:]])
