"""DDPO-IS: the importance-sampling policy gradient with PPO's clipped surrogate (DDPO eq. 4, A.1).

For each (sample, timestep) pair of the epoch's trajectories, with advantage A of the sample's
final reward and ratio ρ = π_θ(a_t | s_t) / π_old(a_t | s_t):

    loss = E[ max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)) ]

Reading order: 1. every inner epoch reshuffles samples and picks each sample's trained timesteps;
2. each optimizer step takes ``train_batch_size`` samples and all their chosen timesteps, flattened
into one list of (sample, timestep) pairs; 3. the pairs go through the UNet ``micro_batch_size`` at a
time, gradients accumulating; 4. clip, check for non-finite gradients, step.

With ``cfg.recompute_old_log_probs`` the old log-probs are first recomputed (detached) in exactly
the micro-batches of the first pass (all of its steps' pairs are drawn before any UNet call,
from the same random draws as without it). Reduced-precision kernels (bf16 autocast) may round
differently with batch size and composition, so sampling-time log-probs can differ from training-time
ones by more than the clip range 1e-4; recomputed ones start the first ratio at 1. The first optimizer
step's pairs are not recomputed: its training forward runs at the old parameters in those very
micro-batches, so its own (detached) log-probs are the recomputed ones, for a quarter less extra work
with four steps per pass. The largest change is reported as ``losses/old_log_prob_dev``.
"""

from __future__ import annotations

import torch

from agents.core import flat_pairs, optimizer_step, subsample_steps
from agents.distributed import all_reduce_sum, local_pairs


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    B, S = rollout.num_samples, rollout.num_steps
    device = advantages.device
    sums = {"losses/policy_loss": 0.0, "losses/approx_kl": 0.0, "losses/clipfrac": 0.0, "losses/ratio_dev_first": 0.0}
    acc = torch.zeros(3, device=device)  # loss, approx_kl, clipfrac sums — summed on device, synced once
    n_pairs, n_steps, skipped, grad_norms = 0, 0, 0, []
    first_ratio_dev, recompute_dev = None, None
    recompute = getattr(cfg, "recompute_old_log_probs", False)
    old_tables: dict[int, torch.Tensor] = {}  # id(local rollout) -> its log-probs, recomputed
    policy.unet.train()
    for inner in range(cfg.num_inner_epochs):
        layout = []
        # 1. Shuffle samples; choose each sample's timesteps.
        order = torch.randperm(B, generator=generator)
        steps = subsample_steps(B, S, cfg.timestep_fraction, generator)  # [B, k]
        for start in range(0, B, cfg.train_batch_size):
            # 2. One optimizer step: these samples × their timesteps, flattened and shuffled.
            idx = order[start : start + cfg.train_batch_size]
            sample_idx = idx.repeat_interleave(steps.shape[1])
            step_idx = steps[idx].reshape(-1)
            perm = torch.randperm(len(sample_idx), generator=generator)
            sample_idx, step_idx = sample_idx[perm].to(device), step_idx[perm].to(device)
            total = len(sample_idx)
            # Several processes: keep the pairs of this process's samples (``total`` stays global).
            layout.append((*local_pairs(rollout, sample_idx, step_idx, advantages), total))
        if recompute and inner == 0:
            # Steps 2, 3, …: recomputed now, before any update. Step 1: by its own training forward.
            recompute_dev = _recompute_old_log_probs(policy, layout[1:], cfg.micro_batch_size, old_tables)
        for k, (local, sample_idx, step_idx, pair_adv, total) in enumerate(layout):
            at_old_params = recompute and inner == 0 and k == 0
            # 3. Micro-batches through the UNet; gradients accumulate.
            for m in range(0, len(sample_idx), cfg.micro_batch_size):
                s, j = sample_idx[m : m + cfg.micro_batch_size], step_idx[m : m + cfg.micro_batch_size]
                batch = flat_pairs(local, s, j)
                adv = pair_adv[m : m + cfg.micro_batch_size]
                log_prob = policy.log_prob(batch, batch["action"])
                if at_old_params:  # no optimizer step yet: this forward is the recomputation
                    recompute_dev = _store_old(old_tables, local, s, j, log_prob.detach(), batch, recompute_dev)
                old_log_prob = old_tables[id(local)][s, j] if recompute else batch["old_log_prob"]
                log_ratio = log_prob - old_log_prob
                ratio = log_ratio.exp()
                unclipped = -adv * ratio
                clipped = -adv * ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
                loss = torch.maximum(unclipped, clipped).mean()
                (loss * len(adv) / total).backward()
                with torch.no_grad():
                    if first_ratio_dev is None:
                        first_ratio_dev = log_ratio.abs().max()
                    acc += torch.stack([
                        loss * len(adv),
                        0.5 * (log_ratio**2).sum(),
                        ((ratio - 1.0).abs() > cfg.clip_range).float().sum(),
                    ])  # fmt: skip
                n_pairs += len(adv)
            # 4. Clip, guard, step.
            norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
            grad_norms.append(norm)
            n_steps += 1
            skipped += not applied
    policy.unet.eval()
    acc = all_reduce_sum(torch.cat([acc, torch.tensor([float(n_pairs)], device=device)]))  # over processes
    totals, n_pairs = acc[:3].tolist(), int(acc[3])
    sums["losses/policy_loss"] = totals[0] / max(n_pairs, 1)
    sums["losses/approx_kl"] = totals[1] / max(n_pairs, 1)
    sums["losses/clipfrac"] = totals[2] / max(n_pairs, 1)
    sums["losses/ratio_dev_first"] = float(first_ratio_dev) if first_ratio_dev is not None else 0.0
    if recompute_dev is not None:
        sums["losses/old_log_prob_dev"] = float(recompute_dev)
    sums["losses/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    sums["losses/optimizer_steps"] = n_steps - skipped
    sums["losses/skipped_steps"] = skipped
    return sums


def _recompute_old_log_probs(
    policy, layout, micro: int, tables: dict[int, torch.Tensor]
) -> torch.Tensor | None:
    """Fill ``tables`` with the policy's log-probs of ``layout``'s pairs, in its micro-batches.

    Computed with autograd on (and detached): a compiled UNet runs another graph without gradients,
    and under bf16 autocast that graph's rounding moved the first |log ratio| to ~0.05 (measured).
    """
    dev = None  # stays on the device: no host sync per micro-batch
    for local, sample_idx, step_idx, _, _ in layout:
        for m in range(0, len(sample_idx), micro):
            s, j = sample_idx[m : m + micro], step_idx[m : m + micro]
            batch = flat_pairs(local, s, j)
            with torch.enable_grad():
                log_prob = policy.log_prob(batch, batch["action"]).detach()
            dev = _store_old(tables, local, s, j, log_prob, batch, dev)
    return dev


def _store_old(tables, local, s, j, log_prob, batch, dev) -> torch.Tensor:
    """Write recomputed old log-probs of pairs ``(s, j)`` into ``local``'s table (created from the sampled
    ones on first use); return the running largest change from the sampled ones."""
    tables.setdefault(id(local), local.log_probs.clone())[s, j] = log_prob
    d = (log_prob - batch["old_log_prob"]).abs().max()
    return d if dev is None else torch.maximum(dev, d)
