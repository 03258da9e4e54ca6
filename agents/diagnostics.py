"""Training diagnostics every run can log: drift from the base model, within-prompt diversity, reward hacking.

| metric                  | what it measures                                                                    |
|-------------------------|-------------------------------------------------------------------------------------|
| ``charts/kl_ref``       | KL(π_θ ‖ π_ref) per denoising step along the epoch's own trajectories, in nats      |
|                         | (summed over latent dimensions), mean over the first ``diagnostic_samples``         |
|                         | trajectories and all their steps; π_ref = the base weights. 0 in the first epoch.   |
| ``charts/diversity``    | mean RMS pixel distance between two images of the same prompt, averaged over the    |
|                         | epoch's prompts that were sampled at least twice (none: not logged)                 |
| ``charts/fidelity``     | tiny-world prompts only: the share of the epoch's images the world's captioner      |
|                         | reads as showing exactly their prompt (``rewards.tinyworld.captioner.score``)       |
| ``charts/reward_hacking`` | 1 when the epoch's mean reward is above the first epoch's while diversity or      |
|                         | fidelity fell below ``HACKING_RATIO`` of the first epoch's (else 0; not logged      |
|                         | without either)                                                                     |

Both Gaussians of a step have the schedule's σ_t (it depends on t only), so the KL is closed-form:
‖μ_θ − μ_ref‖² / (2σ_t²). The same three quantities are the leaderboard's ``kl_to_base``, ``diversity`` and
``hacking`` columns, there measured on fixed evaluation samples (with the captioner's fidelity as a second
collapse signal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from agents.core import gaussian_kl, prompt_groups

HACKING_RATIO = 0.5  # diversity or fidelity below this fraction of the base model's, while reward rose: flagged


def within_prompt_diversity(images: torch.Tensor, prompts: Sequence[str]) -> float | None:
    """Mean over prompts (those with >= 2 images) of the mean RMS distance over pairs of their images.

    ``images``: ``[B, C, H, W]`` in [0, 1]. None when no prompt has two images.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images; expected one prompt per image")
    flat = images.detach().float().flatten(1)
    per_prompt = []
    for ix in prompt_groups(prompts):
        if len(ix) < 2:
            continue
        x = flat[ix]
        d2 = torch.cdist(x, x).pow(2) / x.shape[1]  # mean squared pixel difference of each pair
        i, j = torch.triu_indices(len(ix), len(ix), offset=1)
        per_prompt.append(d2[i, j].clamp_min(0).sqrt().mean())
    return float(torch.stack(per_prompt).mean()) if per_prompt else None


def world_fidelity(images: torch.Tensor, prompts: Sequence[str]) -> float | None:
    """Share of ``images`` the tiny world's captioner reads as exactly their prompt; None when the prompts are
    not tiny-world captions."""
    from rewards.tinyworld import captioner

    try:
        scores = captioner.score(images, list(prompts))
    except ValueError:  # prompts of another world
        return None
    return sum(bool(s["all_correct"]) for s in scores) / max(len(scores), 1)


@torch.no_grad()
def trajectory_kl(policy: Any, reference: Any, rollout: Any, num_samples: int) -> float:
    """Mean per-step KL(π_θ ‖ π_ref) in nats (summed over latent dimensions) over the first ``num_samples``
    trajectories of ``rollout`` (this process's) and all their steps."""
    ro = getattr(rollout, "local", rollout)
    n = min(num_samples, ro.num_samples)
    S = ro.num_steps
    x_t = ro.latents[:n, :S].reshape(n * S, *ro.latents.shape[2:])
    t = ro.timesteps[:n].reshape(-1)
    prompts = [p for p in ro.prompts[:n] for _ in range(S)]
    ours = policy.distribution(x_t, t, prompts)
    ref = reference.distribution(x_t, t, prompts)
    return float(gaussian_kl(ours.mean, ref.mean, ours.std, reduction="sum").mean())


def hacking_flag(reward: float, reward_start: float, signals: Sequence[tuple[float | None, float | None]],
                 ratio: float = HACKING_RATIO) -> bool | None:  # fmt: skip
    """Reward rose (``reward`` > ``reward_start``) while any ``(value, value_at_start)`` signal (diversity,
    fidelity) fell below ``ratio`` × its start. None when no signal has both values."""
    known = [(v, v0) for v, v0 in signals if v is not None and v0 is not None]
    if not known:
        return None
    return bool(reward > reward_start and any(v < ratio * v0 for v, v0 in known))
