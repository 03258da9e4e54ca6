"""Tiny random-weight Stable-Diffusion-layout models, built offline with fixed seeds.

For tests and benchmarks: the same diffusers/transformers classes as SD v1.4 (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel + CLIPTokenizer, DDIMScheduler), at toy sizes, written to a folder in the
SD layout so they load through exactly the code path of a real model.
"""

from __future__ import annotations

import json
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


def build_tiny_sd(
    folder: Path, seed: int = 0, sample_size: int = 16, block_out_channels: tuple[int, int] = (16, 32),
    cross_attention_dim: int = 32,
) -> Path:
    """Save random-weight SD-architecture components (UNet, VAE, CLIP text encoder, tokenizer, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
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
    CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=sample_size,
    )  # fmt: skip
    vae.save_pretrained(folder / "vae")
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    unet.save_pretrained(folder / "unet")
    DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder
