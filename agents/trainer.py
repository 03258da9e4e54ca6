"""The training loop shared by every algorithm: collect → normalise → update → log → checkpoint.

A run directory holds::

    config.json            the resolved TrainConfig
    metrics.jsonl          one line per epoch (charts/…, losses/…, perf/…)
    tb/                    the same metrics for TensorBoard, plus reward histograms
    grid_before.png        samples at fixed evaluation prompts and seeds, before training
    grid_epoch_NNNN.png    the same every ``grid_every`` epochs, and grid_after.png at the end
    reward_curve.png       mean reward against reward queries
    checkpoints/ckpt-NNNN  weights, optimizer, per-prompt statistics, the algorithm's state and epoch
                           (safetensors + JSON)
    checkpoints/latest     the name of the newest complete checkpoint (replaced atomically)

Every random draw of epoch e derives from ``(seed, e)`` alone, so resuming from the checkpoint of
epoch e continues exactly as an uninterrupted run would.

Failures: a NaN/inf reward skips that epoch's update (``charts/skipped_update``); a reward that raises
stops training with :class:`rewards.RewardError` naming it, before anything of the epoch is written,
so the run resumes from its last checkpoint. A kill at any moment leaves the last complete checkpoint
intact (tests/test_fault_drills.py). Several processes: see :mod:`agents.distributed`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusion_env  # noqa: F401  (registers the Denoise-* IDs)
from agents import distributed
from agents.config import TrainConfig, compatibility_warnings, parse_train_timesteps
from agents.core import (
    PerPromptStatTracker,
    Rollout,
    collect_rollout,
    concat_rollouts,
    lr_decay_factor,
    make_optimizer,
    set_lr_decay,
    with_train_window,
)
from agents.diagnostics import hacking_flag, trajectory_kl, within_prompt_diversity, world_fidelity
from agents.plots import plot_reward_curve, reward_label, save_labelled_grid, write_tb_hparams, write_tb_image
from agents.policy import GaussianDenoisingPolicy, ReferencePolicy
from agents.progress import (
    INTERRUPTED,
    TIME_LIMIT,
    GracefulInterrupt,
    epochs_within_time,
    finished_reason,
    planned_epochs,
)
from agents.registry import algo_spec
from agents.rundir import LOCK_NAME, lock_run_dir
from agents.runtime import retain_freed_memory, set_threads
from rewards.base import check_options
from rewards.secrets import redact

GRID_SEED = 1234  # seed of the evaluation grids (the same before, during and after training)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for every (seed, epoch, batch, purpose))."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def make_env(cfg: TrainConfig, num_envs: int | None = None, **overrides: Any):
    """The run's vector environment (``gym.make_vec`` with the config's overrides)."""
    kwargs = dict(cfg.env_kwargs)
    kwargs.setdefault("device", cfg.device)
    kwargs.setdefault("async_reward", cfg.async_rewards)
    for name, value in (("num_steps", cfg.num_steps), ("eta", cfg.eta), ("guidance_scale", cfg.guidance)):
        if value is not None:  # cfg.guidance: 1 for a CFG-free run
            kwargs[name] = value
    kwargs.update(overrides)
    if cfg.env_id not in gym.registry:
        known = sorted(i for i in gym.registry if i.startswith("Denoise-"))
        raise ValueError(f"unknown env id {cfg.env_id!r}; expected one of {known}")
    creator = gym.spec(cfg.env_id).vector_entry_point
    if creator is not None:  # a misspelt env option: one line listing the known ones, not a TypeError
        from gymnasium.envs.registration import load_env_creator

        creator = load_env_creator(creator) if isinstance(creator, str) else creator
        check_options(creator, kwargs, f"env {cfg.env_id!r}")
    env = gym.make_vec(cfg.env_id, num_envs=num_envs or cfg.sample_batch_size,
                       vectorization_mode="vector_entry_point", **kwargs)  # fmt: skip
    return env.unwrapped


def _unserializable(obj: Any) -> str:
    return f"<not serializable: {obj!r}>"


def config_json(cfg: TrainConfig) -> str:
    """The config as JSON, credentials redacted (:func:`rewards.secrets.redact`); objects such as a
    callable reward are recorded by their repr."""
    return json.dumps(redact(cfg.to_dict()), indent=2, default=_unserializable)


class NoCheckpointError(ValueError):
    """``resume`` was asked of a run directory without a checkpoint."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: never shared with another writer
    tmp.write_text(text)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] → one uint8 ``[rows·H, nrow·W, 3]`` array with 1-pixel gaps."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1) + 1, min(n, nrow) * (w + 1) + 1, 3), 255, dtype=np.uint8)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, im in enumerate(arr):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = im
    return grid


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


class Trainer:
    """Trains a :class:`GaussianDenoisingPolicy` on a registered env with one of the registered algorithms."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, checkpoint: str | None = None):
        """``resume``: continue from the checkpoint ``checkpoints/latest`` names, or from ``checkpoint``
        (a folder name such as ``ckpt-0003``). A failed start (unknown env, missing weights) leaves no run
        directory behind: one this trainer created holds only its lock until the env and the policy loaded."""
        self.cfg = cfg.validate()
        if torch.device(cfg.device).type == "cpu":
            retain_freed_memory()  # no page faults for every micro-batch's activations (agents/runtime.py)
            set_threads(cfg.threads)  # the idle cores unless told (agents/runtime.py)
        self.dist = distributed.init()  # one process: a no-op context (see agents/distributed.py)
        self.dist.check_config(self.cfg)
        self.algo = algo_spec(cfg.algo)
        self.update_fn = self.algo.update
        self.run_dir = Path(cfg.run_dir or Path(cfg.output_dir) / f"{cfg.env_id}-{cfg.algo}-s{cfg.seed}")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._writer = None
        # One process per run directory for the trainer's whole life (agents/rundir.py); released by close().
        created = next((p for p in reversed([self.run_dir, *self.run_dir.parents]) if not p.exists()), None)
        lock = lock_run_dir(self.run_dir) if self.dist.is_main else None
        self._release_lock = weakref.finalize(self, lock.release) if lock is not None else (lambda: None)
        try:
            self._setup(cfg, resume, checkpoint)
        except BaseException:
            self._release_lock()
            if created is not None and self.dist.is_main:  # a failed start leaves no folder it made behind
                files = [p for p in created.rglob("*") if p.is_file()] if created.exists() else []
                if all(p == self.run_dir / LOCK_NAME for p in files):
                    shutil.rmtree(created, ignore_errors=True)
            raise

    def _setup(self, cfg: TrainConfig, resume: bool, checkpoint: str | None) -> None:
        if not resume and (self.ckpt_dir / "latest").exists():
            raise ValueError(
                f"{self.run_dir} already holds a run; resume it (--resume {self.run_dir}) or choose another run_dir"
            )
        if resume and checkpoint is None and not (self.ckpt_dir / "latest").exists():  # said before loading anything heavy
            raise NoCheckpointError(
                f"{self.run_dir} has no checkpoint to resume (no {self.ckpt_dir / 'latest'}: the run stopped before "
                f"its first checkpoint); start it afresh with the same settings, e.g. `denoise-gym train --env "
                f"{cfg.env_id} --algo {cfg.algo} --run-dir {self.run_dir}` plus the options of its config.json"
            )
        self.env = make_env(cfg)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(derive_seed(cfg.seed))  # LoRA's random init derives from the run's seed too
            # LoRA, log-prob reduction and the opt-in speed-ups (channels_last, autocast, compile).
            self.policy = GaussianDenoisingPolicy.from_env(self.env, **cfg.policy_kwargs())
        self.dist.broadcast_parameters(self.policy.trainable_parameters())  # every process starts from rank 0's
        self.policy.eval()
        # The base weights, for algorithms that ask for them: before any update or checkpoint load.
        self.reference = (ReferencePolicy(self.policy, self.algo.reference)
                          if self.algo.needs_reference(cfg.algo_config) else None)  # fmt: skip
        # The diagnostics' reference (charts/kl_ref): the algorithm's own, else one of their own.
        self.diag_reference = self.reference
        self._world_prompts: bool | None = None  # are the prompts tiny-world captions (charts/fidelity)? unknown yet
        if self.diag_reference is None and cfg.diagnostic_samples > 0:
            self.diag_reference = ReferencePolicy(self.policy, "device")
        self.algo_state: dict[str, Any] = {}  # the algorithm's own state (checkpointed)
        self.train_window = parse_train_timesteps(cfg.train_timesteps, self.env.num_steps)
        self._grid_env = None
        self.optimizer = make_optimizer(self.policy.trainable_parameters(), cfg)
        self.tracker = PerPromptStatTracker(cfg.per_prompt_buffer_size, cfg.per_prompt_min_count)
        self.epoch = 0
        self.reward_queries = 0
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None  # which limit ended train() (agents.progress)
        self.last_epoch_s = 0.0
        self._saved_epoch = -1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint(checkpoint)
        elif self.dist.is_main:
            _atomic_write_text(self.run_dir / "config.json", config_json(cfg))
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                metrics.unlink()
        for warning in compatibility_warnings(cfg, latent_dim=int(np.prod(self.env.latent_shape))):
            warnings.warn(warning, UserWarning, stacklevel=3)

    def close(self) -> None:
        """Close the TensorBoard writer and the env, and release the run directory's lock (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for name in ("env", "_grid_env"):
            env = getattr(self, name, None)
            if env is not None:
                env.close()
        self._release_lock()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ collection
    def collect(self, epoch: int) -> Rollout:
        cfg = self.cfg
        parts = []
        for b in self.dist.shard_range(cfg.samples_per_epoch // cfg.sample_batch_size):  # global batch index
            gen = torch.Generator(device=self.policy.device).manual_seed(derive_seed(cfg.seed, epoch, b, 1))
            env_seed = derive_seed(cfg.seed, epoch, b, 0) % (2**31)
            parts.append(collect_rollout(self.env, self.policy, env_seed, gen, prompts=self.batch_prompts(epoch, b)))
        return concat_rollouts(parts)

    def batch_prompts(self, epoch: int, batch: int) -> list[str] | None:
        """Prompts of one sample batch when ``samples_per_prompt`` > 1: each drawn prompt repeated."""
        spp = self.cfg.samples_per_prompt
        if spp == 1:
            return None  # the env draws one prompt per trajectory itself
        rng = np.random.default_rng(derive_seed(self.cfg.seed, epoch, batch, 3))
        return [p for _ in range(self.cfg.sample_batch_size // spp) for p in [self.env.prompt_sampler(rng)] * spp]

    # ------------------------------------------------------------------ main loop
    def train(self) -> list[dict[str, Any]]:
        """Train until a limit is reached (:attr:`stop_reason` says which, see :mod:`agents.progress`).

        The first Ctrl-C stops after the current epoch, with that epoch's checkpoint saved; a second one
        raises ``KeyboardInterrupt`` at once (the last complete checkpoint stays intact).
        """
        cfg = self.cfg
        planned, self.stop_reason = planned_epochs(cfg)
        progress = None
        # One process says what Ctrl-C does and shows the progress bar: the main one of a data-parallel run.
        interrupt = GracefulInterrupt() if self.dist.is_main else GracefulInterrupt(message=None)
        with interrupt:
            if self.epoch == 0 and not (self.run_dir / "grid_before.png").exists():
                self.write_grid(self.run_dir / "grid_before.png")
            if cfg.progress and self.dist.is_main:
                from tqdm.auto import tqdm

                progress = tqdm(total=planned, initial=min(self.epoch, planned), desc=f"{cfg.algo} {cfg.env_id}",
                                unit="epoch")  # fmt: skip
            started, self.last_epoch_s = time.perf_counter(), 0.0
            while True:
                reason = finished_reason(cfg, self.epoch, self.reward_queries)
                if reason is None and self.dist.any(interrupt.requested):
                    reason = INTERRUPTED
                # Stop before an epoch that would end past the limit (judged by the last epoch's duration).
                if reason is None and cfg.time_limit_s and self.dist.any(
                    time.perf_counter() - started + self.last_epoch_s > cfg.time_limit_s
                ):
                    reason = TIME_LIMIT
                if reason is not None:
                    break
                epoch_start = time.perf_counter()
                metrics = self.train_epoch()
                self.last_epoch_s = time.perf_counter() - epoch_start
                if self.dist.any(interrupt.requested) and self._saved_epoch != self.epoch:
                    self.dist.on_main(self.save_checkpoint)  # stop with this epoch's work kept
                    self._saved_epoch = self.epoch
                if progress is not None:
                    if cfg.time_limit_s:  # the bar's total follows the limit that will stop the run
                        more = epochs_within_time(cfg.time_limit_s, time.perf_counter() - started, self.last_epoch_s)
                        progress.total = min(planned, self.epoch + more)
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['charts/reward_mean']:.3g}")
            self.stop_reason = reason
            if progress is not None:
                progress.close()
            if reason != INTERRUPTED:  # a stopped run gets its after-grid when it finishes
                self.write_grid(self.run_dir / "grid_after.png")
            self.plot_reward_curve()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.history

    def train_epoch(self) -> dict[str, Any]:
        cfg, epoch = self.cfg, self.epoch
        if cfg.lr_decay != "constant":  # the epoch's share of the learning rate, from the epoch alone
            set_lr_decay(self.optimizer, lr_decay_factor(cfg.lr_decay, epoch, planned_epochs(cfg)[0]))
        t0 = time.perf_counter()
        rollout = self.dist.gather_rollout(lambda: self.collect(epoch))  # global prompts/rewards
        t_sample = time.perf_counter() - t0
        rewards = rollout.rewards
        self.reward_queries += rollout.num_samples
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "charts/reward_queries": self.reward_queries,
            "charts/reward_mean": float(rewards.nanmean()),
            "charts/reward_std": float(rewards[torch.isfinite(rewards)].std()) if rewards.numel() > 1 else 0.0,
        }
        finite = bool(torch.isfinite(rewards).all())
        metrics.update(self.diagnostics(rollout, metrics["charts/reward_mean"]))
        t1 = time.perf_counter()
        if finite:
            advantages = self.tracker.update(rollout.prompts, rewards).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 2))
            extras = {k: v for k, v in (("state", self.algo_state), ("ref", self.reference)) if k in self.algo.extras}
            trained = with_train_window(rollout, self.train_window) if self.train_window is not None else rollout
            metrics.update(self.update_fn(self.policy, self.optimizer, trained, advantages, cfg, gen, self.tracker,
                                          **extras))  # fmt: skip
            metrics["charts/skipped_update"] = 0
        else:  # a NaN/inf reward never reaches the weights
            metrics["charts/skipped_update"] = 1
            metrics["charts/nonfinite_rewards"] = int((~torch.isfinite(rewards)).sum())
        t_train = time.perf_counter() - t1
        metrics["charts/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])  # the epoch's last step's
        metrics["perf/sample_s"] = t_sample
        metrics["perf/train_s"] = t_train
        metrics["charts/samples_per_s"] = rollout.num_samples / max(t_sample + t_train, 1e-9)
        self.epoch += 1
        self.log(metrics, rollout)
        if cfg.grid_every and self.epoch % cfg.grid_every == 0:
            self.write_grid(self.run_dir / f"grid_epoch_{self.epoch:04d}.png")
        last = self.epoch == cfg.num_epochs or (
            cfg.reward_query_budget and self.reward_queries >= cfg.reward_query_budget
        )
        if self.epoch % cfg.save_every == 0 or last:
            self.dist.on_main(self.save_checkpoint)
            self._saved_epoch = self.epoch
        return metrics

    def diagnostics(self, rollout: Rollout, reward_mean: float) -> dict[str, Any]:
        """charts/kl_ref, charts/diversity and charts/reward_hacking of this epoch (:mod:`agents.diagnostics`),
        measured on the rollout before the update (the policy that sampled it)."""
        out: dict[str, Any] = {}
        if self.diag_reference is not None:
            out["charts/kl_ref"] = trajectory_kl(self.policy, self.diag_reference, rollout, self.cfg.diagnostic_samples)
        local = getattr(rollout, "local", rollout)
        signals = {"charts/diversity": within_prompt_diversity(local.images, local.prompts)}
        if self._world_prompts is not False:  # checked once: prompts of another world are never captioned again
            signals["charts/fidelity"] = world_fidelity(local.images, local.prompts)
            self._world_prompts = signals["charts/fidelity"] is not None
        out.update({k: v for k, v in signals.items() if v is not None})
        first = self.history[0] if self.history else {**out, "charts/reward_mean": reward_mean}
        flag = hacking_flag(reward_mean, first["charts/reward_mean"], [(v, first.get(k)) for k, v in signals.items()])
        if flag is not None:
            out["charts/reward_hacking"] = int(flag)
        return out

    # ------------------------------------------------------------------ logging
    def log(self, metrics: dict[str, Any], rollout: Rollout) -> None:
        self.history.append(metrics)
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        try:
            self.tb_writer()
            step = metrics["charts/reward_queries"]
            for k, v in metrics.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, step)
            finite = rollout.rewards[torch.isfinite(rollout.rewards)]
            if finite.numel():
                self._writer.add_histogram("charts/reward_hist", finite.cpu(), step)
        except ImportError:  # tensorboard is optional at run time; JSONL is the record
            pass
        means = self.tracker.prompt_means()
        if means:
            _atomic_write_text(self.run_dir / "prompt_means.json", json.dumps(means, indent=1))

    def tb_writer(self):
        """The run's TensorBoard writer (created with the run's hyperparameters on first use); raises
        ImportError without tensorboard."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
            hparams = self.cfg.to_dict()
            own = hparams.pop("algo_config") or {}
            write_tb_hparams(self._writer, {**hparams, **{f"algo_config.{k}": v for k, v in own.items()}})
        return self._writer

    def eval_prompts(self) -> list[str]:
        prompts = self.env.prompts
        if prompts is None:
            rng = np.random.default_rng(self.cfg.seed)
            return [self.env.prompt_sampler(rng) for _ in range(self.cfg.num_eval_prompts)]
        return list(prompts[: self.cfg.num_eval_prompts])

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int = 1234) -> torch.Tensor:
        """The policy's samples for ``prompts`` at fixed seeds, through an env sharing the run's model family
        (nothing reloaded, no prompt encoded twice) and scoring nothing."""
        if self._grid_env is None or self._grid_env.num_envs != len(prompts):
            self._grid_env = grid_env(self.cfg, len(prompts), self.env.family)
        return sample_images(self._grid_env, self.policy, prompts, seed)

    def write_grid(self, path: Path) -> None:
        if not self.dist.is_main:
            return
        prompts = self.eval_prompts()
        # The prompt under each image, the seed below; prompts and seed also in <grid>.json.
        png, _ = save_labelled_grid(path, self.sample_images(prompts, seed=GRID_SEED), prompts, seed=GRID_SEED,
                                    title=f"{self.cfg.env_id} · {self.cfg.algo} · after epoch {self.epoch}",
                                    extra={"epoch": self.epoch})  # fmt: skip
        try:
            write_tb_image(self.tb_writer(), "samples/eval_grid", png, self.reward_queries)
        except ImportError:
            pass

    def plot_reward_curve(self) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        plot_reward_curve(rows, self.run_dir / "reward_curve.png", title=self.cfg.env_id, label=self.cfg.algo,
                          ylabel=reward_label(self.env.reward_fn))  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.policy.trainable_state()

    def save_checkpoint(self) -> Path:
        """Write ckpt-NNNN atomically (temp folder, fsync, rename), then repoint ``latest``."""
        self.ckpt_dir.mkdir(exist_ok=True)
        name = f"ckpt-{self.epoch:04d}"
        tmp = self.ckpt_dir / f".{name}.{os.getpid()}.tmp"  # per process (the run-dir lock makes it moot)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(self.trainable_state(), str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(self.optimizer, self.policy)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        algo_tensors, algo_json = split_algo_state(self.algo_state)
        if algo_tensors:
            save_file(algo_tensors, str(tmp / "algo_state.safetensors"))
        state = {
            "epoch": self.epoch, "reward_queries": self.reward_queries, "optimizer": opt_meta,
            "tracker": self.tracker.state_dict(), "config": redact(self.cfg.to_dict()), "format": 1,
            "algo_state": algo_json, "algo_state_tensors": {k: str(v.device) for k, v in self.algo_state.items()
                                                            if isinstance(v, torch.Tensor)},
        }  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(state, default=_unserializable))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.ckpt_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(self.ckpt_dir / "latest", name)
        keep = self.cfg.keep_checkpoints  # 0: keep every one
        older = sorted(p for p in self.ckpt_dir.glob("ckpt-*") if p.name != name)
        for old in older[: -(keep - 1)] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self, checkpoint: str | None = None) -> None:
        latest = self.ckpt_dir / "latest"
        if checkpoint is None and not latest.exists():
            raise NoCheckpointError(f"{self.run_dir} has no checkpoint to resume (no {latest}); expected the run "
                             "directory of a run that saved a checkpoint")
        name = checkpoint if checkpoint is not None else latest.read_text(errors="replace").strip()
        source = f"--from-checkpoint {name!r}" if checkpoint is not None else f"{latest} names {name[:80]!r}"
        if not re.fullmatch(r"ckpt-\d+", name):
            raise ValueError(f"{source}; expected a checkpoint folder name like 'ckpt-0003'")
        folder = self.ckpt_dir / name
        if checkpoint is not None and not folder.is_dir():
            have = sorted(p.name for p in self.ckpt_dir.glob("ckpt-*")) if self.ckpt_dir.is_dir() else []
            raise ValueError(f"--from-checkpoint {name!r}: no such folder in {self.ckpt_dir}; expected one of {have}")
        try:
            state = json.loads((folder / "state.json").read_text())
            weights = load_file(str(folder / "weights.safetensors"))
            opt_tensors = load_file(str(folder / "optimizer.safetensors"))
            epoch, queries = int(state["epoch"]), int(state["reward_queries"])
            devices = state.get("algo_state_tensors") or {}  # name -> device; checkpoints before the algorithm API: none
            algo_tensors = load_file(str(folder / "algo_state.safetensors")) if devices else {}
            algo_state = {**state.get("algo_state", {}), **{k: algo_tensors[k] for k in devices}}
        except Exception as exc:  # truncated, foreign or missing files
            raise ValueError(f"checkpoint {folder} is unreadable ({type(exc).__name__}: {exc}); "
                             "expected weights.safetensors, optimizer.safetensors and state.json"
                             + intact_checkpoint_hint(self.ckpt_dir, exclude=name, run_dir=self.run_dir)) from exc  # fmt: skip
        try:  # only in-memory state changes here; the run directory is untouched until this succeeded
            load_trainable_weights(self.policy.network, weights)
            _optimizer_from_flat(self.optimizer, self.policy, opt_tensors, state["optimizer"])
            self.tracker.load_state_dict(state["tracker"])
            self.algo_state = {k: v.to(devices[k]) if k in devices else v for k, v in algo_state.items()}  # where it was
        except Exception as exc:
            raise ValueError(f"checkpoint {folder} does not fit this run ({type(exc).__name__}: {exc}); "
                             "expected one written by a run with the same model and settings") from exc  # fmt: skip
        self.epoch, self.reward_queries = epoch, queries
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():  # drop lines of epochs after the checkpoint (an interrupted epoch)
            rows = []
            for line in metrics.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill in mid-write
                    continue
            self.history = [r for r in rows if isinstance(r, dict) and r.get("epoch", self.epoch) < self.epoch]
            if self.dist.is_main:
                _atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in self.history))
        if self.dist.is_main:  # temp folders of an interrupted checkpoint write (we hold the run-dir lock)
            for tmp in self.ckpt_dir.glob(".ckpt-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)


def split_algo_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An algorithm's state as (tensors for safetensors, the rest for JSON); raises on a value that neither
    holds exactly (JSON keeps Python floats exactly: they are written with repr)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if k not in tensors}
    try:
        json.dumps(rest, allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"the algorithm's state holds a value JSON cannot store ({exc}); expected numbers, "
                        "strings, bools, lists/dicts of them, or tensors") from exc  # fmt: skip
    return tensors, rest


def readable_checkpoint(folder: Path) -> int | None:
    """The epoch of a complete, readable checkpoint folder, or None when any of its files is damaged."""
    try:
        state = json.loads((folder / "state.json").read_text())
        load_file(str(folder / "weights.safetensors"))
        load_file(str(folder / "optimizer.safetensors"))
        if state.get("algo_state_tensors"):
            load_file(str(folder / "algo_state.safetensors"))
        return int(state["epoch"])
    except Exception:
        return None


def intact_checkpoint_hint(ckpt_dir: Path, *, exclude: str, run_dir: Path) -> str:
    """``"; the previous checkpoint … is intact: resume from it with …"``, or "" when none is."""
    import shlex

    for folder in sorted((p for p in ckpt_dir.glob("ckpt-*") if p.name != exclude), reverse=True):
        epoch = readable_checkpoint(folder)
        if epoch is not None:
            return (f". The previous checkpoint {folder.name} (epoch {epoch}) is intact: resume from it with "
                    f"`denoise-gym train --resume {shlex.quote(str(run_dir))} --from-checkpoint {folder.name}`")
    return ". No other intact checkpoint is left in " + str(ckpt_dir)


def grid_env(cfg: TrainConfig, num_envs: int, family: Any = None):
    """An env of the run's settings that scores nothing, for sample grids: over ``family`` (nothing reloaded),
    or loading the run's model when None."""
    model = {} if family is None else {"model": family}
    return make_env(cfg, num_envs=num_envs, reward="none", reward_kwargs=None, async_reward=False, **model)


@torch.no_grad()
def sample_images(env: Any, policy: GaussianDenoisingPolicy, prompts: list[str], seed: int) -> torch.Tensor:
    """``policy``'s samples of ``prompts`` (one per env slot) at fixed seeds: what the run's grids show."""
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    return collect_rollout(env, policy, seed, gen, prompts=prompts).images


def load_policy(cfg: TrainConfig, checkpoint: str | os.PathLike | None = None) -> tuple[GaussianDenoisingPolicy, dict]:
    """The policy of ``cfg`` in eval mode, with the weights of the checkpoint folder ``checkpoint`` (None: the
    pretrained model's), and the checkpoint's ``state.json`` ({} for None).

    Read-only: no run-directory lock, nothing in the run written, so it may read a run still training, and
    an earlier checkpoint leaves the run's later metrics alone (resuming from it, with :class:`Trainer`,
    drops them). The policy is built as a run of ``cfg`` builds it (LoRA from the run's seed: a LoRA
    checkpoint then holds every trainable weight)."""
    env = grid_env(cfg, 1)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(derive_seed(cfg.seed))
        policy = GaussianDenoisingPolicy.from_env(env, **cfg.policy_kwargs())
    env.close()
    state: dict = {}
    if checkpoint is not None:
        folder = Path(checkpoint)
        try:
            state = json.loads((folder / "state.json").read_text())
            weights = load_file(str(folder / "weights.safetensors"))
        except Exception as exc:  # missing, truncated or foreign files
            raise ValueError(f"checkpoint {folder} is unreadable ({type(exc).__name__}: {exc}); expected "
                             "weights.safetensors and state.json") from exc  # fmt: skip
        load_trainable_weights(policy.network, weights)
    policy.eval()
    return policy, state


def load_trainable_weights(network: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's trainable parameters into ``network``; every key must match exactly."""
    params = dict(network.named_parameters())

    unknown = [k for k in weights if k not in params]
    if unknown:
        raise ValueError(f"checkpoint has parameters this model lacks (e.g. {unknown[:3]}); "
                         "was it written for another model or LoRA setting?")  # fmt: skip
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameters (e.g. {missing[:3]})")
    with torch.no_grad():
        for k, v in weights.items():
            if params[k].shape != v.shape:
                raise ValueError(f"checkpoint parameter {k} has shape {tuple(v.shape)}; expected {tuple(params[k].shape)}")
            params[k].copy_(v)


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, policy: GaussianDenoisingPolicy):
    """The optimizer's state dict as safetensors tensors plus JSON metadata (no pickle)."""
    sd = optimizer.state_dict()
    tensors = {f"{i}::{k}": torch.as_tensor(v).detach().contiguous().cpu() for i, st in sd["state"].items() for k, v in st.items()}
    names = [n for n, p in policy.network.named_parameters() if p.requires_grad]
    meta = {"param_groups": sd["param_groups"], "param_names": names,
            "state_keys": {str(i): sorted(st) for i, st in sd["state"].items()}}  # fmt: skip
    return tensors, meta


def _optimizer_from_flat(optimizer, policy, tensors, meta) -> None:
    names = [n for n, p in policy.network.named_parameters() if p.requires_grad]
    if names != meta["param_names"]:
        raise ValueError("the checkpoint's optimizer was built for other parameters; was it written for another model?")
    state = {int(i): {k: tensors[f"{i}::{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
