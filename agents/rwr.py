"""RWR: reward-weighted regression on the model's own samples (DDPO §4.2, A.2, A.3, B.1).

Only the final samples x_0 and their rewards are used. The model is trained with the denoising loss of
its family (for SD v1 the DDPM ε loss) on its own samples, each weighted by a softmax of β times its
reward over the samples of the same prompt (appendix A.3: "computing the softmax over rewards for each
prompt independently"), so the weights of every prompt sum to 1:

    loss = Σ_c Σ_{i: c_i = c} w_i ‖target - pred_θ(x_t,i, t, c)‖² / #prompts,   x_t,i = noised(x_0,i, t, noise)
    w_i = softmax_{i: c_i = c}(β r_i)

β is an inverse temperature in the reward's units (appendix A.6: 0.2 for rewards of SD v1.4's tasks);
the tiny presets set it per task so that β × the base model's reward spread is about 1 (agents/config.py).
The prediction is the classifier-free-guided one at the policy's guidance scale ("CFG training",
appendix B.1, Figure 8: essential for more than one round of sampling and training);
``rwr_cfg_training=False`` trains the conditional prediction only, and ``rwr_weighting="advantage"``
weighs by β × the normalised, clipped advantage instead of the reward (both kept for ablations).

``rwr_updates_per_epoch`` optimizer steps each draw ``train_batch_size`` samples with one random
training timestep and noise each (from the model family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from agents.config import SD14_COMMON, SD35_COMMON, TINY_COMMON
from agents.core import RolloutBuffer, optimizer_step, prompt_groups
from agents.distributed import all_reduce_sum
from agents.fields import AlgoConfig, doc_field, final_samples_only, positive_int, train_batch_within_epoch


@dataclass
class RegressionConfig(AlgoConfig):
    """The settings of the weighted-regression algorithms (RWR and RWR-sparse)."""

    rwr_cfg_training: bool = doc_field(
        True,
        "Regress the classifier-free-guided prediction at the run's guidance scale (CFG training, appendix "
        "B.1); off: the conditional prediction only (an ablation, Figure 8).",
    )
    rwr_updates_per_epoch: int = doc_field(
        8,
        "Optimizer steps per epoch (each on train_batch_size samples, one random timestep each).",
    )


@dataclass
class RWRConfig(RegressionConfig):
    """RWR's own settings (``cfg.algo_config``)."""

    rwr_beta: float = doc_field(
        0.2,
        "RWR inverse temperature β of the per-prompt softmax weights, in the reward's units (appendix A.6: 0.2 "
        "for SD v1.4's tasks; the tiny presets set it per task so that β × the base model's reward spread is "
        "about 1).",
    )
    rwr_weighting: str = doc_field(
        "reward",
        "RWR weights: softmax of β × \"reward\" per prompt (appendix A.2/A.3), or of β × the normalised, "
        "clipped \"advantage\" (an ablation; the weighting before the model seam).",
        choices=("reward", "advantage"),
    )

    def validate(self, shared) -> list[str]:
        errors = positive_int(self, "rwr_updates_per_epoch") + train_batch_within_epoch(shared)
        if not math.isfinite(self.rwr_beta):
            errors.append(f"rwr_beta={self.rwr_beta}: expected a finite number")
        if self.rwr_weighting not in ("reward", "advantage"):
            errors.append(f"rwr_weighting={self.rwr_weighting!r}: expected 'reward' (the paper's) or 'advantage'")
        return errors + final_samples_only(shared, "RWR")


# RWR's β on the tiny tasks (appendix A.2 weights softmax(β r) per prompt, so β has the reward's inverse
# units): about 1 / the base model's within-prompt reward std, so that one std of reward changes a sample's
# weight by a factor e within its prompt. Measured on the shipped model, 8 training prompts × 8 samples:
# 0.057 kB (JPEG size, both JPEG tasks) and 0.064 (BERTScore recall, prompt alignment).
TINY_RWR_BETA = {"Compressibility": 16.0, "Incompressibility": 16.0, "PromptAlignment": 16.0}
# The same on the embedded tiny flow model (Denoise-TinyFlow-*, SDE a = 0.7, guidance 4.5, the 9000-step weights),
# by `python -m benchmarks.reward_spread Denoise-TinyFlow-<task>-v0` (8 training prompts × 8 samples, seed 0):
# within-prompt std 0.065 kB (JPEG) and 0.030 (BERTScore recall).
TINYFLOW_RWR_BETA = {"Compressibility": 15.0, "Incompressibility": 15.0, "PromptAlignment": 33.0}

# RWR has no Flow-GRPO counterpart on SD3.5: Flow-GRPO's epoch of groups (so the per-prompt softmax compares 24
# samples of one prompt), each sample regressed about 5 times per epoch as in DDPO appendix A.6's RWR (400
# steps × 128 of 10,000 samples; here 45 × 128 of 1,152), at a tenth of the learning rate as the tiny presets
# (RWR takes many more optimizer steps per epoch than DDPO). Untuned.
SD35_PRESET = dict(SD35_COMMON, train_batch_size=128, rwr_updates_per_epoch=45, learning_rate=3e-5)
SD14_PRESET = dict(SD14_COMMON, samples_per_epoch=10_000, sample_batch_size=16, train_batch_size=128,
                   rwr_updates_per_epoch=400)  # fmt: skip
# RWR weighs samples within each prompt, so its batches repeat prompts (8 prompts × 8 samples); with one sample
# per prompt every weight is 1 and RWR degenerates into self-distillation.
TINY_PRESET = dict(TINY_COMMON, train_batch_size=64, rwr_updates_per_epoch=8, learning_rate=3e-5, samples_per_prompt=8)


def tiny_preset(env_id: str) -> dict:
    """The tiny preset with β looked up by the task of ``env_id`` in :data:`TINYFLOW_RWR_BETA` for
    ``Denoise-TinyFlow-*`` IDs, else in :data:`TINY_RWR_BETA`."""
    betas = TINYFLOW_RWR_BETA if env_id.startswith("Denoise-TinyFlow-") else TINY_RWR_BETA
    task = next((t for t in betas if f"-{t}-" in env_id), None)
    return dict(TINY_PRESET, rwr_beta=betas[task]) if task is not None else dict(TINY_PRESET)


PRESETS = {"sd14": SD14_PRESET, "sd35": SD35_PRESET, "tiny": tiny_preset}


def per_prompt_softmax(prompts, scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores) within each group of equal prompts: weights of every prompt sum to 1."""
    weights = torch.empty_like(scores)
    for ix in prompt_groups(prompts, scores.device):
        weights[ix] = torch.softmax(scores[ix], dim=0)
    return weights


def weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator) -> dict[str, float]:
    """Steps of the weighted denoising loss on the rollout's x_0; ``weights`` [B] (normalised per prompt)."""
    buffer = RolloutBuffer(rollout, weights, cfg.micro_batch_size)
    family = policy.family
    B, device = buffer.num_samples, weights.device  # all processes' samples (global indices)
    latent_shape = tuple(buffer.local.latents.shape[2:])
    ac = cfg.algo_config  # RWRConfig or RWRSparseConfig
    guided = ac.rwr_cfg_training
    n_prompts = len(set(buffer.prompts))
    loss_sum, n_steps, skipped, norms = torch.zeros((), device=device), 0, 0, []
    policy.train()
    for _ in range(ac.rwr_updates_per_epoch):
        idx = torch.randperm(B, generator=generator)[: cfg.train_batch_size]
        t, noise = family.training_inputs(len(idx), latent_shape, generator)
        t, noise = t.to(device), noise.to(device)  # idx stays on the CPU: prompts are looked up without a sync
        # Importance of each drawn sample: its weight rescaled so the expectation is the full loss.
        w = weights[idx] * (B / len(idx)) / n_prompts
        # Several processes: keep the drawn samples this process holds (one process: all of them).
        keep, x0, prompts = buffer.samples(idx)
        keep = keep.to(device)
        t, noise, w = t[keep], noise[keep], w[keep]
        x_t, target = family.noised(x0, t, noise)
        for m in range(0, len(t), cfg.micro_batch_size):
            sl = slice(m, m + cfg.micro_batch_size)
            pred = policy.prediction(x_t[sl], t[sl], prompts[sl], guided=guided)
            per_sample = ((pred - target[sl]) ** 2).mean(dim=(1, 2, 3))
            loss = (w[sl] * per_sample).sum()
            loss.backward()
            loss_sum += loss.detach()
        norm, applied = optimizer_step(policy, optimizer, cfg.max_grad_norm)
        norms.append(norm)
        n_steps += 1
        skipped += not applied
    policy.eval()
    loss_sum = all_reduce_sum(loss_sum)
    return {"losses/policy_loss": float(loss_sum) / max(n_steps, 1), "losses/grad_norm": sum(norms) / max(len(norms), 1),
            "losses/optimizer_steps": n_steps - skipped, "losses/skipped_steps": skipped}  # fmt: skip


def rwr_weights(prompts, rewards: torch.Tensor, advantages: torch.Tensor, cfg) -> torch.Tensor:
    """A.2/A.3: per-prompt softmax of β × reward; ``rwr_weighting="advantage"``: of β × the normalised advantage."""
    ac = cfg.algo_config
    scores = advantages if ac.rwr_weighting == "advantage" else rewards.float()
    return per_prompt_softmax(prompts, ac.rwr_beta * scores)


def update(policy, optimizer, rollout, advantages, cfg, generator, tracker=None) -> dict[str, float]:
    weights = rwr_weights(rollout.prompts, rollout.rewards, advantages, cfg)
    metrics = weighted_denoising_update(policy, optimizer, rollout, weights, cfg, generator)
    metrics["losses/weight_max"] = float(weights.max())
    return metrics
