"""Evaluating a policy: mean reward at fixed prompts and seeds, on training and held-out prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agents.config import TrainConfig
from agents.core import collect_rollout, concat_rollouts
from agents.policy import GaussianDenoisingPolicy
from agents.trainer import derive_seed, make_env

# Held-out prompt sets of the named training sets (DDPO §6.3: generalisation to unseen prompts).
HELDOUT_SETS = {"tiny_train": "tiny_heldout", "tiny_train_scenes": "tiny_heldout_scenes",
                "tiny_train_scenes_seen_relations": "tiny_heldout_relation_scenes"}


@torch.no_grad()
def evaluate_policy(
    cfg: TrainConfig, policy: GaussianDenoisingPolicy, prompts: str | Sequence[str], num_samples: int = 64,
    seed: int = 10_000, batch_size: int | None = None,
) -> dict[str, Any]:
    """Rewards of ``num_samples`` samples of ``policy`` on ``prompts`` at fixed seeds (same for every policy).

    The env shares the policy's model family (nothing reloaded, each prompt encoded once)."""
    batch = min(batch_size or cfg.sample_batch_size, num_samples)
    env = make_env(cfg, num_envs=batch, prompts=prompts, model=policy.family)
    parts = []
    for b in range(int(np.ceil(num_samples / batch))):
        gen = torch.Generator(device=policy.device).manual_seed(derive_seed(seed, b, 1))
        parts.append(collect_rollout(env, policy, derive_seed(seed, b, 0) % 2**31, gen))
    ro = concat_rollouts(parts)
    env.close()
    r = ro.rewards[:num_samples]
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "num_samples": int(len(r)),
            "rewards": r.tolist(), "prompts": list(ro.prompts[:num_samples]), "images": ro.images[:num_samples]}  # fmt: skip


def heldout_prompt_set(cfg: TrainConfig) -> str | None:
    import gymnasium as gym

    prompts = cfg.env_kwargs.get("prompts", gym.spec(cfg.env_id).kwargs.get("prompts"))
    return HELDOUT_SETS.get(prompts) if isinstance(prompts, str) else None


@torch.no_grad()
def evaluate_diversity(cfg: TrainConfig, policy: GaussianDenoisingPolicy, num_prompts: int = 16, per_prompt: int = 4,
                       seed: int = 20_000) -> float:  # fmt: skip
    """Within-prompt diversity (:func:`agents.diagnostics.within_prompt_diversity`) of ``per_prompt`` samples of each
    of ``num_prompts`` training prompts, all drawn at fixed seeds (the same for every policy)."""
    from agents.diagnostics import within_prompt_diversity

    if num_prompts < 1 or per_prompt < 2:
        raise ValueError(f"num_prompts={num_prompts}, per_prompt={per_prompt}; expected >= 1 and >= 2")
    per_batch = max(1, min(cfg.sample_batch_size, num_prompts * per_prompt) // per_prompt)  # prompts per batch
    env = make_env(cfg, num_envs=per_batch * per_prompt, model=policy.family)
    rng = np.random.default_rng(seed)
    prompts = [env.prompt_sampler(rng) for _ in range(num_prompts)]
    parts = []
    for b, start in enumerate(range(0, num_prompts, per_batch)):
        chunk = prompts[start : start + per_batch]
        chunk = chunk + chunk[-1:] * (per_batch - len(chunk))  # the env's batch is fixed; padding is dropped below
        gen = torch.Generator(device=policy.device).manual_seed(derive_seed(seed, b, 1))
        batch = [p for p in chunk for _ in range(per_prompt)]
        parts.append(collect_rollout(env, policy, derive_seed(seed, b, 0) % 2**31, gen, prompts=batch))
    env.close()
    images = torch.cat([r.images for r in parts])[: num_prompts * per_prompt]
    return within_prompt_diversity(images, [p for p in prompts for _ in range(per_prompt)])
