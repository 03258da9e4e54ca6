"""Pretrain the embedded tiny text-to-image model on the procedural world, on CPU, from a seed.

    python -m diffusion_env.tiny.pretrain --out diffusion_env/assets/tiny --seed 0

Two stages, with the same classes as Stable Diffusion v1.4 so the rest of the code treats both alike:

1. ``AutoencoderKL``: 32x32x3 images <-> 8x8x4 latents (two downsampling stages), trained with pixel MSE
   plus L1 plus a small KL term. Its ``scaling_factor`` is then set to 1 / std of the latents, so the scaled
   latents the UNet sees have about unit variance (as SD's 0.18215 does for its VAE).
2. ``UNet2DConditionModel`` jointly with a small ``CLIPTextModel`` trained from scratch: epsilon
   prediction under a 1000-step scaled-linear schedule (SD's betas 0.00085 -> 0.012), captions dropped
   to the empty string 10% of the time so ``""`` gives the unconditional embedding used by
   classifier-free guidance. An exponential moving average of the weights is what gets saved.

The result is written with ``save_pretrained`` in the folder layout of an SD repository
(``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``), with ``train_log.jsonl`` (losses)
and ``train_summary.json`` beside it. Training data are drawn afresh every step from the training split
of the world (held-out colour x shape pairs never appear), so there is no fixed dataset to overfit.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewards.tinyworld.tokenizer import MODEL_MAX_LENGTH, build_tokenizer
from rewards.tinyworld.world import caption, render, sample_scene

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "tiny"

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def unet_config(cross_attention_dim: int) -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),  # number of heads per block (diffusers' historical naming)
        norm_num_groups=8,
    )


def text_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        projection_dim=64,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_of_scenes(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` training-split scenes as a float ``[n, 3, 32, 32]`` tensor in [-1, 1] and their captions."""
    scenes = [sample_scene(rng, split="train") for _ in range(n)]
    x = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [caption(s) for s in scenes]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_vae(args, rng, log) -> tuple[object, float]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    bar = tqdm(range(args.vae_steps), desc="vae", mininterval=5.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
        x, _ = batch_of_scenes(rng, args.vae_batch)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        mse = F.mse_loss(recon, x)
        l1 = F.l1_loss(recon, x)  # L1 keeps the flat colours' edges sharper than MSE alone
        kl = post.kl().mean() / x[0].numel()  # per pixel, to keep the weight size-independent
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            log({"stage": "vae", "step": step, "loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()})
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    # scaling_factor: 1 / std of sampled latents over fresh scenes, so scaled latents have unit variance.
    with torch.no_grad():
        zs = []
        for _ in range(8):
            x, _ = batch_of_scenes(rng, 128)
            zs.append(vae.encode(x).latent_dist.sample())
        z = torch.cat(zs)
        std = z.std().item()
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        eval_mse = F.mse_loss(recon, x).item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log({"stage": "vae_eval", "latent_std": std, "latent_mean": z.mean().item(), "recon_mse": eval_mse})
    return vae, eval_mse


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, m in zip(self.shadow, self.modules):
            for ps, pm in zip(s.parameters(), m.parameters()):
                ps.lerp_(pm, 1.0 - d)


def train_unet(args, rng, vae, tokenizer, log):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        )
    )
    unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size))
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)  # only its training alphas_cumprod are used
    alphas_cumprod = scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-4)
    ema = EMA([unet, text_encoder], args.ema_decay)
    sf = vae.config.scaling_factor
    vae.requires_grad_(False)
    bar = tqdm(range(args.unet_steps), desc="unet", mininterval=5.0)
    running = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=200)
        x, captions = batch_of_scenes(rng, args.batch)
        drop = rng.random(len(captions)) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * sf
        ids = tokenizer(
            captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        cond = text_encoder(ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == args.unet_steps - 1:
            log({"stage": "unet", "step": step, "loss": loss.item(), "loss_avg": running, "lr": opt.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{running:.4f}")
    unet_ema, text_ema = ema.shadow
    return unet_ema, text_ema, running


def save(out: Path, vae, unet, text_encoder, tokenizer) -> None:
    from diffusers import DDIMScheduler

    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    import diffusers
    import transformers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "_transformers_version": transformers.__version__,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--batch", type=int, default=64, help="UNet batch size")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    args = p.parse_args(argv)
    for name in ("batch", "vae_batch", "vae_steps", "unet_steps", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}; expected a positive integer")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout={args.caption_dropout}; expected a probability in [0, 1)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_file = log_path.open("w")
    t0 = time.time()

    def log(rec: dict) -> None:
        rec = {"time_s": round(time.time() - t0, 2), **rec}
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    log({"stage": "args", **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})
    tokenizer = build_tokenizer(out / "tokenizer")
    vae, vae_mse = train_vae(args, rng, log)
    t_vae = time.time() - t0
    unet, text_encoder, unet_loss = train_unet(args, rng, vae, tokenizer, log)
    wall = time.time() - t0
    save(out, vae, unet, text_encoder, tokenizer)
    summary = {
        "seed": args.seed,
        "threads": args.threads,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "batch": args.batch,
        "vae_batch": args.vae_batch,
        "vae_recon_mse": vae_mse,
        "vae_scaling_factor": vae.config.scaling_factor,
        "unet_final_loss_ema98": unet_loss,
        "wall_s_vae": round(t_vae, 1),
        "wall_s_total": round(wall, 1),
        "params": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)},
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log({"stage": "done", **summary})
    log_file.close()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
