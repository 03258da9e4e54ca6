"""Can a reduced-precision policy be trained with PPO's clipped ratio? (``python -m benchmarks.precision``)

DDPO-IS clips the ratio π_θ/π_old at 1 ± ε with ε = 1e-4 (1e-3 in the tiny preset): the log-ratios it
acts on are of that size. This measures whether UNet calls under autocast resolve them:

1. Sample ``--samples`` trajectories with the fp32 policy; take ``--pairs`` of their (sample, timestep)
   pairs as one training micro-batch.
2. Log-probs at the current weights θ_0, in fp32 and under ``--dtype`` autocast (same weights, same
   micro-batch, autograd on as in training).
3. One AdamW step of each ``--lr`` from θ_0 on the fp32 policy (the DDPO-IS surrogate with seeded
   random advantages); the reduced-precision policy gets the same new weights θ_1.
4. Log-probs at θ_1 in both precisions; compare the log-ratios log π_θ1 − log π_θ0.

Printed and returned: the fp32 log-ratios' size, how far the reduced-precision ones are from them, the
fraction of pairs whose sign agrees, and the fraction whose clip decision (|ratio − 1| > ε) differs.
``--dtype fp32`` is the control (the same computation twice: deviations 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import diffusion_env  # noqa: F401  (registers the Denoise-* IDs)
from agents.config import ATTENTION_IMPLS, preset_config
from agents.core import RolloutBuffer, collect_rollout, make_optimizer
from agents.policy import GaussianDenoisingPolicy
from agents.trainer import make_env

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Denoise-Tiny-Compressibility-v0", help="registered env ID")
    p.add_argument("--model", help="model folder (default: the env's)")
    p.add_argument("--random-model", choices=("tiny", "micro"), help="a random-weight model of this size instead")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype compared with fp32")
    p.add_argument("--samples", type=int, default=16, help="trajectories sampled (default 16)")
    p.add_argument("--pairs", type=int, default=160, help="(sample, timestep) pairs compared (default 160)")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-5, 3e-5, 3e-4],
                   help="AdamW learning rates, one step each from the same weights (default: 1e-5 (DDPO's "
                   "SD v1.4 setting), 3e-5, 3e-4 (the tiny DDPO-IS preset))")  # fmt: skip
    p.add_argument("--steps", type=int, help="denoising steps (default: the env's)")
    p.add_argument("--attention", default="math", choices=ATTENTION_IMPLS, help="attention kernels (default math)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run: random micro model, 4 samples, 4 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.random_model, args.samples, args.steps, args.pairs = args.random_model or "micro", 4, args.steps or 4, 16
    for name in ("samples", "pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: expected a positive integer")
    if not all(lr > 0 for lr in args.lr):
        p.error(f"--lr={args.lr}: expected numbers > 0")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp, model = None, args.model
    if args.random_model:
        from diffusion_env.testing import temporary_random_model

        tmp, path = temporary_random_model(args.random_model, prefix="precision-model-")
        model = str(path)
    cfg = preset_config("tiny", "ddpo-is", env_id=args.env, env_kwargs={"model": model} if model else {},
                        sample_batch_size=args.samples, samples_per_epoch=args.samples, num_steps=args.steps,
                        train_batch_size=args.samples).validate()  # fmt: skip
    env = make_env(cfg)
    family = env.family
    torch.manual_seed(args.seed)
    full = GaussianDenoisingPolicy(family.load_network(), family, attention=args.attention)
    low = GaussianDenoisingPolicy(family.load_network(), family, attention=args.attention,
                                  autocast_dtype=DTYPES[args.dtype])  # fmt: skip

    # 1. Trajectories and one micro-batch of pairs.
    rollout = collect_rollout(env, full, args.seed, torch.Generator().manual_seed(args.seed))
    S = rollout.num_steps
    pairs = torch.randperm(rollout.num_samples * S, generator=torch.Generator().manual_seed(args.seed))[: args.pairs]
    batch = RolloutBuffer(rollout, rollout.rewards, len(pairs)).pairs(pairs // S, pairs % S, rollout.rewards, len(pairs))

    def log_probs(policy: GaussianDenoisingPolicy) -> torch.Tensor:
        policy.train()
        with torch.enable_grad():
            return policy.log_prob(batch.obs, batch.actions).detach()

    # 2. θ_0.
    full0, low0 = log_probs(full), log_probs(low)
    theta0 = {k: v.clone() for k, v in full.network.state_dict().items()}
    dev0 = (low0 - full0).abs()
    result: dict[str, Any] = {
        "dtype": args.dtype, "pairs": len(pairs), "model": model or "env default", "attention": args.attention,
        "log_prob_dev_at_theta0": {"mean": float(dev0.mean()), "max": float(dev0.max())}, "steps": [],
    }  # fmt: skip
    for lr in args.lr:
        # 3. One AdamW step from θ_0 on the fp32 policy; the same new weights for the other.
        full.network.load_state_dict(theta0)
        adv = torch.randn(len(pairs), generator=torch.Generator().manual_seed(args.seed + 1))
        optimizer = make_optimizer(full.trainable_parameters(), cfg.replace(learning_rate=lr))
        full.train()
        (-(adv * (full.log_prob(batch.obs, batch.actions) - full0).exp()).mean()).backward()
        optimizer.step()
        low.network.load_state_dict(full.network.state_dict())
        # 4. θ_1 and the log-ratios.
        full_ratio, low_ratio = log_probs(full) - full0, log_probs(low) - low0
        diff = (low_ratio - full_ratio).abs()
        result["steps"].append({
            "lr": lr,
            "fp32_log_ratio": {"mean_abs": float(full_ratio.abs().mean()), "max_abs": float(full_ratio.abs().max())},
            "log_ratio_error": {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())},
            "error_over_signal": float(diff.mean() / full_ratio.abs().mean().clamp_min(1e-30)),
            "sign_agreement": float(((low_ratio > 0) == (full_ratio > 0)).float().mean()),
            "clip_decision_differs": {
                str(eps): float(((low_ratio.exp() - 1).abs() > eps).ne((full_ratio.exp() - 1).abs() > eps).float().mean())
                for eps in (1e-4, 1e-3)
            },
        })  # fmt: skip
    print(f"{args.dtype} vs fp32 on {len(pairs)} pairs; log-prob deviation at θ_0: mean {dev0.mean():.2e}, max {dev0.max():.2e}")
    print(f"{'lr':>8s} {'fp32 |log ratio|':>17s} {'error':>9s} {'error/signal':>12s} {'same sign':>9s} "
          f"{'clip 1e-4 differs':>17s} {'clip 1e-3 differs':>17s}")  # fmt: skip
    for r in result["steps"]:
        c = r["clip_decision_differs"]
        print(f"{r['lr']:8.0e} {r['fp32_log_ratio']['mean_abs']:17.2e} {r['log_ratio_error']['mean_abs']:9.2e} "
              f"{r['error_over_signal']:12.3f} {r['sign_agreement']:9.1%} {c['0.0001']:17.1%} {c['0.001']:17.1%}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    env.close()
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
