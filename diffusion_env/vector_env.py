"""``DenoisingEnv``: text-to-image denoising as a vectorized, torch-native Gymnasium MDP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffusion_env.downloads import check_downloads
from diffusion_env.models import ModelFamily, load_family
from diffusion_env.prompts import PromptSampler, finite_prompts, make_prompt_sampler
from diffusion_env.spaces import MAX_PROMPT_LENGTH, SAMPLE_CHARSET, PromptText, check_prompt
from rewards import AsyncRewardEvaluator, make_reward, reward_name, score_batch
from rewards.base import check_int

PROMPT_CHARSET = SAMPLE_CHARSET  # what PromptText.sample draws from; any UTF-8 text is a member


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}; expected a torch floating dtype or one of {sorted(table)}")
    return table[dtype]


class DenoisingEnv(VectorEnv):
    """Denoising a batch of latents with a text-conditioned diffusion model, as an MDP (DDPO §4.3).

    ``num_envs`` trajectories advance in lockstep. All tensors stay on ``device``; no step copies
    data to the host except the terminal step's reward computation when the reward needs it.

    ## Description
    A state is s_t = (c, t, x_t): the prompt c, the sampler's timestep t and the latent x_t. An action
    is the next latent a_t = x_{t-1}. The environment is the deterministic "physics" of the MDP: it
    accepts x_{t-1} as the new state. The stochastic policy p_θ(x_{t-1} | x_t, c) — a Gaussian whose
    mean and standard deviation the model family computes (:meth:`ModelFamily.step_distribution`) —
    belongs to the agent, which owns the network. The environment holds the model family
    (:mod:`diffusion_env.models`: frozen parts, schedule, decoding; the policy takes the same object),
    the reward function and the prompt distribution.

    ## Observation space (per sub-environment)
    ``Dict(prompt=PromptText, t=Discrete(T), x_t=Box(-inf, inf, latent_shape, float32))`` where T is the
    scheduler's number of training timesteps and ``latent_shape = (C, H/f, W/f)`` for the VAE's
    latent channels C and downsampling factor f. ``PromptText`` (:mod:`diffusion_env.spaces`) holds
    every prompt the env accepts: any UTF-8-encodable text of at most 10,000 code points; the env
    refuses other prompts with ``ValueError``. Observations are returned batched as a dict with
    ``prompt`` a tuple of ``num_envs`` strings, ``t`` a ``[num_envs]`` int64 tensor and ``x_t`` a
    ``[num_envs, *latent_shape]`` tensor, on ``device``.

    ## Action space (per sub-environment)
    ``Box(-action_bound, action_bound, latent_shape, float32)``: the next latent x_{t-1}. Finite bounds
    keep Stable-Baselines3 happy; latents of a Gaussian step never come near the default of 100.
    Actions must be floating-point tensors (or arrays) of shape ``[num_envs, *latent_shape]`` on
    ``device``; with ``validate_actions=True`` (default) non-finite or out-of-bound values raise
    ``ValueError`` (one host sync per step; turn off for maximum throughput once an agent is trusted).

    ## Starting state
    x_T ~ N(0, I) drawn from each sub-environment's own seeded generator, t = the first timestep of the
    ``num_steps``-step schedule, c drawn from the prompt distribution with the same generator.

    ## Rewards
    0 on every step but the last. After the last step the latents x_0 are decoded by the VAE to images
    in [0, 1] and the reward is ``reward(images, prompts)`` (see :mod:`rewards`), a float32 tensor.
    A reward that raises surfaces as :class:`rewards.RewardError` naming the reward and its error; an
    output of the wrong shape or type as ``ValueError``; NaN/inf values are passed through.

    ## Episode end
    Terminates after ``num_steps`` actions, for all sub-environments at once. Never truncates.
    Autoreset mode is ``NEXT_STEP``: the ``step`` after a terminal step resets every sub-environment
    (its action is ignored) and returns the first observation of new episodes with zero reward.
    The terminal ``info`` carries ``images`` (``[num_envs, 3, H, W]`` float in [0, 1]), ``prompts``,
    ``final_latents`` and ``reward_info`` (the reward's metadata), each with a ``_key`` mask.

    With ``async_reward=True`` the terminal reward is *deferred*: ``step`` returns NaN rewards at once
    and ``info["reward_handle"]`` (a :class:`rewards.RewardHandle`) whose ``result()`` gives
    ``(rewards, reward_info)`` once a worker thread has computed them, so an agent can sample its
    next batch meanwhile (reward evaluation is the bottleneck of DDPO in practice, paper §6.1).

    ## Arguments
    - ``num_envs``: number of lockstep trajectories.
    - ``model``: a local folder or Hugging Face repo id (loaded from the cache only unless
      ``download=True``), or a loaded :class:`~diffusion_env.models.ModelFamily` (shared, not reloaded);
      ``family``: the family's registered name (default: detected from the folder's layout, else
      ``"sd1-ddim"``).
    - ``reward``: a registered reward name (:func:`rewards.make_reward`) or a callable; ``reward_kwargs``.
    - ``prompts``: a prompt-set name (:mod:`diffusion_env.prompts`), a list of prompts, or a callable
      ``np_random -> str``.
    - ``num_steps``: DDIM steps per episode; ``eta``: DDIM's η (> 0); ``guidance_scale``: the
      classifier-free guidance weight policies should use (the env itself does not run the UNet).
    - ``height``, ``width``: image size in pixels (default: the VAE's sample size).
    - ``device``, ``dtype``: where and in which precision the frozen parts run.
    - ``decode_batch_size``: images decoded per VAE call at the terminal step (bounds memory). The
      default 1 makes every image independent of its batch, so a vector env and single envs give
      bit-identical images and rewards; larger values decode faster but batched kernels round
      differently (|Δ pixel| ~1e-6 on the tiny VAE in fp32), so float rewards may then differ in the
      last bits (quantised ones such as JPEG sizes agree).
    - ``async_reward``, ``reward_workers``: deferred terminal rewards computed by a thread pool.

    ## Version history
    - v0: initial version.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        num_envs: int = 1,
        *,
        model: str | ModelFamily | None = None,
        reward: str | Callable = "jpeg_incompressibility",
        reward_kwargs: dict[str, Any] | None = None,
        prompts: str | Sequence[str] | PromptSampler = "imagenet_animals",
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        download: bool = False,
        family: str | None = None,
        action_bound: float = 100.0,
        validate_actions: bool = True,
        decode_batch_size: int = 1,
        async_reward: bool = False,
        reward_workers: int = 2,
        render_mode: str | None = None,
    ):
        # 1. Validate settings before loading anything heavy.
        check_int("num_envs", num_envs, 1)  # strict: no bool-for-int, no truncated floats
        check_int("num_steps", num_steps, 1)
        check_int("decode_batch_size", decode_batch_size, 1)
        check_int("reward_workers", reward_workers, 1)
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_int(name, value, 1)
        if not eta > 0:
            raise ValueError(f"eta={eta}; the step has no density for eta <= 0 (eta is DDIM's η or the flow SDE's "
                             "noise level a). Use eta > 0 (DDPO: 1 on SD v1; Flow-GRPO: 0.7 on SD3.5)")  # fmt: skip
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale={guidance_scale}; expected >= 1 (1 disables guidance)")
        if not action_bound > 0 or not np.isfinite(action_bound):
            raise ValueError(f"action_bound={action_bound}; expected a finite positive number")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; expected None or one of {self.metadata['render_modes']}")
        self.num_envs = int(num_envs)
        self.num_steps = int(num_steps)
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.device = torch.device(device)
        self.dtype = _parse_dtype(dtype)
        self.action_bound = float(action_bound)
        self.validate_actions = validate_actions
        self.decode_batch_size = int(decode_batch_size)
        self.render_mode = render_mode
        self.prompt_sampler = make_prompt_sampler(prompts)
        # Every missing download (diffusion weights, reward models) in one message, before anything loads.
        check_downloads(model=model, reward=reward, reward_kwargs=reward_kwargs, download=download, family=family)
        self.reward_fn = make_reward(reward, **(reward_kwargs or {}))
        self.async_reward = bool(async_reward)
        self._evaluator = AsyncRewardEvaluator(self.reward_fn, max_workers=reward_workers) if async_reward else None

        # 2. The model family: frozen parts and the sampling schedule (shared with the policy).
        if model is None:
            raise ValueError("no model: pass model=<local path, Hugging Face repo id, or a loaded ModelFamily>")
        if isinstance(model, ModelFamily) and (model.device != self.device or model.dtype != self.dtype):
            raise ValueError(f"the model family given is on {model.device} in {model.dtype}; expected the env's "
                             f"device={self.device} and dtype={self.dtype}")  # fmt: skip
        loaded = load_family(model, family=family, device=self.device, dtype=self.dtype, download=download)
        self.family = loaded.with_schedule(self.num_steps, self.eta, self.guidance_scale)
        self.model_path = self.family.model_path
        self.num_train_timesteps = self.family.num_train_timesteps
        self.timesteps = self.family.timesteps

        # 3. Spaces.
        self.height = int(height or self.family.default_size)
        self.width = int(width or self.family.default_size)
        self.latent_shape = self.family.latent_shape(self.height, self.width)
        self.single_observation_space = spaces.Dict(
            {
                "prompt": PromptText(MAX_PROMPT_LENGTH),
                "t": spaces.Discrete(self.family.timestep_count),
                "x_t": spaces.Box(-np.inf, np.inf, self.latent_shape, np.float32),
            }
        )
        self.single_action_space = spaces.Box(-self.action_bound, self.action_bound, self.latent_shape, np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        # 4. Episode state.
        self._env_rngs: list[np.random.Generator] | None = None
        self._step_index = -1  # -1: never reset
        self._needs_reset = True
        self._prompts: tuple[str, ...] = ()
        self._latents: torch.Tensor | None = None
        self._last_images: torch.Tensor | None = None

    # ------------------------------------------------------------------ frozen-model helpers
    @property
    def prompts(self) -> tuple[str, ...] | None:
        """The finite prompt set of this env, or None for a callable distribution."""
        return finite_prompts(self.prompt_sampler)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents to images ``[B, 3, H, W]`` in [0, 1] (float32), ``decode_batch_size`` at a time
        (1, the default: each image independent of the batch it came in, bit for bit)."""
        return self.family.decode(latents, self.decode_batch_size)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        """Start ``num_envs`` new episodes.

        ``seed``: an int seeds sub-environment i with ``seed + i`` (so env i equals a single env seeded
        ``seed + i``); a list gives one seed per sub-environment; None continues each generator.
        ``options``: ``{"prompts": [...]}`` fixes the prompts of this episode (one per sub-environment).
        """
        if isinstance(seed, (list, tuple)):
            if len(seed) != self.num_envs:
                raise ValueError(f"got {len(seed)} seeds; expected one per sub-environment ({self.num_envs})")
            seeds: list[int | None] = list(seed)
            super().reset(seed=seed[0])
        else:
            super().reset(seed=seed)
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        if seed is not None or self._env_rngs is None:
            self._env_rngs = [
                seeding.np_random(s)[0] if s is not None else seeding.np_random(int(self.np_random.integers(2**62)))[0]
                for s in seeds
            ]
        options = options or {}
        unknown = set(options) - {"prompts"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected only 'prompts'")

        # 1. Prompts, from each sub-environment's generator (drawn even when fixed, to keep streams aligned).
        drawn = tuple(self.prompt_sampler(rng) for rng in self._env_rngs)
        for p in drawn:
            if not isinstance(p, str):
                raise ValueError(f"the prompt distribution returned {type(p).__name__}; expected str")
        if "prompts" in options:
            fixed = options["prompts"]
            if (isinstance(fixed, str) or not isinstance(fixed, Sequence) or len(fixed) != self.num_envs
                    or not all(isinstance(p, str) for p in fixed)):  # fmt: skip
                raise ValueError(f"options['prompts'] is {fixed!r:.200}; expected a list of {self.num_envs} strings")
            drawn = tuple(fixed)
        for p in drawn:  # exactly the members of the observation space's PromptText
            check_prompt(p)
        self._prompts = drawn

        # 2. x_T ~ N(0, I) per sub-environment, drawn on the CPU for device-independent seeding.
        noise = []
        for rng in self._env_rngs:
            g = torch.Generator().manual_seed(int(rng.integers(2**63)))
            noise.append(torch.randn(self.latent_shape, generator=g))
        self._latents = self.family.initial_latents(torch.stack(noise)).to(self.device, torch.float32)
        self._step_index = 0
        self._needs_reset = False
        self._last_images = None
        return self._observation(), {}

    def step(self, actions):
        if self._step_index < 0:
            raise RuntimeError("step() was called before reset(); call env.reset(seed=...) first")
        if self._needs_reset:  # NEXT_STEP autoreset: this action is ignored
            obs, info = self.reset()
            zeros = torch.zeros(self.num_envs, device=self.device)
            false = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
            return obs, zeros, false, false.clone(), info

        self._latents = self._check_actions(actions)
        self._step_index += 1
        terminated = self._step_index == self.num_steps
        terminations = torch.full((self.num_envs,), terminated, dtype=torch.bool, device=self.device)
        truncations = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        if not terminated:
            rewards = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
            return self._observation(), rewards, terminations, truncations, {}

        # Terminal step: decode x_0 and score it.
        images = self.decode_latents(self._latents)
        self._last_images = images
        mask = np.ones(self.num_envs, dtype=bool)
        info = {
            "images": images, "_images": mask,
            "prompts": self._prompts, "_prompts": mask,
            "final_latents": self._latents, "_final_latents": mask,
        }  # fmt: skip
        if self._evaluator is not None:  # deferred: the reward arrives through the handle
            info["reward_handle"], info["_reward_handle"] = self._evaluator.submit(images, list(self._prompts)), mask
            rewards = torch.full((self.num_envs,), float("nan"), device=self.device)
        else:
            rewards, reward_info = score_batch(self.reward_fn, images, list(self._prompts), reward_name(self.reward_fn))
            rewards = rewards.to(self.device)
            info["reward_info"], info["_reward_info"] = reward_info, mask
        self._needs_reset = True
        return self._observation(), rewards, terminations, truncations, info

    def close_extras(self, **kwargs: Any) -> None:
        if self._evaluator is not None:
            self._evaluator.close()

    def render(self):
        """``rgb_array``: uint8 ``[num_envs, H, W, 3]`` of the current latents decoded (final images at the end)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; pass render_mode='rgb_array'")
            return None
        if self._latents is None:
            raise RuntimeError("render() before reset(); call env.reset() first")
        images = self._last_images if self._last_images is not None else self.decode_latents(self._latents)
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ internals
    @property
    def current_timestep(self) -> torch.Tensor:
        """t of the current state, ``[num_envs]`` int64 (0 once the episode is over)."""
        if self._step_index >= self.num_steps:
            return torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        return self.timesteps[self._step_index].expand(self.num_envs)

    @property
    def step_index(self) -> int:
        """How many actions this episode has taken (0 right after reset)."""
        return self._step_index

    def _observation(self) -> dict[str, Any]:
        return {"prompt": self._prompts, "t": self.current_timestep, "x_t": self._latents}

    def _check_actions(self, actions) -> torch.Tensor:
        expected = (self.num_envs, *self.latent_shape)
        if isinstance(actions, np.ndarray):
            if not np.issubdtype(actions.dtype, np.floating):
                raise ValueError(f"actions have dtype {actions.dtype}; expected a floating-point array of shape {expected}")
            actions = torch.from_numpy(np.ascontiguousarray(actions)).to(self.device)
        if not isinstance(actions, torch.Tensor):
            raise ValueError(f"actions are {type(actions).__name__}; expected a torch tensor of shape {expected}")
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions have shape {tuple(actions.shape)}; expected {expected} ([num_envs, *latent_shape])")
        if not actions.is_floating_point():
            raise ValueError(f"actions have dtype {actions.dtype}; expected a floating-point tensor")
        if actions.device != self.device and not (
            actions.device.type == self.device.type and self.device.index is None
        ):
            raise ValueError(f"actions are on {actions.device}; expected them on the env's device {self.device}")
        actions = actions.detach().to(torch.float32)
        if self.validate_actions:
            bad = ~torch.isfinite(actions) | (actions.abs() > self.action_bound)
            if bool(bad.any()):
                raise ValueError(
                    f"actions contain NaN, inf or values beyond ±{self.action_bound}; expected finite latents "
                    "within the action space"
                )
        return actions
