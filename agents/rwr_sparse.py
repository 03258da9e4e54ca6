"""RWR-sparse: reward-weighted regression with binary weights (DDPO §4.2, A.2).

A sample is kept (weight 1) when its reward reaches its prompt's ``rwr_sparse_quantile`` (default
0.9: the bottom 90% are dropped); kept samples share their prompt's unit weight equally. The
quantile comes from the prompt's running reward buffer once it holds enough rewards, before that
from the current batch. The loss is then RWR's weighted DDPM loss (:mod:`agents.rwr`).
"""

from __future__ import annotations

import torch

from agents.core import PerPromptStatTracker, prompt_groups
from agents.rwr import weighted_denoising_update


def sparse_weights(prompts, rewards: torch.Tensor, tracker: PerPromptStatTracker, quantile: float) -> torch.Tensor:
    """Binary keep-mask by per-prompt quantile, normalised so every prompt with kept samples sums to 1."""
    keep = (rewards >= tracker.threshold(prompts, rewards, quantile)).float()
    weights = torch.zeros_like(rewards)
    for ix in prompt_groups(prompts, rewards.device):
        total = keep[ix].sum()
        if total > 0:
            weights[ix] = keep[ix] / total
    return weights


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    if tracker is None:
        raise ValueError("rwr-sparse needs the run's PerPromptStatTracker for its per-prompt thresholds")
    weights = sparse_weights(rollout.prompts, rollout.rewards, tracker, cfg.rwr_sparse_quantile)
    metrics = weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator)
    metrics["losses/kept_fraction"] = float((weights > 0).float().mean())
    return metrics
