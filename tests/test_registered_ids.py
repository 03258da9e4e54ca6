"""Every registered Denoise-* ID: gym.make / gym.make_vec, Gymnasium's check_env and one episode.

SD14 IDs run on tiny random components passed as kwargs (the same loading code path as SD v1.4):
the model folder, and for the model-based rewards a tiny random CLIP / a local VLM server. SD35 IDs run the
same way on a tiny random SD3-layout model; TinyFlow IDs on a random-weight model of the tiny flow model's
architecture (the shipped one is not needed).
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from test_rewards_aesthetic import REAL_HEAD, random_head, tiny_clip
from test_rewards_clip_family import ARCH as HPS_ARCH
from test_rewards_clip_family import open_clip_state_dict
from test_rewards_clip_family import tiny_clip as tiny_text_clip
from test_rewards_clip_family import tiny_tokenizer as tiny_clip_tokenizer
from test_rewards_image_reward import ARCH as BLIP_ARCH
from test_rewards_image_reward import checkpoint_and_text_model
from test_rewards_image_reward import tiny_tokenizer as tiny_bert_tokenizer

import diffusion_env
from diffusion_env import TINY_MODEL_PATH
from rewards.alignment import MINILM
from rewards.server import serve_in_thread

ALL_IDS = sorted(i for i in gym.registry if i.startswith("Denoise-"))
HAVE_TINY = (TINY_MODEL_PATH / "unet").is_dir()


@pytest.fixture(scope="module")
def vlm_server():
    url, stop = serve_in_thread(lambda images: ["a cat riding a bike"] * len(images))
    yield url
    stop()


def _kwargs(env_id, request, vlm_server):
    if env_id.startswith("Denoise-Tiny-"):
        if not HAVE_TINY:
            pytest.skip(f"the shipped tiny model is not built at {TINY_MODEL_PATH}")
        return dict(num_steps=2)
    if env_id.startswith("Denoise-TinyFlow-"):
        return dict(model=str(request.getfixturevalue("random_tinyflow")), num_steps=2)
    model = request.getfixturevalue("tiny_sd3" if env_id.startswith("Denoise-SD35-") else "tiny_sd")
    kw = dict(model=str(model), height=16, width=16, num_steps=2)
    if "Aesthetic" in env_id:
        head = torch.load(REAL_HEAD, map_location="cpu", weights_only=True) if REAL_HEAD.is_file() else random_head(768)
        kw["reward_kwargs"] = dict(clip_model=tiny_clip(768), head=head)
    if "PickScore" in env_id:
        kw["reward_kwargs"] = dict(model=tiny_text_clip(), tokenizer=tiny_clip_tokenizer())
    if "-HPS-" in env_id:
        kw["reward_kwargs"] = dict(checkpoint=open_clip_state_dict(), tokenizer=tiny_clip_tokenizer(), arch=HPS_ARCH)
    if "ImageReward" in env_id:
        kw["reward_kwargs"] = dict(checkpoint=checkpoint_and_text_model()[0], tokenizer=tiny_bert_tokenizer(),
                                   arch=BLIP_ARCH)  # fmt: skip
    if "PromptAlignment" in env_id:
        kw["reward_kwargs"] = dict(base_url=vlm_server, model="tiny-vlm", api_key="", bertscore_model=MINILM)
    return kw


def test_all_paper_tasks_registered():
    for task in ("Aesthetic", "Compressibility", "Incompressibility", "PromptAlignment"):
        assert f"Denoise-SD14-{task}-v0" in ALL_IDS
    for task in ("PickScore", "HPS", "ImageReward"):
        assert f"Denoise-SD14-{task}-v0" in ALL_IDS
    for task in ("Compressibility", "Incompressibility", "PromptAlignment"):
        assert f"Denoise-Tiny-{task}-v0" in ALL_IDS
        assert f"Denoise-TinyFlow-{task}-v0" in ALL_IDS
    for task in ("Aesthetic", "Compressibility", "Incompressibility", "PromptAlignment"):
        assert f"Denoise-SD35-{task}-v0" in ALL_IDS


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_make_check_env_and_episode(env_id, request, vlm_server):
    kw = _kwargs(env_id, request, vlm_server)
    env = gym.make(env_id, **kw)
    check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert np.isfinite(reward) and info["image"].dtype == np.uint8
    venv = gym.make_vec(env_id, num_envs=2, **kw)
    assert isinstance(venv.unwrapped, diffusion_env.DenoisingEnv)
    obs, _ = venv.reset(seed=0)
    for _ in range(venv.unwrapped.num_steps):
        obs, rewards, terms, _, _ = venv.step(torch.zeros(2, *venv.unwrapped.latent_shape))
    assert terms.all() and torch.isfinite(rewards).all() and rewards.dtype == torch.float32
    env.close()
    venv.close()
