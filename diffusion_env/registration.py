"""Registered environment IDs (imported by ``import diffusion_env``).

``Denoise-SD14-*``: the DDPO paper's tasks on Stable Diffusion v1.4 (512×512, 50 DDIM steps, η = 1,
guidance 5), and the same set-up with the preference rewards PickScore, HPSv2.1 and ImageReward on the
``animal_activities`` prompts. ``Denoise-SD35-*``: the DDPO paper's four tasks on Stable Diffusion 3.5 Medium
(flow matching) with Flow-GRPO's sampling settings (512×512, 10 SDE steps at noise level 0.7, guidance 4.5;
evaluate with ``num_steps=SD35_EVAL_NUM_STEPS``). ``Denoise-Tiny-*``: the same tasks on the embedded tiny model
(32×32, 20 steps), which runs on a CPU in minutes; ``Denoise-TinyFlow-*``: the same on the embedded tiny
flow-matching model. Every keyword below can be overridden through ``gym.make``/``gym.make_vec``.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from diffusion_env.models import SD14_REPO, SD35_REPO, TINY_MODEL_PATH, TINYFLOW_MODEL_PATH

SINGLE_ENTRY = "diffusion_env.env:DenoisingSingleEnv"
VECTOR_ENTRY = "diffusion_env.vector_env:DenoisingEnv"

SD14_DEFAULTS = dict(model=SD14_REPO, height=512, width=512, num_steps=50, eta=1.0, guidance_scale=5.0)
TINY_DEFAULTS = dict(model=str(TINY_MODEL_PATH), height=32, width=32, num_steps=20, eta=1.0, guidance_scale=5.0)
TINYFLOW_DEFAULTS = dict(model=str(TINYFLOW_MODEL_PATH), family="sd3-flow", height=32, width=32, num_steps=20, eta=0.7,
                         guidance_scale=4.5)  # fmt: skip
# Flow-GRPO's SD3.5-Medium settings (github.com/yifan123/flow_grpo, config/grpo.py, e.g. `pickscore_sd3` and
# `geneval_sd3`: resolution 512, sample.num_steps 10, sample.eval_num_steps 40, sample.guidance_scale 4.5;
# config/base.py: sample.noise_level 0.7, the SDE's a, which is the env's eta). The family is named so that a
# repo id needs no layout detection.
SD35_DEFAULTS = dict(model=SD35_REPO, family="sd3-flow", height=512, width=512, num_steps=10, eta=0.7,
                     guidance_scale=4.5)  # fmt: skip
SD35_EVAL_NUM_STEPS = 40  # Flow-GRPO evaluates with 40 steps: gym.make(id, num_steps=SD35_EVAL_NUM_STEPS)

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
SD35_TASKS = {k: SD14_TASKS[k] for k in ("Aesthetic", "Compressibility", "Incompressibility", "PromptAlignment")}
TINY_TASKS = {
    "Compressibility": dict(reward="jpeg_compressibility", prompts="tiny_train"),
    "Incompressibility": dict(reward="jpeg_incompressibility", prompts="tiny_train"),
    "PromptAlignment": dict(reward="tiny_prompt_alignment", prompts="tiny_train"),
    # GenEval-style rule reward (rewards/tinyworld/geneval.py) on scenes with the training object-count mix
    "GenEval": dict(reward="tiny_geneval", prompts="tiny_train_scenes"),
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
    for task, kw in SD35_TASKS.items():
        _register(f"Denoise-SD35-{task}-v0", {**SD35_DEFAULTS, **kw})
    for task, kw in TINY_TASKS.items():
        _register(f"Denoise-Tiny-{task}-v0", {**TINY_DEFAULTS, **kw})
        _register(f"Denoise-TinyFlow-{task}-v0", {**TINYFLOW_DEFAULTS, **kw})


def describe_env(env_id: str) -> str:
    """One line about a registered ``Denoise-*`` ID: model, image size, steps, reward and prompts."""
    from pathlib import Path

    kw = registry[env_id].kwargs
    model = kw.get("model")
    embedded = {TINY_MODEL_PATH: "embedded tiny model", TINYFLOW_MODEL_PATH: "embedded tiny flow model"}
    if model is not None:
        model = embedded.get(Path(str(model)), model)
    size = f"{kw['height']}²" if kw.get("height") and kw.get("height") == kw.get("width") else None
    parts = [str(model), size, f"{kw['num_steps']} steps" if "num_steps" in kw else None,
             f"reward {kw.get('reward')}", f"prompts {kw.get('prompts')}"]  # fmt: skip
    return ", ".join(p for p in parts if p)
