"""The base model's within-prompt reward spread on a task: what RWR's β is set from (agents/rwr.py).

    python -m benchmarks.reward_spread Denoise-TinyFlow-Compressibility-v0 [--prompts 8] [--per-prompt 8] [--seed 0]

RWR weighs a prompt's samples by softmax(β r), so β has the reward's inverse units; the tiny presets take
β ≈ 1 / the within-prompt std of the base model's rewards, so that one std changes a sample's weight by a
factor e. Prompts: every ``len(train_prompts()) // --prompts``-th tiny-world training caption (fixed), each
sampled ``--per-prompt`` times at the env's registered settings. Prints the mean over prompts of the
population std of their rewards, the mean reward and the β it suggests.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch


def within_prompt_std(env_id: str, num_prompts: int = 8, per_prompt: int = 8, seed: int = 0, model: str | None = None
                      ) -> dict:  # fmt: skip
    import gymnasium as gym

    import diffusion_env  # noqa: F401  (registers the IDs)
    from agents.core import collect_rollout
    from agents.policy import GaussianDenoisingPolicy
    from rewards.tinyworld.world import train_prompts

    captions = train_prompts()
    prompts = [captions[i * (len(captions) // num_prompts)] for i in range(num_prompts)]
    kwargs = {"model": model} if model else {}
    env = gym.make_vec(env_id, num_envs=num_prompts * per_prompt, vectorization_mode="vector_entry_point", **kwargs)
    policy = GaussianDenoisingPolicy.from_env(env)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    batch = [p for p in prompts for _ in range(per_prompt)]
    rewards = collect_rollout(env, policy, seed, gen, prompts=batch).rewards.float().cpu().numpy()
    env.close()
    stds = rewards.reshape(num_prompts, per_prompt).std(axis=1)
    spread = float(stds.mean())
    return {"env_id": env_id, "prompts": prompts, "per_prompt": per_prompt, "seed": seed,
            "within_prompt_std": spread, "reward_mean": float(rewards.mean()), "suggested_beta": 1.0 / spread}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("env_id")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model folder (default: the ID's own)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.per_prompt < 2:
        p.error(f"--prompts={args.prompts}, --per-prompt={args.per_prompt}: expected >= 1 and >= 2")
    out = within_prompt_std(args.env_id, args.prompts, args.per_prompt, args.seed, args.model)
    print(json.dumps({k: v for k, v in out.items() if k != "prompts"}))
    return out


if __name__ == "__main__":
    main()
