"""CFG training at tiny scale (the DDPO paper's Figure 8): an RWR variant trained on the guided prediction
against the same variant trained on the conditional prediction only, over several rounds of sampling and
training.

    python -m benchmarks.cfg_training [--algo rwr-sparse] [--task PromptAlignment] [--seeds 3] [--budget 1024]

Each (variant, seed) run uses the algorithm's ``tiny`` preset through :mod:`benchmarks.leaderboard`'s
run configuration, with ``rwr_cfg_training`` True or False, until ``--budget`` reward queries; then it is
evaluated like a leaderboard run (train and held-out prompts at fixed seeds, KL to the base model, the
captioner's fidelity). Every epoch is one round (sample with guidance, then train), so the reward curve
against reward queries is the figure. A run with a ``result.json`` is reused. Writes
``<out>/cfg_training.{json,md,png}``.

The with-CFG-training variant is the leaderboard's configuration: pass ``--runs`` of a finished
leaderboard (its ``<task>/<algo>/seed<k>`` folders) to reuse those runs instead of training them again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.runtime import set_threads
from benchmarks import leaderboard

VARIANTS = {"without CFG training": False, "with CFG training": True}


def run_variant(task: str, algo: str, seed: int, cfg_training: bool, args: argparse.Namespace) -> dict[str, Any]:
    from agents.trainer import Trainer

    cfg = leaderboard.run_config(task, algo, seed, args)
    folder = args.runs / task / (algo if cfg_training else f"{algo}-no-cfg-training") / f"seed{seed}"
    cfg = cfg.replace(rwr_cfg_training=cfg_training, run_dir=str(folder)).validate()
    done = folder / "result.json"
    if done.exists():  # also a leaderboard run (the with-CFG-training variant is the leaderboard's config)
        return {**json.loads(done.read_text()), "cfg_training": cfg_training}
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=(folder / "checkpoints" / "latest").exists())
    trainer.train()
    result = {"task": task, "algo": algo, "seed": seed, "cfg_training": cfg_training,
              "curve": [[h["charts/reward_queries"], h["charts/reward_mean"]] for h in trainer.history]}  # fmt: skip
    result.update(leaderboard.evaluate_run(cfg, trainer.policy, leaderboard.base_policy(trainer.env.family), args))
    result["total_s"] = time.perf_counter() - t0
    tmp = done.with_name(".result.json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)
    trainer.env.close()
    return result


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fig = [], plt.figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, flag in VARIANTS.items():
        rs = [r for r in results if r["cfg_training"] == flag]
        curves = [np.asarray(r["curve"], dtype=float) for r in rs]
        n = min(len(c) for c in curves)
        y = np.stack([c[:n, 1] for c in curves])
        ax.plot(curves[0][:n, 0], y.mean(0), label=f"{name} ({len(rs)} seeds)")
        ax.fill_between(curves[0][:n, 0], y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
        row = {"variant": name, "seeds": len(rs)}
        for c in ("train_eval", "heldout_eval", "kl_to_base", "fidelity"):
            vals = [r[c] for r in rs if r.get(c) is not None]
            row[c] = [float(np.mean(vals)), float(np.std(vals))] if vals else [None, None]
        row["reward_by_round"] = y.mean(0).tolist()
        rows.append(row)
    ax.set_xlabel("reward queries (one round of sampling and training per 64)")
    ax.set_ylabel("training reward (epoch mean)")
    ax.set_title(f"{args.algo} on {args.task.removeprefix('Denoise-')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "cfg_training.png", dpi=100)
    plt.close(fig)
    out = {"algo": args.algo, "task": args.task, "budget": args.budget, "rows": rows, "runs": results}
    (args.out / "cfg_training.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# CFG training: {args.algo} on {args.task}, {args.budget} reward queries, mean ± std over seeds", "",
             "| variant | seeds | eval (train prompts) | eval (held-out) | KL/step to base | fidelity |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(
            leaderboard._fmt(r[c]) for c in ("train_eval", "heldout_eval", "kl_to_base", "fidelity")) + " |")  # fmt: skip
    (args.out / "cfg_training.md").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", default="rwr-sparse", choices=["rwr", "rwr-sparse"])
    p.add_argument("--task", default="PromptAlignment", help="a tiny task (its middle part) or a full ID")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=160)
    p.add_argument("--runs", type=Path, default=leaderboard.RUNS, help="run folders (default: the leaderboard's)")
    p.add_argument("--out", type=Path, default=Path("runs") / "cfg_training", help="where the table and figure go")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", choices=["with", "without"],
                   help="train only this variant's runs and write nothing (e.g. while a leaderboard trains the other)")
    args = p.parse_args(argv)
    for name in ("seeds", "budget", "eval_samples", "micro_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    args.task = leaderboard.task_id(args.task)
    args.model = args.num_steps = args.samples_per_epoch = None  # leaderboard.run_config's options
    set_threads(args.threads)  # as its runs do (TrainConfig.threads)
    flags = list(VARIANTS.values()) if args.train_only is None else [args.train_only == "with"]
    results = [run_variant(args.task, args.algo, s, flag, args) for flag in flags for s in range(args.seeds)]
    if args.train_only:
        return {"runs": results}
    out = summarise(results, args)
    print((args.out / "cfg_training.md").read_text())
    return out


if __name__ == "__main__":
    main()
