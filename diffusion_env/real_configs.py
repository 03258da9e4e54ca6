"""The published architectures of Stable Diffusion v1.4 and SD3.5-Medium, written out, and random-weight models
built from them (real sizes, or a ``"debug"`` scale of the same layout for smoke tests).

Speed and memory do not depend on the weights, so a random-weight model of the real architecture measures
what a run on the real model costs, with nothing to download. Each figure below cites the published
``config.json`` it comes from (Hugging Face copies of the official snapshots, found through their
``_name_or_path`` fields). Headline checks (tests/test_real_size.py): the parameters of these configs add up
to the published counts (SD3.5-Medium: keras-hub's preset total of 3,371,793,763; SD v1.4: UNet 859,520,964,
CLIP text 123,060,480, VAE 83,653,863).

Not real: the tokenizers. The real CLIP vocabularies are not available offline, so both architectures use the
project's byte-level CLIP tokenizer (:func:`diffusion_env.testing.write_tiny_tokenizer`) padded to the real
77 tokens; the text encoders keep the real ``vocab_size`` of 49,408, so every tensor has its real shape.
SD3.5-Medium also ships a T5-XXL encoder (``text_encoder_3``); it is left out here, as the SD3 pipeline
allows, and its 256 sequence positions are zeros (``t5_tokens``), as diffusers does without T5.

Entry points: :func:`architecture` (the configs, at a scale), :func:`parameter_counts` (counted on the meta
device: no memory, no time), :func:`build_parts` (an in-memory model family plus its network, no disk),
:func:`build_real_size_model` (the same model saved in the real folder layout).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ARCHS = ("sd35-medium", "sd14")
SCALES = ("real", "debug")
CLIP_MAX_LENGTH = 77  # both CLIP tokenizers' model_max_length
T5_TOKENS = 256  # the SD3 pipeline's default max_sequence_length (zeros without T5)

# ---------------------------------------------------------------------------------------------- SD3.5-Medium
# stabilityai/stable-diffusion-3.5-medium, snapshot b940f670f0eda2d07fbb75229e779da1ad11eb80.
SD35_MEDIUM: dict[str, dict[str, Any]] = {
    # transformer/config.json, as copied in huggingface.co/Prgckwb/trpfrog-sd3.5-medium (its _name_or_path is
    # that snapshot). MMDiT-X: the model card's "QK-normalization ... and dual attention blocks in the first
    # 12 transformer layers" are qk_norm and dual_attention_layers (indices 0 … 12, thirteen blocks).
    "transformer": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13)),
    ),  # fmt: skip
    # text_encoder/config.json (same copy): CLIP ViT-L/14's text tower with its projection.
    "text_encoder": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),  # fmt: skip
    # text_encoder_2/config.json, as copied in huggingface.co/Kolyadual/MicroMacro-GenImage-v1-medium (same
    # snapshot): OpenCLIP ViT-bigG/14's text tower with its projection.
    "text_encoder_2": dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),  # fmt: skip
    # vae/config.json (Prgckwb copy): 16 latent channels, no quant convs, latents / 1.5305 + 0.0609 decoded.
    "vae": dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
        shift_factor=0.0609, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True,
    ),  # fmt: skip
    # scheduler/scheduler_config.json of the public release (mirror huggingface.co/frankjoshua/stable-diffusion-
    # 3.5-medium at 9e00742): FlowMatchEulerDiscreteScheduler, 1000 training steps, timestep shift 3.0.
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
}

# ---------------------------------------------------------------------------------------------- SD v1.4
# CompVis/stable-diffusion-v1-4.
SD14: dict[str, dict[str, Any]] = {
    # unet/config.json, as copied in huggingface.co/misza222/owczpodh-dog (_name_or_path
    # "CompVis/stable-diffusion-v1-4"). attention_head_dim=8 is diffusers' legacy name for 8 heads per block.
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=768, attention_head_dim=8, act_fn="silu",
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        use_linear_projection=False, upcast_attention=False,
    ),  # fmt: skip
    # text_encoder/config.json, as copied in huggingface.co/pcuenq/v14-variants (_name_or_path the CompVis
    # snapshot 3857c45b…): CLIP ViT-L/14's text tower (no projection used).
    "text_encoder": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),  # fmt: skip
    # vae/config.json, as copied in huggingface.co/Antiraedus/LeDude-dog (_name_or_path
    # "CompVis/stable-diffusion-v1-4").
    "vae": dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    ),  # fmt: skip
    # scheduler/scheduler_config.json (huggingface.co/CompVis/stable-diffusion-v1-4, refs/pr/221, "Make sure the
    # scheduler compatible with DDIM"): PNDM's config; the family samples with DDIM built from it.
    "scheduler": dict(
        _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
        trained_betas=None, clip_sample=False,
    ),  # fmt: skip
}

_REAL = {"sd35-medium": SD35_MEDIUM, "sd14": SD14}


# ---------------------------------------------------------------------------------------------- scales
def _debug_text(cfg: dict[str, Any], width: int) -> dict[str, Any]:
    return {**cfg, "hidden_size": width, "intermediate_size": 2 * width, "projection_dim": width,
            "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip


def _debug_vae(cfg: dict[str, Any]) -> dict[str, Any]:
    # Four blocks as the real one: the same ×8 downsampling, so latents keep their real shape.
    return {**cfg, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}


def _debug(arch: str, cfg: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The same layout (block types, latent channels, VAE factor, sequence lengths, vocabulary) with tiny widths
    and depths, so a DDPO epoch at the real resolution runs in seconds on one CPU core."""
    out = copy.deepcopy(cfg)
    out["vae"] = _debug_vae(cfg["vae"])
    if arch == "sd35-medium":
        w1, w2 = 16, 32
        out["text_encoder"] = _debug_text(cfg["text_encoder"], w1)
        out["text_encoder_2"] = _debug_text(cfg["text_encoder_2"], w2)
        out["transformer"].update(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                                  joint_attention_dim=64, pooled_projection_dim=w1 + w2, dual_attention_layers=[0])  # fmt: skip
    else:
        out["text_encoder"] = _debug_text(cfg["text_encoder"], 32)
        out["unet"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=2,
                           cross_attention_dim=32, norm_num_groups=8)  # fmt: skip
    return out


def architecture(arch: str, scale: str = "real") -> dict[str, dict[str, Any]]:
    """The component configs of ``arch`` ("sd35-medium" or "sd14") at ``scale`` ("real" or "debug"): a fresh
    copy, keyed by the model folder's subfolder names."""
    if arch not in _REAL:
        raise ValueError(f"arch={arch!r}; expected one of {list(ARCHS)}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; expected one of {list(SCALES)}")
    cfg = _REAL[arch]
    return copy.deepcopy(cfg) if scale == "real" else _debug(arch, cfg)


def network_name(arch: str) -> str:
    """The trainable network's subfolder: ``transformer`` (SD3.5) or ``unet`` (SD v1.4)."""
    return "transformer" if arch == "sd35-medium" else "unet"


# ---------------------------------------------------------------------------------------------- modules
def _text_encoder(arch: str, cfg: dict[str, Any]) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if arch == "sd35-medium" else CLIPTextModel
    return cls(CLIPTextConfig(**cfg))


def build_network(arch: str, scale: str = "real") -> torch.nn.Module:
    """The trainable network of ``arch`` at ``scale``, randomly initialised on the current default device (under
    ``torch.device("meta")``: shapes only, for counting)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cfg = architecture(arch, scale)[network_name(arch)]
    return SD3Transformer2DModel(**cfg) if arch == "sd35-medium" else UNet2DConditionModel(**cfg)


def build_vae(arch: str, scale: str = "real") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**architecture(arch, scale)["vae"])


def _text_keys(arch: str) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2") if arch == "sd35-medium" else ("text_encoder",)


def parameter_counts(arch: str, scale: str = "real") -> dict[str, int]:
    """Parameters of each component (and ``pos_embed``, the SD3 transformer's fixed sin-cos table, which
    diffusers keeps as a buffer), counted on the meta device: nothing is allocated or initialised."""
    with torch.device("meta"):
        modules = {key: _text_encoder(arch, architecture(arch, scale)[key]) for key in _text_keys(arch)}
        modules["vae"] = build_vae(arch, scale)
        modules[network_name(arch)] = build_network(arch, scale)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    if arch == "sd35-medium":
        counts["pos_embed"] = modules["transformer"].pos_embed.pos_embed.numel()
    return counts


@contextlib.contextmanager
def _construction(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Build modules directly in ``dtype`` on ``device``: no float32 copy of a half-precision model ever exists,
    and on a GPU the random initialisation runs there."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """The project's byte-level CLIP tokenizer (every byte, bare and word-final) padded to ``max_length``."""
    from transformers import CLIPTokenizer

    from diffusion_env.testing import write_tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        write_tiny_tokenizer(Path(tmp), words=("a", "an", "the", "cat", "dog", "of", "photo"))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def build_parts(arch: str = "sd35-medium", *, scale: str = "real", seed: int = 0, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, t5_tokens: int = T5_TOKENS):  # fmt: skip
    """A random-weight ``arch`` as an in-memory model family and its network: ``(family, network)``.

    Built in the order text encoder(s), VAE, network from ``torch.manual_seed(seed)`` (the caller's random state
    is left as it was), each directly in ``dtype`` on ``device``. The family (:class:`~diffusion_env.models.SD3Family`
    with ``t5_tokens`` zero T5 positions, or :class:`~diffusion_env.models.SD1Family` with DDIM built from the PNDM
    config) goes to ``DenoisingEnv(model=family)``; the network to ``GaussianDenoisingPolicy(network, family)``.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from diffusion_env.models import SD1Family, SD3Family

    cfg = architecture(arch, scale)
    device = torch.device(device)
    tokenizer = clip_tokenizer()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _construction(dtype, device):
        torch.manual_seed(seed)
        encoders = [_text_encoder(arch, cfg[key]) for key in _text_keys(arch)]
        vae = build_vae(arch, scale)
        network = build_network(arch, scale)
    if dtype != torch.float32:
        network.to(dtype=dtype)  # buffers made in float32 (the SD3 position table) follow the weights
    if arch == "sd35-medium":
        family = SD3Family(FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]), vae, encoders, [tokenizer, tokenizer],
                           joint_attention_dim=cfg["transformer"]["joint_attention_dim"], t5_tokens=t5_tokens,
                           device=device, dtype=dtype)  # fmt: skip
    else:
        family = SD1Family(DDIMScheduler.from_config(_ddim_config(cfg["scheduler"])), vae, encoders[0], tokenizer,
                           device=device, dtype=dtype)  # fmt: skip
    return family, network


def _ddim_config(pndm: dict[str, Any]) -> dict[str, Any]:
    """The PNDM scheduler config's entries DDIM also has (the rest, e.g. ``skip_prk_steps``, are PNDM's own)."""
    from diffusers import DDIMScheduler

    accepted = inspect.signature(DDIMScheduler.__init__).parameters
    return {k: v for k, v in pndm.items() if k in accepted}


def build_real_size_model(folder: str | Path, arch: str = "sd35-medium", seed: int = 0, *, scale: str = "real",
                          dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """Write the random-weight ``arch`` of :func:`build_parts` to ``folder`` in the real layout (``load_family``
    loads it like the downloaded model without T5: its ``model_index.json`` names T5, as the published one does,
    but T5's folders are left out, so the family passes T5's 256 positions as zeros).

    Disk: 4 bytes per parameter in float32 (SD3.5-Medium about 12.6 GB, SD v1.4 about 4.3 GB); half in bf16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler

    from diffusion_env.testing import SD3_MODEL_INDEX

    folder = Path(folder)
    family, network = build_parts(arch, scale=scale, seed=seed, dtype=dtype)
    cfg = architecture(arch, scale)
    if arch == "sd35-medium":
        for key, encoder, tok in zip(_text_keys(arch), family.text_encoders, family.tokenizers):
            encoder.save_pretrained(folder / key)
            tok.save_pretrained(folder / key.replace("text_encoder", "tokenizer"))
        index = {**SD3_MODEL_INDEX, "text_encoder_3": ["transformers", "T5EncoderModel"],
                 "tokenizer_3": ["transformers", "T5TokenizerFast"]}  # as published; the folders are absent
    else:
        family.text_encoder.save_pretrained(folder / "text_encoder")
        family.tokenizer.save_pretrained(folder / "tokenizer")
        index = {"_class_name": "StableDiffusionPipeline"}
    family.vae.save_pretrained(folder / "vae")
    network.save_pretrained(folder / network_name(arch))
    scheduler_cls = FlowMatchEulerDiscreteScheduler if arch == "sd35-medium" else PNDMScheduler  # as published
    scheduler_cls.from_config(cfg["scheduler"]).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
