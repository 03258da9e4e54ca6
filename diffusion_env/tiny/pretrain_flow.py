"""Pretrain the embedded tiny flow-matching model (SD3 classes) on the procedural world, on CPU, from a seed.

    python -m diffusion_env.tiny.pretrain_flow --out diffusion_env/assets/tinyflow --seed 0 --threads 1

The same diffusers/transformers classes as Stable Diffusion 3.5, sized for a laptop:

1. ``AutoencoderKL``: the embedded DDIM tiny model's VAE (trained by :mod:`diffusion_env.tiny.pretrain` on
   the same world), so the two tiny models differ only in the denoiser and a fidelity comparison is fair.
   As SD3's VAE, it gets a ``shift_factor`` (the latents' mean) and a ``scaling_factor`` (1 / the std of
   the shifted latents), both measured here on fresh scenes.
2. ``SD3Transformer2DModel`` (MMDiT, QK RMS-norm as SD3.5) jointly with two ``CLIPTextModelWithProjection``
   encoders trained from scratch on the world's tokenizer: rectified-flow velocity regression,
   x_σ = (1 - σ) x_0 + σ ε with target ε - x_0 and σ drawn logit-normal (SD3's default density),
   captions dropped to ``""`` 10% of the time for classifier-free guidance. An exponential moving
   average of the weights is saved. The scheduler is ``FlowMatchEulerDiscreteScheduler`` with ``--shift``.

Written with ``save_pretrained`` in the layout of an SD3 repository (``transformer/ vae/ text_encoder/
text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/ model_index.json``; no T5), with ``train_log.jsonl``
and ``train_summary.json``. Training scenes are drawn afresh every step from the training split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffusion_env.models.loading import TINY_MODEL_PATH
from diffusion_env.tiny.pretrain import EMA, batch_of_scenes, lr_at, n_params, seed_everything
from rewards.tinyworld.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "tinyflow"
TEXT_WIDTH = 64  # each CLIP's hidden size; the transformer's joint_attention_dim is the two side by side


def text_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad, projection_dim=TEXT_WIDTH)  # fmt: skip


def transformer_config(heads: int = 4, layers: int = 4) -> dict:
    return dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=32,
                num_attention_heads=heads, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=32 * heads,
                pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=8, qk_norm="rms_norm")  # fmt: skip


def latent_statistics(vae, rng: np.random.Generator, batches: int = 8) -> tuple[float, float]:
    """Mean and std (after removing the mean) of the VAE's sampled latents over fresh scenes."""
    with torch.no_grad():
        z = torch.cat([vae.encode(batch_of_scenes(rng, 128)[0]).latent_dist.sample() for _ in range(batches)])
    mean = z.mean().item()
    return mean, (z - mean).std().item()


def encode_text(encoders, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The SD3 conditioning of a batch (as :class:`~diffusion_env.models.sd3.SD3Family` builds it, with grads):
    penultimate hidden states side by side, and the projected text embeddings side by side."""
    ids = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    outs = [enc(ids, output_hidden_states=True) for enc in encoders]
    return torch.cat([o.hidden_states[-2] for o in outs], -1), torch.cat([o.text_embeds for o in outs], -1)


def train(args, rng, vae, tokenizer, log):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                       tokenizer.pad_token_id))  # fmt: skip
    encoders = [CLIPTextModelWithProjection(cfg), CLIPTextModelWithProjection(cfg)]
    transformer = SD3Transformer2DModel(**transformer_config(args.heads, args.layers))
    modules = [transformer, *encoders]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema = EMA(modules, args.ema_decay)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    bar = tqdm(range(args.steps), desc="transformer", mininterval=5.0)
    running = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=200)
        x, captions = batch_of_scenes(rng, args.batch)
        drop = rng.random(len(captions)) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.sample() - shift) * scale
        states, pooled = encode_text(encoders, tokenizer, captions)
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(x0.shape[0]))  # logit-normal(0, 1)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * noise
        v = transformer(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=states,
                        pooled_projections=pooled).sample  # fmt: skip
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            log({"stage": "transformer", "step": step, "loss": loss.item(), "loss_avg": running,
                 "lr": opt.param_groups[0]["lr"]})  # fmt: skip
            bar.set_postfix(loss=f"{running:.4f}")
    return ema.shadow, running


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--vae", type=Path, default=TINY_MODEL_PATH, help="model folder whose vae/ is reused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heads", type=int, default=4, help="attention heads of width 32 (hidden = 32 x heads)")
    p.add_argument("--layers", type=int, default=4, help="joint transformer blocks")
    p.add_argument("--shift", type=float, default=1.0, help="the flow scheduler's timestep shift")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    args = p.parse_args(argv)
    for name in ("batch", "steps", "threads", "heads", "layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)}; expected a positive integer")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout={args.caption_dropout}; expected a probability in [0, 1)")
    if not args.shift > 0:
        raise ValueError(f"--shift={args.shift}; expected a positive number")
    return args


def main(argv=None) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from diffusion_env.testing import save_sd3_layout

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.jsonl").open("w")
    t0 = time.time()

    def log(rec: dict) -> None:
        log_file.write(json.dumps({"time_s": round(time.time() - t0, 2), **rec}) + "\n")
        log_file.flush()

    log({"stage": "args", **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})
    tokenizer = build_tokenizer(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae").eval().requires_grad_(False)
    mean, std = latent_statistics(vae, rng)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    log({"stage": "vae", "latent_mean": mean, "latent_std": std})
    (transformer, enc1, enc2), loss = train(args, rng, vae, tokenizer, log)
    wall = time.time() - t0
    save_sd3_layout(out, [enc1, enc2], [tokenizer, tokenizer], vae, transformer,
                    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift))  # fmt: skip
    summary = {
        "seed": args.seed, "threads": args.threads, "steps": args.steps, "batch": args.batch,
        "vae_shift_factor": mean, "vae_scaling_factor": 1.0 / std, "final_loss_ema98": loss,
        "wall_s_total": round(wall, 1),
        "params": {"vae": n_params(vae), "transformer": n_params(transformer),
                   "text_encoders": n_params(enc1) + n_params(enc2)},
    }  # fmt: skip
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log({"stage": "done", **summary})
    log_file.close()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
