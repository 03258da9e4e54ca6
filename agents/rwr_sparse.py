"""RWR-sparse: reward-weighted regression with binary weights (DDPO §4.2, A.2).

A sample is kept (weight 1) when its reward reaches its prompt's ``rwr_sparse_quantile`` (default
0.9: the bottom 90% are dropped); kept samples share their prompt's unit weight equally. The
quantile comes from the prompt's running reward buffer once it holds enough rewards, before that
from the current batch. The loss is then RWR's weighted DDPM loss (:mod:`agents.rwr`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.config import SD14_COMMON, SD35_COMMON, TINY_COMMON
from agents.core import PerPromptStatTracker, prompt_groups
from agents.fields import doc_field, final_samples_only, positive_int, train_batch_within_epoch
from agents.rwr import RegressionConfig, weighted_denoising_update


@dataclass
class RWRSparseConfig(RegressionConfig):
    """RWR-sparse's own settings (``cfg.algo_config``)."""

    rwr_sparse_quantile: float = doc_field(
        0.9,
        "Keep samples at or above this per-prompt quantile (0.9: bottom 90% dropped).",
    )

    def validate(self, shared) -> list[str]:
        errors = positive_int(self, "rwr_updates_per_epoch") + train_batch_within_epoch(shared)
        if not 0 < self.rwr_sparse_quantile < 1:
            errors.append(f"rwr_sparse_quantile={self.rwr_sparse_quantile}: expected 0 < q < 1")
        return errors + final_samples_only(shared, "RWR-sparse")


PRESETS = {
    "sd14": dict(SD14_COMMON, samples_per_epoch=10_000, sample_batch_size=16, train_batch_size=128,
                 rwr_updates_per_epoch=400),  # fmt: skip
    "sd35": dict(SD35_COMMON, train_batch_size=128, rwr_updates_per_epoch=45, learning_rate=3e-5),  # as RWR's
    "tiny": dict(TINY_COMMON, train_batch_size=64, rwr_updates_per_epoch=8, learning_rate=3e-5, samples_per_prompt=8),
}


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
    weights = sparse_weights(rollout.prompts, rollout.rewards, tracker, cfg.algo_config.rwr_sparse_quantile)
    metrics = weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator)
    metrics["losses/kept_fraction"] = float((weights > 0).float().mean())
    return metrics
