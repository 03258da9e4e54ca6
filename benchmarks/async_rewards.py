"""How much reward time the deferred (async) reward hides behind sampling.

``python -m benchmarks.async_rewards [--env Denoise-Tiny-PromptAlignment-v0] [--num-envs 64] [--batches 4]``

Collects ``batches`` episodes of ``num_envs`` lockstep trajectories with the base policy in one
process, in three modes, alternating over ``--repeats`` rounds (medians reported): with a free
reward (sampling alone, T_sample), with the reward computed at the terminal step (sync; its reward
calls alone take T_reward), and with ``async_reward=True``, where batch k's reward runs in a worker
thread while batch k+1 is sampled (wall time T_async). The fraction of reward time hidden behind
sampling is ``(T_sample + T_reward − T_async) / T_reward`` (1: fully hidden, 0: not at all).
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401
from agents.core import collect_rollout, resolve_rewards
from agents.policy import GaussianDenoisingPolicy


def _free_reward(images, prompts):
    return torch.zeros(len(prompts)), {}


def run(env_id: str, num_envs: int, batches: int, async_reward: bool, unet=None, free=False, **kwargs) -> dict:
    if free:
        kwargs = {**kwargs, "reward": _free_reward}
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                       async_reward=async_reward, **kwargs).unwrapped  # fmt: skip
    policy = GaussianDenoisingPolicy.from_env(env, network=unet)
    reward_s = 0.0
    if not async_reward:  # time the reward alone inside the sync env
        inner = env.reward_fn

        def timed(images, prompts):
            nonlocal reward_s
            t = time.perf_counter()
            out = inner(images, prompts)
            reward_s += time.perf_counter() - t
            return out

        env.reward_fn = timed
    collect_rollout(env, policy, seed=999, generator=torch.Generator().manual_seed(0))  # warm-up
    reward_s = 0.0
    t0 = time.perf_counter()
    parts = [collect_rollout(env, policy, seed=b * num_envs, generator=torch.Generator().manual_seed(b)) for b in range(batches)]
    rewards = torch.cat([resolve_rewards(p).rewards for p in parts])
    wall = time.perf_counter() - t0
    env.close()
    return {"wall_s": wall, "reward_s": reward_s, "reward_mean": float(rewards.mean()), "unet": policy.network}


def explain_hidden_fraction(fraction: float, threads: int) -> str:
    """One sentence on what a hidden fraction means, including the surprising cases (< 0, > 1)."""
    if fraction < 0:
        return (f"hidden fraction {fraction:.2f} < 0: overlap did not pay on this machine. The async run took longer "
                "than sampling and rewards one after the other, because the reward thread competes with sampling "
                f"for the same {threads} CPU thread(s) (and adds switching); deferred rewards pay when the reward "
                "runs elsewhere (a GPU, a remote VLM server) or on otherwise idle cores.")  # fmt: skip
    if fraction > 1:
        return (f"hidden fraction {fraction:.2f} > 1: more than the whole reward time vanished, which is timing noise "
                "(run with more --repeats); read it as fully hidden.")  # fmt: skip
    return (f"hidden fraction {fraction:.2f}: {fraction:.0%} of the reward time ran behind sampling "
            "(1: fully hidden, 0: not at all).")


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Denoise-Tiny-PromptAlignment-v0",
                   help="registered env ID (default: Denoise-Tiny-PromptAlignment-v0)")  # fmt: skip
    p.add_argument("--num-envs", type=int, default=64, help="lockstep trajectories per batch (default: 64)")
    p.add_argument("--batches", type=int, default=4, help="batches collected per mode (default: 4)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the three modes; medians reported (default: 2)")
    p.add_argument("--env-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="extra gym.make_vec keyword arguments as a JSON object (default: {})")  # fmt: skip
    a = p.parse_args()
    unet, rows = None, {"sample_only": [], "sync": [], "async": []}
    for i in range(a.repeats):
        for mode in rows:
            print(f"round {i + 1}/{a.repeats}: {mode} ...", flush=True)
            r = run(a.env, a.num_envs, a.batches, mode == "async", unet=unet, free=mode == "sample_only", **a.env_kwargs)
            unet = r.pop("unet")
            rows[mode].append(r)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    t_sample, t_reward, t_async = med["sample_only"]["wall_s"], med["sync"]["reward_s"], med["async"]["wall_s"]
    print(json.dumps({"env": a.env, "num_envs": a.num_envs, "batches": a.batches, "repeats": a.repeats,
                      "median": med, "runs": rows,
                      "same_rewards": abs(med["sync"]["reward_mean"] - med["async"]["reward_mean"]) < 1e-6,
                      "T_sample_s": t_sample, "T_reward_s": t_reward, "T_async_s": t_async,
                      "hidden_fraction": (t_sample + t_reward - t_async) / max(t_reward, 1e-9),
                      "torch_threads": torch.get_num_threads()}, indent=1))  # fmt: skip
    print(explain_hidden_fraction((t_sample + t_reward - t_async) / max(t_reward, 1e-9), torch.get_num_threads()))


if __name__ == "__main__":
    main()
