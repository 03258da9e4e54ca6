"""Evaluate a shipped tiny model by the world's captioner, at fixed prompts and seeds.

    python -m diffusion_env.tiny.evaluate [--model diffusion_env/assets/tiny] [--json eval.json]
    python -m diffusion_env.tiny.evaluate --model diffusion_env/assets/tinyflow [--deterministic]

Samples with the model's registered settings (DDIM tiny model: η = 1, 20 steps, guidance 5; the flow
model: its SDE, or its ODE with ``--deterministic``) and reports, on training and held-out prompts:

- single-object prompts: share with colour and shape right, and with every attribute (size too) right;
- multi-object prompts: share with every attribute right (count, colours, shapes, relation) and with
  colours and shapes right;
- JPEG size (quality 95) mean and std over all base samples, and their ratio;
- the wall time to sample 64 images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from diffusion_env.tiny.sample import ASSET_DIR, load_tiny, sample, timed_sample
from rewards.jpeg import jpeg_size_kb
from rewards.tinyworld.captioner import score
from rewards.tinyworld.world import heldout_prompts, parse_prompt, train_prompts

CHUNK = 64


def prompt_sets(n_multi: int, single_repeats: int, seed: int = 0) -> dict[str, list[str]]:
    """Fixed evaluation prompts: every single-object prompt ``single_repeats`` times, and ``n_multi``
    multi-object prompts drawn without replacement (by ``seed``) from each split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, prompts in (("train", train_prompts()), ("heldout", heldout_prompts())):
        singles = [p for p in prompts if len(parse_prompt(p)["objects"]) == 1]
        multi = [p for p in prompts if len(parse_prompt(p)["objects"]) > 1]
        out[f"{split}_single"] = singles * single_repeats
        pick = rng.choice(len(multi), size=min(n_multi, len(multi)), replace=False)
        out[f"{split}_multi"] = [multi[i] for i in sorted(pick)]
    return out


def sample_many(model, prompts: list[str], seed: int, **kw) -> torch.Tensor:
    """Sample in chunks of 64; chunk ``k`` uses seed ``seed + k`` (a fixed function of ``seed``)."""
    chunks = [prompts[i : i + CHUNK] for i in range(0, len(prompts), CHUNK)]
    return torch.cat([sample(model, c, seed=seed + k, **kw) for k, c in enumerate(chunks)])


def evaluate(model_dir=ASSET_DIR, n_multi: int = 64, single_repeats: int = 4, seed: int = 1000,
             steps: int | None = None, guidance: float | None = None, eta: float | None = None,
             deterministic: bool = False) -> dict:  # fmt: skip
    model = load_tiny(model_dir)
    kw = dict(model.settings(steps, guidance, eta), deterministic=deterministic)
    report: dict = {"settings": {"seed": seed, **kw, "n_multi": n_multi, "single_repeats": single_repeats}}
    all_images = []
    for k, (name, prompts) in enumerate(prompt_sets(n_multi, single_repeats).items()):
        images = sample_many(model, prompts, seed + 100 * k, **kw)
        all_images.append(images)
        s = score(images, prompts)
        report[name] = {
            "n": len(prompts),
            "colour_shape": float(np.mean([r["colour_shape"] for r in s])),
            "all_correct": float(np.mean([r["all_correct"] for r in s])),
            "count": float(np.mean([r["count"] for r in s])),
        }
        if name.endswith("multi"):
            report[name]["relation"] = float(np.mean([bool(r["relation"]) for r in s]))
        else:
            report[name]["size"] = float(np.mean([bool(r["size"]) for r in s]))
    kb = jpeg_size_kb(torch.cat(all_images))
    report["jpeg_kb"] = {
        "n": int(kb.numel()),
        "mean": kb.mean().item(),
        "std": kb.std().item(),
        "std_over_mean": (kb.std() / kb.mean()).item(),
    }
    prompts64 = train_prompts()[::20][:CHUNK]
    sample(model, prompts64[:2], seed=0, **kw)  # warm-up
    _, secs = timed_sample(model, prompts64, seed=0, **kw)
    report["sample_64_s"] = secs
    report["threads"] = torch.get_num_threads()
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Evaluate the tiny text-to-image model by the world's captioner")
    p.add_argument("--model", type=Path, default=ASSET_DIR)
    p.add_argument("--json", type=Path, default=None, help="write the report here (default: <model>/eval.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-multi", type=int, default=64)
    p.add_argument("--single-repeats", type=int, default=4)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's registered IDs')")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the registered IDs')")
    p.add_argument("--eta", type=float, default=None, help="DDIM η / flow SDE noise level (default: registered)")
    p.add_argument("--deterministic", action="store_true", help="the family's deterministic step (flow: the ODE)")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads}; expected a positive integer")
    torch.set_num_threads(args.threads)
    report = evaluate(args.model, n_multi=args.n_multi, single_repeats=args.single_repeats, seed=args.seed,
                      steps=args.steps, guidance=args.guidance, eta=args.eta, deterministic=args.deterministic)
    text = json.dumps(report, indent=2)
    print(text)
    out = args.json or Path(args.model) / "eval.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
