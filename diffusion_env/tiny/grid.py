"""A PNG grid of a tiny model's samples on fixed prompts and seeds (one row per prompt).

    python -m diffusion_env.tiny.grid --out tiny_grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion_env.tiny.sample import ASSET_DIR, load_tiny, sample

GRID_PROMPTS = [
    "a small red circle",
    "a large green square",
    "a small yellow triangle",
    "a large purple circle",
    "a small blue triangle",  # held out: blue triangles never appear in training
    "a red circle above a blue square",
    "a yellow square left of a green triangle",
    "a red circle, a blue square and a green triangle",
]


def make_grid(model_dir=ASSET_DIR, prompts=GRID_PROMPTS, n_seeds: int = 8, seed: int = 0, scale: int = 4,
              deterministic: bool = False):  # fmt: skip
    prompts = list(prompts)
    if n_seeds < 1 or scale < 1:
        raise ValueError(f"n_seeds={n_seeds}, scale={scale}; expected positive integers")
    model = load_tiny(model_dir)
    rows = sample(model, [p for p in prompts for _ in range(n_seeds)], seed=seed, deterministic=deterministic)
    imgs = rows.permute(0, 2, 3, 1).numpy()
    tile = imgs.shape[1] * scale
    label_w = 300
    canvas = Image.new("RGB", (label_w + n_seeds * tile, len(prompts) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for r, p in enumerate(prompts):
        draw.text((4, r * tile + tile // 2 - 6), p, fill="black")
        for c in range(n_seeds):
            im = Image.fromarray(np.ascontiguousarray(imgs[r * n_seeds + c])).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (label_w + c * tile, r * tile))
    return canvas


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Sample grid of the tiny model")
    p.add_argument("--out", type=Path, default=Path("tiny_grid.png"))
    p.add_argument("--model", type=Path, default=ASSET_DIR)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--deterministic", action="store_true", help="the family's deterministic step (flow: the ODE)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    make_grid(args.model, n_seeds=args.seeds, seed=args.seed, deterministic=args.deterministic).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
