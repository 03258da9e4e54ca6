"""GPU check: random-weight SD v1.4 and SD3.5-Medium DDPO-IS epochs under bf16 and fp16 autocast on one CUDA device.

    python -m benchmarks.gpu_check [--arch sd14 sd35-medium] [--size PX] [--samples N] [--steps N] [--json PATH]

For each architecture (the published sizes of :mod:`diffusion_env.real_configs`, float32 weights, LoRA rank 4)
and each autocast dtype, a model is built on the GPU from the same seed, one epoch warms up (kernels, cuDNN
autotuning), and one epoch is timed through :func:`benchmarks.real_size.timed_epoch`. Reported per row:

- seconds per network call in sampling (no gradients, the guidance batch) and in training (forward +
  backward), and the TFLOP/s they reach (FLOPs counted as in :mod:`benchmarks.real_size`), which checks the
  40 % utilisation that benchmark's H100 projection assumes;
- the epoch's samples/s (sampling, VAE decoding, JPEG reward, training);
- the first minibatch's max |log ratio|: the policy's log-prob recomputed in the first PPO micro-batch (at the
  old parameters) minus the one recorded at sampling. In exact arithmetic it is 0; reduced precision moves it,
  and DDPO's clip range is 1e-4 (``recompute_old_log_probs`` exists for this);
- the CUDA allocator's peak memory in the epoch.

Defaults (512 px, 8 samples x 4 steps, training micro-batches of 4 pairs) take a few minutes on an H100,
mostly building models. Without a CUDA device it refuses in one line.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.real_size import DEFAULTS, H100_DENSE_BF16_FLOPS, call_flops, timed_epoch, train_config
from benchmarks.throughput import build_side, machine_info, run_epoch
from diffusion_env.real_configs import ARCHS, SCALES, build_parts

PRECISIONS = ("bf16", "fp16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", choices=ARCHS, default=["sd14", "sd35-medium"],
                   help="architectures (default: sd14 sd35-medium)")  # fmt: skip
    p.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    p.add_argument("--samples", type=int, default=8, help="samples per epoch, one sampling batch (default 8)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--micro-batch", type=int, default=4, help="(sample, timestep) pairs per training call (default 4)")
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    p.add_argument("--scale", choices=SCALES, default="real", help="real (default) or debug: tiny widths, a smoke run")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = p.parse_args(argv)
    for name in ("size", "samples", "steps", "micro_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    return args


def check(arch: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``arch`` on the GPU, warm up one epoch, time one: the row of figures."""
    t0 = time.perf_counter()
    family, network = build_parts(arch, scale=args.scale, device=args.device)
    build_s = time.perf_counter() - t0
    d = DEFAULTS[arch]
    cfg = train_config(family, size=args.size, guidance=d["guidance"], eta=d["eta"], device=args.device,
                       autocast=precision, samples=args.samples, steps=args.steps, micro_batch=args.micro_batch)  # fmt: skip
    side = build_side(cfg, f"{arch}-{precision}", network=network)
    run_epoch(side, 1, cfg.samples_per_epoch, record=False)  # warm-up
    e = timed_epoch(side, epoch=0)
    flops = call_flops(side, arch, args.scale)
    side.env.close()
    row = {
        "arch": arch, "autocast": precision, "build_s": build_s,
        "sample_call_s": e["sample_call_s"], "train_call_s": e["train_call_s"],
        "sample_call_tflops": flops["sample_call_flops"] / e["sample_call_s"] / 1e12,
        "train_call_tflops": flops["train_call_flops"] / e["train_call_s"] / 1e12,
        "samples_per_s": e["samples_per_s"], "epoch_s": e["epoch_s"], "sample_s": e["sample_s"],
        "train_s": e["train_s"], "first_abs_log_ratio": e["ratio_dev_first"], "peak_gpu_mem_gb": e["peak_mem_mb"] / 1024,
        "flops": flops, "scale": args.scale, "size": args.size,
    }  # fmt: skip
    del side, family, network, e
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def report(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'arch':12s} {'autocast':8s} {'sample call':>11s} {'train call':>10s} {'TFLOP/s s/t':>13s} "
          f"{'samples/s':>9s} {'|log ratio|':>11s} {'peak GB':>8s}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:12s} {r['autocast']:8s} failed: {r['error'][:80]}")
            continue
        print(f"{r['arch']:12s} {r['autocast']:8s} {r['sample_call_s']:10.3f}s {r['train_call_s']:9.3f}s "
              f"{r['sample_call_tflops']:6.0f}/{r['train_call_tflops']:<6.0f} {r['samples_per_s']:9.2f} "
              f"{r['first_abs_log_ratio']:11.2e} {r['peak_gpu_mem_gb']:8.1f}")  # fmt: skip
    print(f"(H100 SXM dense bf16 peak: {H100_DENSE_BF16_FLOPS / 1e12:.0f} TFLOP/s; DDPO's clip range: 1e-4)")


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_check: no CUDA device (torch.cuda.is_available() is False); expected a "
                         "machine with an NVIDIA GPU and a CUDA build of torch")  # fmt: skip
    rows = []
    for arch in args.arch:
        for precision in PRECISIONS:
            print(f"{arch}, {precision} autocast: building, warming up, timing …", flush=True)
            try:
                rows.append(check(arch, precision, args))
            except (RuntimeError, ValueError) as exc:  # out of memory, a non-finite reward …: the next row still runs
                rows.append({"arch": arch, "autocast": precision, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"  failed: {rows[-1]['error']}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    report(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(args.device), "settings": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1) + "\n")  # fmt: skip
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
