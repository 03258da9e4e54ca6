"""``DenoisingSingleEnv``: one denoising trajectory as a NumPy-facing ``gymnasium.Env``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffusion_env.vector_env import DenoisingEnv


class DenoisingSingleEnv(gym.Env):
    """One trajectory of :class:`~diffusion_env.vector_env.DenoisingEnv`, for ``gym.make``, checkers and SB3.

    The MDP, arguments and version history are those of ``DenoisingEnv`` (see its docstring); this
    class runs it with ``num_envs=1`` and speaks NumPy, as most single-environment code expects.

    ## Observation space
    ``Dict(prompt=Text, t=Discrete(T), x_t=Box(-inf, inf, latent_shape, float32))``; observations are
    ``{"prompt": str, "t": np.int64, "x_t": np.ndarray float32}``.

    ## Action space
    ``Box(-action_bound, action_bound, latent_shape, float32)``: x_{t-1}, as a NumPy array or a tensor.

    ## Rewards, episode end
    0 until the ``num_steps``-th action, then ``reward(image, prompt)``; ``terminated`` is True then.
    The terminal ``info`` holds ``image`` (uint8 ``[H, W, 3]``), ``prompt`` and ``reward_info``.

    ## Seeding
    ``reset(seed=s)`` gives the same trajectory as sub-environment ``i`` of a ``DenoisingEnv`` reset
    with ``seed=s - i``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        self.vector_env = DenoisingEnv(1, render_mode=render_mode, **kwargs)
        self.render_mode = render_mode
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space

    def __getattr__(self, name: str):
        # Expose the frozen-model helpers (encode_prompts, timesteps, …) of the underlying env.
        if name.startswith("_") or name == "vector_env":
            raise AttributeError(name)
        return getattr(self.vector_env, name)

    @staticmethod
    def _to_numpy(obs: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": obs["prompt"][0],
            "t": np.int64(obs["t"][0].item()),
            "x_t": obs["x_t"][0].detach().to("cpu", torch.float32).numpy(),
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and "prompt" in options:  # one env: {"prompt": str} fixes the episode's prompt
            options = {k: v for k, v in options.items() if k != "prompt"} | {"prompts": [options["prompt"]]}
        obs, _ = self.vector_env.reset(seed=seed, options=options)
        return self._to_numpy(obs), {}

    def step(self, action):
        if isinstance(action, (np.ndarray, torch.Tensor)):
            action = action[None]
        else:
            raise ValueError(f"action is {type(action).__name__}; expected an array of shape {self.action_space.shape}")
        obs, rewards, terms, truncs, info = self.vector_env.step(action)
        out_info: dict[str, Any] = {}
        if "images" in info:
            out_info["image"] = (info["images"][0] * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            out_info["prompt"] = info["prompts"][0]
            out_info["reward_info"] = {
                k: (v[0].item() if isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) == 1 else v)
                for k, v in info["reward_info"].items()
            }
        return self._to_numpy(obs), float(rewards[0]), bool(terms[0]), bool(truncs[0]), out_info

    def render(self):
        frames = self.vector_env.render()
        return None if frames is None else frames[0]

    def close(self):
        self.vector_env.close()
        super().close()
