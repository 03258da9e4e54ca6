"""Reference runs that pin the training behaviour across refactors (issue 12: the model seam).

For every registered ``Denoise-*`` ID and for DDPO-IS, DDPO-SF, RWR and RWR-sparse, a short seeded run
on the CPU in fp32 (one torch thread) records every epoch's metrics (timings left out) and a sha256 of
every trained tensor of the final checkpoint. The JSON beside this file was written by the commit that
precedes the refactor:

    .venv/bin/python tests/reference/seam_reference.py --write tests/reference/seam_reference.json

``tests/test_seam_reference.py`` reruns the same runs with the current code and compares. SD14 IDs run
on the tiny random SD-layout model of :func:`diffusion_env.testing.build_tiny_sd` (their own settings
otherwise), with a tiny random CLIP for the aesthetic reward and a local describe-server for prompt
alignment, as ``tests/test_registered_ids.py`` does.

RWR's paper weighting and CFG training are newer than the reference; the RWR rows therefore run
with the options that keep the old behaviour (``LEGACY``), applied only where the config has them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ (test_rewards_aesthetic's tiny CLIP)

ALGOS = ("ddpo-is", "ddpo-sf", "rwr", "rwr-sparse")
# Options that select the pre-refactor behaviour of an algorithm (fields that exist only after it).
LEGACY = {"rwr": {"rwr_weighting": "advantage", "rwr_cfg_training": False},
          "rwr-sparse": {"rwr_cfg_training": False}}  # fmt: skip


def run_config(env_id: str, algo: str, run_dir: Path, tiny_sd: Path, vlm_url: str) -> dict:
    """The TrainConfig fields of one reference run."""
    from rewards.alignment import MINILM

    # The reference decoded 64 images per VAE call (its default; decoding one at a time became the default
    # later, for batch-size-independent float rewards): pinned, as LEGACY pins RWR's old options.
    env_kwargs: dict = dict(decode_batch_size=64)
    if env_id.startswith("Denoise-SD14-"):
        env_kwargs.update(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog", "a red circle"])
        if "Aesthetic" in env_id:
            from test_rewards_aesthetic import random_head, tiny_clip

            env_kwargs["reward_kwargs"] = dict(clip_model=tiny_clip(768), head=random_head(768))
        if "PromptAlignment" in env_id:
            env_kwargs["reward_kwargs"] = dict(base_url=vlm_url, model="tiny-vlm", api_key="", bertscore_model=MINILM)
    cfg = dict(
        env_id=env_id, algo=algo, seed=7, num_epochs=2, samples_per_epoch=8, sample_batch_size=4,
        samples_per_prompt=2, train_batch_size=4, micro_batch_size=3, num_steps=3, learning_rate=1e-3,
        per_prompt_buffer_size=8, per_prompt_min_count=2, rwr_updates_per_epoch=2, num_eval_prompts=2,
        env_kwargs=env_kwargs, run_dir=str(run_dir), progress=False,
        lora_rank=4 if env_id.startswith("Denoise-SD14-") else None,
    )  # fmt: skip
    if algo == "ddpo-is":
        cfg.update(num_inner_epochs=2, timestep_fraction=0.67, clip_range=1e-3)
    return cfg


def weights_digest(run_dir: Path) -> dict[str, str]:
    """sha256 of every tensor of the run's latest checkpoint (name → hex digest of its raw bytes)."""
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints"
    weights = load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "weights.safetensors"))
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(weights.items())}


# Metrics logged since the reference was written (agents/diagnostics.py): measured, never fed back into training.
LATER_METRICS = ("charts/samples_per_s", "charts/kl_ref", "charts/diversity", "charts/fidelity",
                 "charts/reward_hacking", "charts/learning_rate")


def clean_metrics(history: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures and without the metrics added after the reference."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/") and k not in LATER_METRICS}
            for row in history]  # fmt: skip


def run_one(env_id: str, algo: str, tiny_sd: Path, vlm_url: str) -> dict:
    from agents.config import TrainConfig
    from agents.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="seam-ref-") as tmp:
        run_dir = Path(tmp) / "run"
        fields = run_config(env_id, algo, run_dir, tiny_sd, vlm_url)
        fields.update(LEGACY.get(algo, {}))
        # Fields of another algorithm were set but unused before the algorithm API, and are refused since then.
        names = set(TrainConfig.__dataclass_fields__) | set(TrainConfig(algo=algo).algo_field_names())
        fields = {k: v for k, v in fields.items() if k in names}
        trainer = Trainer(TrainConfig(**fields))
        history = trainer.train()
        trainer.env.close()
        return {"metrics": clean_metrics(history), "weights": weights_digest(run_dir)}


def all_ids() -> list[str]:
    import gymnasium as gym

    import diffusion_env  # noqa: F401

    return sorted(i for i in gym.registry if i.startswith("Denoise-"))


def machine() -> str:
    """The CPU model and torch version: bit-exact results are expected only on the same pair."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} | torch {torch.__version__}"


def run_all(ids: list[str] | None = None, algos: tuple[str, ...] = ALGOS) -> dict:
    from diffusion_env.testing import build_tiny_sd
    from rewards.server import serve_in_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions then do not depend on the machine's core count
    url, stop = serve_in_thread(lambda images: ["a cat riding a bike"] * len(images))
    try:
        with tempfile.TemporaryDirectory(prefix="seam-ref-model-") as tmp:
            tiny_sd = build_tiny_sd(Path(tmp) / "tiny_sd")
            return {f"{env_id}|{algo}": run_one(env_id, algo, tiny_sd, url)
                    for env_id in (ids or all_ids()) for algo in algos}  # fmt: skip
    finally:
        stop()
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", metavar="JSON", help="write the reference runs to this file")
    p.add_argument("--compare", metavar="JSON", help="compare the current code with this file; exit 1 on a change")
    args = p.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ids = None  # --write: every registered ID; --compare: the IDs the reference recorded
    if args.compare:
        ids = sorted({key.split("|")[0] for key in json.loads(Path(args.compare).read_text())["runs"]})
    results = run_all(ids)
    if args.write:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        Path(args.write).write_text(json.dumps({"commit": commit, "machine": machine(), "runs": results}, indent=1) + "\n")
        print(f"wrote {len(results)} reference runs to {args.write}")
    if args.compare:
        ref = json.loads(Path(args.compare).read_text())["runs"]
        changed = [k for k in ref if ref[k] != results.get(k)]
        print(f"{len(ref) - len(changed)} of {len(ref)} runs bit-identical" + (f"; changed: {changed}" if changed else ""))
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
