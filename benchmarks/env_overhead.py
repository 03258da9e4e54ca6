"""The environment's own cost per step, next to the UNet's: ``python -m benchmarks.env_overhead``.

Runs full episodes of ``num_envs`` lockstep trajectories with the UNet policy, then times the same
UNet calls alone on the same inputs, and ``env.step`` alone. The env's overhead per step is the
episode's step-loop time minus its UNet time (step math, action checks, bookkeeping), reported per
step; the terminal decode + reward is reported separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from agents.policy import GaussianDenoisingPolicy
from diffusion_env import TINY_MODEL_PATH, DenoisingEnv


def _model(kind: str) -> str:
    if kind == "tiny-pretrained" and (TINY_MODEL_PATH / "unet").is_dir():
        return str(TINY_MODEL_PATH)
    from diffusion_env.testing import build_tiny_sd

    return str(build_tiny_sd(Path(tempfile.mkdtemp(prefix="overhead-")), sample_size=16))


def measure(num_envs: int = 64, num_steps: int = 20, episodes: int = 3, model: str = "random-tiny") -> dict:
    path = _model(model)
    env = DenoisingEnv(num_envs, model=path, prompts=["a cat", "a dog", "a red circle"], num_steps=num_steps,
                       reward="jpeg_incompressibility")  # fmt: skip
    policy = GaussianDenoisingPolicy.from_env(env)
    policy.eval()
    gen = torch.Generator().manual_seed(0)
    loop_s, unet_s, env_step_s, terminal_s = 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for ep in range(episodes + 1):  # the first episode warms up and is not counted
            obs, _ = env.reset(seed=ep)
            states = []
            t0 = time.perf_counter()
            step_only = 0.0
            for j in range(num_steps):
                action, _ = policy.act(obs, generator=gen)
                states.append((obs["x_t"], obs["t"], obs["prompt"]))
                if j == num_steps - 1:
                    t_term = time.perf_counter()
                s0 = time.perf_counter()
                obs, *_ = env.step(action)
                if j < num_steps - 1:  # the terminal step (decode + reward) is reported on its own
                    step_only += time.perf_counter() - s0
            t_end = time.perf_counter()
            if ep == 0:
                continue
            term = t_end - t_term
            loop_s += t_end - t0 - term
            terminal_s += term
            env_step_s += step_only
            # The same UNet calls alone (guided: cond + uncond halves in one call).
            u0 = time.perf_counter()
            for x, t, prompts in states:
                policy.prediction(x, t, prompts)
            unet_s += time.perf_counter() - u0
    steps = episodes * num_steps
    return {
        "num_envs": num_envs, "num_steps": num_steps, "episodes": episodes, "model": model,
        "unet_params_M": sum(p.numel() for p in policy.network.parameters()) / 1e6,
        "step_loop_ms_per_step": 1e3 * loop_s / steps,
        "unet_ms_per_step": 1e3 * unet_s / steps,
        "env_overhead_ms_per_step": 1e3 * (loop_s - unet_s) / steps,
        "env_step_alone_ms_per_step": 1e3 * env_step_s / (episodes * max(num_steps - 1, 1)),
        "overhead_fraction": (loop_s - unet_s) / loop_s,
        "terminal_decode_reward_ms": 1e3 * terminal_s / episodes,
        "episode_s": (loop_s + terminal_s) / episodes,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}",
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-envs", type=int, default=64, help="lockstep trajectories (default: 64)")
    p.add_argument("--num-steps", type=int, default=20, help="denoising steps per episode (default: 20)")
    p.add_argument("--episodes", type=int, default=3, help="timed episodes (default: 3)")
    p.add_argument("--model", choices=["random-tiny", "tiny-pretrained"], default="random-tiny",
                   help="a random-weight tiny model or the shipped tiny model (default: random-tiny)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(measure(a.num_envs, a.num_steps, a.episodes, a.model), indent=1))


if __name__ == "__main__":
    main()
