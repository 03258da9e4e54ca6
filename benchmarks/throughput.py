"""Throughput of one full DDPO-IS epoch — sampling, reward, training — and how far it is from its limit.

    python -m benchmarks.throughput [--env ID] [--preset NAME] [--baseline] [--json PATH]

What is measured, in one process:

- **The optimised epoch**: the library's own path (``collect_rollout`` over ``sample_batch_size``
  lockstep trajectories, then the registered ``ddpo-is`` update on flattened (sample, timestep)
  micro-batches) with the speed settings of the preset, those a ``denoise-gym train --preset`` run takes
  (``micro_batch_size``, ``channels_last``, ``compile_network``, ``attention``, threads; each can be
  changed with ``--micro-batch``, ``--channels-last``, ``--compile``, ``--attention``, ``--threads``, and
  bf16 autocast with recomputed old log-probs turned on with ``--bf16``). Both sides use the fused AdamW of ``make_optimizer`` and,
  on CPU, keep freed memory in the process (``--retain-freed-memory``), as training runs do. This is one
  process's epoch: a CPU run with idle cores forks data-parallel processes, each doing its share of it
  on one thread (TrainConfig.processes); ``benchmarks.end_to_end`` times that, the whole command.
- **The baseline epoch** (``--baseline``): the same epoch with every speed-up off, in the style of the
  reference implementations (TRL's DDPOTrainer, ddpo-pytorch): eager fp32, sampling in batches of 16
  with a Python loop over steps, training in batches of 16 samples with one forward/backward call per
  timestep (each sample at its own shuffled timestep) and one optimizer step per batch. Same
  algorithm, same number of optimizer steps; only the implementation differs. Baseline and
  optimised epochs are interleaved (B, O, B, O, …) so that load from other jobs hits both alike.
- **Pure UNet compute**: every UNet call of a timed epoch is recorded (inputs cloned) and replayed
  alone afterwards on the same inputs, with the same settings (autocast, memory format, compiled or
  not): forwards without gradients for sampling, forward + backward for training.
  ``ratio_to_unet = epoch time / pure UNet time`` says how far the implementation is from its limit.
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` on the eager UNet at each recorded call
  shape (matmuls, convolutions and attention; element-wise work is not counted), giving GFLOP/s
  achieved in the pure UNet time and over the whole epoch, against the machine's fp32 and bf16
  matmul peaks measured in the same run (a square matmul timed).
- **Memory**: peak RSS during each epoch on CPU (the kernel's high-water mark, reset before the epoch),
  ``torch.cuda.max_memory_allocated`` on GPU.

Compile time (``--compile``) is paid in the warm-up epoch; timed epochs exclude it, and it is reported
as ``compile_s`` (warm-up epoch time minus the median timed epoch). Figures go to stdout and, with
``--json``, to a file (the committed one is ``benchmarks/results/throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import diffusion_env  # noqa: F401  (registers the Denoise-* IDs)
from agents.config import ATTENTION_IMPLS, preset_config
from agents.core import (
    PerPromptStatTracker,
    RolloutBuffer,
    clipped_surrogate,
    collect_rollout,
    concat_rollouts,
    make_optimizer,
    optimizer_step,
)
from agents.policy import GaussianDenoisingPolicy
from agents.registry import get_algo
from agents.runtime import retain_freed_memory, set_threads
from agents.trainer import derive_seed, make_env
from benchmarks.heartbeat import heartbeat
from diffusion_env.models import TINY_MODEL_PATH

DEFAULT_ENV = "Denoise-Tiny-Compressibility-v0"
TARGETS = {"speedup_min": 1.5, "ratio_to_unet_max": 1.10}
# The reference style (TRL's DDPOTrainer, ddpo-pytorch) as TrainConfig values: eager fp32, sample and train
# batches of 16, SDPA attention, contiguous memory, nothing compiled or recomputed. Training calls of 16 pairs:
# the shape of ``reference_update``'s call per timestep (16 samples at one timestep each), which ignores
# micro_batch_size; through the library's own update (a ``denoise-gym train`` run, benchmarks/end_to_end.py)
# the same setting makes one forward/backward per 16 (sample, timestep) pairs. Every "Speed:" field of
# TrainConfig is set here (tests/test_end_to_end_bench.py checks it).
REFERENCE_STYLE: dict[str, Any] = dict(
    sample_batch_size=16, train_batch_size=16, micro_batch_size=16, channels_last=False, autocast_dtype=None,
    compile_network=False, recompute_old_log_probs=False, attention="sdpa", threads=0, processes=1,
)  # fmt: skip
# threads=0: the reference takes the same automatic thread count as the fast side (the idle cores; the whole
# machine when nothing else runs, as torch's own default), so that the comparison is of implementations.
# processes=1: one process, as TRL's DDPOTrainer and ddpo-pytorch run without a launcher.
# --bf16 auto: bf16 only where the hardware multiplies in bf16 this many times faster than in fp32. With
# less (AVX512-BF16 without AMX: 2.3x on an AMD EPYC) bf16 autocast was slower than fp32 for the tiny UNet
# (measured with the fused SDPA attention, whose bf16 CPU backward is slow in itself); with AMX (6-7x on a
# Xeon) and math attention it was 1.2x faster than fp32 per epoch.
BF16_AUTO_MIN_GAIN = 3.0


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_bf16": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")),
        "torch": torch.__version__, "python": platform.python_version(), "device": device,
    }  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def use_bf16(option: str, fp32_gflops: float, bf16_gflops: float) -> bool:
    """``--bf16``: "on", "off", or "auto" = on where bf16 matmuls ran >= BF16_AUTO_MIN_GAIN x fp32's."""
    if option not in ("auto", "on", "off"):
        raise ValueError(f"bf16 option {option!r}; expected 'auto', 'on' or 'off'")
    return option == "on" or (option == "auto" and bf16_gflops >= BF16_AUTO_MIN_GAIN * fp32_gflops)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of an ``n × n`` matmul in ``dtype`` (best of repeated timed calls)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    a @ b
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class PeakMemory:
    """Peak memory (MB) while the block runs: the CUDA allocator's peak on GPU; on CPU the kernel's peak
    RSS (``VmHWM``), reset at entry through ``/proc/self/clear_refs``.

    Where that reset is not available, RSS is sampled every 5 ms by a thread instead. That thread is the
    last resort: on a 2-core machine its wake-ups take a core from torch's threads 200 times a second and
    slowed the very epoch being timed (measured as part of the gap between the epoch and its UNet time).
    """

    def __init__(self, device: str):
        self.device, self.peak_mb, self._stop, self._thread = device, 0.0, threading.Event(), None

    @staticmethod
    def _status_mb(key: str) -> float | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    @classmethod
    def rss_mb(cls) -> float:
        rss = cls._status_mb("VmRSS")
        if rss is not None:
            return rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def _reset_peak_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # Linux >= 4.0: resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not (self._reset_peak_rss() and self._status_mb("VmHWM") is not None):
            self.peak_mb = self.rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is None:
            self.peak_mb = self._status_mb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


class TimedReward:
    """Wraps the env's reward function and adds up the seconds spent in it."""

    def __init__(self, fn, device: str):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, images, prompts):
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(images, prompts)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def __repr__(self) -> str:
        return repr(self.fn)


class UNetRecorder:
    """Records the inputs of every ``policy.forward_network`` call while ``on``; replays them alone."""

    def __init__(self, policy: GaussianDenoisingPolicy):
        self.policy, self.calls, self.on = policy, [], False
        self._call = policy.forward_network
        policy.forward_network = self  # instance attribute: the policy's network calls now go through the recorder

    def __call__(self, x, t, cond):
        if self.on:
            # The module's train/eval flag too: a compiled UNet guards on it (replaying in the other
            # mode would recompile inside the timing).
            # ``grad`` is set only once a backward pass actually reaches this call's output: a call made
            # with autograd on whose output is detached (e.g. old log-probs recomputed in training
            # precision) is a forward-only call, and replaying it with a backward would overstate the
            # pure UNet time.
            # And the grad mode: a forward with autograd on runs another (compiled) graph than one without.
            entry = [x.detach().clone(), t.clone(), {k: v.detach().clone() for k, v in cond.items()}, False,
                     self.policy.network.training,
                     torch.is_grad_enabled()]  # fmt: skip
            self.calls.append(entry)
            out = self._call(x, t, cond)
            if out.requires_grad:
                def mark_backward(grad, entry=entry):
                    entry[3] = True
                    return grad

                out.register_hook(mark_backward)
            return out
        return self._call(x, t, cond)

    def replay(self, limit: int | None = None) -> tuple[float, float]:
        """Seconds of the recorded calls run alone, each in its grad mode, backward where one ran:
        ``(sampling calls, training calls)`` (calls made in the module's eval / train mode).

        ``limit``: replay only the first ``limit`` calls of each kind (per-call times of a large model); how
        many of each were replayed is left in :attr:`replayed`."""
        device = str(self.policy.device)
        seconds, was_training = [0.0, 0.0], self.policy.network.training
        counts = [0, 0]
        for x, t, cond, backward, training, grad_mode in self.calls:
            if limit is not None and counts[training] >= limit:
                continue
            counts[training] += 1
            self.policy.network.train(training)
            _sync(device)
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad_mode):
                out = self._call(x, t, cond)
                if backward:
                    out.backward(torch.ones_like(out))
            _sync(device)
            seconds[training] += time.perf_counter() - t0
        self.policy.network.train(was_training)
        for p in self.policy.network.parameters():
            p.grad = None
        self.replayed = (counts[0], counts[1])
        return seconds[0], seconds[1]

    def flops(self) -> int:
        """FLOPs of the recorded calls (counted on the eager UNet, per distinct shape, scaled by batch).

        Counted with diffusers' math attention whatever kernels ran: the counter sees its matmuls but
        has no formula for torch's CPU flash-attention ops, which would leave attention out.
        """
        from diffusers.models.attention_processor import AttnProcessor
        from torch.utils.flop_counter import FlopCounterMode

        unet, family, per_row, total = self.policy.network, self.policy.family, {}, 0
        processors = unet.attn_processors
        unet.set_attn_processor(AttnProcessor())
        for x, t, cond, grad, *_ in self.calls:
            key = (tuple(x.shape[1:]), tuple(tuple(v.shape[1:]) for v in cond.values()), grad)
            if key not in per_row:
                rows = min(4, x.shape[0])
                counter = FlopCounterMode(display=False)
                with counter, torch.set_grad_enabled(grad):
                    out = family.call_network(unet, x[:rows], t[:rows], {k: v[:rows] for k, v in cond.items()})
                    if grad:
                        out.backward(torch.ones_like(out))
                per_row[key] = counter.get_total_flops() / rows
            total += per_row[key] * x.shape[0]
        unet.set_attn_processor(processors)
        for p in unet.parameters():
            p.grad = None
        return int(total)


# ---------------------------------------------------------------------------------------------- epochs
def reference_update(
    policy, optimizer, rollout, advantages, cfg, generator, tracker=None
) -> dict[str, float]:
    """DDPO-IS trained the way the reference implementations do it (the baseline's update).

    For each batch of ``train_batch_size`` samples: every sample's timesteps in its own random order;
    for each position j one forward/backward call over the batch (sample i at its j-th timestep), the
    loss divided by the number of timesteps (gradient accumulation); then one optimizer step.
    """
    B, S = rollout.num_samples, rollout.num_steps
    device = rollout.latents.device
    first_dev = None
    policy.train()
    buffer = RolloutBuffer(rollout, advantages, B)
    order = torch.randperm(B, generator=generator)
    for start in range(0, B, cfg.train_batch_size):
        idx = order[start : start + cfg.train_batch_size]
        perms = torch.stack([torch.randperm(S, generator=generator) for _ in range(len(idx))])
        for j in range(S):
            sample_idx, step_idx = idx.to(device), perms[:, j].to(device)
            batch = buffer.pairs(sample_idx, step_idx, advantages[sample_idx], len(idx) * S)
            log_ratio = policy.log_prob(batch.obs, batch.actions) - batch.old_log_probs
            (clipped_surrogate(log_ratio, batch.advantages, cfg.clip_range).mean() / S).backward()
            if first_dev is None:
                first_dev = log_ratio.detach().abs().max()
        optimizer_step(policy, optimizer, cfg.max_grad_norm)
    policy.eval()
    return {"losses/ratio_dev_first": float(first_dev)}


def build_side(cfg, name: str, network: torch.nn.Module | None = None) -> SimpleNamespace:
    """Env, policy, optimizer and stat tracker of one side of the comparison (``network``: the policy's network
    when the env's model family was built in memory and cannot load it)."""
    env = make_env(cfg)
    policy = GaussianDenoisingPolicy.from_env(env, network=network, **cfg.policy_kwargs())
    policy.eval()
    reward = TimedReward(env.reward_fn, cfg.device)
    env.reward_fn = reward
    return SimpleNamespace(
        name=name, cfg=cfg, env=env, policy=policy, reward=reward, recorder=UNetRecorder(policy),
        optimizer=make_optimizer(policy.trainable_parameters(), cfg),
        tracker=PerPromptStatTracker(cfg.per_prompt_buffer_size, cfg.per_prompt_min_count),
        update=reference_update if name == "baseline" else get_algo(cfg.algo), epochs=[],
    )  # fmt: skip


def _page_faults() -> int | None:
    """Minor page faults of this process so far (fresh pages the kernel had to map and zero)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_epoch(side: SimpleNamespace, epoch: int, num_samples: int, record: bool,
              replay_limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One epoch of ``num_samples`` samples: collect (sampling + reward), normalise, update. With ``record`` the
    epoch's network calls are then replayed alone (the first ``replay_limit`` of each kind, or all)."""
    cfg, device = side.cfg, side.cfg.device
    side.reward.seconds = 0.0
    side.recorder.calls, side.recorder.on = [], record
    faults0 = _page_faults()
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        parts = []
        for b in range(num_samples // cfg.sample_batch_size):
            gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, epoch, b, 1))
            parts.append(
                collect_rollout(side.env, side.policy, derive_seed(cfg.seed, epoch, b, 0) % 2**31, gen)
            )
        rollout = concat_rollouts(parts)
        _sync(device)
        t1 = time.perf_counter()
        adv = side.tracker.update(rollout.prompts, rollout.rewards).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 2))
        metrics = side.update(side.policy, side.optimizer, rollout, adv, cfg, gen, side.tracker)
        _sync(device)
        t2 = time.perf_counter()
    side.recorder.on = False
    out = {
        "epoch_s": t2 - t0, "sample_s": t1 - t0 - side.reward.seconds, "reward_s": side.reward.seconds,
        "train_s": t2 - t1, "peak_mem_mb": mem.peak_mb, "samples": rollout.num_samples,
        "page_faults": None if faults0 is None else _page_faults() - faults0,
        "ratio_dev_first": metrics.get("losses/ratio_dev_first"),
        "old_log_prob_dev": metrics.get("losses/old_log_prob_dev"),
        "reward_mean": float(rollout.rewards.mean()),
    }  # fmt: skip
    if record:
        out["unet_calls"] = len(side.recorder.calls)
        out["unet_pure_sample_s"], out["unet_pure_train_s"] = side.recorder.replay(replay_limit)
        out["unet_replayed_calls"] = list(side.recorder.replayed)
        out["unet_pure_s"] = out["unet_pure_sample_s"] + out["unet_pure_train_s"]
        out["ratio_to_unet"] = out["epoch_s"] / out["unet_pure_s"]
    return out


def summarise(side: SimpleNamespace, flops: int, peaks: dict[str, float]) -> dict[str, Any]:
    timed = side.epochs
    med = {k: statistics.median(e[k] for e in timed) for k in ("epoch_s", "sample_s", "reward_s", "train_s",
           "unet_pure_s", "unet_pure_sample_s", "unet_pure_train_s", "ratio_to_unet")}  # fmt: skip
    cfg = side.cfg
    out = {
        "config": {
            k: getattr(cfg, k)
            for k in (
                "sample_batch_size",
                "train_batch_size",
                "micro_batch_size",
                "channels_last",
                "autocast_dtype",
                "compile_network",
                "recompute_old_log_probs",
                "attention",
            )
        },  # fmt: skip
        **{f"{k}": v for k, v in med.items()},
        "samples_per_s": timed[0]["samples"] / med["epoch_s"],
        "split": {k: med[f"{k}_s"] / med["epoch_s"] for k in ("sample", "reward", "train")},
        "peak_mem_mb": max(e["peak_mem_mb"] for e in timed),
        "unet_calls": timed[0]["unet_calls"],
        "unet_gflop_per_epoch": flops / 1e9,
        "gflops_in_pure_unet": flops / 1e9 / med["unet_pure_s"],
        "gflops_over_epoch": flops / 1e9 / med["epoch_s"],
        "ratio_dev_first": [e["ratio_dev_first"] for e in timed],
        "old_log_prob_dev": [e["old_log_prob_dev"] for e in timed],
        "epochs": timed,
    }
    peak = peaks["bf16_gflops"] if cfg.autocast_dtype == "bf16" else peaks["fp32_gflops"]
    out["fraction_of_matmul_peak"] = out["gflops_in_pure_unet"] / peak
    return out


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default=DEFAULT_ENV, help=f"registered env ID (default {DEFAULT_ENV})")
    p.add_argument("--preset", default="tiny", help="agents.config preset for ddpo-is (default tiny)")
    p.add_argument("--baseline", action="store_true", help="also run the reference-style baseline epoch")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument(
        "--model", help="model folder (default: the env's; a random tiny model if that is missing)"
    )
    p.add_argument("--random-model", choices=("tiny", "micro"),
                   help="use a random-weight model of this size (diffusion_env.testing) instead")  # fmt: skip
    p.add_argument("--samples", type=int, default=64, help="samples per epoch (default 64)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the env's, 20 for Denoise-Tiny-*)")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed epochs per side (default 2; median reported)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        help="optimised side's (sample, timestep) pairs per training call (default: the preset's, what "
        "denoise-gym train uses; 32 in the tiny presets)",
    )
    p.add_argument(
        "--bf16", nargs="?", const="on", default="off", choices=("auto", "on", "off"),
        help="optimised side under bf16 autocast, old log-probs recomputed in training precision "
        "(default off: the epoch stays exact fp32; bf16 log-ratios after one step are within 2%% of "
        "fp32's at the tiny preset's lr 3e-4 but as large as the signal at DDPO's 1e-5, see python -m "
        "benchmarks.precision). auto: on where this run measures bf16 matmuls at >= "
        f"{BF16_AUTO_MIN_GAIN:g}x the fp32 peak (AMX CPUs, tensor-core GPUs); --bf16 alone: on",
    )  # fmt: skip
    p.add_argument(
        "--attention", choices=ATTENTION_IMPLS,
        help="optimised side's attention kernels (agents.policy.GaussianDenoisingPolicy; default: the preset's, "
        "sdpa; math was no faster for the tiny model in fp32 on an AMD EPYC, faster with an Intel Xeon's AMX)",
    )  # fmt: skip
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction,
        help="optimised side in channels_last memory format (default: the preset's, off)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction,
        help="optimised side through torch.compile (default: the preset's, off; one to two and a half minutes "
        "of warm-up on a 2-core CPU, excluded from the timed epochs and reported as compile_s)",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for both sides (default 0: as a training run chooses them, the cores "
        "not busy with other jobs; agents/runtime.py)",
    )
    p.add_argument(
        "--retain-freed-memory", action=argparse.BooleanOptionalAction, default=True,
        help="on CPU, keep freed memory in the process for both sides (agents.runtime; default on): "
        "without it glibc faults every training micro-batch's activations in afresh",
    )  # fmt: skip
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="smoke run: random micro model, 16 samples x 4 steps, 1 repeat, small peak matmul, no compile")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.random_model = args.random_model or "micro"
        args.samples, args.steps, args.repeats, args.peak_n = 16, args.steps or 4, 1, 512
        args.compile = False  # a smoke run: no minute of compilation
    for name in ("samples", "repeats", "peak_n", "micro_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.threads < 0:
        p.error(f"--threads={args.threads}: expected 0 (the idle cores) or a positive integer")
    if args.samples % 16:
        p.error(f"--samples={args.samples}: expected a multiple of 16 (the baseline's batch size)")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)  # as the trainer does (TrainConfig.threads)
    # Both sides alike: freed activations are reused instead of faulted in afresh (agents/runtime.py).
    retained = retain_freed_memory() if args.device == "cpu" and args.retain_freed_memory else None
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tmp = None
    model, model_kind = args.model, "given"
    if args.random_model or (
        model is None and not (TINY_MODEL_PATH / "unet").exists() and "Tiny" in args.env
    ):
        from diffusion_env.testing import temporary_random_model

        size = args.random_model or "tiny"
        tmp, path = temporary_random_model(size, prefix="throughput-model-")
        model, model_kind = str(path), f"random-{size}"
        print(f"model: random-weight {size} stand-in ({model}); speed does not depend on the weights")
    elif model is None:
        model_kind = "shipped tiny model" if "Tiny" in args.env else "env default"
    env_kwargs = {"model": model} if model else {}

    # 1. Matmul peaks (they also decide --bf16 auto).
    peaks = {"matmul_n": args.peak_n,
             "fp32_gflops": matmul_peak_gflops(torch.float32, args.device, args.peak_n),
             "bf16_gflops": matmul_peak_gflops(torch.bfloat16, args.device, args.peak_n)}  # fmt: skip
    print(
        f"matmul peaks (n={args.peak_n}): fp32 {peaks['fp32_gflops']:.1f} GFLOP/s, bf16 {peaks['bf16_gflops']:.1f} GFLOP/s"
    )
    bf16_gain = peaks["bf16_gflops"] / peaks["fp32_gflops"]
    bf16 = use_bf16(args.bf16, peaks["fp32_gflops"], peaks["bf16_gflops"])
    preset = preset_config(args.preset, "ddpo-is", env_id=args.env)
    attention = args.attention or preset.attention
    choice = {"bf16": bf16, "bf16_option": args.bf16, "bf16_matmul_gain": bf16_gain,
              "bf16_auto_min_gain": BF16_AUTO_MIN_GAIN, "attention": attention}  # fmt: skip
    print(f"optimised side: {'bf16 autocast' if bf16 else 'fp32'} (--bf16 {args.bf16}; bf16 matmuls "
          f"{bf16_gain:.1f}x fp32 here), {attention} attention")  # fmt: skip

    common = dict(env_id=args.env, env_kwargs=env_kwargs, device=args.device, progress=False,
                  samples_per_epoch=args.samples, num_steps=args.steps)  # fmt: skip
    # The epoch, whatever the preset trains with: one PPO pass over every timestep in optimizer
    # steps of 16 samples, so both sides do the same work and the same number of optimizer steps.
    common.update(train_batch_size=16, num_inner_epochs=1, timestep_fraction=1.0)
    opt_cfg = preset_config(args.preset, "ddpo-is", **common).replace(
        sample_batch_size=min(args.samples, preset.sample_batch_size),
        micro_batch_size=args.micro_batch or preset.micro_batch_size, attention=attention,
        channels_last=preset.channels_last if args.channels_last is None else args.channels_last,
        compile_network=preset.compile_network if args.compile is None else args.compile,
        autocast_dtype="bf16" if bf16 else None, recompute_old_log_probs=bf16,
    ).validate()  # fmt: skip
    sides = [build_side(opt_cfg, "optimised")]
    if args.baseline:
        base_cfg = preset_config(args.preset, "ddpo-is", **common).replace(**REFERENCE_STYLE).validate()
        sides.insert(0, build_side(base_cfg, "baseline"))
    env = sides[-1].env
    settings = {"env_id": args.env, "model": model or "env default", "model_kind": model_kind,
                "unet_params_m": sum(p.numel() for p in sides[-1].policy.network.parameters()) / 1e6,
                "samples_per_epoch": args.samples, "num_steps": env.num_steps, "guidance_scale": env.guidance_scale,
                "preset": args.preset, "algo": "ddpo-is", "timestep_fraction": opt_cfg.timestep_fraction,
                "num_inner_epochs": opt_cfg.num_inner_epochs, "lora_rank": opt_cfg.lora_rank,
                "repeats": args.repeats, "optimised_choice": choice}  # fmt: skip
    print(json.dumps(settings))

    # 2. Warm-up: a full optimised epoch (compiles every shape); a one-batch baseline epoch.
    warm = {}
    for side in sides:
        n = args.samples if side.name == "optimised" else side.cfg.sample_batch_size
        compiling = side.name == "optimised" and side.cfg.compile_network
        print(f"warm-up {side.name}: one epoch of {n} samples"
              + (" (torch.compile compiles every batch shape: a minute or two)" if compiling else ""), flush=True)  # fmt: skip
        t0 = time.perf_counter()
        with heartbeat(f"warm-up {side.name}"):  # untimed: a line every 15 s, so a long compile is visibly alive
            run_epoch(side, 10_000, n, record=False)
        warm[side.name] = time.perf_counter() - t0
        print(f"warm-up {side.name}: {warm[side.name]:.1f} s ({n} samples)")

    # 3. Timed epochs, interleaved, each replayed alone afterwards.
    print(f"timed: {args.repeats} round(s) x {len(sides)} side(s), each epoch then replayed as pure UNet calls "
          "(the 'pure UNet' times)", flush=True)  # fmt: skip
    for r in range(args.repeats):
        for side in sides:
            e = run_epoch(side, r, args.samples, record=True)
            side.epochs.append(e)
            print(f"{side.name:9s} epoch {r}: {e['epoch_s']:.2f} s (sample {e['sample_s']:.2f}, reward "
                  f"{e['reward_s']:.3f}, train {e['train_s']:.2f}); pure UNet {e['unet_pure_s']:.2f} s "
                  f"(sample {e['unet_pure_sample_s']:.2f}, train {e['unet_pure_train_s']:.2f}) "
                  f"-> ratio {e['ratio_to_unet']:.3f}; peak {e['peak_mem_mb']:.0f} MB; "
                  f"{e['page_faults']} page faults")  # fmt: skip

    # 4. Peaks again (the machine is shared: keep the better of the two measurements), FLOPs, summary.
    for key, dtype in (("fp32_gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        again = matmul_peak_gflops(dtype, args.device, args.peak_n)
        peaks[f"{key}_start_end"] = [peaks[key], again]
        peaks[key] = max(peaks[key], again)
    result: dict[str, Any] = {"machine": machine_info(args.device), "settings": settings, "peaks": peaks}
    for side in sides:
        result[side.name] = summarise(side, side.recorder.flops(), peaks)
    opt = result["optimised"]
    if opt_cfg.compile_network:
        opt["compile_s"] = warm["optimised"] - opt["epoch_s"]
        opt["compile_note"] = "warm-up epoch minus median timed epoch; excluded from epoch_s"
    checks = {"ratio_to_unet_ok": opt["ratio_to_unet"] <= TARGETS["ratio_to_unet_max"]}
    if args.baseline:
        result["speedup"] = result["baseline"]["epoch_s"] / opt["epoch_s"]
        result["speedup_per_repeat"] = [b["epoch_s"] / o["epoch_s"] for b, o in
                                        zip(result["baseline"]["epochs"], opt["epochs"])]  # fmt: skip
        result["unet_compute_speedup"] = result["baseline"]["unet_pure_s"] / opt["unet_pure_s"]
        checks["speedup_ok"] = result["speedup"] >= TARGETS["speedup_min"]
    result["targets"] = {**TARGETS, **checks}
    result["machine"]["malloc_retains_freed_memory"] = retained
    result["machine"]["load_avg_1min_at_start"] = load_at_start
    result["machine"]["load_avg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
        print(f"wrote {args.json}")
    for side in sides:
        side.env.close()
    if tmp is not None:
        tmp.cleanup()
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return repr(obj)


def report(result: dict[str, Any]) -> None:
    peaks = result["peaks"]
    print(f"\n{'side':10s} {'epoch s':>8s} {'samples/s':>9s} {'sample':>7s} {'reward':>7s} {'train':>7s} "
          f"{'UNet s':>7s} {'ratio':>6s} {'GFLOP/s':>8s} {'of peak':>7s} {'peak MB':>8s}")  # fmt: skip
    for name in ("baseline", "optimised"):
        if name not in result:
            continue
        s = result[name]
        print(f"{name:10s} {s['epoch_s']:8.2f} {s['samples_per_s']:9.2f} {s['split']['sample']:7.1%} "
              f"{s['split']['reward']:7.1%} {s['split']['train']:7.1%} {s['unet_pure_s']:7.2f} "
              f"{s['ratio_to_unet']:6.3f} {s['gflops_in_pure_unet']:8.1f} {s['fraction_of_matmul_peak']:7.1%} "
              f"{s['peak_mem_mb']:8.0f}")  # fmt: skip
    print(f"matmul peaks: fp32 {peaks['fp32_gflops']:.1f}, bf16 {peaks['bf16_gflops']:.1f} GFLOP/s")
    if "speedup" in result:
        print(f"speed-up (baseline / optimised epoch): {result['speedup']:.2f}x "
              f"(per repeat {', '.join(f'{x:.2f}' for x in result['speedup_per_repeat'])}); "
              f"UNet compute alone {result['unet_compute_speedup']:.2f}x")  # fmt: skip
    opt = result["optimised"]
    print(f"first-minibatch |log ratio| max: {opt['ratio_dev_first']} (clip range 1e-4); "
          f"recomputed old log-prob deviation: {opt['old_log_prob_dev']}")  # fmt: skip
    if "compile_s" in opt:
        print(f"compile: {opt['compile_s']:.1f} s ({opt['compile_note']})")
    print("targets:", json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
