"""Shared fixtures: a tiny random Stable-Diffusion-layout model built offline with fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import agents.runtime  # noqa: E402

agents.runtime.AUTO_PROCESSES = False  # runs stay in the test's process; tests of forked runs turn it on

SHARED = Path(__file__).resolve().parents[2] / "shared"

from diffusion_env.testing import build_tiny_sd, build_tiny_sd3, write_tiny_tokenizer  # noqa: E402,F401  (re-exported)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Path of a tiny random SD-layout model (16×16 images, 4×8×8 latents)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """Path of a tiny random SD3-layout model (16×16 images, 16×8×8 latents, flow scheduler with shift 3)."""
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def random_tinyflow(tmp_path_factory) -> Path:
    """Path of a random-weight model of the embedded tiny flow model's architecture (SD3 layout, 32×32 images,
    4×8×8 latents): the stand-in for ``diffusion_env/assets/tinyflow`` in tests."""
    from diffusion_env.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tinyflow") / "tinyflow", size="tinyflow")


def make_env(tiny_sd, num_envs=2, **kw):
    from diffusion_env import DenoisingEnv

    defaults = dict(model=str(tiny_sd), prompts=["a cat", "a dog", "a red circle"], num_steps=4,
                    reward="jpeg_incompressibility")  # fmt: skip
    return DenoisingEnv(num_envs, **{**defaults, **kw})
