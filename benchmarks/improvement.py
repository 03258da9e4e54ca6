"""Reward improvement per algorithm in base-model standard deviations (d), at a reward-query budget.

``python -m benchmarks.improvement [--tasks Compressibility Incompressibility] [--algos ...] [--budget 2048]``

For each (task, algorithm): train from the shipped tiny model with the algorithm's ``tiny`` preset
until ``budget`` reward queries, then evaluate at fixed seeds on the training prompts. ``d`` is
``(mean reward after − mean reward of the base model) / std of the base model's rewards``, both
evaluated on the same prompts and seeds. Finished runs (``result.json``) are kept; an interrupted
run resumes from its last checkpoint. Several processes may split ``--algos`` and share ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import diffusion_env  # noqa: F401
from agents.config import preset_config
from agents.evaluate import evaluate_policy
from agents.trainer import Trainer

RUNS = Path(__file__).resolve().parents[1] / "runs" / "improvement"


def _task(name: str) -> str:
    return name if name.startswith("Denoise-") else f"Denoise-Tiny-{name}-v0"


def base_stats(task: str, args) -> dict:
    path = args.runs / task / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = preset_config("tiny", "ddpo-is", env_id=task, run_dir=str(args.runs / task / "_base"), progress=False)
    from agents.trainer import make_env
    from diffusion_env.components import load_unet

    unet = load_unet(make_env(cfg, num_envs=1).model_path)
    ev = evaluate_policy(cfg, unet, "tiny_train", args.eval_samples)
    res = {"reward_mean": ev["reward_mean"], "reward_std": ev["reward_std"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, path)  # several processes may race here: each writes whole files only
    return res


def run(task: str, algo: str, args) -> dict:
    folder = args.runs / task / algo
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = preset_config("tiny", algo, env_id=task, reward_query_budget=args.budget, num_epochs=10**6,
                        run_dir=str(folder), seed=args.seed, progress=args.progress)  # fmt: skip
    resume = (folder / "checkpoints" / "latest").exists()
    start = time.perf_counter()
    trainer = Trainer(cfg, resume=resume)
    trainer.train()
    ev = evaluate_policy(cfg, trainer.policy.unet, "tiny_train", args.eval_samples)
    base = base_stats(task, args)
    res = {"task": task, "algo": algo, "reward_queries": trainer.reward_queries, "epochs": trainer.epoch,
           "eval_reward": ev["reward_mean"], "base_reward": base["reward_mean"], "base_std": base["reward_std"],
           "d": (ev["reward_mean"] - base["reward_mean"]) / base["reward_std"],
           "train_minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    done.write_text(json.dumps(res, indent=1))
    trainer.env.close()
    return res


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["Compressibility", "Incompressibility"])
    p.add_argument("--algos", nargs="+", default=["ddpo-is", "ddpo-sf", "rwr", "rwr-sparse"])
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for task in map(_task, args.tasks):
        base_stats(task, args)
        for algo in args.algos:
            r = run(task, algo, args)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("task", "algo", "reward_queries", "eval_reward", "base_reward", "d")}), flush=True)
    print("\n| task | algorithm | reward queries | base reward | eval reward | d |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['algo']} | {r['reward_queries']} | {r['base_reward']:.4g} | {r['eval_reward']:.4g} | {r['d']:.2f} |")
    return results


if __name__ == "__main__":
    main()
