"""DDPO-IS: the importance-sampling policy gradient with PPO's clipped surrogate (DDPO eq. 4, A.1).

For each (sample, timestep) pair of the epoch's trajectories, with advantage A of the sample's
final reward and ratio ρ = π_θ(a_t | s_t) / π_old(a_t | s_t):

    loss = E[ max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)) ]

Reading order: 1. every inner epoch the rollout buffer reshuffles samples, picks each sample's trained
timesteps and cuts optimizer steps of ``train_batch_size`` samples (all their chosen timesteps, as one
shuffled list of pairs); 2. the pairs go through the policy ``micro_batch_size`` at a time, gradients
accumulating; 3. clip, check for non-finite gradients, step.

With ``recompute_old_log_probs`` the old log-probs are first recomputed (detached) in exactly
the micro-batches of the first pass (all of its steps' pairs are drawn before any network call,
from the same random draws as without it). Reduced-precision kernels (bf16 autocast) may round
differently with batch size and composition, so sampling-time log-probs can differ from training-time
ones by more than the clip range 1e-4; recomputed ones start the first ratio at 1. The first optimizer
step's pairs are not recomputed: its training forward runs at the old parameters in those very
micro-batches, so its own (detached) log-probs are the recomputed ones, for a quarter less extra work
with four steps per pass. The largest change is reported as ``losses/old_log_prob_dev``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.config import SD14_COMMON, SD35_COMMON, TINY_COMMON
from agents.core import RolloutBuffer, clipped_surrogate, optimizer_step
from agents.distributed import all_reduce_sum
from agents.fields import AlgoConfig, doc_field, finite_positive, positive_int, train_batch_divides_epoch


@dataclass
class DDPOISConfig(AlgoConfig):
    """DDPO-IS's own settings (``cfg.algo_config``)."""

    clip_range: float = doc_field(
        1e-4,
        "PPO clip range ε (appendix A.1: 1e-4, tuned for mean-reduced log-probs).",
    )
    num_inner_epochs: int = doc_field(1, "Passes over the epoch's samples (several PPO passes reuse them).")
    recompute_old_log_probs: bool = doc_field(
        False,
        "Recompute old log-probs in the training micro-batches before the first pass (reduced precision).",
    )

    def validate(self, shared) -> list[str]:
        return (positive_int(self, "num_inner_epochs") + finite_positive(self, "clip_range")
                + train_batch_divides_epoch(shared))  # fmt: skip


# clip 1e-3, not the paper's 1e-4: mean-reduced log-ratios average over 256 latent dimensions here
# (16,384 for SD v1.4), so the same per-dimension change moves them more; with 1e-4 over 70% of
# pairs were clipped and learning stalled (d 0.40 vs 0.55 after 512 queries in a side-by-side trial).
# Two passes over each epoch's samples in optimizer steps of 32 samples (4 steps per epoch): at
# 2,048 queries on Compressibility (seed 0) d was 1.10, against 0.91 with one pass in steps of 16
# and 1.01 with two passes in steps of 64 (python -m benchmarks.improvement --set ... --tag ...).
TINY_PRESET = dict(TINY_COMMON, train_batch_size=32, num_inner_epochs=2, clip_range=1e-3)
# The tiny flow model (Denoise-TinyFlow-*) takes the same preset: every faster setting tried was either
# within run-to-run noise or unstable. Seed-0 trials at 1,024 queries (python -m benchmarks.improvement --tasks
# Denoise-TinyFlow-<task>-v0 --algos ddpo-is --seeds 0 --budget 1024 --set ... --tag ...), d on
# Compressibility / Incompressibility (this preset on the leaderboard, 3 seeds: 0.43 ± 0.01 on Compressibility,
# 0.71 ± 0.07 on Incompressibility):
#   clip 5e-3, epochs of 32 samples in steps of 16          0.55 / –
#   clip 1e-2, lr 6e-4                                      0.71 / –
#   clip 1e-2, lr 6e-4, 8 samples per prompt                0.84 / –
#   clip 2e-2, lr 3e-4                                      0.78 / 0.65
#   clip 2e-2, lr 1e-3                                      1.30 / reward fell (1.10 -> 0.99 by epoch 11)
#   clip 2e-2, lr 1e-3, lr_warmup_steps 16                  0.79 / 1.62
# Without the warm-up, AdamW's first step at lr 1e-3 moved the policy more (approx_kl 2.4-3.5) than all later
# steps, and its d 1.30 came with the captioner's fidelity at 0. The warm-up setting then ran on the
# leaderboard (micro-batches of 160 pairs, so other rounding): seeds 0 and 1 gave d 0.44 and 2.33 on
# Compressibility at 325 and 1,026 nats/step of drift (seed 1: fidelity 0, diversity 0.04 against the base
# model's 0.28: collapsed), and d 0.48 and -1.44 on Incompressibility, seed 1 collapsing (4,160 nats/step)
# and losing reward. One seed's d says little here. Then clip 2e-2, lr 6e-4, lr_warmup_steps 8 on 3 seeds (python -m
# benchmarks.improvement, one thread, micro-batches of 32 pairs): Compressibility 0.95 / 0.87 / 0.96 (0.93 ±
# 0.05; the captioner's fidelity fell from about 0.4 to 0.1), Incompressibility seed 0 -0.79 (training reward
# peaked at epoch 12, then fell; fidelity 0.03: collapsed). The same with --set lr_decay=linear (seed 0,
# 2026-12-08): Compressibility 0.83 (training fidelity 0.13 at the last epoch), Incompressibility 0.58 (no collapse,
# fidelity 0.27): the decay stops the collapse but leaves both below 1.

PRESETS = {
    "sd14": dict(SD14_COMMON, samples_per_epoch=256, train_batch_size=64, num_inner_epochs=1),
    "sd35": dict(SD35_COMMON, train_batch_size=24 * 24, num_inner_epochs=1, clip_range=1e-4),  # two steps per epoch
    "tiny": TINY_PRESET,
}


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    ac = cfg.algo_config  # DDPOISConfig
    buffer = RolloutBuffer(rollout, advantages, cfg.micro_batch_size)
    device = advantages.device
    acc = torch.zeros(3, device=device)  # loss, approx_kl, clipfrac sums — summed on device, synced once
    n_pairs, n_steps, skipped, grad_norms = 0, 0, 0, []
    first_ratio_dev, recompute_dev = None, None
    recompute = ac.recompute_old_log_probs
    policy.train()
    for inner in range(ac.num_inner_epochs):
        # 1. This pass's optimizer steps (drawn before any network call).
        steps = buffer.train_steps(cfg.train_batch_size, generator, cfg.timestep_fraction)
        if recompute and inner == 0:
            # Steps 2, 3, …: recomputed now, before any update. Step 1: by its own training forward.
            recompute_dev = _recompute_old_log_probs(policy, buffer, steps[1:])
        for k, step in enumerate(steps):
            at_old_params = recompute and inner == 0 and k == 0
            # 2. Micro-batches through the policy; gradients accumulate.
            for batch in buffer.micro_batches(step):
                log_prob = policy.log_prob(batch.obs, batch.actions)
                old_log_prob = batch.old_log_probs
                if at_old_params:  # no optimizer step yet: this forward is the recomputation
                    old_log_prob = log_prob.detach()
                    recompute_dev = _max(recompute_dev, buffer.store_old_log_probs(batch, old_log_prob))
                log_ratio = log_prob - old_log_prob
                loss = clipped_surrogate(log_ratio, batch.advantages, ac.clip_range).mean()
                n = len(batch.advantages)
                (loss * n / batch.num_step_pairs).backward()
                with torch.no_grad():
                    if first_ratio_dev is None:
                        first_ratio_dev = log_ratio.abs().max()
                    acc += torch.stack([
                        loss * n,
                        0.5 * (log_ratio**2).sum(),
                        ((log_ratio.exp() - 1.0).abs() > ac.clip_range).float().sum(),
                    ])  # fmt: skip
                n_pairs += n
            # 3. Clip, guard, step.
            norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
            grad_norms.append(norm)
            n_steps += 1
            skipped += not applied
    policy.eval()
    acc = all_reduce_sum(torch.cat([acc, torch.tensor([float(n_pairs)], device=device)]))  # over processes
    totals, n_pairs = acc[:3].tolist(), int(acc[3])
    metrics = {
        "losses/policy_loss": totals[0] / max(n_pairs, 1),
        "losses/approx_kl": totals[1] / max(n_pairs, 1),
        "losses/clipfrac": totals[2] / max(n_pairs, 1),
        "losses/ratio_dev_first": float(first_ratio_dev) if first_ratio_dev is not None else 0.0,
    }
    if recompute_dev is not None:
        metrics["losses/old_log_prob_dev"] = float(recompute_dev)
    metrics["losses/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    metrics["losses/optimizer_steps"] = n_steps - skipped
    metrics["losses/skipped_steps"] = skipped
    return metrics


def _max(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.maximum(a, b)


def _recompute_old_log_probs(policy, buffer: RolloutBuffer, steps) -> torch.Tensor | None:
    """Store the policy's log-probs of ``steps``' pairs in ``buffer``, in their micro-batches; return the
    largest change (on the device: no host sync per micro-batch).

    Computed with autograd on (and detached): a compiled network runs another graph without gradients,
    and under bf16 autocast that graph's rounding moved the first |log ratio| to ~0.05 (measured).
    """
    dev = None
    for step in steps:
        for batch in buffer.micro_batches(step):
            with torch.enable_grad():
                log_prob = policy.log_prob(batch.obs, batch.actions).detach()
            dev = _max(dev, buffer.store_old_log_probs(batch, log_prob))
    return dev
