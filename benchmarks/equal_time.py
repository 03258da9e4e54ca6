"""Leaderboard runs compared at equal wall time, beside the leaderboard's equal reward queries.

    python -m benchmarks.equal_time --tasks Denoise-TinyFlow-GenEval-v0 [--runs runs/leaderboard] [--last 3]

Every algorithm spends the same reward-query budget, but not the same time. For each task this takes the
run time of its fastest algorithm (median over its seeds of the summed per-epoch sampling and training
seconds, ``perf/sample_s`` + ``perf/train_s`` in metrics.jsonl) as the common budget T, and reports every
algorithm's training reward (``charts/reward_mean``, the mean of the ``--last`` epochs finished within T)
and its reward queries by T, mean ± std over seeds. Times are only comparable between runs that shared the
machine in the same way (the leaderboard's cells, one thread each).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.end_to_end import epoch_seconds, read_metrics
from benchmarks.leaderboard import RUNS


def epoch_times(rows: list[dict]) -> np.ndarray:
    """Cumulative sampling + training seconds at the end of each epoch."""
    return np.cumsum([epoch_seconds(r) for r in rows])


def reward_by_time(rows: list[dict], t: float, last: int = 3) -> tuple[float | None, int]:
    """(mean training reward of the last ``last`` epochs finished by ``t`` seconds, reward queries by then);
    (None, 0) when no epoch finished by ``t``."""
    done = [r for r, end in zip(rows, epoch_times(rows), strict=True) if end <= t]
    if not done:
        return None, 0
    return float(np.mean([r["charts/reward_mean"] for r in done[-last:]])), int(done[-1]["charts/reward_queries"])


def load_runs(runs: Path, task: str) -> dict[str, list[list[dict]]]:
    """{algorithm: [metrics rows of each finished seed]} for ``task`` (folders ``<algo>/seed<N>`` with a result)."""
    out: dict[str, list[list[dict]]] = {}
    for result in sorted((runs / task).glob("*/seed*/result.json")):
        if not result.parent.name.removeprefix("seed").isdigit():
            continue  # folders set aside (e.g. "seed0.first-model") are not runs of today's config
        out.setdefault(result.parent.parent.name, []).append(read_metrics(result.parent))
    return out


def compare(by_algo: dict[str, list[list[dict]]], last: int = 3) -> tuple[float, list[dict]]:
    """(T, one row per algorithm) with T the fastest algorithm's median total run time."""
    totals = {a: float(np.median([epoch_times(rows)[-1] for rows in seeds])) for a, seeds in by_algo.items()}
    t = min(totals.values())
    table = []
    for algo, seeds in by_algo.items():
        at_t = [reward_by_time(rows, t, last) for rows in seeds]
        rewards = [r for r, _ in at_t if r is not None]
        table.append({"algo": algo, "seeds": len(seeds), "total_min": totals[algo] / 60,
                      "reward_at_T": (float(np.mean(rewards)), float(np.std(rewards))) if rewards else None,
                      "queries_at_T": float(np.mean([q for _, q in at_t])),
                      "final_reward": float(np.mean([np.mean([r["charts/reward_mean"] for r in rows[-last:]])
                                                     for rows in seeds]))})  # fmt: skip
    return t, table


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", required=True, help="task IDs (folders of --runs)")
    p.add_argument("--runs", type=Path, default=RUNS, help=f"the leaderboard's run folders (default {RUNS})")
    p.add_argument("--last", type=int, default=3, help="epochs averaged for a reward (default 3)")
    args = p.parse_args(argv)
    for task in args.tasks:
        by_algo = load_runs(args.runs, task)
        if not by_algo:
            raise SystemExit(f"--tasks {task}: no finished runs in {args.runs / task}; expected a leaderboard task")
        t, table = compare(by_algo, args.last)
        print(f"\n{task}: T = {t / 60:.2f} min (the fastest algorithm's median run)")
        print("| algorithm | seeds | run min | training reward by T | queries by T | training reward at the end |")
        print("|---|---|---|---|---|---|")
        for r in table:
            at = f"{r['reward_at_T'][0]:.4g} ± {r['reward_at_T'][1]:.2g}" if r["reward_at_T"] else "–"
            print(f"| {r['algo']} | {r['seeds']} | {r['total_min']:.2f} | {at} | {r['queries_at_T']:.0f} "
                  f"| {r['final_reward']:.4g} |")  # fmt: skip


if __name__ == "__main__":
    main()
