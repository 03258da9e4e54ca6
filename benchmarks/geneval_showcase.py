"""Tiny-GenEval, measured exactly: the all-correct rate of training runs against reward queries (issue 15).

    python -m benchmarks.geneval_showcase RUN_DIR [RUN_DIR ...] [--samples 256] [--relations]
                                          [--out benchmarks/results/geneval]

For each run (a ``denoise-gym train`` folder on ``Denoise-Tiny-GenEval-v0`` or ``Denoise-TinyFlow-GenEval-v0``)
and for each of its checkpoints, and for the base model once per task:

- **all-correct** (the strict GenEval bit: every check of the prompt passes) and the mean reward (the share of
  checks passed) of ``--samples`` samples on training scenes (``tiny_train_scenes``: the training object-count
  mix) and on held-out scenes (``tiny_heldout_scenes``: colour×shape pairs never trained on), at fixed seeds,
  the same for every policy; each check's pass rate and all-correct by object count
  (:func:`benchmarks.geneval_ceiling.summary`, which also gives the ceiling these are compared with);
  with ``--relations`` also on two-object scenes of training pairs whose relation is a seen one (``above``,
  ``left of``) and a held-out one (``below``, ``right of``: ``rewards.tinyworld.world.HELDOUT_RELATIONS``), for
  runs fine-tuned on ``tiny_train_scenes_seen_relations``, which never names those two;
- **within-prompt diversity** (:func:`agents.evaluate.evaluate_diversity`: 4 images of each of 16 prompts) of the
  final checkpoint and of the base model (the issue's guard against reward hacking: ≥ 50% of the base's).

Writes ``<out>/showcase.json`` (every figure), ``<out>/curve.png`` (all-correct against reward queries on training
and held-out prompts: each run, and the mean over runs), and ``<out>/grid_before_after.png`` (the same prompts and
seeds drawn by the base model and by the first run's final checkpoint, each prompt under its row).
Evaluations are cached per checkpoint in ``<run>/geneval_eval/`` so that a rerun adds only what is new.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffusion_env  # noqa: F401  (registers the IDs)
from agents.config import TrainConfig

SPLITS = {"train": "tiny_train_scenes", "heldout": "tiny_heldout_scenes"}
RELATION_SPLITS = {"seen_relations": "tiny_seen_relation_scenes", "heldout_relations": "tiny_heldout_relation_scenes"}
ALL_SPLITS = {**SPLITS, **RELATION_SPLITS}
SPLIT_LABELS = {"train": "training prompts", "heldout": "held-out colour×shape pairs",
                "seen_relations": "2 objects, seen relations", "heldout_relations": "2 objects, held-out relations"}
SPLIT_COLOURS = {"train": "tab:blue", "heldout": "tab:orange", "seen_relations": "tab:green",
                 "heldout_relations": "tab:red"}
EVAL_SEED = 10_000  # the evaluation's prompts and noise (agents.evaluate's default; never a training seed)
# Samples per evaluation batch, fixed: the seeds of agents.evaluate follow the batch index, so a run's own sampling
# batch (64 in the committed runs, 32 in the tiny presets since 2026-12-07) would give other runs other samples.
EVAL_BATCH = 64
GRID_PROMPTS = 8  # rows of the before/after grid
GRID_PER_PROMPT = 4
GRID_SEED = 4321


def load_config(run: Path) -> TrainConfig:
    path = run / "config.json"
    if not path.exists():
        raise SystemExit(f"{run}: no config.json; expected the folder of a `denoise-gym train` run")
    cfg = TrainConfig.from_dict(json.loads(path.read_text())).replace(run_dir=str(run), progress=False)
    if "GenEval" not in cfg.env_id:
        raise SystemExit(f"{run}: env_id={cfg.env_id!r}; expected a Tiny-GenEval task (Denoise-Tiny*-GenEval-v*)")
    return cfg


def checkpoints(run: Path) -> list[str]:
    """The run's complete checkpoints, oldest first (a folder with its weights file)."""
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.glob("ckpt-*") if p.is_dir() and any(p.glob("*.safetensors")))
    if not names:
        raise SystemExit(f"{run}: no checkpoint in {folder}; expected a run trained with checkpoints")
    return names


@torch.no_grad()
def evaluate(cfg: TrainConfig, policy, samples: int, seed: int = EVAL_SEED,
             splits: Sequence[str] = tuple(SPLITS)) -> dict[str, Any]:
    """Each of ``splits``' figures (names of :data:`ALL_SPLITS`)."""
    from agents.evaluate import evaluate_policy
    from benchmarks.geneval_ceiling import summary

    out = {}
    for split in splits:
        r = evaluate_policy(cfg, policy, ALL_SPLITS[split], num_samples=samples, seed=seed)
        out[split] = summary(r["images"], r["prompts"])
    return out


def _policy(cfg: TrainConfig, checkpoint: str | None):
    """The policy at ``checkpoint`` of the run (None: the base model), read without touching the run."""
    from agents.trainer import load_policy

    return load_policy(cfg, None if checkpoint is None else Path(cfg.run_dir) / "checkpoints" / checkpoint)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def evaluate_point(cfg: TrainConfig, checkpoint: str | None, samples: int, cache: Path, diversity: bool,
                   splits: Sequence[str] = tuple(SPLITS)) -> dict:  # fmt: skip
    """One checkpoint's (None: the base model's) figures on ``splits``; what ``cache`` holds is not recomputed."""
    from agents.evaluate import evaluate_diversity

    data = json.loads(cache.read_text()) if cache.exists() else {}
    # A cache from before EVAL_BATCH was sampled in batches of the run's own size.
    if data.get("samples") != samples or data.get("eval_batch", cfg.sample_batch_size) != EVAL_BATCH:
        data = {}
    missing = [s for s in splits if s not in data]
    if not missing and (not diversity or data.get("diversity") is not None):
        return data
    t0 = time.perf_counter()
    policy, state = _policy(cfg, checkpoint)
    cfg = cfg.replace(sample_batch_size=EVAL_BATCH)  # the same samples for every run (EVAL_BATCH)
    if (data.get("epoch"), data.get("reward_queries")) != (state.get("epoch", 0), state.get("reward_queries", 0)):
        data, missing = {}, list(splits)  # the cache is of other weights (a run trained again in place)
    data.update({"checkpoint": checkpoint, "epoch": state.get("epoch", 0), "samples": samples, "eval_batch": EVAL_BATCH,
                 "reward_queries": state.get("reward_queries", 0), **evaluate(cfg, policy, samples, splits=missing)})  # fmt: skip
    if diversity and data.get("diversity") is None:
        data["diversity"] = evaluate_diversity(cfg, policy)
    data.setdefault("diversity", None)
    data["eval_s"] = data.get("eval_s", 0.0) + time.perf_counter() - t0
    _write_json(cache, data)
    return data


def run_curve(run: Path, samples: int, splits: Sequence[str] = tuple(SPLITS)) -> dict[str, Any]:
    cfg = load_config(run)
    names = checkpoints(run)
    points = [evaluate_point(cfg, n, samples, run / "geneval_eval" / f"{n}.json", diversity=n == names[-1],
                             splits=splits) for n in names]  # fmt: skip
    metrics = run / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    train_s = sum(r.get("perf/sample_s", 0) + r.get("perf/train_s", 0) for r in rows)
    return {"run": str(run), "env_id": cfg.env_id, "algo": cfg.algo, "seed": cfg.seed, "points": points,
            "epoch_s_sum": train_s}  # fmt: skip


def plot_curves(runs: list[dict], base: dict, path: Path, splits: Sequence[str] = tuple(SPLITS)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for split in splits:
        for r in runs:
            q = [0] + [p["reward_queries"] for p in r["points"]]
            y = [base[split]["all_correct"]] + [p[split]["all_correct"] for p in r["points"]]
            ax.plot(q, y, color=SPLIT_COLOURS[split], alpha=0.3, lw=1)
        grid = sorted({p["reward_queries"] for r in runs for p in r["points"]})
        common = [g for g in grid if all(any(p["reward_queries"] == g for p in r["points"]) for r in runs)]
        mean = [np.mean([next(p[split]["all_correct"] for p in r["points"] if p["reward_queries"] == g) for r in runs])
                for g in common]  # fmt: skip
        ax.plot([0] + common, [base[split]["all_correct"]] + mean, color=SPLIT_COLOURS[split], lw=2.2,
                label=f"{SPLIT_LABELS[split]} (mean of {len(runs)})")  # fmt: skip
    ceiling = Path(__file__).parent / "results" / "geneval_ceiling.json"  # through the VAE both tiny models share
    if ceiling.exists():
        c = json.loads(ceiling.read_text())
        for split in SPLITS:
            ax.axhline(c[split]["vae_round_trip"]["all_correct"], color=SPLIT_COLOURS[split], ls=":", lw=1,
                       label=f"ceiling: true renders through the VAE ({split})")  # fmt: skip
    ax.set_xlabel("reward queries")
    ax.set_ylabel(f"all-correct rate ({base['train']['n']} fixed-seed samples)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{runs[0]['env_id']} · {runs[0]['algo']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def before_after_grid(run: Path, path: Path) -> dict[str, Any]:
    """The same prompts and seeds from the base model (left half) and the run's final checkpoint (right half)."""
    from agents.plots import save_labelled_grid
    from agents.trainer import grid_env, make_env, sample_images
    from rewards.tinyworld.geneval import TinyGenEval

    cfg = load_config(run)
    rng = np.random.default_rng(GRID_SEED)
    env = make_env(cfg, num_envs=1)
    prompts = [env.prompt_sampler(rng) for _ in range(GRID_PROMPTS)]
    env.close()
    batch = [p for p in prompts for _ in range(GRID_PER_PROMPT)]
    images = []
    for checkpoint in (None, checkpoints(run)[-1]):
        policy = _policy(cfg, checkpoint)[0]
        env = grid_env(cfg, len(batch), policy.family)
        images.append(sample_images(env, policy, batch, GRID_SEED))
        env.close()
    before, after = images
    tiles, labels = [], []
    _, info_b = TinyGenEval()(before, batch)
    _, info_a = TinyGenEval()(after, batch)
    for i, prompt in enumerate(prompts):
        sl = slice(i * GRID_PER_PROMPT, (i + 1) * GRID_PER_PROMPT)
        tiles += [before[sl], after[sl]]
        nb, na = int(info_b["all_correct"][sl].sum()), int(info_a["all_correct"][sl].sum())
        labels += [f"{prompt}   (before {nb}/{GRID_PER_PROMPT} | after {na}/{GRID_PER_PROMPT} all-correct)"] * (
            2 * GRID_PER_PROMPT)
    save_labelled_grid(path, torch.cat(tiles), labels, nrow=2 * GRID_PER_PROMPT, seed=GRID_SEED,
                       title=f"left 4: base model · right 4: {cfg.algo} at {checkpoints(run)[-1]} ({run.name})")  # fmt: skip
    return {"prompts": prompts, "before_all_correct": info_b["all_correct"].tolist(),
            "after_all_correct": info_a["all_correct"].tolist()}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of one task (their checkpoints are evaluated)")
    p.add_argument("--samples", type=int, default=256, help="evaluation samples per split and checkpoint (256)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/geneval"), help="output folder")
    p.add_argument("--no-grid", action="store_true", help="skip the before/after grid")
    p.add_argument("--relations", action="store_true",
                   help="also evaluate two-object scenes with seen and with held-out relations (RELATION_SPLITS)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples={args.samples}: expected a positive integer")
    from agents.runtime import set_threads

    set_threads(0)
    cfgs = [load_config(r) for r in args.runs]
    if len({c.env_id for c in cfgs}) != 1:
        p.error(f"runs of several tasks {sorted({c.env_id for c in cfgs})}; expected runs of one task")
    splits = [*SPLITS, *(RELATION_SPLITS if args.relations else ())]
    base = evaluate_point(cfgs[0], None, args.samples, args.out / f"base_{cfgs[0].env_id}.json", diversity=True,
                          splits=splits)  # fmt: skip
    runs = [run_curve(r, args.samples, splits) for r in args.runs]
    result: dict[str, Any] = {"env_id": cfgs[0].env_id, "samples": args.samples, "eval_seed": EVAL_SEED,
                              "base": base, "runs": runs}  # fmt: skip
    finals = [r["points"][-1] for r in runs]
    result["summary"] = {
        split: {"base": base[split]["all_correct"], "final": [f[split]["all_correct"] for f in finals],
                "final_mean": float(np.mean([f[split]["all_correct"] for f in finals]))}
        for split in splits
    }  # fmt: skip
    result["summary"]["diversity"] = {"base": base["diversity"], "final": [f["diversity"] for f in finals]}
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, base, args.out / "curve.png", splits)
    if not args.no_grid:
        result["grid"] = before_after_grid(args.runs[0], args.out / "grid_before_after.png")
    _write_json(args.out / "showcase.json", result)
    for split in splits:
        s = result["summary"][split]
        rel = ""
        if split in RELATION_SPLITS:  # what these splits are for: the relation check alone
            rel = f"; relation check {base[split]['checks']['relation']:.1%} → " + ", ".join(
                f"{f[split]['checks']['relation']:.1%}" for f in finals)
        print(f"{split:17s} all-correct base {s['base']:.1%} → " + ", ".join(f"{v:.1%}" for v in s["final"])
              + f" (mean {s['final_mean']:.1%}){rel}")  # fmt: skip
    d = result["summary"]["diversity"]
    print(f"diversity base {d['base']:.4f} → " + ", ".join(f"{v:.4f}" for v in d["final"]))
    print(f"wrote {args.out}/showcase.json, curve.png" + ("" if args.no_grid else ", grid_before_after.png"))
    return result


if __name__ == "__main__":
    main()
