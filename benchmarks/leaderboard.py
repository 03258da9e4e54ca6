"""Leaderboard: every registered algorithm on the tiny tasks at a fixed reward-query budget.

The tasks are ``Denoise-Tiny-*`` (the embedded DDIM model) and ``Denoise-TinyFlow-*`` (the embedded
flow-matching model, Flow-GRPO's SDE); ``--tasks`` takes IDs or their middle parts
(``Compressibility``, ``TinyFlow-Compressibility``).

    python -m benchmarks.leaderboard [--quick] [--algos ...] [--tasks ...] [--seeds N] [--budget Q]

Each (task, algorithm, seed) run trains with the algorithm's ``tiny`` preset
(``agents.config.preset_config("tiny", algo, ...)``) through :class:`agents.trainer.Trainer` until
``--budget`` reward queries have been made, then is evaluated:

- ``final_reward``: mean reward of the last training epoch (the curve's end);
- ``train_eval`` / ``heldout_eval``: mean reward at fixed seeds on the training prompts and on the
  held-out prompt set of the task's prompts (``tiny_train`` → ``tiny_heldout``), with
  :func:`agents.evaluate.evaluate_policy` — the same seeds for every run and for the base model;
- ``kl_to_base``: drift from the base model (over-optimisation). Along trajectories sampled by the
  fine-tuned policy, each step's policy and the base model's are Gaussians with the same σ_t, so
  KL(π_ft ‖ π_base) = ‖μ_ft − μ_base‖² / (2σ_t²) summed over latent dimensions, in closed form. Reported
  as the mean over steps and samples (nats per step) and summed over steps (``kl_path``: the KL
  between the two samplers' trajectory distributions, since both start from the same x_T);
- ``fidelity``: the tiny world's programmatic captioner (:mod:`rewards.tinyworld.captioner`) on the
  same fine-tuned samples: the fraction showing every object of the prompt with the right colour,
  shape, count, size and relation (prompt-image faithfulness; falls when rewards are gamed).

Every run lives in ``<runs>/<task>/<algo>/seed<k>/`` (the trainer's run directory, checkpoints
included) and is finished when its ``result.json`` exists. A finished run is reused as long as its
``config.json`` equals the config the current preset gives; otherwise it is moved aside to
``seed<k>.stale-<time>`` (kept, not deleted) and redone. An interrupted run resumes from its last
checkpoint, so the leaderboard can be stopped and restarted at any time. At the end (and after each
run) the table is written to ``<out>/leaderboard.json`` and
``.md``, and ``<out>/leaderboard_<task>.png`` plots mean reward ± std over seeds against reward
queries (the DDPO paper's Figure 4 at tiny scale).

Any algorithm registered with :func:`agents.registry.register_algo` before :func:`main` runs is
included (see ``benchmarks/examples/my_algo.py`` and ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffusion_env  # noqa: F401  (registers the Denoise-* IDs)
from agents import distributed
from agents.config import preset_config
from agents.policy import GaussianDenoisingPolicy
from agents.registry import registered_algos
from agents.runtime import set_threads

TASKS = (
    "Denoise-Tiny-Compressibility-v0",
    "Denoise-Tiny-Incompressibility-v0",
    "Denoise-Tiny-PromptAlignment-v0",
    "Denoise-Tiny-GenEval-v0",
    "Denoise-TinyFlow-Compressibility-v0",
    "Denoise-TinyFlow-Incompressibility-v0",
    "Denoise-TinyFlow-PromptAlignment-v0",
    "Denoise-TinyFlow-GenEval-v0",
)
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parents[1] / "runs" / "leaderboard"
# --quick never writes over the committed figures (benchmarks/results) unless --out asks it to.
QUICK_RUNS = RUNS.with_name("leaderboard-quick")
QUICK = dict(budget=128, seeds=1, tasks=TASKS[:2], eval_samples=16)


def task_id(name: str) -> str:
    """``Compressibility``, ``TinyFlow-Compressibility`` or a full ID → the registered ID."""
    import gymnasium as gym

    if name.startswith("Denoise-"):
        full = name
    else:
        full = f"Denoise-{name}-v0" if name.startswith("TinyFlow-") else f"Denoise-Tiny-{name}-v0"
    if full not in gym.registry:
        known = sorted(i for i in gym.registry if i.startswith(("Denoise-Tiny-", "Denoise-TinyFlow-")))
        raise ValueError(f"unknown task {name!r}; expected one of {known} (or their middle part)")
    return full


def short_name(task: str) -> str:
    """``Denoise-Tiny-Compressibility-v0`` → ``Compressibility``; ``Denoise-TinyFlow-X-v0`` → ``TinyFlow-X``."""
    return task.removeprefix("Denoise-").removesuffix("-v0").removeprefix("Tiny-")


# The committed runs sampled each epoch in one batch of 64 (the tiny presets' size before they took 32, so that
# two processes can share an epoch): kept, so that their figures stay comparable and their runs are not stale.
SAMPLE_BATCH_SIZE = 64


def run_config(task: str, algo: str, seed: int, args: argparse.Namespace):
    """The run's TrainConfig: the algorithm's tiny preset, this task and seed, the budget."""
    overrides: dict[str, Any] = dict(env_id=task, seed=seed, reward_query_budget=args.budget, progress=False,
                                     run_dir=str(args.runs / task / algo / f"seed{seed}"), save_every=1,
                                     micro_batch_size=args.micro_batch, threads=args.threads,
                                     sample_batch_size=SAMPLE_BATCH_SIZE)  # fmt: skip
    if args.model:
        overrides["env_kwargs"] = {"model": str(args.model)}
    if args.num_steps:
        overrides["num_steps"] = args.num_steps
    cfg = preset_config("tiny", algo, **overrides)
    if args.samples_per_epoch:
        n = args.samples_per_epoch
        cfg = cfg.replace(samples_per_epoch=n, sample_batch_size=min(cfg.sample_batch_size, n),
                          train_batch_size=min(cfg.train_batch_size, n))  # fmt: skip
    cfg = cfg.replace(num_epochs=math.ceil(args.budget / cfg.samples_per_epoch))
    world = distributed.context().world_size
    if (cfg.samples_per_epoch // cfg.sample_batch_size) % world and cfg.samples_per_epoch % world == 0:
        # Several processes share an epoch by sample batches: smaller lockstep batches, same samples per epoch.
        cfg = cfg.replace(sample_batch_size=cfg.samples_per_epoch // world)
    return cfg.validate()


# ---------------------------------------------------------------------------------------------- drift
@torch.no_grad()
def drift_from_base(
    cfg, ft: GaussianDenoisingPolicy, base: GaussianDenoisingPolicy, num_samples: int, seed: int
) -> dict:
    """KL to the base model along fine-tuned trajectories, and the captioner's fidelity of the samples."""
    from agents.trainer import derive_seed, make_env

    env = make_env(cfg, num_envs=num_samples, model=ft.family)
    gen = torch.Generator(device=ft.device).manual_seed(derive_seed(seed, 7))
    obs, _ = env.reset(seed=derive_seed(seed, 8) % 2**31)
    kls, info = [], {}
    while "images" not in info:
        g_ft = ft.distribution(obs["x_t"], obs["t"], obs["prompt"])
        g_base = base.distribution(obs["x_t"], obs["t"], obs["prompt"])
        var = g_ft.std.flatten() ** 2  # the same σ_t for both: it depends on t only
        kls.append(((g_ft.mean - g_base.mean) ** 2).flatten(1).sum(1) / (2 * var))
        noise = torch.randn(g_ft.mean.shape, generator=gen, device=ft.device)
        obs, _, _, _, info = env.step(g_ft.mean + g_ft.std * noise)
    kl = torch.stack(kls, dim=1)  # [B, S]
    out = {"kl_to_base": float(kl.mean()), "kl_path": float(kl.sum(1).mean()), "fidelity": None}
    try:
        from rewards.tinyworld import captioner

        scores = captioner.score(info["images"], list(info["prompts"]))
        out["fidelity"] = float(np.mean([s["all_correct"] for s in scores]))
    except (ImportError, ValueError, KeyError) as exc:  # prompts that are not world captions
        out["fidelity_error"] = f"{type(exc).__name__}: {exc}"
    env.close()
    return out


def base_policy(family) -> GaussianDenoisingPolicy:
    """The pretrained model as a policy over ``family`` (what every run is compared with)."""
    return GaussianDenoisingPolicy(family.load_network(), family)


def evaluate_run(cfg, policy: GaussianDenoisingPolicy, base: GaussianDenoisingPolicy, args) -> dict[str, Any]:
    from agents.evaluate import HELDOUT_SETS, evaluate_policy, heldout_prompt_set

    out: dict[str, Any] = {}
    import gymnasium as gym

    train_prompts = cfg.env_kwargs.get("prompts", gym.spec(cfg.env_id).kwargs.get("prompts"))
    train = evaluate_policy(cfg, policy, train_prompts, num_samples=args.eval_samples)
    out["train_eval"], out["train_eval_std"] = train["reward_mean"], train["reward_std"]
    heldout = heldout_prompt_set(cfg) or HELDOUT_SETS.get("tiny_train")
    out["heldout_eval"] = evaluate_policy(cfg, policy, heldout, num_samples=args.eval_samples)["reward_mean"]
    out.update(drift_from_base(cfg, policy, base, args.eval_samples, seed=10_000))
    out["diversity"] = run_diversity(cfg, policy, args)
    return out


def run_diversity(cfg, policy: GaussianDenoisingPolicy, args) -> float | None:
    """Within-prompt diversity at fixed seeds: ``eval_samples`` images, 4 per training prompt."""
    from agents.evaluate import evaluate_diversity

    return evaluate_diversity(cfg, policy, num_prompts=max(1, args.eval_samples // 4), per_prompt=4)


# ---------------------------------------------------------------------------------------------- runs
def run_one(task: str, algo: str, seed: int, args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Train and evaluate one run unless its result.json exists. Returns ``(result, ran)``."""
    from agents.trainer import Trainer
    from benchmarks.end_to_end import epoch_seconds
    from benchmarks.rundirs import set_aside_if_stale

    cfg = run_config(task, algo, seed, args)
    run_dir = Path(cfg.run_dir)
    dist = distributed.context()
    dist.on_main(lambda: set_aside_if_stale(run_dir, cfg))  # a preset changed: redo it, keep the old folder
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text()), False
    resume = (run_dir / "checkpoints" / "latest").exists()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=resume)
    # A resumed run also counts the sampling and training time of the epochs it resumed past (their set-up and
    # checkpoint time is lost with the process that ran them), so "train min" is not the last piece's alone.
    before_s = sum(epoch_seconds(h) for h in trainer.history)
    trainer.train()
    train_s = time.perf_counter() - t0 + before_s
    result = {
        "task": task, "algo": algo, "seed": seed, "budget": args.budget, "resumed": resume,
        "resumed_epochs_s": before_s if resume else None,
        "reward_queries": trainer.reward_queries, "epochs": trainer.epoch,
        "final_reward": trainer.history[-1]["charts/reward_mean"] if trainer.history else None,
        "curve": [[h["charts/reward_queries"], h["charts/reward_mean"]] for h in trainer.history],
        "train_s": train_s,
    }  # fmt: skip

    def evaluate_and_write() -> None:  # the main process evaluates and writes; the others read the result
        result.update(evaluate_run(cfg, trainer.policy, base_policy(trainer.env.family), args))
        result["total_s"] = time.perf_counter() - t0
        tmp = done.with_name(".result.json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, done)

    dist.on_main(evaluate_and_write)
    trainer.env.close()
    return json.loads(done.read_text()), True


def base_reference(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The base model's evaluation on the task (cached like a run, in ``<runs>/<task>/base.json``)."""
    path = args.runs / task / "base.json"
    res = json.loads(path.read_text()) if path.exists() else None
    if res is not None and "diversity" in res:
        return res
    cfg = run_config(task, registered_algos()[0], 0, args)
    from agents.trainer import make_env

    env = make_env(cfg, num_envs=1)
    base = base_policy(env.family)
    if res is None:
        res = {"task": task, "algo": "base model", **evaluate_run(cfg, base, base, args)}
    else:  # cached before the diversity column: add it, keep the rest as it was
        res["diversity"] = run_diversity(cfg, base, args)
    env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".base.json.{os.getpid()}.tmp")  # atomic: processes sharing --runs may race here
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)
    return res


# ---------------------------------------------------------------------------------------------- tables
COLUMNS = ("final_reward", "train_eval", "d_train", "heldout_eval", "kl_to_base", "kl_path", "fidelity", "diversity",
           "hacking", "train_min")  # fmt: skip
DERIVED = ("d_train", "hacking", "train_min")  # computed from a run and its task's base model at tabulation


def hacking(run: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """1.0 when the run's eval reward rose above the base model's while its fidelity or diversity fell below
    half the base model's (:func:`agents.diagnostics.hacking_flag`), else 0.0; None without the figures."""
    from agents.diagnostics import hacking_flag

    if not base or run.get("train_eval") is None or base.get("train_eval") is None:
        return None
    flag = hacking_flag(run["train_eval"], base["train_eval"],
                        [(run.get(k), base.get(k)) for k in ("fidelity", "diversity")])  # fmt: skip
    return None if flag is None else float(flag)


def improvement_d(run: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """(the run's train-prompt eval reward − the base model's) / the std of the base model's rewards."""
    if not base or not base.get("train_eval_std") or run.get("train_eval") is None:
        return None
    return (run["train_eval"] - base["train_eval"]) / base["train_eval_std"]


def aggregate(results: list[dict[str, Any]], bases: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in results):
        if task in bases:
            b = bases[task]
            rows.append({"task": task, "algo": "base model", "seeds": 0,
                         **{c: [b.get(c), 0.0] for c in COLUMNS if c not in ("final_reward", *DERIVED)},
                         "final_reward": [None, None], "d_train": [0.0, 0.0], "hacking": [0.0, 0.0],
                         "train_min": [None, None]})  # fmt: skip
        for algo in dict.fromkeys(r["algo"] for r in results if r["task"] == task):
            rs = [{**r, "d_train": improvement_d(r, bases.get(task)), "hacking": hacking(r, bases.get(task)),
                   "train_min": r["train_s"] / 60 if r.get("train_s") is not None else None}
                  for r in results if r["task"] == task and r["algo"] == algo]  # fmt: skip
            row = {"task": task, "algo": algo, "seeds": len(rs)}
            for c in COLUMNS:
                vals = [r[c] for r in rs if r.get(c) is not None]
                row[c] = [float(np.mean(vals)), float(np.std(vals))] if vals else [None, None]
            rows.append(row)
    return rows


def _fmt(ms: list) -> str:
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.3g} ± {s:.2g}" if s else f"{m:.3g}"


def carried_runs(args: argparse.Namespace, results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Runs of ``--carry-over``'s leaderboard that this invocation does not redo: of (task, algorithm) pairs it
    does not plan, or — with ``--existing-only`` — of planned pairs none of whose runs are finished here."""
    if not getattr(args, "carry_over", None):
        return []
    old = json.loads(Path(args.carry_over).read_text())
    if getattr(args, "existing_only", False):
        redone = {(r["task"], r["algo"]) for r in results or []}
        keep = lambda r: (r["task"], r["algo"]) not in redone  # noqa: E731
    else:
        keep = lambda r: not (r["task"] in args.tasks and r["algo"] in args.algos)  # noqa: E731
    return [{**r, "carried_over": str(args.carry_over)} for r in old["runs"] if keep(r)]


def write_outputs(results, bases, args, pending: int) -> dict[str, Any]:
    carried = carried_runs(args, results)
    carried_pairs = {(r["task"], r["algo"]) for r in carried}
    # Runs --existing-only found unfinished, unless the carried-over table holds their (task, algorithm) pair.
    pending += sum((t, a) not in carried_pairs for t, a, _ in getattr(args, "missing", ()))
    results = results + carried
    tasks = list(dict.fromkeys([r["task"] for r in results] + list(args.tasks)))
    rows = aggregate(results, bases)
    out = {"budget": args.budget, "seeds": args.seeds, "algos": args.algos, "tasks": tasks,
           "complete": pending == 0, "pending_runs": pending, "rows": rows, "runs": results, "bases": bases}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "leaderboard.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Leaderboard: tiny tasks, {args.budget} reward queries per run",
             "", f"Mean ± std over seeds. {'Complete.' if not pending else f'**Partial: {pending} run(s) missing.**'}",
             "Columns: see `docs/benchmarks.md` (KL in nats per denoising step; path KL summed over steps).",
             f"Run time: {sum(r.get('total_s', 0.0) for r in results) / 60:.0f} min summed over the {len(results)} "
             "runs' own wall times (training + evaluation; `total_s` in each run).",
             *([f"Carried over unchanged from `{args.carry_over}` (not rerun): "
                f"{', '.join(sorted({short_name(r['task']) + ' ' + r['algo'] for r in carried}))}."] if carried else []),
             "",
             "| task | algorithm | seeds | final reward | eval (train prompts) | d (base std) | eval (held-out) | KL/step to base | path KL | fidelity | diversity | hacking | train min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        task = short_name(r["task"])
        lines.append(
            f"| {task} | {r['algo']} | {r['seeds']} | " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |"
        )
    (args.out / "leaderboard.md").write_text("\n".join(lines) + "\n")
    plot_curves(results, args)
    return out


def plot_curves(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in dict.fromkeys(r["task"] for r in results):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for algo in dict.fromkeys(r["algo"] for r in results if r["task"] == task):
            curves = [
                np.asarray(r["curve"], dtype=float)
                for r in results
                if r["task"] == task and r["algo"] == algo
            ]
            curves = [c for c in curves if len(c)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = curves[0][:n, 0]
            y = np.stack([c[:n, 1] for c in curves])
            ax.plot(x, y.mean(0), label=f"{algo} ({len(curves)} seeds)")
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
        ax.set_xlabel("reward queries")
        ax.set_ylabel("reward (mean over the epoch)")
        ax.set_title(task.removeprefix("Denoise-"))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(
            args.out / f"leaderboard_{short_name(task)}.png", dpi=100
        )
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: budget {QUICK['budget']}, {QUICK['seeds']} seed, 2 tasks, {QUICK['eval_samples']} eval samples")  # fmt: skip
    p.add_argument("--algos", nargs="+", help="algorithms (default: every registered one)")
    p.add_argument(
        "--tasks", nargs="+", help="tasks: IDs or Compressibility/Incompressibility/PromptAlignment"
    )
    p.add_argument("--seeds", type=int, help="seeds per (task, algorithm) (default 3)")
    p.add_argument("--carry-over", type=Path, metavar="JSON",
                   help="a leaderboard.json whose runs of other (task, algorithm) pairs join the table unchanged, "
                        "marked as carried over: rerun only the tasks and algorithms whose code or config changed")  # fmt: skip
    p.add_argument("--existing-only", action="store_true",
                   help="only tabulate runs already finished in --runs (e.g. by several invocations side by side); "
                        "train nothing")  # fmt: skip
    p.add_argument("--budget", type=int, help="reward queries per run (default 1024)")
    p.add_argument("--eval-samples", type=int, help="samples per evaluation (default 64)")
    p.add_argument("--out", type=Path,
                   help=f"where the tables and plots go (default {RESULTS}; with --quick: RUNS/results, so the "
                        "committed figures stay as they are)")  # fmt: skip
    p.add_argument("--runs", type=Path, help=f"where the run folders go (default {RUNS}; with --quick: {QUICK_RUNS})")
    p.add_argument(
        "--model", help="model folder for every task (default: the envs' own, the shipped tiny model)"
    )
    p.add_argument("--num-steps", type=int, help="denoising steps (default: the env's)")
    p.add_argument("--samples-per-epoch", type=int, help="override the presets' samples per epoch (tests)")
    p.add_argument("--micro-batch", type=int, default=160,
                   help="(sample, timestep) pairs per training call (default 160; see benchmarks/throughput.py)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, see docs/benchmarks.md)"
    )
    args = p.parse_args(argv)
    quick = QUICK if args.quick else dict(budget=1024, seeds=3, tasks=TASKS, eval_samples=64)
    args.runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    args.out = args.out or (args.runs / "results" if args.quick else RESULTS)
    for k, v in quick.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("seeds", "budget", "eval_samples", "micro_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    try:
        args.tasks = [task_id(t) for t in args.tasks]
    except ValueError as exc:
        p.error(str(exc))
    known = registered_algos()
    args.algos = args.algos or known
    unknown = [a for a in args.algos if a not in known]
    if unknown:
        p.error(
            f"unknown algorithm(s) {unknown}; registered: {known} (register yours with agents.registry.register_algo)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)  # as its runs do (TrainConfig.threads)
    dist = distributed.init()  # under torchrun: every run trains on all processes; the main one evaluates, writes
    # Seed-major order: a leaderboard stopped early still has every (task, algorithm) at seed 0.
    plan = [(t, a, s) for s in range(args.seeds) for t in args.tasks for a in args.algos]
    results, bases, ran = [], {}, 0
    # Base models of every task in the table (carried-over tasks too: their rows get the same d column).
    for task in dict.fromkeys(list(args.tasks) + [r["task"] for r in carried_runs(args)]):
        dist.on_main(lambda task=task: base_reference(task, args))
        bases[task] = base_reference(task, args)  # cached by the main process: every process reads it
    args.missing = []
    if args.existing_only:  # tabulate what other invocations finished; train nothing
        finished = [(t, a, s) for t, a, s in plan if Path(run_config(t, a, s, args).run_dir, "result.json").exists()]
        # Unfinished runs of pairs with a finished run count as pending; pairs with none are not in this table.
        started = {(t, a) for t, a, _ in finished}
        args.missing, plan = [x for x in plan if x not in finished and x[:2] in started], finished
    for i, (task, algo, seed) in enumerate(plan):
        t0 = time.perf_counter()
        res, did = run_one(task, algo, seed, args)
        ran += did
        results.append(res)
        state = f"{time.perf_counter() - t0:.0f} s" if did else "done before, skipped"
        if not dist.is_main:
            continue
        print(f"[{i + 1}/{len(plan)}] {task} {algo} seed {seed}: final reward {res['final_reward']:.4g}, "
              f"held-out {res['heldout_eval']:.4g}, KL/step {res['kl_to_base']:.3g} ({state})", flush=True)  # fmt: skip
        write_outputs(results, bases, args, pending=len(plan) - i - 1)
    if not dist.is_main:
        return {"ran": ran, "skipped": len(plan) - ran}
    out = write_outputs(results, bases, args, pending=0)
    out["ran"], out["skipped"] = ran, len(plan) - ran
    print((args.out / "leaderboard.md").read_text())
    print(f"tables and plots: {args.out}/leaderboard.md, leaderboard.json, leaderboard_<task>.png; runs: {args.runs}")
    if args.quick and args.out.resolve() != RESULTS.resolve():
        print(f"(--quick wrote to a scratch folder; the committed {RESULTS} is unchanged. Pass --out {RESULTS} "
              "to replace it.)")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
