"""What DDPO-IS costs on a real-size model: one epoch (2 samples x 2 steps) on a random-weight SD3.5-Medium or SD v1.4.

    python -m benchmarks.real_size [--arch sd35-medium|sd14] [--size PX] [--full [--grad-checkpointing]]
                                   [--guidance G] [--threads N] [--dtype fp32|bf16] [--json PATH]

The model is :func:`diffusion_env.real_configs.build_parts`: the published architecture (configs cited in
:mod:`diffusion_env.real_configs`) with random weights, built in memory (no download, nothing on disk). Speed
and memory do not depend on the weights. The epoch goes through the project's own path: a ``DenoisingEnv`` on
the model family, a :class:`~agents.policy.GaussianDenoisingPolicy` (LoRA rank 4, or every parameter with
``--full``), ``collect_rollout`` and the registered ``ddpo-is`` update, run by
:func:`benchmarks.throughput.run_epoch` (DDPO's classifier-free guidance in sampling and training; one
optimizer step; training micro-batches of 2 (sample, timestep) pairs, i.e. 4 network rows with guidance).

Reported (table on stdout, all figures in ``--json``):

- parameters: the network's (trainable ones too), the text encoders' and the VAE's;
- peak RSS (``resource.getrusage(...).ru_maxrss``; on CPU also the epoch's own peak) or, on a GPU, the CUDA
  allocator's peak in the epoch;
- seconds per network call: the epoch's first sampling call (no gradients, the guidance batch of 2 x
  samples rows) and first training call (forward + backward), each replayed alone after the epoch, warm;
- the epoch's seconds (sampling incl. VAE decoding and the JPEG reward, and training) — first calls included,
  nothing warmed up;
- FLOPs of one network call of each kind, counted by ``torch.utils.flop_counter.FlopCounterMode`` on a copy of
  the network on the meta device (same config, LoRA and checkpointing, the calls' very shapes; attention
  through SDPA's math backend so its matmuls are counted), and of one VAE decode;
- a projected H100 throughput from those FLOPs: samples/s = 0.40 x 989 TFLOP/s / FLOPs per sample. 989 TFLOP/s
  is the H100 SXM's dense BF16 tensor-core peak (NVIDIA datasheet; 1,979 with sparsity); the 40 % model-FLOPs
  utilisation is an ASSUMPTION (well-tuned bf16 transformer training reaches 35-50 %), not a measurement. The
  projection is given at the epoch's step count and at ``--project-steps`` (DDPO: 50 steps on SD v1.4;
  Flow-GRPO: 10 on SD3.5), every step trained.

Memory, float32 weights (``--dtype bf16`` halves the weights): SD3.5-Medium ≈ 12.6 GB of weights (transformer
9.0 GB, CLIP-bigG 2.8 GB) plus activations; ``--full`` adds gradients and AdamW's two moments, 3 x 9.0 GB more
(≈ 40 GB; use ``--grad-checkpointing`` to keep activations small). SD v1.4 ≈ 4.3 GB, ``--full`` + 10.3 GB.
A real-size epoch is about 23 TFLOP with LoRA (SD3.5-Medium at 256 px: 2 sampling calls of 3.7 TFLOP, 2
training calls of 7.5, 2 decodes of 0.6; SD v1.4 at 512 px: 3.2, 6.9 and 2.5), and the two replayed calls add
about half of that: minutes on a CPU. Run it with the machine to itself. ``--scale debug`` runs the same layout with tiny widths in
seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from agents.config import TrainConfig
from agents.policy import add_lora
from agents.runtime import retain_freed_memory
from benchmarks.heartbeat import heartbeat
from benchmarks.throughput import build_side, machine_info, run_epoch
from diffusion_env.real_configs import ARCHS, SCALES, build_network, build_parts, build_vae, parameter_counts

H100_DENSE_BF16_FLOPS = 989e12  # H100 SXM, dense BF16 tensor-core peak (NVIDIA datasheet)
ASSUMED_MFU = 0.40  # assumed model-FLOPs utilisation for the projection (not measured)
ENV_ID = "Denoise-SD14-Incompressibility-v0"  # its reward (JPEG size) and prompts; the model is overridden
SAMPLES, STEPS, MICRO_BATCH = 2, 2, 2
# Per architecture: default image size, guidance, sampler noise (SD3.5: Flow-GRPO's SDE level 0.7; SD v1.4:
# DDIM η = 1 as DDPO) and the step count the H100 projection is also given at.
DEFAULTS = {
    "sd35-medium": dict(size=256, guidance=4.5, eta=0.7, project_steps=10),
    "sd14": dict(size=512, guidance=5.0, eta=1.0, project_steps=50),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- set-up
def train_config(family: Any, *, size: int, guidance: float, eta: float, full: bool = False,
                 grad_checkpointing: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 autocast: str | None = None, samples: int = SAMPLES, steps: int = STEPS,
                 micro_batch: int = MICRO_BATCH, lora_rank: int = 4) -> TrainConfig:  # fmt: skip
    """The epoch's TrainConfig: one DDPO-IS pass over every timestep of ``samples`` samples, one optimizer step,
    on an env whose model is the in-memory ``family`` at ``size`` x ``size`` pixels."""
    # Random weights can put a latent past the env's action bound (100) or, in fp16, make it non-finite: the
    # epoch is timed all the same (a non-finite update is skipped), so actions are not validated.
    env_kwargs = dict(model=family, height=size, width=size, dtype=dtype, prompts=["a photo of a cat"],
                      validate_actions=False)  # fmt: skip
    return TrainConfig(
        env_id=ENV_ID, env_kwargs=env_kwargs, device=device, progress=False, samples_per_epoch=samples,
        sample_batch_size=samples, train_batch_size=samples, micro_batch_size=micro_batch, num_inner_epochs=1,
        timestep_fraction=1.0, num_steps=steps, eta=eta, guidance_scale=guidance,
        lora_rank=None if full else lora_rank, gradient_checkpointing=grad_checkpointing, autocast_dtype=autocast,
        per_prompt_buffer_size=0,
    ).validate()  # fmt: skip


def calls_by_kind(side: Any) -> tuple[int, int]:
    """How many network calls the last recorded epoch made in sampling and in training."""
    training = [entry[4] for entry in side.recorder.calls]
    return training.count(False), training.count(True)


def timed_epoch(side: Any, epoch: int = 0) -> dict[str, Any]:
    """One recorded epoch (:func:`benchmarks.throughput.run_epoch`), then its first sampling and first training
    call replayed alone: seconds per call of each kind."""
    e = run_epoch(side, epoch, side.cfg.samples_per_epoch, record=True, replay_limit=1)
    n_sample, n_train = calls_by_kind(side)
    replayed = e["unet_replayed_calls"]
    e.update(sample_calls=n_sample, train_calls=n_train,
             sample_call_s=e["unet_pure_sample_s"] / max(replayed[0], 1),
             train_call_s=e["unet_pure_train_s"] / max(replayed[1], 1),
             samples_per_s=e["samples"] / e["epoch_s"])  # fmt: skip
    return e


# ---------------------------------------------------------------------------------------------- FLOPs
def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _count(fn, backward: bool, grad: bool) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(grad):
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
    return int(counter.get_total_flops())


def meta_network(arch: str, scale: str, lora_rank: int | None, lora_targets, gradient_checkpointing: bool):
    """The network on the meta device with the policy's LoRA and checkpointing: shapes only, for counting."""
    with torch.device("meta"):
        net = build_network(arch, scale)
    if lora_rank is not None:
        add_lora(net, lora_rank, lora_targets)
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return net


def call_flops(side: Any, arch: str, scale: str) -> dict[str, Any]:
    """FLOPs of the epoch's first sampling call, first training call (forward + backward) and of decoding one
    image, counted on meta-device copies at the recorded shapes; with the rows each call had."""
    cfg, family = side.cfg, side.policy.family
    net = meta_network(arch, scale, cfg.lora_rank, family.lora_targets, cfg.gradient_checkpointing)

    def forward_on_meta(*args, **kwargs):
        return net(*[_to_meta(a) for a in args], **{k: _to_meta(v) for k, v in kwargs.items()})

    out: dict[str, Any] = {}
    for kind, training in (("sample", False), ("train", True)):
        x, t, cond, backward, _, grad_mode = next(e for e in side.recorder.calls if e[4] == training)
        net.train(training)
        call = functools.partial(family.call_network, forward_on_meta, x, t, cond)
        out[f"{kind}_call_flops"] = _count(call, backward, grad_mode)
        out[f"{kind}_call_rows"] = int(x.shape[0])
    with torch.device("meta"):
        vae = build_vae(arch, scale)
    latent = torch.zeros(1, *side.env.latent_shape, device="meta")
    out["decode_flops_per_image"] = _count(lambda: vae.decode(latent).sample, False, False)
    return out


def project(flops: dict[str, Any], cfg: TrainConfig, steps: int) -> dict[str, float]:
    """FLOPs per sample of an epoch with ``steps`` steps, every one sampled (guided) and trained on, plus one
    decode; and the samples/s an H100 would reach at the assumed utilisation."""
    rows_per_item = 2 if cfg.guidance_scale != 1 else 1  # a guided call holds the unconditional rows too
    per_sample_step = flops["sample_call_flops"] / (flops["sample_call_rows"] / rows_per_item)
    per_pair = flops["train_call_flops"] / (flops["train_call_rows"] / rows_per_item)
    per_sample = steps * (per_sample_step + cfg.timestep_fraction * per_pair) + flops["decode_flops_per_image"]
    return {"steps": steps, "tflop_per_sample": per_sample / 1e12,
            "h100_samples_per_s": ASSUMED_MFU * H100_DENSE_BF16_FLOPS / per_sample}  # fmt: skip


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="sd35-medium", help="architecture (default sd35-medium)")
    p.add_argument("--scale", choices=SCALES, default="real",
                   help="real: the published sizes; debug: the same layout, tiny widths (a smoke run in seconds)")  # fmt: skip
    p.add_argument("--size", type=int, help="image size in pixels (default 256 for sd35-medium, 512 for sd14)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default 4.5 for sd35-medium, 5 for sd14)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA rank 4)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="gradient checkpointing (TrainConfig.gradient_checkpointing)")  # fmt: skip
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), help="network calls under torch.autocast (default: none)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, i.e. every core)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--project-steps", type=int,
                   help="steps of the projected epoch besides the measured one (default 10 for sd35-medium "
                   "(Flow-GRPO), 50 for sd14 (DDPO))")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = p.parse_args(argv)
    defaults = DEFAULTS[args.arch]
    args.size = args.size or defaults["size"]
    args.guidance = defaults["guidance"] if args.guidance is None else args.guidance
    args.project_steps = args.project_steps or defaults["project_steps"]
    if args.size < 8 or args.size % 8:
        p.error(f"--size={args.size}: expected a positive multiple of 8 (the VAE's factor)")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads={args.threads}: expected a positive integer")
    if args.grad_checkpointing and not args.full:
        print("note: --grad-checkpointing with LoRA (it is meant for --full; kept as asked)")
    return args


def peak_rss_mb() -> float:
    """The process's peak resident set so far (``ru_maxrss``, kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run the epoch, count and project: the result dict (see the module's docstring)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        retain_freed_memory()  # as training runs on CPU do (agents/runtime.py)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    print(f"building a random-weight {args.arch} ({args.scale} scale, {args.dtype}) on {args.device} …", flush=True)
    family, network = build_parts(args.arch, scale=args.scale, seed=args.seed, device=args.device, dtype=dtype)
    build_s, rss_built = time.perf_counter() - t0, peak_rss_mb()
    cfg = train_config(family, size=args.size, guidance=args.guidance, eta=DEFAULTS[args.arch]["eta"], full=args.full,
                       grad_checkpointing=args.grad_checkpointing, device=args.device, dtype=dtype,
                       autocast=args.autocast)  # fmt: skip
    side = build_side(cfg, "real-size", network=network)
    counts = parameter_counts(args.arch, args.scale)
    trainable = sum(p.numel() for p in side.policy.trainable_parameters())
    print(f"built in {build_s:.1f} s; one epoch: {cfg.samples_per_epoch} samples x {cfg.num_steps} steps at "
          f"{args.size}px, {'full fine-tuning' if args.full else f'LoRA rank {cfg.lora_rank}'}", flush=True)  # fmt: skip
    with heartbeat("epoch", every_s=60):
        e = timed_epoch(side)
    flops = call_flops(side, args.arch, args.scale)
    side.env.close()
    gpu = args.device.startswith("cuda")
    return {
        "machine": machine_info(args.device),
        "settings": {"arch": args.arch, "scale": args.scale, "size": args.size, "guidance": args.guidance,
                     "eta": cfg.eta, "samples": cfg.samples_per_epoch, "steps": cfg.num_steps,
                     "micro_batch_pairs": cfg.micro_batch_size, "full": args.full, "lora_rank": cfg.lora_rank,
                     "gradient_checkpointing": args.grad_checkpointing, "dtype": args.dtype, "autocast": args.autocast,
                     "latent_shape": list(side.env.latent_shape), "seed": args.seed},  # fmt: skip
        "parameters": {**counts, "trainable": trainable},
        "build_s": build_s,
        "peak_rss_mb": max(rss_built, peak_rss_mb()),
        "epoch_peak_mem_mb": e["peak_mem_mb"],
        "epoch_peak_mem_kind": "cuda max_memory_allocated" if gpu else "RSS high-water mark during the epoch",
        "epoch_s": e["epoch_s"], "sample_s": e["sample_s"], "reward_s": e["reward_s"], "train_s": e["train_s"],
        "samples_per_s": e["samples_per_s"],
        "sample_calls": e["sample_calls"], "train_calls": e["train_calls"],
        "sample_call_s": e["sample_call_s"], "train_call_s": e["train_call_s"],
        "ratio_dev_first": e["ratio_dev_first"],
        "flops": flops,
        "projection": {"assumption": f"H100 SXM dense bf16 {H100_DENSE_BF16_FLOPS / 1e12:.0f} TFLOP/s at an "
                                     f"assumed {ASSUMED_MFU:.0%} MFU (not measured)",
                       "measured_steps": project(flops, cfg, cfg.num_steps),
                       "reference_steps": project(flops, cfg, args.project_steps)},  # fmt: skip
    }  # fmt: skip


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.1f}k"


def report(r: dict[str, Any]) -> None:
    s, f = r["settings"], r["flops"]
    mode = "full" + (" +ckpt" if s["gradient_checkpointing"] else "") if s["full"] else f"LoRA r{s['lora_rank']}"
    print(f"\n{s['arch']} ({s['scale']}), {s['size']}px, {s['samples']} samples x {s['steps']} steps, {mode}, "
          f"{s['dtype']}{', autocast ' + s['autocast'] if s['autocast'] else ''}")  # fmt: skip
    rows = [("parameters", ", ".join(f"{k} {_millions(v)}" for k, v in r["parameters"].items())),
            ("peak RSS", f"{r['peak_rss_mb']:,.0f} MB (epoch: {r['epoch_peak_mem_mb']:,.0f} MB, {r['epoch_peak_mem_kind']})"),
            ("build", f"{r['build_s']:.1f} s"),
            ("sampling call", f"{r['sample_call_s']:.3f} s ({f['sample_call_rows']} rows, no grad; "
                              f"{f['sample_call_flops'] / 1e12:.3f} TFLOP)"),
            ("training call", f"{r['train_call_s']:.3f} s ({f['train_call_rows']} rows, fwd+bwd; "
                              f"{f['train_call_flops'] / 1e12:.3f} TFLOP)"),
            ("VAE decode", f"{f['decode_flops_per_image'] / 1e12:.3f} TFLOP per image"),
            ("epoch", f"{r['epoch_s']:.2f} s (sample {r['sample_s']:.2f}, reward {r['reward_s']:.2f}, train "
                      f"{r['train_s']:.2f}; {r['sample_calls']} sampling + {r['train_calls']} training calls)"),
            ("first |log ratio|", f"{r['ratio_dev_first']:.2e}")]  # fmt: skip
    for name, key in (("H100 projection", "measured_steps"), ("H100 projection", "reference_steps")):
        p = r["projection"][key]
        rows.append((name, f"{p['h100_samples_per_s']:.2f} samples/s at {p['steps']} steps "
                           f"({p['tflop_per_sample']:.2f} TFLOP per sample)"))  # fmt: skip
    width = max(len(n) for n, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  ({r['projection']['assumption']})")


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
