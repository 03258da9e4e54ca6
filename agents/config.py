"""One typed configuration per training run, with presets (DDPO appendix A.6, Flow-GRPO's SD3.5 and tiny CPU
ones)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from agents.policy import ATTENTION_IMPLS
from agents.registry import registered_algos

RENAMED = {"compile_unet": "compile_network"}  # old field name -> current one
ALGOS = ("ddpo-is", "ddpo-sf", "rwr", "rwr-sparse")


def _type_errors(cfg: TrainConfig) -> list[str]:
    """Fields whose value does not have the annotated type (bools are not ints; ints are floats)."""
    hints = typing.get_type_hints(type(cfg))
    errors = []
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        allowed = tuple(typing.get_origin(a) or a for a in allowed)
        ok = any(
            value is None if a is type(None)
            else isinstance(value, (int, float)) and not isinstance(value, bool) if a is float
            else isinstance(value, int) and not isinstance(value, bool) if a is int
            else isinstance(value, a)
            for a in allowed
        )  # fmt: skip
        if not ok:
            names = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
            errors.append(f"{f.name}={value!r:.80}: expected {names}")
    return errors


def _doc(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with its documentation (and allowed values) in ``metadata``.

    Mutable defaults (dicts, lists) become a ``default_factory`` that returns a fresh copy.
    """
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_help(name: str) -> str:
    """The documentation of the :class:`TrainConfig` field ``name``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}[name]


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is <= ``at_most`` (pairs d, n/d up to √n; bounded work for huge n)."""
    best, d = 1, 1
    while d * d <= n and d <= 1_000_000:
        if n % d == 0:
            best = max([best] + [c for c in (d, n // d) if c <= at_most])
        d += 1
    return best


@dataclass
class TrainConfig:
    """Every setting of a run. Each field's documentation is its ``metadata["help"]`` (see :func:`_doc`):
    the command line's help (agents/cli.py) is generated from it, so this class stays the one source."""

    env_id: str = _doc(
        "Denoise-Tiny-Compressibility-v0",
        "Registered environment ID (``gym.make_vec`` is called with it).",
    )
    algo: str = _doc(
        "ddpo-is",
        "Algorithm: one of ddpo-is, ddpo-sf, rwr, rwr-sparse (or one registered with "
        "agents.register_algo).",
    )
    seed: int = _doc(
        0,
        "Master seed: environment seeds, sampling noise and minibatch shuffles all derive from it per "
        "epoch.",
    )
    num_epochs: int = _doc(
        32,
        "Number of epochs (collect → update); the run stops earlier if reward_query_budget is reached.",
    )
    reward_query_budget: int = _doc(
        0,
        "Stop once this many rewards have been queried (0: no budget, run num_epochs).",
    )
    samples_per_epoch: int = _doc(
        64,
        "Trajectories collected per epoch (= reward queries per epoch). Multiple of sample_batch_size.",
    )
    sample_batch_size: int = _doc(64, "Lockstep trajectories per environment episode (the env's num_envs).")
    samples_per_prompt: int = _doc(
        1,
        "Trajectories per drawn prompt in a sample batch (1: every trajectory draws its own prompt). "
        "Groups of repeated prompts give per-prompt statistics and RWR's per-prompt weights something "
        "to compare.",
    )
    train_batch_size: int = _doc(
        64,
        "Samples whose (sample, timestep) pairs make one optimizer step. Divides samples_per_epoch.",
    )
    micro_batch_size: int = _doc(
        256,
        "(sample, timestep) pairs per forward/backward call (memory bound); gradients accumulate over "
        "calls.",
    )
    num_inner_epochs: int = _doc(
        1,
        "Passes over the epoch's samples (DDPO-IS: several PPO passes; DDPO-SF must be 1).",
    )
    timestep_fraction: float = _doc(1.0, "Fraction of each trajectory's timesteps trained on (0 < f <= 1).")
    learning_rate: float = _doc(1e-5, "AdamW learning rate.")
    adam_beta1: float = _doc(0.9, "AdamW β1.")
    adam_beta2: float = _doc(0.999, "AdamW β2.")
    adam_weight_decay: float = _doc(1e-4, "AdamW weight decay (appendix A.6: 1e-4).")
    adam_epsilon: float = _doc(1e-8, "AdamW ε.")
    max_grad_norm: float = _doc(1.0, "Gradient clipping by global norm.")
    clip_range: float = _doc(
        1e-4,
        "PPO clip range ε of DDPO-IS (appendix A.1: 1e-4, tuned for mean-reduced log-probs).",
    )
    adv_clip_max: float = _doc(5.0, "Advantages are clipped to ±adv_clip_max.")
    per_prompt_buffer_size: int = _doc(
        32,
        "Per-prompt reward buffer length (0: normalise by batch statistics only).",
    )
    per_prompt_min_count: int = _doc(
        16,
        "Rewards a prompt needs before its own statistics replace the batch's.",
    )
    rwr_beta: float = _doc(
        0.2,
        "RWR inverse temperature β of the per-prompt softmax weights, in the reward's units (appendix A.6: 0.2 "
        "for SD v1.4's tasks; the tiny presets set it per task so that β × the base model's reward spread is "
        "about 1).",
    )
    rwr_weighting: str = _doc(
        "reward",
        "RWR weights: softmax of β × \"reward\" per prompt (appendix A.2/A.3), or of β × the normalised, "
        "clipped \"advantage\" (an ablation; the weighting before the model seam).",
        choices=("reward", "advantage"),
    )
    rwr_cfg_training: bool = _doc(
        True,
        "RWR and RWR-sparse regress the classifier-free-guided prediction at the run's guidance scale (CFG "
        "training, appendix B.1); off: the conditional prediction only (an ablation, Figure 8).",
    )
    rwr_sparse_quantile: float = _doc(
        0.9,
        "RWR-sparse keeps samples at or above this per-prompt quantile (0.9: bottom 90% dropped).",
    )
    rwr_updates_per_epoch: int = _doc(
        8,
        "RWR optimizer steps per epoch (each on train_batch_size samples, one random timestep each).",
    )
    lora_rank: int | None = _doc(None, "LoRA rank (None: full fine-tuning of the network).")
    log_prob_reduction: str = _doc(
        "mean",
        "Log-density reduction over latent dimensions: mean (reference convention) or sum (exact).",
        choices=("mean", "sum"),
    )
    guidance_scale: float | None = _doc(None, "Classifier-free guidance weight (None: the env's).")
    eta: float | None = _doc(
        None, "The sampler's stochasticity: DDIM η for SD v1, the SDE noise level a for flow models (None: the "
        "env's; must be > 0)."
    )
    num_steps: int | None = _doc(None, "Denoising steps per episode (None: the env's).")
    env_kwargs: dict[str, Any] = _doc(
        {},
        "Extra keyword arguments for gym.make_vec (model path, prompts, reward_kwargs, …).",
    )
    device: str = _doc("cpu", "Torch device.")
    channels_last: bool = _doc(
        False,
        "Speed: network weights and inputs in channels-last memory format (oneDNN / tensor-core "
        "convolutions).",
    )
    autocast_dtype: str | None = _doc(
        None,
        "Speed: torch.autocast dtype of network calls in sampling and training: None (fp32), \"bf16\" or "
        "\"fp16\".",
        choices=(None, "bf16", "fp16"),
    )
    compile_network: bool = _doc(
        False,
        "Speed: call the policy's network through torch.compile (each batch shape compiles once, in the first "
        "epoch).",
    )
    attention: str = _doc(
        "sdpa",
        "Speed: attention kernels of the network: \"sdpa\" (fused scaled_dot_product_attention; long "
        "sequences, GPUs) or \"math\" (matmuls + softmax; faster on CPUs for short sequences, and under "
        "bf16 autocast).",
        choices=ATTENTION_IMPLS,
    )
    gradient_checkpointing: bool = _doc(
        False,
        "Memory: recompute the network's activations in the backward pass instead of storing them (diffusers' "
        "enable_gradient_checkpointing): training holds one block's activations instead of all, for one more "
        "forward per training call. For full fine-tuning of large networks or large micro-batches.",
    )
    recompute_old_log_probs: bool = _doc(
        False,
        "DDPO-IS: recompute old log-probs in the training micro-batches before the first pass (reduced "
        "precision).",
    )
    async_rewards: bool = _doc(
        False,
        "Compute each batch's rewards in a worker thread while the next batch is sampled.",
    )
    save_every: int = _doc(1, "Save a checkpoint every this many epochs (and at the end).")
    grid_every: int = _doc(
        0,
        "Write evaluation sample grids every this many epochs (0: only before and after).",
    )
    num_eval_prompts: int = _doc(8, "Number of fixed evaluation prompts in the grids.")
    output_dir: str = _doc(
        "runs",
        "Where runs are written (a run directory is created below it unless run_dir is set).",
    )
    run_dir: str | None = _doc(None, "Explicit run directory (none: output_dir/<env>-<algo>-s<seed>).")
    progress: bool = _doc(True, "Show progress bars.")
    time_limit_s: float = _doc(
        0.0,
        "Training time limit in seconds (0: none): no epoch starts that the last epoch's duration says "
        "would end past it (the first epoch always runs).",
    )

    def validate(self) -> TrainConfig:
        """Refuse settings that make no sense, with a message that says how to fix them."""
        errors = _type_errors(self)
        if errors:  # the checks below compare values; first make sure they have the right types
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))
        if self.algo not in registered_algos():
            errors.append(f"algo={self.algo!r}: expected one of {registered_algos()}")
        for name in ("num_epochs", "samples_per_epoch", "sample_batch_size", "train_batch_size",
                     "micro_batch_size", "num_inner_epochs", "rwr_updates_per_epoch", "save_every"):  # fmt: skip
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.reward_query_budget < 0:
            errors.append(f"reward_query_budget={self.reward_query_budget}: expected >= 0 (0 = no budget)")
        if self.samples_per_epoch % max(1, self.sample_batch_size):
            errors.append(
                f"samples_per_epoch={self.samples_per_epoch} is not a multiple of sample_batch_size="
                f"{self.sample_batch_size}: make samples_per_epoch a multiple of it"
            )
        if self.algo.startswith("rwr") and self.train_batch_size > self.samples_per_epoch:
            errors.append(
                f"train_batch_size={self.train_batch_size} exceeds samples_per_epoch={self.samples_per_epoch}: "
                "RWR draws its batches from the epoch's samples; expected train_batch_size <= samples_per_epoch"
            )
        elif not self.algo.startswith("rwr") and self.samples_per_epoch % max(1, self.train_batch_size):
            errors.append(
                f"train_batch_size={self.train_batch_size} does not divide samples_per_epoch="
                f"{self.samples_per_epoch}: choose a divisor, e.g. {_largest_divisor(self.samples_per_epoch, self.train_batch_size)}"
            )
        if isinstance(self.samples_per_prompt, int) and (
            self.samples_per_prompt < 1 or self.sample_batch_size % self.samples_per_prompt
        ):
            errors.append(
                f"samples_per_prompt={self.samples_per_prompt}: expected a positive divisor of "
                f"sample_batch_size={self.sample_batch_size}"
            )
        if not 0 < self.timestep_fraction <= 1:
            errors.append(f"timestep_fraction={self.timestep_fraction}: expected 0 < fraction <= 1")
        if self.eta is not None and not self.eta > 0:
            errors.append(f"eta={self.eta}: the policy has no density for eta <= 0; use eta > 0 (DDPO uses 1)")
        # ``not x > 0`` (rather than ``x <= 0``) also refuses NaN.
        for name in ("learning_rate", "clip_range", "adv_clip_max", "max_grad_norm"):
            value = getattr(self, name)
            if not value > 0 or (name != "max_grad_norm" and not math.isfinite(value)):
                errors.append(f"{name}={value}: expected a finite number > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: expected 0 <= beta < 1")
        for name in ("adam_weight_decay", "adam_epsilon", "time_limit_s"):
            if not 0 <= getattr(self, name) < math.inf:
                errors.append(f"{name}={getattr(self, name)}: expected a finite number >= 0")
        if not math.isfinite(self.rwr_beta):
            errors.append(f"rwr_beta={self.rwr_beta}: expected a finite number")
        for name in ("seed", "per_prompt_buffer_size", "grid_every"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)}: expected an integer >= 0")
        for name in ("per_prompt_min_count", "num_eval_prompts"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.num_steps is not None and self.num_steps < 1:
            errors.append(f"num_steps={self.num_steps}: expected a positive integer (or None: the env's)")
        if self.guidance_scale is not None and not 1 <= self.guidance_scale < math.inf:
            errors.append(f"guidance_scale={self.guidance_scale}: expected a finite number >= 1 (1: no guidance)")
        if self.eta is not None and not math.isfinite(self.eta):
            errors.append(f"eta={self.eta}: expected a finite number > 0")
        if self.algo == "ddpo-sf" and self.num_inner_epochs != 1:
            errors.append("ddpo-sf is on-policy: num_inner_epochs must be 1 (use ddpo-is for several passes)")
        if self.rwr_weighting not in ("reward", "advantage"):
            errors.append(f"rwr_weighting={self.rwr_weighting!r}: expected 'reward' (the paper's) or 'advantage'")
        if not 0 < self.rwr_sparse_quantile < 1:
            errors.append(f"rwr_sparse_quantile={self.rwr_sparse_quantile}: expected 0 < q < 1")
        if self.log_prob_reduction not in ("mean", "sum"):
            errors.append(f"log_prob_reduction={self.log_prob_reduction!r}: expected 'mean' or 'sum'")
        if self.lora_rank is not None and self.lora_rank < 1:
            errors.append(f"lora_rank={self.lora_rank}: expected a positive integer, or None for full fine-tuning")
        if self.autocast_dtype not in (None, "bf16", "fp16"):
            errors.append(f"autocast_dtype={self.autocast_dtype!r}: expected None (fp32), 'bf16' or 'fp16'")
        if self.attention not in ATTENTION_IMPLS:
            errors.append(f"attention={self.attention!r}: expected 'sdpa' or 'math'")
        if self.per_prompt_buffer_size and self.per_prompt_min_count > self.per_prompt_buffer_size:
            errors.append(
                f"per_prompt_min_count={self.per_prompt_min_count} > per_prompt_buffer_size="
                f"{self.per_prompt_buffer_size}: it could never be reached; expected min_count <= buffer_size"
            )
        if errors:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))
        return self

    def policy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~agents.policy.GaussianDenoisingPolicy` that this config sets."""
        return dict(lora_rank=self.lora_rank, reduction=self.log_prob_reduction, channels_last=self.channels_last,
                    autocast_dtype=self.autocast_dtype, compile_network=self.compile_network,
                    attention=self.attention, gradient_checkpointing=self.gradient_checkpointing)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config written to a run's config.json; credentials redacted there are dropped, so the
        reward falls back to ``api_key_env`` / ``OPENAI_API_KEY`` (see :mod:`rewards.secrets`)."""
        from rewards.secrets import drop_redacted

        data = drop_redacted({RENAMED.get(k, k): v for k, v in data.items()})  # and fields renamed since
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# DDPO appendix A.6 (Stable Diffusion v1.4): AdamW lr 1e-5, weight decay 1e-4; LoRA rank 4.
_SD14_COMMON = dict(lora_rank=4, learning_rate=1e-5, adam_weight_decay=1e-4, sample_batch_size=16,
                    micro_batch_size=64, device="cuda", async_rewards=True)  # fmt: skip
# Flow-GRPO on SD3.5-Medium (github.com/yifan123/flow_grpo): scripts/train_sd3.py puts LoRA rank 32 on the
# transformer's attention projections (lora_alpha 64 there; this project's LoRA scales by alpha = rank) and
# runs the LoRA-wrapped transformer in fp32 without autocast; config/base.py: AdamW lr 3e-4, weight decay 1e-4,
# clip range 1e-4, one inner epoch; config/grpo.py (`pickscore_sd3`, `geneval_sd3`): 48 prompts × 24 images
# per epoch (num_image_per_prompt 24), two optimizer steps per epoch (gradient_accumulation_steps =
# num_batches_per_epoch // 2), timestep_fraction 0.99 of 10 steps, i.e. int(9.9) = 9 steps trained; here
# the count is round(f · S), so 0.9. Its KL penalty (train.beta) and EMA have no field here.
_SD35_COMMON = dict(lora_rank=32, learning_rate=3e-4, adam_weight_decay=1e-4, clip_range=1e-4, sample_batch_size=24,
                    samples_per_prompt=24, samples_per_epoch=48 * 24, timestep_fraction=0.9, micro_batch_size=16,
                    device="cuda", async_rewards=True)  # fmt: skip
# Tiny presets: sized so one epoch of 64 samples takes about 15 s on a 2-core CPU.
_TINY_COMMON = dict(learning_rate=3e-4, sample_batch_size=64, samples_per_epoch=64, micro_batch_size=320,
                    per_prompt_buffer_size=32, per_prompt_min_count=8)  # fmt: skip

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sd14": {
        "ddpo-is": dict(_SD14_COMMON, samples_per_epoch=256, train_batch_size=64, num_inner_epochs=1),
        "ddpo-sf": dict(_SD14_COMMON, samples_per_epoch=256, train_batch_size=256, num_inner_epochs=1),
        "rwr": dict(_SD14_COMMON, samples_per_epoch=10_000, sample_batch_size=16, train_batch_size=128,
                    rwr_updates_per_epoch=400),  # fmt: skip
        "rwr-sparse": dict(_SD14_COMMON, samples_per_epoch=10_000, sample_batch_size=16, train_batch_size=128,
                           rwr_updates_per_epoch=400),  # fmt: skip
    },
    "sd35": {
        "ddpo-is": dict(_SD35_COMMON, train_batch_size=24 * 24, num_inner_epochs=1),  # two steps per epoch
        "ddpo-sf": dict(_SD35_COMMON, train_batch_size=48 * 24, num_inner_epochs=1),  # on-policy: one step
        # RWR has no Flow-GRPO counterpart: Flow-GRPO's epoch of groups (so the per-prompt softmax compares 24
        # samples of one prompt), each sample regressed about 5 times per epoch as in DDPO appendix A.6's RWR
        # (400 steps × 128 of 10,000 samples; here 45 × 128 of 1,152), at a tenth of the learning rate as the
        # tiny presets (RWR takes many more optimizer steps per epoch than DDPO). Untuned.
        "rwr": dict(_SD35_COMMON, train_batch_size=128, rwr_updates_per_epoch=45, learning_rate=3e-5),
        "rwr-sparse": dict(_SD35_COMMON, train_batch_size=128, rwr_updates_per_epoch=45, learning_rate=3e-5),
    },
    "tiny": {
        # clip 1e-3, not the paper's 1e-4: mean-reduced log-ratios average over 256 latent dimensions here
        # (16,384 for SD v1.4), so the same per-dimension change moves them more; with 1e-4 over 70% of
        # pairs were clipped and learning stalled (d 0.40 vs 0.55 after 512 queries in a side-by-side trial).
        # Two passes over each epoch's samples in optimizer steps of 32 samples (4 steps per epoch): at
        # 2,048 queries on Compressibility (seed 0) d was 1.10, against 0.91 with one pass in steps of 16
        # and 1.01 with two passes in steps of 64 (python -m benchmarks.improvement --set ... --tag ...).
        "ddpo-is": dict(_TINY_COMMON, train_batch_size=32, num_inner_epochs=2, clip_range=1e-3),
        "ddpo-sf": dict(_TINY_COMMON, train_batch_size=64, num_inner_epochs=1),
        # RWR weighs samples within each prompt, so its batches repeat prompts (8 prompts × 8 samples);
        # with one sample per prompt every weight is 1 and RWR degenerates into self-distillation.
        # β: see TINY_RWR_BETA (set per task by preset_config).
        "rwr": dict(_TINY_COMMON, train_batch_size=64, rwr_updates_per_epoch=8, learning_rate=3e-5,
                    samples_per_prompt=8),  # fmt: skip
        "rwr-sparse": dict(_TINY_COMMON, train_batch_size=64, rwr_updates_per_epoch=8, learning_rate=3e-5,
                           samples_per_prompt=8),  # fmt: skip
    },
}


# RWR's β on the tiny tasks (appendix A.2 weights softmax(β r) per prompt, so β has the reward's inverse
# units): about 1 / the base model's within-prompt reward std, so that one std of reward changes a sample's
# weight by a factor e within its prompt. Measured on the shipped model, 8 training prompts × 8 samples:
# 0.057 kB (JPEG size, both JPEG tasks) and 0.064 (BERTScore recall, prompt alignment).
TINY_RWR_BETA = {"Compressibility": 16.0, "Incompressibility": 16.0, "PromptAlignment": 16.0}
# The same on the embedded tiny flow model (Denoise-TinyFlow-*, SDE a = 0.7, guidance 4.5), 8 training prompts
# (every 160th of train_prompts()) × 8 samples, seed 0: within-prompt std 0.070 kB (JPEG) and 0.042 (BERTScore
# recall); measured the same way the DDIM model gives 0.076 and 0.069.
TINYFLOW_RWR_BETA = {"Compressibility": 14.0, "Incompressibility": 14.0, "PromptAlignment": 24.0}


MEAN_TUNED_CLIP_MAX = 1e-2  # clip ranges at or below this are of the mean-reduced scale (paper 1e-4, tiny 1e-3)


def compatibility_warnings(cfg: TrainConfig, latent_dim: int | None = None) -> list[str]:
    """Settings that validate one by one but do not work together as intended, each with the reason.

    ``latent_dim``: the number of latent dimensions D (the env's ``prod(latent_shape)``), when known.
    A sum-reduced log-prob is D times the mean-reduced one, and so is every log-ratio: PPO's
    ``ratio = exp(Δ)`` then moves D times further from 1, and a clip range tuned for the mean (the
    paper's 1e-4) clips nearly every pair (a trial: clipfrac 0.75, approx_kl 5.7e5).
    """
    out = []
    uses_clip = cfg.algo == "ddpo-is"
    if uses_clip and cfg.log_prob_reduction == "sum" and cfg.clip_range <= MEAN_TUNED_CLIP_MAX:
        d = f"D={latent_dim}" if latent_dim else "D = the number of latent dimensions"
        scaled = f"{cfg.clip_range * latent_dim:.3g}" if latent_dim else "clip_range·D"
        out.append(
            f"log_prob_reduction='sum' with clip_range={cfg.clip_range:g}: that clip range is of the scale of "
            f"mean-reduced log-probs; summed over {d} latent dimensions every log-ratio is D times larger, so "
            f"expect ratios of order exp(±D·δ) and most pairs clipped (clipfrac near 1, huge approx_kl); use "
            f"log_prob_reduction='mean', or scale clip_range by D (about {scaled})"
        )
    return out


def preset_config(preset: str, algo: str, **overrides: Any) -> TrainConfig:
    """The config of ``preset`` ("sd14", "sd35" or "tiny") for ``algo``, with field overrides.

    The tiny preset serves both embedded models; its RWR β is looked up by the task of ``env_id`` in
    :data:`TINYFLOW_RWR_BETA` for ``Denoise-TinyFlow-*`` IDs, else in :data:`TINY_RWR_BETA`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    base = dict(PRESETS[preset].get(algo) or {})
    if preset == "tiny" and algo == "rwr":
        env_id = overrides.get("env_id", TrainConfig.env_id)
        betas = TINYFLOW_RWR_BETA if env_id.startswith("Denoise-TinyFlow-") else TINY_RWR_BETA
        task = next((t for t in betas if f"-{t}-" in env_id), None)
        if task is not None:
            base["rwr_beta"] = betas[task]
    return TrainConfig(algo=algo, **{**base, **overrides})
