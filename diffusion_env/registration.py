"""Registered environment IDs (imported by ``import diffusion_env``).

``Denoise-SD14-*``: the DDPO paper's tasks on Stable Diffusion v1.4 (512×512, 50 DDIM steps, η = 1,
guidance 5), and the same set-up with the preference rewards PickScore, HPSv2.1 and ImageReward on the
``animal_activities`` prompts. ``Denoise-Tiny-*``: the same tasks on the embedded tiny model (32×32, 20 steps), which
runs on a CPU in minutes. Every keyword below can be overridden through ``gym.make``/``gym.make_vec``.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from diffusion_env.models import SD14_REPO, TINY_MODEL_PATH, TINYFLOW_MODEL_PATH

SINGLE_ENTRY = "diffusion_env.env:DenoisingSingleEnv"
VECTOR_ENTRY = "diffusion_env.vector_env:DenoisingEnv"

SD14_DEFAULTS = dict(model=SD14_REPO, height=512, width=512, num_steps=50, eta=1.0, guidance_scale=5.0)
TINY_DEFAULTS = dict(model=str(TINY_MODEL_PATH), height=32, width=32, num_steps=20, eta=1.0, guidance_scale=5.0)
TINYFLOW_DEFAULTS = dict(model=str(TINYFLOW_MODEL_PATH), family="sd3-flow", height=32, width=32, num_steps=20, eta=0.7,
                         guidance_scale=4.5)  # fmt: skip

SD14_TASKS = {
    "Aesthetic": dict(reward="aesthetic", prompts="simple_animals"),
    "Compressibility": dict(reward="jpeg_compressibility", prompts="imagenet_animals"),
    "Incompressibility": dict(reward="jpeg_incompressibility", prompts="imagenet_animals"),
    "PromptAlignment": dict(reward="prompt_alignment", prompts="animal_activities"),
    # human-preference rewards the field trains on (weights: see rewards.pickscore / hps / image_reward)
    "PickScore": dict(reward="pickscore", prompts="animal_activities"),
    "HPS": dict(reward="hpsv2", prompts="animal_activities"),
    "ImageReward": dict(reward="image_reward", prompts="animal_activities"),
}
TINY_TASKS = {
    "Compressibility": dict(reward="jpeg_compressibility", prompts="tiny_train"),
    "Incompressibility": dict(reward="jpeg_incompressibility", prompts="tiny_train"),
    "PromptAlignment": dict(reward="tiny_prompt_alignment", prompts="tiny_train"),
}


def _register(env_id: str, kwargs: dict) -> None:
    if env_id in registry:
        return
    register(
        id=env_id,
        entry_point=SINGLE_ENTRY,
        vector_entry_point=VECTOR_ENTRY,
        kwargs=kwargs,
        disable_env_checker=False,
    )


def register_all() -> None:
    for task, kw in SD14_TASKS.items():
        _register(f"Denoise-SD14-{task}-v0", {**SD14_DEFAULTS, **kw})
    for task, kw in TINY_TASKS.items():
        _register(f"Denoise-Tiny-{task}-v0", {**TINY_DEFAULTS, **kw})


def describe_env(env_id: str) -> str:
    """One line about a registered ``Denoise-*`` ID: model, image size, steps, reward and prompts."""
    from pathlib import Path

    kw = registry[env_id].kwargs
    model = kw.get("model")
    if model is not None and Path(str(model)) == TINY_MODEL_PATH:
        model = "embedded tiny model"
    size = f"{kw['height']}²" if kw.get("height") and kw.get("height") == kw.get("width") else None
    parts = [str(model), size, f"{kw['num_steps']} steps" if "num_steps" in kw else None,
             f"reward {kw.get('reward')}", f"prompts {kw.get('prompts')}"]  # fmt: skip
    return ", ".join(p for p in parts if p)
