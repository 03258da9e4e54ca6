"""End to end: a whole ``denoise-gym train`` run, cold, on the fast path against the reference style.

    python -m benchmarks.end_to_end [--repeats N] [--budget 1024] [--threads N] [--json PATH] [--keep-runs]

What is measured: the command a user runs,

    denoise-gym train --env Denoise-Tiny-Compressibility-v0 --algo ddpo-is --preset tiny \\
        --reward-query-budget 1024 --run-dir RUN --progress false

each time in a fresh Python process with an empty compile cache (``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` point at a new empty folder per run), so imports, model loading, the grids before
and after, compilation and every checkpoint are paid as on a fresh machine. Two styles of the same run:

- **fast**: the command as it is (the preset's settings, whatever speed-ups they turn on);
- **reference**: the same command plus :data:`benchmarks.throughput.REFERENCE_STYLE` as options (eager
  fp32, sample and train batches of 16, one forward/backward per 16 (sample, timestep) pairs, contiguous
  memory, SDPA attention, nothing compiled) — the style of TRL's DDPOTrainer and ddpo-pytorch, as
  ``python -m benchmarks.throughput --baseline`` defines it. They win over anything in ``--extra``.

Runs alternate (reference, fast, reference, fast, …: ``--repeats`` pairs) so that load from other jobs
hits both alike. Per run:

- ``wall_s``: launch to exit; ``to_last_checkpoint_s``: launch to the mtime of ``checkpoints/latest``
  (written last by the last checkpoint; what follows it is the after-grid and the reward curve);
- ``samples_per_s``: reward queries of the run / ``wall_s``;
- ``peak_rss_mb``: the child's own peak RSS (``ru_maxrss`` of the process, reported by the tiny wrapper
  that runs the CLI in it); ``peak_rss_waited_mb``: ``os.wait4``'s ``ru_maxrss`` of that child (the max
  over it and the descendants it waited for: one run's figure, unlike ``RUSAGE_CHILDREN``);
  ``peak_tree_rss_mb``: the largest sum of the RSS of the child and all its descendants (compile
  workers included), polled every ``--poll-s`` seconds from ``/proc`` (a lower bound); ``peak_tree_pss_mb``:
  the same sum of PSS (``/proc/<pid>/smaps_rollup``: each page shared between processes counted once; read
  every ``--pss-every`` polls, as reading it walks the page tables and slows what it measures), the
  memory of the whole run when the trainer forks data-parallel workers (TrainConfig.processes), whose
  imported pages are shared with their parent; ``max_processes``: the most processes seen in the tree
  (a transient helper process, such as the ``ldconfig`` that ``ctypes.util.find_library`` runs, counts).
  The memory target compares the trees' PSS (``memory_ratio``);
- ``epoch_s``: each epoch's ``perf/sample_s + perf/train_s`` from the run's metrics.jsonl;
  ``steady_epoch_s`` is their median without the first epoch (which pays compilation and warm-up);
- ``ratio_dev_first``: ``losses/ratio_dev_first`` of the run's first epoch, the largest |log ratio| of
  its first training micro-batch (0 in exact fp32), and ``ratio_dev_first_max`` over all epochs;
- the config the child wrote (its config.json), the torch threads it used, load averages before and after.

Threads: ``--threads N`` sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the child (torch's default
thread count), and ``--threads N`` of the command when TrainConfig has a ``threads`` field; ``--threads 0``
(default) leaves the child's environment as this process's, as a user's shell would.

Figures go to stdout and to ``--json`` (default: a file in the temp folder; the committed one is
``benchmarks/results/end_to_end.json``). Runs are written to a temp folder, deleted afterwards unless
``--keep-runs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agents.cli import format_options
from agents.config import TrainConfig, field_help, preset_config
from benchmarks.throughput import REFERENCE_STYLE, machine_info

DEFAULT_ENV = "Denoise-Tiny-Compressibility-v0"
STYLES = ("reference", "fast")
TARGETS = {"cold_speedup_min": 1.5, "steady_speedup_min": 1.7, "rss_ratio_max": 1.25, "ratio_dev_first_max": 1e-6}
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
REPO_ROOT = Path(__file__).resolve().parents[1]  # the folder holding agents/ and benchmarks/

# Runs the CLI exactly as ``python -m agents.cli`` does, then reports what only the process itself knows:
# its own peak RSS and torch's thread count. Imports nothing before the CLI does.
CHILD = """\
import json, os, resource, runpy, sys
rc = 0
try:
    runpy.run_module("agents.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
import torch
with open(os.environ["END_TO_END_REPORT"], "w") as fh:
    json.dump({"rc": rc, "torch_threads": torch.get_num_threads(),
               "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, fh)
sys.exit(rc)
"""


# ---------------------------------------------------------------------------------------------- commands
def speed_fields() -> list[str]:
    """TrainConfig fields documented as speed-ups (help text starting "Speed:")."""
    return [f.name for f in dataclasses.fields(TrainConfig) if field_help(f.name).startswith("Speed:")]


def train_argv(args: argparse.Namespace, style: str, run_dir: Path) -> list[str]:
    """The ``denoise-gym`` arguments of one run: the user's command, plus REFERENCE_STYLE for the reference."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}; expected one of {STYLES}")
    argv = ["train", "--env", args.env, "--algo", args.algo, "--preset", args.preset,
            "--reward-query-budget", str(args.budget), "--run-dir", str(run_dir), "--progress", "false"]  # fmt: skip
    if args.env_kwargs:
        argv += ["--env-kwargs", json.dumps(args.env_kwargs)]
    if args.threads and "threads" in {f.name for f in dataclasses.fields(TrainConfig)}:
        argv += ["--threads", str(args.threads)]
    argv += shlex.split(args.extra)
    if style == "reference":  # last: argparse keeps the last value, so these hold whatever --extra says
        argv += shlex.split(format_options(REFERENCE_STYLE))
    return argv


def child_env(args: argparse.Namespace, cache_dir: Path, report: Path) -> dict[str, str]:
    """This process's environment with a fresh compile cache, the report path, this checkout first on the
    import path and, with ``--threads``, the thread count."""
    env = dict(os.environ)
    for var in CACHE_VARS:
        folder = cache_dir / var.split("_")[0].lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[var] = str(folder)
    if args.threads:
        env.update({var: str(args.threads) for var in THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["END_TO_END_REPORT"] = str(report)
    return env


# ---------------------------------------------------------------------------------------------- /proc
def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/<tid>/children`` (just ``[pid]`` without it)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return out


def _pss_kb(pid: int) -> int | None:
    """The proportional set size of ``pid`` (kB): its private pages plus its share of pages it shares, so that
    summed over processes (forked data-parallel workers sharing their parent's imports) each page counts once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class TreeRss:
    """Polls the largest summed RSS and PSS (MB) of a process and its descendants while it runs, and the
    largest number of processes in that tree."""

    def __init__(self, pid: int, interval_s: float, pss_every: int = 10):
        self.pid, self.interval_s, self.peak_mb, self.polls = pid, interval_s, 0.0, 0
        self.peak_pss_mb, self.max_processes, self.pss_every = 0.0, 0, pss_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        tree = process_tree(self.pid)
        total = sum(_status_kb(p, "VmRSS") or 0 for p in tree)
        self.peak_mb, self.polls = max(self.peak_mb, total / 1024), self.polls + 1
        self.max_processes = max(self.max_processes, len(tree))
        # PSS costs a walk of every page table (measured: polling it every 0.5 s slowed a 2-process run's epochs
        # from 11 to 14 s on 2 cores), so only every pss_every-th poll; the trainer keeps freed memory
        # (agents/runtime.py), so the resident size stays at its peak between polls.
        if self.polls % self.pss_every == 1 or self.pss_every == 1:
            pss = sum(_pss_kb(p) or 0 for p in tree)
            self.peak_pss_mb = max(self.peak_pss_mb, pss / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- one run
def _load_avg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_seconds(row: dict[str, Any]) -> float:
    """One epoch's sampling + training seconds from its metrics.jsonl row (0 for a part it did not record)."""
    return row.get("perf/sample_s", 0.0) + row.get("perf/train_s", 0.0)


def epoch_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-epoch seconds (sampling + training), the median of the steady ones (all but the first; None with
    one epoch), and the first micro-batch |log ratio| of the first epoch and of any epoch."""
    epochs = [epoch_seconds(r) for r in rows if "perf/sample_s" in r and "perf/train_s" in r]
    devs = [r["losses/ratio_dev_first"] for r in rows if r.get("losses/ratio_dev_first") is not None]
    return {
        "epochs": len(rows), "epoch_s": epochs, "first_epoch_s": epochs[0] if epochs else None,
        "steady_epoch_s": statistics.median(epochs[1:]) if len(epochs) > 1 else None,
        "ratio_dev_first": rows[0].get("losses/ratio_dev_first") if rows else None,
        "ratio_dev_first_max": max(devs) if devs else None,
    }  # fmt: skip



def flat_config(config: dict) -> dict:
    """A run's config.json with its algorithm's own fields (``algo_config``) beside the shared ones."""
    return {**config, **(config.get("algo_config") or {})}

def run_once(args: argparse.Namespace, style: str, repeat: int, work: Path) -> dict[str, Any]:
    """One training run of ``style`` in a fresh process; its figures (see the module docstring)."""
    folder = work / f"{style}-{repeat}"
    run_dir, report, log = folder / "run", folder / "report.json", folder / "child.log"
    folder.mkdir(parents=True)
    argv = train_argv(args, style, run_dir)
    env = child_env(args, folder / "compile-cache", report)
    cmd = [sys.executable, "-c", CHILD, *argv]
    load_before = _load_avg()
    with open(log, "wb") as out:
        launched, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
        with TreeRss(proc.pid, args.poll_s, args.pss_every) as tree:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode, waited_kb = os.waitstatus_to_exitcode(status), usage.ru_maxrss
            else:
                proc.wait()
                waited_kb = None
        wall = time.perf_counter() - t0
    load_after = _load_avg()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{style} run {repeat} exited with {proc.returncode}; expected 0. Command: "
                           f"denoise-gym {shlex.join(argv)}\n--- its output (end) ---\n{tail}")  # fmt: skip
    child = json.loads(report.read_text())
    latest = run_dir / "checkpoints" / "latest"
    rows = read_metrics(run_dir)
    queries = rows[-1]["charts/reward_queries"] if rows else 0
    config = json.loads((run_dir / "config.json").read_text())
    return {
        "style": style, "repeat": repeat, "command": "denoise-gym " + shlex.join(argv),
        "wall_s": wall,
        "to_last_checkpoint_s": latest.stat().st_mtime - launched if latest.exists() else None,
        "reward_queries": queries, "samples_per_s": queries / wall,
        "peak_rss_mb": child["maxrss_kb"] / 1024,
        "peak_rss_waited_mb": None if waited_kb is None else waited_kb / 1024,
        "peak_tree_rss_mb": tree.peak_mb or None, "peak_tree_pss_mb": tree.peak_pss_mb or None,
        "max_processes": tree.max_processes, "rss_polls": tree.polls,
        "torch_threads": child["torch_threads"], **epoch_figures(rows),
        "load_avg_before": load_before, "load_avg_after": load_after,
        "config": config, "reference_overrides_applied": all(flat_config(config).get(k) == v for k, v in REFERENCE_STYLE.items()),
        "run_dir": str(run_dir),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- summary
def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per style, speed-ups reference / fast (cold: whole run; steady: epochs after the first),
    memory fast / reference, and each against TARGETS."""
    keys = ("wall_s", "to_last_checkpoint_s", "samples_per_s", "first_epoch_s", "steady_epoch_s", "peak_rss_mb",
            "peak_rss_waited_mb", "peak_tree_rss_mb", "peak_tree_pss_mb", "ratio_dev_first_max")  # fmt: skip
    styles = {s: {k: _median([r for r in runs if r["style"] == s], k) for k in keys} for s in STYLES}
    ref, fast = styles["reference"], styles["fast"]
    pairs = [(r, f) for r in runs for f in runs if r["style"] == "reference" and f["style"] == "fast"
             and r["repeat"] == f["repeat"]]  # fmt: skip
    out = {
        "styles": styles,
        "cold_speedup": _ratio(ref["wall_s"], fast["wall_s"]),
        "cold_speedup_per_pair": [_ratio(r["wall_s"], f["wall_s"]) for r, f in pairs],
        "to_checkpoint_speedup": _ratio(ref["to_last_checkpoint_s"], fast["to_last_checkpoint_s"]),
        "steady_speedup": _ratio(ref["steady_epoch_s"], fast["steady_epoch_s"]),
        "steady_speedup_per_pair": [_ratio(r["steady_epoch_s"], f["steady_epoch_s"]) for r, f in pairs],
        "rss_ratio": _ratio(fast["peak_rss_mb"], ref["peak_rss_mb"]),
        "tree_rss_ratio": _ratio(fast["peak_tree_rss_mb"], ref["peak_tree_rss_mb"]),
        "tree_pss_ratio": _ratio(fast["peak_tree_pss_mb"], ref["peak_tree_pss_mb"]),
    }
    # The memory target is on the whole run: the process tree's summed PSS (each shared page once), which for
    # one process is its RSS up to the pages it shares with others; the child's own RSS where PSS is unknown.
    out["memory_ratio"] = out["tree_pss_ratio"] if out["tree_pss_ratio"] is not None else out["rss_ratio"]
    devs = [r["ratio_dev_first_max"] for r in runs if r["ratio_dev_first_max"] is not None]
    checks = {
        "cold_speedup_ok": out["cold_speedup"] is not None and out["cold_speedup"] >= TARGETS["cold_speedup_min"],
        "steady_speedup_ok": out["steady_speedup"] is not None
        and out["steady_speedup"] >= TARGETS["steady_speedup_min"],
        "rss_ratio_ok": out["memory_ratio"] is not None and out["memory_ratio"] <= TARGETS["rss_ratio_max"],
        "ratio_dev_first_ok": bool(devs) and max(devs) < TARGETS["ratio_dev_first_max"],
    }
    out["targets"] = {**TARGETS, **checks}
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(result: dict[str, Any]) -> None:
    print(f"\n{'style':9s} {'rep':>3s} {'wall s':>8s} {'to ckpt':>8s} {'queries':>7s} {'samples/s':>9s} "
          f"{'epoch 1':>8s} {'steady':>7s} {'RSS MB':>7s} {'tree MB':>7s} {'PSS MB':>7s} {'procs':>5s} {'thr':>3s} "
          f"{'|logr|':>8s} "
          f"{'load before/after':>17s}")  # fmt: skip
    for r in result["runs"]:
        loads = "/".join(_fmt(x and x[0], ".1f") for x in (r["load_avg_before"], r["load_avg_after"]))
        print(f"{r['style']:9s} {r['repeat']:3d} {r['wall_s']:8.1f} {_fmt(r['to_last_checkpoint_s'], '8.1f')} "
              f"{r['reward_queries']:7d} {r['samples_per_s']:9.2f} {_fmt(r['first_epoch_s'], '8.2f')} "
              f"{_fmt(r['steady_epoch_s'], '7.2f')} {r['peak_rss_mb']:7.0f} {_fmt(r['peak_tree_rss_mb'], '7.0f')} "
              f"{_fmt(r.get('peak_tree_pss_mb'), '7.0f')} {r.get('max_processes', 0):5d} "
              f"{r['torch_threads']:3d} {_fmt(r['ratio_dev_first_max'], '8.1e')} {loads:>17s}")  # fmt: skip
    s = result["summary"]
    t = s["targets"]
    print(f"cold speed-up (reference / fast wall time, medians): {_fmt(s['cold_speedup'], '.2f')}x "
          f"(target >= {t['cold_speedup_min']}; per pair {', '.join(_fmt(x, '.2f') for x in s['cold_speedup_per_pair'])}); "
          f"to the last checkpoint {_fmt(s['to_checkpoint_speedup'], '.2f')}x")  # fmt: skip
    print(f"steady epochs (all but the first): {_fmt(s['steady_speedup'], '.2f')}x (target >= "
          f"{t['steady_speedup_min']}; per pair {', '.join(_fmt(x, '.2f') for x in s['steady_speedup_per_pair'])})")  # fmt: skip
    print(f"memory fast / reference: {_fmt(s['memory_ratio'], '.2f')}x (target <= {t['rss_ratio_max']}; the process "
          f"trees' summed PSS, each shared page once); the launched process's own RSS {_fmt(s['rss_ratio'], '.2f')}x, "
          f"the trees' summed RSS {_fmt(s['tree_rss_ratio'], '.2f')}x")  # fmt: skip
    print(f"targets met: {', '.join(k for k, v in t.items() if v is True) or 'none'}; "
          f"missed: {', '.join(k for k, v in t.items() if v is False) or 'none'}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default=DEFAULT_ENV, help=f"registered env ID (default {DEFAULT_ENV})")
    p.add_argument("--algo", default="ddpo-is", help="algorithm (default ddpo-is)")
    p.add_argument("--preset", default="tiny", help="preset of the command (default tiny)")
    p.add_argument("--budget", type=int, default=1024, help="--reward-query-budget of each run (default 1024)")
    p.add_argument("--repeats", type=int, default=1, help="(reference, fast) pairs, interleaved (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="the child's thread count (OMP_NUM_THREADS, MKL_NUM_THREADS; and --threads where the CLI "
                        "has it); default 0: the child's environment is this one's")  # fmt: skip
    p.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "denoise-gym-end_to_end.json",
                   help="where the figures go (default: a file in the temp folder; the committed one is "
                        "benchmarks/results/end_to_end.json)")  # fmt: skip
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (their path is printed)")
    p.add_argument("--work-dir", type=Path, help="where the runs go (default: a new temp folder)")
    p.add_argument("--model", help="model folder for both runs (the env's model kwarg; default: the env's)")
    p.add_argument("--random-model", choices=("tiny", "micro"),
                   help="both runs on a random-weight model of this size (diffusion_env.testing): for smoke runs")  # fmt: skip
    p.add_argument("--extra", default="",
                   help="more denoise-gym train options for both runs, one string, e.g. --extra=\"--num-steps 2 "
                        "--samples-per-epoch 16\" (for smoke runs; the reference style's own values win)")  # fmt: skip
    p.add_argument("--poll-s", type=float, default=0.5, help="seconds between RSS polls of a run's processes")
    p.add_argument("--pss-every", type=int, default=10,
                   help="read PSS (a walk of the page tables, not free) every this many RSS polls (default 10)")
    args = p.parse_args(argv)
    for name in ("budget", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: expected a positive integer")
    if args.threads < 0:
        p.error(f"--threads={args.threads}: expected 0 (the child's default) or a positive integer")
    if not args.poll_s > 0:
        p.error(f"--poll-s={args.poll_s}: expected a number > 0")
    if args.pss_every < 1:
        p.error(f"--pss-every={args.pss_every}: expected a positive integer")
    if args.model and args.random_model:
        p.error("--model and --random-model: expected at most one of them")
    try:
        shlex.split(args.extra)
    except ValueError as exc:
        p.error(f"--extra={args.extra!r}: {exc}; expected options as a shell would write them")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset_config(args.preset, args.algo)  # an unknown preset fails here, before any run
    tmp_model = None
    if args.random_model:
        from diffusion_env.testing import temporary_random_model

        tmp_model, path = temporary_random_model(args.random_model, prefix="end-to-end-model-")
        args.model = str(path)
        print(f"model: random-weight {args.random_model} stand-in ({path}); speed does not depend on the weights")
    args.model = str(Path(args.model).resolve()) if args.model else None  # the children run in their own folders
    args.env_kwargs = {"model": args.model} if args.model else {}
    missing = [f for f in speed_fields() if f not in REFERENCE_STYLE]
    if missing:
        print(f"warning: REFERENCE_STYLE (benchmarks/throughput.py) does not set the speed fields {missing}; "
              "the reference runs take the preset's values for them")  # fmt: skip
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="end-to-end-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"runs in {work}; each in a fresh process with an empty compile cache; {args.repeats} (reference, fast) "
          f"pair(s) at {args.budget} reward queries", flush=True)  # fmt: skip
    machine = {**machine_info("cpu"), "load_avg_at_start": _load_avg(),
               "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               "env_threads": {v: os.environ.get(v) for v in THREAD_VARS}}  # fmt: skip
    machine.pop("torch_threads")  # this process's, not the runs' (each run records its own)
    runs = []
    try:
        for repeat in range(args.repeats):
            for style in STYLES:
                print(f"{style} run {repeat}: started", flush=True)
                run = run_once(args, style, repeat, work)
                runs.append(run)
                print(f"{style} run {repeat}: {run['wall_s']:.1f} s, {run['epochs']} epochs, "
                      f"steady epoch {_fmt(run['steady_epoch_s'], '.2f')} s, peak RSS {run['peak_rss_mb']:.0f} MB, "
                      f"{run['torch_threads']} thread(s)", flush=True)  # fmt: skip
    finally:
        if tmp_model is not None:
            tmp_model.cleanup()
        if not args.keep_runs and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_avg_at_end"] = _load_avg()
    result = {
        "machine": machine,
        "settings": {"env_id": args.env, "algo": args.algo, "preset": args.preset, "budget": args.budget,
                     "repeats": args.repeats, "threads_option": args.threads, "model": args.model or "env default",
                     "extra": args.extra, "reference_style": REFERENCE_STYLE, "compile_cache": "empty per run ("
                     + ", ".join(CACHE_VARS) + ")", "kept_runs": str(work) if args.keep_runs or args.work_dir else None},
        "runs": runs, "summary": summarise(runs),
    }  # fmt: skip
    report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}" + (f"; runs kept in {work}" if args.keep_runs or args.work_dir else ""))
    return result


if __name__ == "__main__":
    main()
