"""DenoisingEnv / DenoisingSingleEnv: Gymnasium conformance, seeding, vector == singles, bad input."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import make_env
from gymnasium.utils.env_checker import check_env

import diffusion_env
from agents.policy import GaussianDenoisingPolicy
from diffusion_env import DenoisingSingleEnv, ModelNotFoundError

PROMPTS = ["a cat", "a dog", "a red circle"]


def _single(tiny_sd, **kw):
    return DenoisingSingleEnv(model=str(tiny_sd), prompts=PROMPTS, num_steps=4, reward="jpeg_incompressibility", **kw)


def _rollout(env, policy, seed):
    """Deterministic-policy rollout (mean actions): depends only on the env's seeded state."""
    obs, _ = env.reset(seed=seed)
    traj = [obs["x_t"].clone()]
    for _ in range(env.num_steps):
        action, _ = policy.act(obs, deterministic=True)
        obs, reward, term, trunc, info = env.step(action)
        traj.append(obs["x_t"].clone())
    assert bool(term.all()) and not bool(trunc.any())
    return obs, reward, info, traj


def test_gymnasium_check_env(tiny_sd):
    env = _single(tiny_sd)
    check_env(env, skip_render_check=True)


def test_episode_structure(tiny_sd):
    env = make_env(tiny_sd, num_envs=2, num_steps=3)
    obs, info = env.reset(seed=0)
    assert info == {} and len(obs["prompt"]) == 2 and obs["x_t"].shape == (2, *env.latent_shape)
    ts = [obs["t"]]
    for i in range(3):
        obs, reward, term, trunc, info = env.step(torch.zeros(2, *env.latent_shape))
        ts.append(obs["t"])
        if i < 2:
            assert (reward == 0).all() and not term.any() and info == {}
    assert term.all() and not trunc.any()
    assert info["images"].shape == (2, 3, env.height, env.width) and info["_images"].all()
    assert torch.equal(reward, info["reward_info"]["jpeg_kb"])  # incompressibility: reward = kB
    assert torch.equal(ts[0], env.timesteps[0].expand(2)) and torch.equal(ts[1], env.timesteps[1].expand(2))
    # NEXT_STEP autoreset: the following step starts a new episode with zero reward.
    obs, reward, term, trunc, _ = env.step(torch.zeros(2, *env.latent_shape))
    assert env.step_index == 0 and (reward == 0).all() and not term.any()
    assert torch.equal(obs["t"], env.timesteps[0].expand(2))


def test_seeded_determinism(tiny_sd):
    env = make_env(tiny_sd, num_envs=3)
    policy = GaussianDenoisingPolicy.from_env(env)
    a = _rollout(env, policy, seed=11)
    b = _rollout(env, policy, seed=11)
    c = _rollout(env, policy, seed=12)
    assert a[0]["prompt"] == b[0]["prompt"]
    for x, y in zip(a[3], b[3]):
        assert torch.equal(x, y)
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[3][0], c[3][0])


def test_stochastic_policy_determinism(tiny_sd):
    env = make_env(tiny_sd, num_envs=2)
    policy = GaussianDenoisingPolicy.from_env(env)

    def run():
        obs, _ = env.reset(seed=3)
        g = torch.Generator().manual_seed(7)
        for _ in range(env.num_steps):
            action, logp = policy.act(obs, generator=g)
            obs, reward, *_ = env.step(action)
        return reward, logp

    r1, l1 = run()
    r2, l2 = run()
    assert torch.equal(r1, r2) and torch.equal(l1, l2)


def test_vector_equals_singles(tiny_sd):
    n, seed = 3, 5
    venv = make_env(tiny_sd, num_envs=n)
    policy = GaussianDenoisingPolicy.from_env(venv)
    vobs, vreward, vinfo, vtraj = _rollout(venv, policy, seed)
    for i in range(n):
        env = make_env(tiny_sd, num_envs=1)
        single_policy = GaussianDenoisingPolicy(policy.network, env.family)
        obs, reward, info, traj = _rollout(env, single_policy, seed + i)
        assert info["prompts"][0] == vinfo["prompts"][i]
        assert torch.equal(traj[0][0], vtraj[0][i])  # identical x_T
        torch.testing.assert_close(traj[-1][0], vtraj[-1][i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(info["images"][0], vinfo["images"][i], atol=1e-4, rtol=1e-4)


def test_single_env_matches_vector_env_seeding(tiny_sd):
    venv = make_env(tiny_sd, num_envs=2)
    vobs, _ = venv.reset(seed=20)
    env = _single(tiny_sd)
    obs, _ = env.reset(seed=21)
    assert obs["prompt"] == vobs["prompt"][1]
    np.testing.assert_array_equal(obs["x_t"], vobs["x_t"][1].numpy())


def test_reset_options_fix_prompts(tiny_sd):
    env = make_env(tiny_sd, num_envs=2)
    obs, _ = env.reset(seed=0, options={"prompts": ["a dog", "a cat"]})
    assert obs["prompt"] == ("a dog", "a cat")
    with pytest.raises(ValueError, match="prompts"):
        env.reset(options={"prompts": ["only one"]})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"bogus": 1})


@pytest.mark.parametrize(
    "action, match",
    [
        (torch.zeros(2, 4, 8), "shape"),
        (torch.zeros(3, 4, 8, 8), "shape"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.int64), "dtype"),
        (np.zeros((2, 4, 8, 8), dtype=np.int32), "dtype"),
        (torch.full((2, 4, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 4, 8, 8), float("inf")), "NaN"),
        (torch.full((2, 4, 8, 8), 1e6), "beyond"),
        (torch.zeros(2, 4, 8, 8, device="meta"), "device"),
        ([[0.0]], "expected a torch tensor"),
    ],
)
def test_bad_actions(tiny_sd, action, match):
    env = make_env(tiny_sd, num_envs=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)
    assert env.step_index == 0  # the bad action changed nothing


def test_numpy_actions_accepted(tiny_sd):
    env = make_env(tiny_sd, num_envs=2)
    env.reset(seed=0)
    obs, *_ = env.step(np.ones((2, *env.latent_shape), dtype=np.float64))
    assert torch.equal(obs["x_t"], torch.ones(2, *env.latent_shape))


def test_step_before_reset(tiny_sd):
    env = make_env(tiny_sd, num_envs=1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(1, *env.latent_shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_envs=0), "num_envs"),
        (dict(num_steps=0), "num_steps"),
        (dict(eta=0.0), "eta"),
        (dict(num_steps=5000), "exceeds"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(prompts=[]), "empty"),
        (dict(prompts="no_such_set"), "prompt set"),
        (dict(reward="no_such_reward"), "unknown reward"),
        (dict(height=13), "multiples"),
    ],
)
def test_bad_settings(tiny_sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(tiny_sd, **kwargs)


def test_missing_sd14_weights_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"CompVis/stable-diffusion-v1-4.*hf download CompVis/stable-diffusion-v1-4"):
        gym.make("Denoise-SD14-Compressibility-v0")
    with pytest.raises(ModelNotFoundError, match="lacks"):
        gym.make("Denoise-SD14-Compressibility-v0", model=str(tmp_path))


def test_registered_ids():
    ids = sorted(i for i in gym.registry if i.startswith("Denoise-"))
    for task in ("Aesthetic", "Compressibility", "Incompressibility", "PromptAlignment"):
        assert f"Denoise-SD14-{task}-v0" in ids
    spec = gym.spec("Denoise-SD14-Compressibility-v0")
    assert spec.kwargs["num_steps"] == 50 and spec.kwargs["eta"] == 1.0 and spec.kwargs["guidance_scale"] == 5.0
    assert spec.kwargs["height"] == spec.kwargs["width"] == 512
    assert spec.kwargs["prompts"] == "imagenet_animals"
    assert gym.spec("Denoise-SD14-Aesthetic-v0").kwargs["prompts"] == "simple_animals"


@pytest.mark.parametrize("env_id", ["Denoise-SD14-Compressibility-v0", "Denoise-SD14-Incompressibility-v0"])
def test_make_and_make_vec_sd14_ids_on_tiny_components(tiny_sd, env_id):
    kw = dict(model=str(tiny_sd), height=16, width=16, num_steps=3)
    env = gym.make(env_id, **kw)
    obs, _ = env.reset(seed=0)
    assert obs["x_t"].shape == (4, 8, 8) and obs["prompt"] in diffusion_env.prompts.imagenet_animals()
    for _ in range(3):
        obs, reward, term, trunc, info = env.step(env.action_space.sample() * 0)
    assert term and np.isfinite(reward) and info["image"].shape == (16, 16, 3)
    sign = -1 if "Compressibility" in env_id and "In" not in env_id else 1
    assert sign * reward > 0
    venv = gym.make_vec(env_id, num_envs=3, **kw)
    assert isinstance(venv.unwrapped, diffusion_env.DenoisingEnv) and venv.num_envs == 3
    obs, _ = venv.reset(seed=0)
    assert len(obs["prompt"]) == 3


def test_sb3_check_env_and_ppo_smoke(tiny_sd):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = diffusion_env.SB3Adapter(_single(tiny_sd))
    sb3_check_env(env, warn=False)
    model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(256)
    assert model.num_timesteps >= 256


def test_unet_loads_from_env_model(tiny_sd):
    env = make_env(tiny_sd)
    unet = env.family.load_network()
    assert unet.config.in_channels == env.latent_shape[0]


def test_async_reward_matches_sync(tiny_sd):
    results = {}
    for deferred in (False, True):
        env = make_env(tiny_sd, num_envs=3, async_reward=deferred)
        env.reset(seed=4)
        for _ in range(env.num_steps):
            obs, reward, term, _, info = env.step(torch.full((3, *env.latent_shape), 0.5) * torch.arange(3).reshape(3, 1, 1, 1))
        if deferred:
            assert torch.isnan(reward).all() and "reward_info" not in info
            reward, reward_info = info["reward_handle"].result(timeout=60)
            assert info["reward_handle"].prompts == list(info["prompts"])
        results[deferred] = reward
        env.close()
    assert torch.equal(results[False], results[True])


UNICODE_PROMPTS = ["a cat \U0001f431", "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd", "\u200fright-to-left mark",
                   "nul\x00byte", "caf\u00e9 \u4e00\u4e8c"]  # fmt: skip


def test_unicode_prompts_are_inside_the_observation_space(tiny_sd):
    import string
    import warnings

    from gymnasium import spaces

    assert not any(spaces.Text(10_000, charset=string.printable).contains(p) for p in UNICODE_PROMPTS[:4])
    env = gym.make("Denoise-SD14-Compressibility-v0", model=str(tiny_sd), height=16, width=16, num_steps=2,
                   prompts=UNICODE_PROMPTS)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = set()
        for seed in range(12):
            obs, _ = env.reset(seed=seed)
            seen.add(obs["prompt"])
            assert env.observation_space.contains(obs)
            for _ in range(2):
                obs, *_ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert len(seen) >= 3
    bad = [str(w.message) for w in caught if "observation space" in str(w.message) or "obs returned" in str(w.message)]
    assert not bad, bad


def test_prompts_outside_the_space_are_refused_clearly(tiny_sd):
    env = make_env(tiny_sd, num_envs=1)
    with pytest.raises(ValueError, match="lone surrogate"):
        env.reset(seed=0, options={"prompts": ["bad \ud800 text"]})
    space = env.single_observation_space["prompt"]
    assert not space.contains("bad \ud800 text") and not space.contains(3) and space.contains("\U0001f431")
    assert space.contains(space.sample())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_envs=True), "num_envs=True; expected an integer >= 1"),
        (dict(num_steps=2.5), r"num_steps=2.5; expected an integer >= 1"),
        (dict(decode_batch_size=4.0), r"decode_batch_size=4.0; expected an integer >= 1"),
        (dict(height=16.7), r"height=16.7; expected an integer >= 1"),
        (dict(reward_kwargs={"quality": True}), r"quality=True; expected an integer in \[1, 100\]"),
        (dict(reward_kwargs={"quality": 95.9}), r"quality=95.9; expected an integer in \[1, 100\]"),
        (dict(reward_kwargs={"qualty": 90}), r"no option 'qualty'; expected one of \['quality'\]"),
    ],
)
def test_options_are_validated_strictly(tiny_sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(tiny_sd, **kwargs)


def _mean_pixel(images, prompts):
    return images.float().mean(dim=(1, 2, 3)) * 1000.0, {}  # a float reward: any pixel difference shows


@pytest.mark.parametrize("decode_batch_size", [1, None])
def test_vector_and_single_envs_agree_exactly_for_float_rewards(tiny_sd, decode_batch_size):
    """The same final latents give bit-identical images and rewards in a batch of 4 and one at a time.
    ``None``: the default; batched decoding (decode_batch_size=4) is checked to really differ below."""
    n = 4
    kw = dict(reward=_mean_pixel, num_steps=2) | ({} if decode_batch_size is None else {"decode_batch_size": 1})
    venv = make_env(tiny_sd, num_envs=n, **kw)
    g = torch.Generator().manual_seed(0)
    actions = [torch.randn(n, *venv.latent_shape, generator=g) * 3 for _ in range(2)]
    venv.reset(seed=0)
    for a in actions:
        _, vreward, _, _, vinfo = venv.step(a)
    for i in range(n):
        env = make_env(tiny_sd, num_envs=1, **kw)
        env.reset(seed=i)
        for a in actions:
            _, reward, _, _, info = env.step(a[i : i + 1])
        assert torch.equal(info["images"][0], vinfo["images"][i])
        assert torch.equal(reward[0], vreward[i])
    batched = make_env(tiny_sd, num_envs=n, **(kw | {"decode_batch_size": n}))
    assert not torch.equal(batched.decode_latents(actions[-1]), venv.decode_latents(actions[-1])), (
        "batched decoding matched per-image decoding: this test could not tell them apart"
    )
