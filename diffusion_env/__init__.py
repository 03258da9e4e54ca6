"""denoise-gym environments: text-to-image denoising as a Gymnasium MDP (DDPO, Black et al. 2023).

``import diffusion_env`` registers the ``Denoise-*`` IDs (see :mod:`diffusion_env.registration`).
"""

from diffusion_env.env import DenoisingSingleEnv
from diffusion_env.models import (
    SD14_REPO,
    SD35_REPO,
    TINY_MODEL_PATH,
    TINYFLOW_MODEL_PATH,
    ModelFamily,
    ModelNotFoundError,
    SD1Family,
    load_family,
)
from diffusion_env.registration import register_all
from diffusion_env.vector_env import DenoisingEnv
from diffusion_env.wrappers import SB3Adapter

register_all()

__all__ = [
    "DenoisingEnv",
    "DenoisingSingleEnv",
    "ModelFamily",
    "ModelNotFoundError",
    "SB3Adapter",
    "SD14_REPO",
    "SD35_REPO",
    "TINY_MODEL_PATH",
    "TINYFLOW_MODEL_PATH",
    "SD1Family",
    "load_family",
]
