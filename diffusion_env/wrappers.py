"""Adapters for libraries that cannot consume text observations (Stable-Baselines3)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class SB3Adapter(gym.ObservationWrapper):
    """Replaces the ``prompt`` text with its pooled text-encoder embedding and ``t`` with t / T.

    Observation space: ``Dict(prompt_embedding=Box(D), t=Box([0, 1], (1,)), x_t=Box(latent_shape))``,
    all float32, which ``stable_baselines3``'s ``MultiInputPolicy`` accepts. Works on
    :class:`~diffusion_env.env.DenoisingSingleEnv` (directly or under ``gym.make``'s wrappers).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        inner = env.unwrapped
        if not hasattr(inner, "family"):
            raise ValueError(f"SB3Adapter wraps a DenoisingSingleEnv; got {type(inner).__name__}")
        self._family = inner.family
        dim = int(self._family.pooled_embedding([""]).shape[-1])
        self._num_train_timesteps = inner.num_train_timesteps
        x_space = env.observation_space["x_t"]
        self.observation_space = spaces.Dict(
            {
                "prompt_embedding": spaces.Box(-np.inf, np.inf, (dim,), np.float32),
                "t": spaces.Box(0.0, 1.0, (1,), np.float32),
                "x_t": x_space,
            }
        )

    def observation(self, observation):
        emb = self._family.pooled_embedding([observation["prompt"]])[0]
        return {
            "prompt_embedding": emb.float().cpu().numpy(),
            "t": np.array([observation["t"] / self._num_train_timesteps], dtype=np.float32),
            "x_t": observation["x_t"],
        }
