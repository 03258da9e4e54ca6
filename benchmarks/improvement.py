"""Reward improvement per algorithm in base-model standard deviations (d), at a reward-query budget.

``python -m benchmarks.improvement [--tasks ...] [--algos ...] [--seeds 0 1 2] [--budget 2048] [--set FIELD=VALUE]``

For each (task, algorithm, seed): train from the shipped tiny model with the algorithm's ``tiny``
preset until ``budget`` reward queries, then evaluate at fixed seeds on the training prompts. ``d`` is
``(mean reward after − mean reward of the base model) / std of the base model's rewards``, both
evaluated on the same prompts and seeds. The table gives d per seed and its mean ± std over seeds.

Runs live in ``<runs>/<task>/<algo>[+<tag>]/seed<k>/``. A finished run (``result.json``) is kept and
reused only while its ``config.json`` still equals the config it would run now; a run whose preset
changed since is moved aside to ``seed<k>.stale-<time>`` (never deleted) and redone. An interrupted
run resumes from its last checkpoint. Several processes may split ``--algos``/``--tasks``/``--seeds``
and share ``--runs``. ``--set FIELD=VALUE`` (repeatable) overrides preset fields for a trial; give
such trials a ``--tag`` so that they get their own folders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import typing
from pathlib import Path
from typing import Any

import diffusion_env  # noqa: F401
from agents.config import TrainConfig, preset_config
from agents.evaluate import evaluate_policy
from agents.runtime import set_threads
from agents.trainer import Trainer
from benchmarks.leaderboard import SAMPLE_BATCH_SIZE
from benchmarks.rundirs import set_aside_if_stale

RUNS = Path(__file__).resolve().parents[1] / "runs" / "improvement"
QUICK_RUNS = RUNS.with_name("improvement-quick")
FULL = dict(tasks=["Compressibility", "Incompressibility"], algos=["ddpo-is", "ddpo-sf", "rwr", "rwr-sparse"],
            seeds=[0, 1, 2], budget=2048, eval_samples=64, runs=RUNS)  # fmt: skip
QUICK = dict(tasks=["Compressibility"], algos=["ddpo-is"], seeds=[0], budget=256, eval_samples=16, runs=QUICK_RUNS)
# Seconds of one epoch of 64 samples with the ddpo-is tiny preset, one thread of a 2-core CPU, by model family:
# the tiny DDIM model (agents/config.py) and the tiny flow model (Denoise-TinyFlow-*: 8 s sampling, 54 s training).
EPOCH_S_PER_64 = {"Denoise-Tiny-": 15.0, "Denoise-TinyFlow-": 62.0}


def _task(name: str) -> str:
    return name if name.startswith("Denoise-") else f"Denoise-Tiny-{name}-v0"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["clip_range=1e-3", ...]`` → typed field values of TrainConfig or of an algorithm's config (clear error on
    a bad one; a field the run's algorithm lacks is refused when its config is validated)."""
    import argparse as _argparse

    from agents.cliargs import value_parser
    from agents.config import algo_config_class
    from agents.registry import registered_algos

    hints = {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k != "algo_config"}
    for algo in registered_algos():
        hints = {**typing.get_type_hints(algo_config_class(algo)), **hints}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in hints:
            fields = ", ".join(sorted(hints))
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of: {fields}")
        try:
            out[name] = value_parser(hints[name], name)(value)
        except (ValueError, _argparse.ArgumentTypeError) as e:
            raise SystemExit(f"--set {item!r}: cannot read {value!r} as {hints[name]} ({e})") from None
    return out


def base_stats(task: str, args) -> dict:
    path = args.runs / task / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = preset_config(
        "tiny", "ddpo-is", env_id=task, run_dir=str(args.runs / task / "_base"), progress=False
    )
    from agents.trainer import make_env
    from benchmarks.leaderboard import base_policy

    env = make_env(cfg, num_envs=1)
    ev = evaluate_policy(cfg, base_policy(env.family), "tiny_train", args.eval_samples)
    env.close()
    res = {"reward_mean": ev["reward_mean"], "reward_std": ev["reward_std"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, path)  # several processes may race here: each writes whole files only
    return res


def run(task: str, algo: str, seed: int, args) -> dict:
    name = f"{algo}+{args.tag}" if args.tag else algo
    folder = args.runs / task / name / f"seed{seed}"
    cfg = preset_config("tiny", algo, **{**dict(env_id=task, reward_query_budget=args.budget, num_epochs=10**6,
                                                run_dir=str(folder), seed=seed, progress=args.progress,
                                                threads=args.threads, sample_batch_size=SAMPLE_BATCH_SIZE),
                                         **args.overrides}).validate()  # fmt: skip
    set_aside_if_stale(folder, cfg)
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    resume = (folder / "checkpoints" / "latest").exists()
    start = time.perf_counter()
    trainer = Trainer(cfg, resume=resume)
    trainer.train()
    base = base_stats(task, args)
    try:
        ev = evaluate_policy(cfg, trainer.policy, "tiny_train", args.eval_samples)
        eval_reward, d, diverged = ev["reward_mean"], (ev["reward_mean"] - base["reward_mean"]) / base["reward_std"], None
    except ValueError as exc:  # the env refuses the fine-tuned policy's non-finite or runaway latents
        eval_reward, d, diverged = None, None, str(exc)
        print(f"{task} {name} seed {seed}: the trained policy diverged at evaluation ({exc})", flush=True)
    res = {"task": task, "algo": name, "seed": seed, "reward_queries": trainer.reward_queries,
           "epochs": trainer.epoch, "eval_reward": eval_reward, "base_reward": base["reward_mean"],
           "base_std": base["reward_std"], "d": d, "diverged": diverged,
           "overrides": args.overrides, "train_minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    tmp = done.with_name(".result.json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, done)
    trainer.env.close()
    return res


def table(results: list[dict]) -> str:
    """Markdown: one row per (task, algorithm) with d per seed and mean ± std over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["algo"]), []).append(r)
    lines = [
        "| task | algorithm | reward queries | seeds | d per seed | d mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    for (task, algo), rs in groups.items():
        per_seed = [r.get("d") for r in sorted(rs, key=lambda r: r.get("seed", 0))]
        ds = [d for d in per_seed if d is not None]  # None: the policy diverged (no finite samples)
        spread = f" ± {statistics.stdev(ds):.2f}" if len(ds) > 1 else ""
        mean = f"{statistics.fmean(ds):.2f}{spread}" if ds else "–"
        if len(ds) < len(per_seed):
            mean += f" ({len(per_seed) - len(ds)} diverged)"
        shown = ", ".join("diverged" if d is None else f"{d:.2f}" for d in per_seed)
        lines.append(f"| {task} | {algo} | {rs[0]['reward_queries']} | {len(per_seed)} | {shown} | {mean} |")
    return "\n".join(lines)


def collect(runs: Path, tasks: list[str], algos: list[str]) -> list[dict]:
    """Every finished run of the presets (not ``+tag`` trials, not set-aside folders) under ``runs``."""
    results = []
    for task in tasks:
        for algo in algos:
            for done in sorted((runs / task / algo).glob("seed*/result.json")):
                if ".stale-" not in done.parent.name:
                    results.append({"seed": int(done.parent.name.removeprefix("seed")), **json.loads(done.read_text())})
    return results


def write_report(results: list[dict], out: Path, command: str) -> None:
    """``<out>/improvement.json`` (every run) and ``improvement.md`` (the table and how it was made)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "improvement.json").write_text(json.dumps(results, indent=1) + "\n")
    budgets = sorted({r["reward_queries"] for r in results})
    md = [f"# Reward improvement at {', '.join(map(str, budgets))} reward queries (tiny presets, shipped tiny model)", "",
          f"Made by `{command}` from the finished runs.",
          "d = (eval reward after − base eval reward) / base std; evaluation: 64 samples, training prompts, fixed seeds;",
          "mean ± std over training seeds.", "", table(results), ""]  # fmt: skip
    (out / "improvement.md").write_text("\n".join(md))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: Compressibility, ddpo-is, seed 0, budget 256, 16 eval samples, runs in {QUICK_RUNS} "
                        "(a few minutes on a 2-core CPU)")  # fmt: skip
    p.add_argument("--tasks", nargs="+", help="tasks: Compressibility, Incompressibility, PromptAlignment or full IDs "
                                              "(default: Compressibility Incompressibility)")  # fmt: skip
    p.add_argument("--algos", nargs="+", help="algorithms (default: ddpo-is ddpo-sf rwr rwr-sparse)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0 1 2)")
    p.add_argument("--budget", type=int, help="reward queries per run (default: 2048)")
    p.add_argument("--eval-samples", type=int, help="samples of each evaluation (default: 64)")
    p.add_argument("--runs", type=Path, help=f"where the run folders go (default: {RUNS}; with --quick: {QUICK_RUNS})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a preset field (repeatable), e.g. --set num_inner_epochs=2")  # fmt: skip
    p.add_argument("--tag", help="name suffix of the run folders (required with --set)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: 1, the fastest on a shared 2-core box)"
    )
    p.add_argument("--progress", action="store_true", help="progress bars of each run's training (default: off)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="train nothing: write DIR/improvement.{json,md} from the finished runs of --tasks x --algos")  # fmt: skip
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.report:
        results = collect(args.runs, [_task(t) for t in args.tasks], args.algos)
        if not results:
            p.error(f"no finished runs under {args.runs} for {args.tasks} x {args.algos}")
        write_report(results, args.report, "python -m benchmarks.improvement --report " + str(args.report))
        print(table(results))
        return results
    args.overrides = parse_overrides(args.overrides)
    if args.overrides and not args.tag:
        p.error("--set changes the preset: give the trial a --tag so that its runs get their own folders")
    set_threads(args.threads)  # as its runs do (TrainConfig.threads)
    results = []
    plan = [(task, algo, seed) for task in map(_task, args.tasks) for algo in args.algos for seed in args.seeds]
    sizes = [preset_config("tiny", algo, **{"env_id": task, **args.overrides}).samples_per_epoch
             for task, algo, _ in plan]  # fmt: skip
    print(estimate_line([(task, n) for (task, _, _), n in zip(plan, sizes)], args.budget), flush=True)
    started, trained = time.perf_counter(), 0
    for i, (task, algo, seed) in enumerate(plan):
        base_stats(task, args)
        t0 = time.perf_counter()
        r = run(task, algo, seed, args)
        if time.perf_counter() - t0 > 5:  # trained now (a finished run is reused in well under a second)
            trained += 1
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("task", "algo", "seed", "reward_queries", "eval_reward", "d")}),
              flush=True)  # fmt: skip
        if trained and i + 1 < len(plan):
            per_run = (time.perf_counter() - started) / trained
            print(f"[{i + 1}/{len(plan)}] about {per_run * (len(plan) - i - 1) / 60:.0f} min left "
                  f"(measured {per_run / 60:.1f} min per run)", flush=True)  # fmt: skip
    print()
    print(table(results))
    print(f"runs: {args.runs}  (write the report with --report DIR)")
    return results


def epoch_seconds_estimate(task: str, samples_per_epoch: int) -> float:
    """The expected seconds of one training epoch on ``task`` (its model family's figure in
    :data:`EPOCH_S_PER_64`, scaled to ``samples_per_epoch``)."""
    prefix = max((k for k in EPOCH_S_PER_64 if task.startswith(k)), key=len, default="Denoise-Tiny-")
    return EPOCH_S_PER_64[prefix] * samples_per_epoch / 64


def estimate_line(runs: list[tuple[str, int]], budget: int) -> str:
    """A duration estimate before anything runs; ``runs``: each planned run's (task, samples per epoch)."""
    seconds = sum(-(-budget // spe) * epoch_seconds_estimate(task, spe) for task, spe in runs)
    shapes = sorted({(-(-budget // spe), spe, epoch_seconds_estimate(task, spe)) for task, spe in runs})
    each = ", ".join(f"{e} epochs of {spe} samples at ~{s:.0f} s" for e, spe, s in shapes)
    return (f"{len(runs)} run(s) x {each}: about {seconds / 60:.0f} min (one thread of a 2-core CPU), "
            "plus evaluations; finished runs are reused")  # fmt: skip


if __name__ == "__main__":
    main()
