"""What every agent shares: rollout collection, per-prompt reward normalisation, optimizer set-up.

The agents talk to the environment only through the Gymnasium vector API (``reset``/``step``) plus
the policy's own model; everything here is batched over the ``num_envs`` lockstep trajectories.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from agents.distributed import all_reduce_grads, local_pairs, local_samples

if TYPE_CHECKING:
    from agents.policy import GaussianDenoisingPolicy

class Rollout(NamedTuple):
    """A batch of complete trajectories of the denoising MDP (B trajectories of S steps).

    ``latents[:, j]`` is the state x_t before step j and ``latents[:, j + 1]`` the action taken.
    """

    prompts: tuple[str, ...]  # [B]
    latents: torch.Tensor  # [B, S + 1, C, H, W], fp32, x_T … x_0
    timesteps: torch.Tensor  # [B, S] int64, t of each state
    log_probs: torch.Tensor  # [B, S] fp32, log π_old(a_j | s_j) at collection time
    rewards: torch.Tensor  # [B] fp32 (NaN while a deferred reward is pending)
    images: torch.Tensor  # [B, 3, H, W] float in [0, 1] (CPU)
    reward_handle: Any = None  # a rewards.RewardHandle when the env defers its reward (async_reward)
    train_window: tuple[int, int] | None = None  # steps [a, b) that are trained on (None: all; see with_train_window)

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    parts = [resolve_rewards(r) for r in parts]
    return Rollout(
        prompts=tuple(p for r in parts for p in r.prompts),
        latents=torch.cat([r.latents for r in parts]),
        timesteps=torch.cat([r.timesteps for r in parts]),
        log_probs=torch.cat([r.log_probs for r in parts]),
        rewards=torch.cat([r.rewards for r in parts]),
        images=torch.cat([r.images for r in parts]),
    )


@torch.no_grad()
def collect_rollout(
    env: Any, policy: GaussianDenoisingPolicy, seed: int, generator: torch.Generator, prompts: Sequence[str] | None = None
) -> Rollout:
    """Run one lockstep episode of ``env`` (a DenoisingEnv) with ``policy``; return the trajectories.

    ``seed`` seeds the environment (sub-env i gets ``seed + i``); ``generator`` drives the policy's
    sampling noise. Nothing leaves the device until the episode is over.
    """
    options = {"prompts": list(prompts)} if prompts is not None else None
    obs, _ = env.reset(seed=seed, options=options)
    latents, timesteps, log_probs = [obs["x_t"]], [], []
    terminated = False
    info: dict[str, Any] = {}
    rewards = None
    while not terminated:
        action, log_prob = policy.act(obs, generator=generator)
        timesteps.append(obs["t"])
        log_probs.append(log_prob)
        obs, rewards, terms, _, info = env.step(action)
        latents.append(action.float())
        terminated = "images" in info  # lockstep: all sub-environments end together
    return Rollout(
        prompts=tuple(info["prompts"]),
        latents=torch.stack(latents, dim=1),
        timesteps=torch.stack(timesteps, dim=1),
        log_probs=torch.stack(log_probs, dim=1).float(),
        rewards=rewards.float(),
        images=info["images"].cpu(),
        reward_handle=info.get("reward_handle"),
    )


def with_train_window(rollout: Any, window: tuple[int, int] | None) -> Any:
    """``rollout`` (or a :class:`~agents.distributed.ShardedRollout`) whose trained steps are ``[a, b)`` of each
    trajectory (None: all): :meth:`RolloutBuffer.train_steps` then draws pairs from those steps only. The
    trajectories themselves are whole (x_0 is still ``latents[:, -1]``)."""
    if hasattr(rollout, "local"):
        return rollout._replace(local=rollout.local._replace(train_window=window))
    return rollout._replace(train_window=window)


def resolve_rewards(rollout: Rollout) -> Rollout:
    """Wait for a deferred reward (``async_reward`` envs) and put it into the rollout. A failing reward
    raises :class:`rewards.RewardError` naming it (wrapped where it was called: :func:`rewards.score_batch`)."""
    if rollout.reward_handle is None:
        return rollout
    rewards, _ = rollout.reward_handle.result()
    return rollout._replace(rewards=rewards.to(rollout.rewards.device).float(), reward_handle=None)


class PerPromptStatTracker:
    """Running per-prompt reward statistics for advantage normalisation (DDPO appendix A.3).

    Each prompt keeps its last ``buffer_size`` rewards. A reward's advantage is
    ``(r - mean_prompt) / (std_prompt + eps)`` once the prompt has ``min_count`` rewards; before that
    the mean and std of the whole current batch are used. ``buffer_size=0`` disables per-prompt
    statistics (batch normalisation only).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 0 or min_count < 1:
            raise ValueError(f"buffer_size={buffer_size}, min_count={min_count}; expected >= 0 and >= 1")
        if buffer_size and min_count > buffer_size:
            raise ValueError(f"min_count={min_count} > buffer_size={buffer_size}; it could never be reached")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add the batch to the buffers and return its advantages (same device and shape as ``rewards``)."""
        r = rewards.detach().float().cpu().numpy()
        if len(prompts) != len(r):
            raise ValueError(f"{len(prompts)} prompts for {len(r)} rewards; expected one prompt per reward")
        global_mean, global_std = float(r.mean()), float(r.std())
        adv = (r - global_mean) / (global_std + self.eps)
        if self.buffer_size:
            for p, x in zip(prompts, r):
                self.buffers.setdefault(p, deque(maxlen=self.buffer_size)).append(float(x))
            for i, p in enumerate(prompts):
                buf = self.buffers[p]
                if len(buf) >= self.min_count:
                    mean, std = float(np.mean(buf)), float(np.std(buf))
                    adv[i] = (r[i] - mean) / (std + self.eps)
        return torch.as_tensor(adv, dtype=torch.float32, device=rewards.device)

    def threshold(self, prompts: Sequence[str], rewards: torch.Tensor, quantile: float) -> torch.Tensor:
        """Per-prompt ``quantile`` of the buffered rewards (the batch's quantile while a prompt has few)."""
        r = rewards.detach().float().cpu().numpy()
        fallback = float(np.quantile(r, quantile))
        out = [
            float(np.quantile(self.buffers[p], quantile))
            if self.buffer_size and len(self.buffers.get(p, ())) >= self.min_count
            else fallback
            for p in prompts
        ]
        return torch.tensor(out, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}

    def prompt_means(self) -> dict[str, float]:
        return {p: float(np.mean(b)) for p, b in self.buffers.items() if b}


def prompt_groups(prompts: Sequence[str], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Indices of the samples of each distinct prompt, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return [torch.tensor(idx, device=device) for idx in groups.values()]


def make_optimizer(params: list[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """AdamW with DDPO appendix A.6's settings (taken from the run config)."""
    if not params:
        raise ValueError("the policy has no trainable parameters; check lora_rank / full fine-tuning settings")
    # The fused kernel: one pass over all parameters instead of a Python loop of small ops (the tiny model on
    # CPU: 2.3 ms per step instead of 11.6). Same update up to rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=fused or None,
    )  # fmt: skip
    warmup = cfg.lr_warmup_steps
    if warmup:  # kept in the param groups, so a checkpoint's optimizer state carries the schedule
        for group in optimizer.param_groups:
            group.update(base_lr=cfg.learning_rate, lr_warmup_steps=warmup, warmup_done=0)
    return optimizer


LR_DECAYS = ("constant", "linear", "cosine")


def lr_decay_factor(kind: str, epoch: int, epochs: int) -> float:
    """The share of the learning rate that epoch ``epoch`` (0-based) of ``epochs`` trains at: 1 for "constant",
    ``1 - e/E`` for "linear", ``(1 + cos(π e/E)) / 2`` for "cosine" (both 1 at the first epoch, > 0 at the last)."""
    if kind not in LR_DECAYS:
        raise ValueError(f"lr_decay={kind!r}; expected one of {list(LR_DECAYS)}")
    p = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    return {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[kind]


def set_lr_decay(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Train the next steps at ``factor`` × the base learning rate (with the warm-up's share on top)."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])  # optimizers restored from checkpoints written before the decay
        group["lr_decay"] = factor
        group["lr"] = group["base_lr"] * factor


def warmup_lr(optimizer: torch.optim.Optimizer) -> None:
    """Set each param group's learning rate for the step about to be applied: ``base_lr · min(1, (k + 1) / N)``
    after k applied steps, N = ``lr_warmup_steps``, times the group's ``lr_decay`` (:func:`set_lr_decay`);
    groups with neither are left alone. The count lives in the group (``warmup_done``), so a checkpoint carries
    it and a resumed run continues the schedule."""
    for group in optimizer.param_groups:
        n = group.get("lr_warmup_steps", 0)
        if n:
            done = group.get("warmup_done", 0)
            group["lr"] = group["base_lr"] * min(1.0, (done + 1) / n) * group.get("lr_decay", 1.0)
            group["warmup_done"] = done + 1


class PairBatch(NamedTuple):
    """A micro-batch of (sample, timestep) pairs of a rollout: what a likelihood-style loss reads.

    ``num_step_pairs`` is the number of pairs of the whole optimizer step over all processes, so a loss
    summed over this micro-batch and divided by it accumulates the step's mean.
    """

    obs: dict[str, Any]  # prompt: list[str] [n]; t: [n] int64; x_t: [n, C, H, W]
    actions: torch.Tensor  # [n, C, H, W]: x_{t-1}
    old_log_probs: torch.Tensor  # [n]: log π_old(a | s) (as sampled, or as recomputed into the buffer)
    advantages: torch.Tensor  # [n]: the advantage of each pair's sample
    num_step_pairs: int
    sample_idx: torch.Tensor  # [n] indices into this process's rollout
    step_idx: torch.Tensor  # [n]


class TrainStep(NamedTuple):
    """The pairs of one optimizer step that this process owns, and the step's global pair count."""

    sample_idx: torch.Tensor  # on the device
    step_idx: torch.Tensor
    advantages: torch.Tensor
    num_pairs: int
    sample_idx_host: torch.Tensor  # the same indices on the CPU: prompts are looked up without a device sync


class RolloutBuffer:
    """An epoch's rollout and advantages, minibatched into (sample, timestep) pairs (as SB3's ``RolloutBuffer``).

    Algorithms ask for an epoch's optimizer steps (:meth:`train_steps`: shuffling, each sample's timestep
    subset and the split over processes are done here) and iterate over their micro-batches
    (:meth:`micro_batches`). With several processes the rollout is a :class:`~agents.distributed.ShardedRollout`:
    every process draws the same global steps and keeps the pairs of its own samples.
    """

    def __init__(self, rollout: Any, advantages: torch.Tensor, micro_batch_size: int):
        self.rollout = rollout
        self.local = getattr(rollout, "local", rollout)
        self.num_samples, self.num_steps = rollout.num_samples, rollout.num_steps  # global sample count
        self.prompts = rollout.prompts  # global
        self.advantages = advantages
        self.micro_batch_size = int(micro_batch_size)
        self.sampled_log_probs = self.local.log_probs
        self.old_log_probs = self.local.log_probs  # replaced by store_old_log_probs (a copy on first write)
        self.train_window = getattr(self.local, "train_window", None)  # steps [a, b) trained on (None: all)

    @property
    def device(self) -> torch.device:
        return self.advantages.device

    def train_steps(self, batch_size: int, generator: torch.Generator, timestep_fraction: float = 1.0,
                    shuffle: bool = True) -> list[TrainStep]:  # fmt: skip
        """One pass over the rollout: optimizer steps of ``batch_size`` samples × their chosen timesteps.

        Random draws, in order: the sample order (``shuffle``), each sample's timestep subset (of the
        rollout's train window, when it has one: ``round(fraction × window)`` of its steps), and per step
        the order of its pairs (``shuffle``). Without ``shuffle`` samples and pairs stay in order.
        """
        B, S = self.num_samples, self.num_steps
        order = torch.randperm(B, generator=generator) if shuffle else torch.arange(B)
        if self.train_window is None:
            steps = subsample_steps(B, S, timestep_fraction, generator)  # [B, k]
        else:
            a, b = self.train_window
            steps = a + subsample_steps(B, b - a, timestep_fraction, generator)
        out = []
        for start in range(0, B, batch_size):
            idx = order[start : start + batch_size]
            sample_idx = idx.repeat_interleave(steps.shape[1])
            step_idx = steps[idx].reshape(-1)
            if shuffle:
                perm = torch.randperm(len(sample_idx), generator=generator)
                sample_idx, step_idx = sample_idx[perm], step_idx[perm]
            total = len(sample_idx)
            _, s, j, adv = local_pairs(self.rollout, sample_idx, step_idx, self.advantages)
            out.append(TrainStep(s.to(self.device), j.to(self.device), adv, total, s))
        return out

    def micro_batches(self, step: TrainStep) -> Iterator[PairBatch]:
        """The step's pairs, ``micro_batch_size`` at a time."""
        for m in range(0, len(step.sample_idx), self.micro_batch_size):
            sl = slice(m, m + self.micro_batch_size)
            s, j = step.sample_idx[sl], step.step_idx[sl]
            yield self.pairs(s, j, step.advantages[sl], step.num_pairs, step.sample_idx_host[sl])

    def pairs(self, s: torch.Tensor, j: torch.Tensor, advantages: torch.Tensor, num_step_pairs: int,
              s_host: torch.Tensor | None = None) -> PairBatch:  # fmt: skip
        """Gather pairs ``(s, j)`` of this process's rollout into one flat batch (``s_host``: ``s`` on the CPU,
        for the prompts' lookup)."""
        ro = self.local
        s_host = s.cpu() if s_host is None else s_host
        obs = {"prompt": [ro.prompts[i] for i in s_host.tolist()], "t": ro.timesteps[s, j], "x_t": ro.latents[s, j]}
        return PairBatch(obs, ro.latents[s, j + 1], self.old_log_probs[s, j], advantages, num_step_pairs, s, j)

    def store_old_log_probs(self, batch: PairBatch, log_probs: torch.Tensor) -> torch.Tensor:
        """Replace the old log-probs of ``batch``'s pairs (recomputed ones); returns the largest change from
        the sampled values, on the device (no host sync)."""
        if self.old_log_probs is self.sampled_log_probs:
            self.old_log_probs = self.sampled_log_probs.clone()
        self.old_log_probs[batch.sample_idx, batch.step_idx] = log_probs
        return (log_probs - self.sampled_log_probs[batch.sample_idx, batch.step_idx]).abs().max()

    def samples(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """For global sample indices ``idx``: ``(keep, x_0, prompts)`` — which of them this process holds, and
        their final latents and prompts."""
        _, keep, lidx = local_samples(self.rollout, idx)
        return keep, self.local.latents[lidx, -1], [self.local.prompts[i] for i in lidx.tolist()]


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate per pair: max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)), ρ = exp(log_ratio)."""
    ratio = log_ratio.exp()
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


def group_advantages(prompts: Sequence[str], rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO): each reward normalised by the mean and std of the rewards of its
    prompt in this batch, ``(r - mean_g) / (std_g + eps)``, with the population std (a group of equal rewards
    gets advantages 0). A prompt drawn twice in one epoch makes one larger group. fp32, on ``rewards``' device."""
    r = rewards.detach().float()
    adv = torch.empty_like(r)
    for ix in prompt_groups(prompts, r.device):
        group = r[ix]
        adv[ix] = (group - group.mean()) / (group.std(unbiased=False) + eps)
    return adv


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean, σ² I) ‖ N(ref_mean, σ² I)) per row: ``(mean - ref_mean)² / (2 σ²)`` per latent dimension,
    averaged (``reduction="mean"``, as the policy's mean-reduced log-probs, and Flow-GRPO's KL loss) or summed
    (``"sum"``: the exact KL of the whole step) over them. ``std`` broadcasts against the means ``[n, C, H, W]``."""
    per_dim = (mean - ref_mean) ** 2 / (2 * std**2)
    dims = tuple(range(1, per_dim.ndim))
    if reduction == "mean":
        return per_dim.mean(dim=dims)
    if reduction == "sum":
        return per_dim.sum(dim=dims)
    raise ValueError(f"reduction={reduction!r}; expected 'mean' or 'sum'")


def subsample_steps(num_samples: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """For each sample, a random subset of ``round(fraction * S)`` step indices: ``[B, k]``."""
    k = max(1, int(round(fraction * num_steps)))
    scores = torch.rand(num_samples, num_steps, generator=generator)
    return scores.argsort(dim=1)[:, :k]


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """One host sync: are all gradients finite? (Guards the weights against NaN/inf updates.)"""
    norms = [p.grad.detach().abs().amax() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def optimizer_step(policy: GaussianDenoisingPolicy, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> tuple[float, bool]:
    """Clip, check and apply the accumulated gradients. Returns ``(grad_norm, applied)``.

    Non-finite gradients (from a NaN reward or loss) are dropped, never applied: the step is skipped.
    """
    params = policy.trainable_parameters()
    all_reduce_grads(params)  # data-parallel: sum over processes (LoRA included); no-op in one process
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    norm = float(grad_norm)  # one host sync per optimizer step
    if not np.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    warmup_lr(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, True
