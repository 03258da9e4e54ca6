"""The ceiling of Tiny-GenEval: what the captioner reads on true renders and on their VAE round-trips.

    python -m benchmarks.geneval_ceiling [--samples 256] [--seed 0] [--json benchmarks/results/geneval_ceiling.json]

Both tiny models decode through the same VAE (the DDIM tiny model's; the flow model reuses it), so no
policy can score more than the captioner reads on decoded true latents. For each split (training scenes with
the training object-count mix, held-out scenes) ``--samples`` scenes are drawn at a fixed seed
(``rewards.tinyworld.world.sample_scene``), rendered, and scored with the Tiny-GenEval reward
(``rewards.tinyworld.geneval.TinyGenEval``): as rendered, and after encode (the posterior's mean) → decode.
Prints the all-correct rate and the mean reward, overall and by object count.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def scenes(split: str, n: int, seed: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """``n`` scenes of ``split`` as images in [0, 1] ``[n, 3, 32, 32]``, their captions and object counts."""
    from rewards.tinyworld import world

    rng = np.random.default_rng(seed)
    drawn = [world.sample_scene(rng, split=split) for _ in range(n)]
    images = torch.from_numpy(np.stack([world.render(s) for s in drawn])).permute(0, 3, 1, 2).float() / 255.0
    return images, [world.caption(s) for s in drawn], [len(s.objects) for s in drawn]


@torch.no_grad()
def round_trip(images: torch.Tensor, model: str | None = None) -> torch.Tensor:
    """Images in [0, 1] through the tiny model's VAE (encode to the posterior mean, decode), in [0, 1]."""
    from diffusers import AutoencoderKL

    from diffusion_env.models.loading import TINY_MODEL_PATH

    vae = AutoencoderKL.from_pretrained(Path(model or TINY_MODEL_PATH) / "vae").eval()
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)


def summary(images: torch.Tensor, prompts: list[str], counts: list[int] | None = None) -> dict:
    """All-correct rate, mean reward and each check's pass rate of ``images``, overall and by object count
    (``counts``: each prompt's number of objects; None: read from the prompts)."""
    from rewards.tinyworld.geneval import TinyGenEval

    if counts is None:
        from rewards.tinyworld.world import parse_prompt

        counts = [len(parse_prompt(p)["objects"]) for p in prompts]
    reward, info = TinyGenEval()(images, prompts)
    correct = info["all_correct"].numpy()
    out = {"all_correct": float(correct.mean()), "reward": float(reward.mean()), "n": len(prompts), "by_count": {},
           "checks": {}}  # fmt: skip
    for name in ("objects", "count", "size", "relation"):  # each check's pass rate over the prompts that have it
        v = info[name].numpy()
        v = v[~np.isnan(v)]
        out["checks"][name] = float(v.mean()) if len(v) else None
    for k in sorted(set(counts)):
        ix = [i for i, c in enumerate(counts) if c == k]
        out["by_count"][str(k)] = {"n": len(ix), "all_correct": float(correct[ix].mean()),
                                   "reward": float(reward[ix].mean())}  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=256, help="scenes per split (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model folder whose vae/ is used (default: the embedded tiny model)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples={args.samples}: expected a positive integer")
    torch.manual_seed(args.seed)
    result = {"samples": args.samples, "seed": args.seed}
    for split in ("train", "heldout"):
        images, prompts, counts = scenes(split, args.samples, args.seed)
        result[split] = {"render": summary(images, prompts, counts),
                         "vae_round_trip": summary(round_trip(images, args.model), prompts, counts)}  # fmt: skip
        for kind, s in result[split].items():
            per = ", ".join(f"{k} objects {v['all_correct']:.1%}" for k, v in s["by_count"].items())
            print(f"{split:8s} {kind:15s} all-correct {s['all_correct']:.1%} (reward {s['reward']:.3f}; {per})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
