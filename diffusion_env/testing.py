"""Random-weight Stable-Diffusion-layout models, built offline with fixed seeds: the one builder for tests
and benchmarks.

The same diffusers/transformers classes as SD v1.4 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel +
CLIPTokenizer, DDIMScheduler), written to a folder in the SD layout so they load through exactly the code
path of a real model:

- :func:`build_tiny_sd`: a toy model on a byte-level CLIP vocabulary (16×16 images, 4×8×8 latents): the
  tests' ``tiny_sd`` fixture and the SD14 IDs' stand-in.
- :func:`build_random_model` ``size="tiny"``: the shipped tiny model's architecture (``diffusion_env/assets/tiny``:
  32×32 images, 8×8×4 latents, UNet blocks (32, 64) with cross-attention in both, a 2-layer width-64 CLIP
  text encoder on the tiny world's tokenizer) with random weights; speed does not depend on the weights, so
  throughput figures from it carry over to the trained model. ``size="micro"``: the same layout, much smaller.
  ``size="tinyflow"``: the embedded tiny flow-matching model's architecture (``diffusion_env/assets/tinyflow``,
  SD3 layout: the configs of :mod:`diffusion_env.tiny.pretrain_flow`, the DDIM tiny model's VAE architecture
  with a ``shift_factor``, ``FlowMatchEulerDiscreteScheduler(shift=1.0)``) with random weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes (re-derived here)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> None:
    """A CLIPTokenizer vocabulary: every byte symbol (bare and word-final), a few whole words, specials."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for w in words:  # whole-word tokens via a chain of merges
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab_list.append(pieces[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def _save_sd_layout(folder: Path, text_encoder, vae_kwargs: dict, unet_kwargs: dict, scheduler_kwargs: dict) -> Path:
    """Build the VAE and UNet (in this order: their random draws follow the text encoder's) and save all parts."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    text_encoder.save_pretrained(folder / "text_encoder")
    AutoencoderKL(**vae_kwargs).save_pretrained(folder / "vae")
    UNet2DConditionModel(**unet_kwargs).save_pretrained(folder / "unet")
    DDIMScheduler(**scheduler_kwargs).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def build_tiny_sd(
    folder: Path, seed: int = 0, sample_size: int = 16, block_out_channels: tuple[int, int] = (16, 32),
    cross_attention_dim: int = 32,
) -> Path:
    """Save random-weight SD-architecture components (UNet, VAE, CLIP text encoder, tokenizer, DDIM)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    write_tiny_tokenizer(folder / "tokenizer", words=("a", "cat", "dog", "red", "circle"))
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=16)
    tok.save_pretrained(folder / "tokenizer")
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cross_attention_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vae = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=sample_size,
    )  # fmt: skip
    unet = dict(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    scheduler = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return _save_sd_layout(folder, CLIPTextModel(text_cfg), vae, unet, scheduler)


# Architectures: (UNet block_out_channels, heads per block, text width, VAE block_out_channels).
SIZES = {
    "tiny": dict(unet_blocks=(32, 64), heads=(2, 4), text_width=64, vae_blocks=(16, 32, 32)),
    "micro": dict(unet_blocks=(8, 16), heads=(2, 2), text_width=16, vae_blocks=(8, 8, 8)),
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip


FLOW_SIZES = ("tinyflow",)  # SD3-layout sizes (built by _build_random_flow_model)


def build_random_model(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model of an embedded tiny model's layout to ``folder``: ``size`` "tiny" or
    "micro" (SD v1 layout), or "tinyflow" (SD3 layout)."""
    if size not in SIZES and size not in FLOW_SIZES:
        raise ValueError(f"size={size!r}; expected one of {sorted(SIZES) + list(FLOW_SIZES)}")
    if size in FLOW_SIZES:
        return _build_random_flow_model(Path(folder), seed)
    from transformers import CLIPTextConfig, CLIPTextModel

    from rewards.tinyworld.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

    arch = SIZES[size]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer")
    width = arch["text_width"]
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=width,
    ))  # fmt: skip
    n_vae = len(arch["vae_blocks"])
    vae = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=arch["vae_blocks"],
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    )  # fmt: skip
    unet = dict(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=arch["unet_blocks"],
        layers_per_block=1, cross_attention_dim=width, attention_head_dim=arch["heads"], norm_num_groups=8,
    )  # fmt: skip
    return _save_sd_layout(folder, text, vae, unet, SCHEDULER)


def _build_random_flow_model(folder: Path, seed: int) -> Path:
    """The tiny flow model's architecture (:mod:`diffusion_env.tiny.pretrain_flow`) with random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusion_env.tiny.pretrain import vae_config
    from diffusion_env.tiny.pretrain_flow import text_config, transformer_config
    from rewards.tinyworld.tokenizer import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(folder / "tokenizer")
    cfg = CLIPTextConfig(**text_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    encoders = [CLIPTextModelWithProjection(cfg), CLIPTextModelWithProjection(cfg)]
    vae = AutoencoderKL(**vae_config(), shift_factor=0.1)  # nonzero, so the shift is exercised
    return save_sd3_layout(folder, encoders, [tok, tok], vae, SD3Transformer2DModel(**transformer_config()),
                           FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0))


def temporary_random_model(size: str, prefix: str = "random-model-") -> tuple[tempfile.TemporaryDirectory, Path]:
    """A random-weight model of ``size`` in a new temporary folder: ``(folder handle, model path)``.

    The folder lives as long as the handle (``handle.cleanup()`` removes it at once).
    """
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return tmp, build_random_model(Path(tmp.name) / size, size=size)


# An SD3 folder's model_index.json without T5 (text_encoder_3 None, which the SD3 pipeline allows).
SD3_MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": [None, None],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": [None, None], "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip


def save_sd3_layout(folder: Path, text_encoders: list, tokenizers: list, vae, transformer, scheduler) -> Path:
    """Save SD3-layout parts (two CLIP encoders with projection and their tokenizers, ``AutoencoderKL``,
    ``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``) and a ``model_index.json`` without T5."""
    import diffusers
    import transformers

    folder = Path(folder)
    for i, (enc, tok) in enumerate(zip(text_encoders, tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        enc.save_pretrained(folder / f"text_encoder{suffix}")
        tok.save_pretrained(folder / f"tokenizer{suffix}")
    vae.save_pretrained(folder / "vae")
    transformer.save_pretrained(folder / "transformer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {**SD3_MODEL_INDEX, "_diffusers_version": diffusers.__version__,
             "_transformers_version": transformers.__version__}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def build_tiny_sd3(folder: Path, seed: int = 0, sample_size: int = 16, shift: float = 3.0, width: int = 16) -> Path:
    """Save a random-weight SD3-architecture toy (16-channel VAE with a shift factor, MMDiT, two CLIPs with
    projection on a byte-level vocabulary, flow-matching scheduler with timestep ``shift``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_tokenizer(folder / "tokenizer", words=("a", "cat", "dog", "red", "circle"))
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=16)
    encoders = [
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id, projection_dim=w,
        ))
        for w in (width, 2 * width)
    ]  # fmt: skip
    vae = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=16,
        layers_per_block=1, norm_num_groups=4, sample_size=sample_size, scaling_factor=1.5, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip
    transformer = dict(
        sample_size=sample_size // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=4 * width, caption_projection_dim=16,
        pooled_projection_dim=3 * width, pos_embed_max_size=sample_size // 2,
    )  # fmt: skip
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    vae_model = AutoencoderKL(**vae, shift_factor=0.1)
    return save_sd3_layout(folder, encoders, [tok, tok], vae_model, SD3Transformer2DModel(**transformer),
                           FlowMatchEulerDiscreteScheduler(shift=shift))
