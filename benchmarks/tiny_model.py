"""Random-weight stand-ins for the embedded tiny model, for benchmarks and their tests.

``build_random_model(folder, size="tiny")`` writes a Stable-Diffusion-layout folder (unet/, vae/,
text_encoder/, tokenizer/, scheduler/) whose architecture matches the shipped tiny model
(``diffusion_env/assets/tiny``: 32x32 images, 8x8x4 latents, UNet blocks (32, 64) with cross-attention
in both, a 2-layer width-64 CLIP text encoder on the tiny world's tokenizer) but with random weights.
Speed does not depend on the weights, so throughput figures from it carry over to the trained model;
rewards obviously do not. ``size="micro"`` is a much smaller model of the same layout for fast tests.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# Architectures: (UNet block_out_channels, heads per block, text width, VAE block_out_channels).
SIZES = {
    "tiny": dict(unet_blocks=(32, 64), heads=(2, 4), text_width=64, vae_blocks=(16, 32, 32)),
    "micro": dict(unet_blocks=(8, 16), heads=(2, 2), text_width=16, vae_blocks=(8, 8, 8)),
}

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip


def build_random_model(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD-layout model of ``size`` ("tiny" or "micro") to ``folder``; return it."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rewards.tinyworld.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

    arch = SIZES[size]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer")
    width = arch["text_width"]
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=width,
    )).save_pretrained(folder / "text_encoder")  # fmt: skip
    n_vae = len(arch["vae_blocks"])
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=arch["vae_blocks"],
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    ).save_pretrained(folder / "vae")  # fmt: skip
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=arch["unet_blocks"],
        layers_per_block=1, cross_attention_dim=width, attention_head_dim=arch["heads"], norm_num_groups=8,
    ).save_pretrained(folder / "unet")  # fmt: skip
    DDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def temporary_random_model(size: str, prefix: str = "random-model-") -> tuple[tempfile.TemporaryDirectory, Path]:
    """A random-weight model of ``size`` in a new temporary folder: ``(folder handle, model path)``.

    The folder lives as long as the handle (``handle.cleanup()`` removes it at once).
    """
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return tmp, build_random_model(Path(tmp.name) / size, size=size)
