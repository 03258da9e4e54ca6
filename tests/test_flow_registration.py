"""The flow-matching IDs (Denoise-SD35-*, Denoise-TinyFlow-*): registered settings, the missing-weights error
of the gated SD3.5 repo, check_env on a random-weight tiny flow model, and the sd35 / tiny-flow presets.

Expected values are Flow-GRPO's (github.com/yifan123/flow_grpo: config/base.py, config/grpo.py,
scripts/train_sd3.py) and the issue's, written out here rather than read from the code under test.
"""

from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import diffusion_env  # noqa: F401  (registers the IDs)
from agents.config import preset_config
from agents.registry import registered_algos
from diffusion_env import ModelNotFoundError
from diffusion_env.registration import describe_env

SD35 = "stabilityai/stable-diffusion-3.5-medium"
SD35_IDS = [f"Denoise-SD35-{t}-v0" for t in ("Aesthetic", "Compressibility", "Incompressibility", "PromptAlignment")]
TINYFLOW_IDS = [f"Denoise-TinyFlow-{t}-v0" for t in ("Compressibility", "Incompressibility", "PromptAlignment")]


# ------------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("env_id", SD35_IDS)
def test_sd35_ids_carry_flow_grpo_settings_and_the_sd14_tasks(env_id):
    spec = gym.spec(env_id)
    kw = spec.kwargs
    assert kw["model"] == SD35 and kw["family"] == "sd3-flow"
    assert (kw["height"], kw["width"], kw["num_steps"], kw["eta"], kw["guidance_scale"]) == (512, 512, 10, 0.7, 4.5)
    sd14 = gym.spec(env_id.replace("SD35", "SD14")).kwargs
    assert (kw["reward"], kw["prompts"]) == (sd14["reward"], sd14["prompts"])
    assert spec.entry_point == gym.spec(env_id.replace("SD35", "SD14")).entry_point
    assert spec.vector_entry_point == "diffusion_env.vector_env:DenoisingEnv"


def test_sd35_tasks_are_the_papers_four():
    assert sorted(i for i in gym.registry if i.startswith("Denoise-SD35-")) == sorted(SD35_IDS)
    assert gym.spec("Denoise-SD35-Compressibility-v0").kwargs["reward"] == "jpeg_compressibility"
    assert gym.spec("Denoise-SD35-Aesthetic-v0").kwargs["prompts"] == "simple_animals"


@pytest.mark.parametrize("env_id", TINYFLOW_IDS)
def test_tinyflow_ids_point_at_the_embedded_flow_model(env_id):
    kw = gym.spec(env_id).kwargs
    assert Path(kw["model"]).parts[-3:] == ("diffusion_env", "assets", "tinyflow")
    assert kw["family"] == "sd3-flow"
    assert (kw["height"], kw["width"], kw["num_steps"], kw["eta"], kw["guidance_scale"]) == (32, 32, 20, 0.7, 4.5)
    tiny = gym.spec(env_id.replace("TinyFlow", "Tiny")).kwargs
    assert (kw["reward"], kw["prompts"]) == (tiny["reward"], tiny["prompts"])
    assert describe_env(env_id).startswith("embedded tiny flow model, 32², 20 steps")
    assert describe_env(env_id.replace("TinyFlow", "Tiny")).startswith("embedded tiny model, ")


def test_tinyflow_model_path_is_exported_beside_the_tiny_one():
    from diffusion_env.models import TINY_MODEL_PATH, TINYFLOW_MODEL_PATH

    assert TINYFLOW_MODEL_PATH == TINY_MODEL_PATH.parent / "tinyflow"
    assert diffusion_env.TINYFLOW_MODEL_PATH == TINYFLOW_MODEL_PATH


# ------------------------------------------------------------------------------------------ missing weights
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face home: the environment variable and the constants huggingface_hub read from it."""
    import huggingface_hub.constants as hc

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("DENOISE_GYM_AESTHETIC_HEAD", raising=False)
    return home


def _assert_names_gated_sd35(msg: str) -> None:
    assert SD35 in msg, msg
    assert f"download {SD35}" in msg, msg  # the download command
    assert "is gated" in msg and f"huggingface.co/{SD35}" in msg and "auth login" in msg and "HF_TOKEN" in msg, msg


@pytest.mark.parametrize("env_id", SD35_IDS)
def test_sd35_ids_with_an_empty_cache_name_the_gated_repo_and_how_to_fetch_it(env_id, empty_hf_cache):
    with pytest.raises(ModelNotFoundError) as exc:
        gym.make(env_id)
    _assert_names_gated_sd35(str(exc.value))


def test_loading_the_sd35_repo_directly_also_names_the_gate(empty_hf_cache):
    from diffusion_env.models import SD3Family

    with pytest.raises(ModelNotFoundError) as exc:
        SD3Family.load(SD35)
    _assert_names_gated_sd35(str(exc.value))


def test_an_ungated_repo_gets_no_gate_note(empty_hf_cache):
    with pytest.raises(ModelNotFoundError) as exc:
        gym.make("Denoise-SD14-Compressibility-v0")
    assert "CompVis/stable-diffusion-v1-4" in str(exc.value) and "is gated" not in str(exc.value)


# ------------------------------------------------------------------------------------------ check_env
@pytest.mark.parametrize("env_id", TINYFLOW_IDS)
def test_check_env_on_tinyflow_ids_with_a_random_flow_model(env_id, random_tinyflow):
    env = gym.make(env_id, model=str(random_tinyflow), num_steps=2)
    assert type(env.unwrapped.vector_env.family).__name__ == "SD3Family"
    assert env.observation_space["x_t"].shape == (4, 8, 8)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


# ------------------------------------------------------------------------------------------ presets
def test_tiny_preset_serves_tinyflow_ids_with_their_own_rwr_beta(monkeypatch):
    import agents.rwr as config  # the tiny β tables belong to RWR's presets

    cfg = preset_config("tiny", "rwr", env_id="Denoise-TinyFlow-Compressibility-v0").validate()
    assert cfg.env_id == "Denoise-TinyFlow-Compressibility-v0" and cfg.samples_per_prompt == 8
    monkeypatch.setitem(config.TINYFLOW_RWR_BETA, "Compressibility", 3.0)
    monkeypatch.setitem(config.TINY_RWR_BETA, "Compressibility", 5.0)
    assert preset_config("tiny", "rwr", env_id="Denoise-TinyFlow-Compressibility-v0").rwr_beta == 3.0
    assert preset_config("tiny", "rwr", env_id="Denoise-Tiny-Compressibility-v0").rwr_beta == 5.0
    for algo in registered_algos():
        preset_config("tiny", algo, env_id="Denoise-TinyFlow-PromptAlignment-v0").validate()


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf", "rwr", "rwr-sparse"])
def test_sd35_preset_is_lora_rank_32_on_flow_grpo_groups(algo):
    cfg = preset_config("sd35", algo, env_id="Denoise-SD35-Aesthetic-v0").validate()
    assert cfg.lora_rank == 32 and cfg.device == "cuda" and cfg.adam_weight_decay == 1e-4
    assert cfg.samples_per_prompt == 24 and cfg.samples_per_epoch == 48 * 24
    if algo.startswith("ddpo"):
        assert cfg.learning_rate == 3e-4
    if algo == "ddpo-is":  # DDPO-SF does not clip: it has no clip range
        assert cfg.clip_range == 1e-4


def test_sd35_ddpo_is_takes_two_optimizer_steps_per_epoch_on_nine_of_ten_steps():
    cfg = preset_config("sd35", "ddpo-is")
    assert cfg.samples_per_epoch // cfg.train_batch_size == 2
    assert round(cfg.timestep_fraction * gym.spec("Denoise-SD35-Aesthetic-v0").kwargs["num_steps"]) == 9


def test_cli_accepts_and_documents_the_sd35_preset(capsys):
    from agents.cli import build_parser, new_train_config

    parser = build_parser()
    args = parser.parse_args(["train", "--env", "Denoise-SD35-Compressibility-v0", "--algo", "ddpo-is",
                              "--preset", "sd35"])  # fmt: skip
    assert args.preset == "sd35"
    cfg = new_train_config({"algo": "ddpo-is", "env_id": "Denoise-SD35-Compressibility-v0"}, "sd35")
    assert cfg.lora_rank == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # no whitespace: immune to where the help wraps
    assert "'sd35'(Flow-GRPO'sSD3.5-MediumLoRAsettings" in text and "Denoise-TinyFlow-*" in text
    assert "Denoise-TinyFlow-Compressibility-v0" in text and "embeddedtinyflowmodel" in text
