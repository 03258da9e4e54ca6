"""Put your own algorithm on the leaderboard: plain REINFORCE with a baseline, registered from outside.

python -m benchmarks.examples.my_algo --quick          # or any benchmarks.leaderboard option
torchrun --nproc_per_node 2 -m benchmarks.examples.my_algo --quick    # the same, on two processes
"""

import sys

from agents.core import RolloutBuffer, optimizer_step
from agents.registry import register_algo
from benchmarks import leaderboard


def reinforce(policy, optimizer, rollout, advantages, cfg, generator, tracker=None):
    """Loss -A · Σ_t log π(a_t | s_t) per sample; A is the per-prompt-normalised reward (the baseline)."""
    buffer = RolloutBuffer(rollout, advantages, cfg.micro_batch_size)  # shuffles, batches, shards
    policy.train()
    norm = 0.0
    for step in buffer.train_steps(cfg.train_batch_size, generator):  # every timestep of train_batch_size samples
        for b in buffer.micro_batches(step):
            log_prob = policy.log_prob(b.obs, b.actions)
            (-(b.advantages * log_prob).sum() * buffer.num_steps / b.num_step_pairs).backward()  # mean over samples
        norm, _ = optimizer_step(policy, optimizer, cfg.max_grad_norm)
    policy.eval()
    return {"losses/grad_norm": norm}


register_algo("reinforce", reinforce, override=True)

if __name__ == "__main__":
    leaderboard.main(["--algos", "reinforce", "ddpo-is", *sys.argv[1:]])
