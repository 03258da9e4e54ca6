"""One typed configuration per training run, with presets (DDPO appendix A.6, Flow-GRPO's SD3.5 and tiny CPU
ones).

:class:`TrainConfig` holds what every algorithm shares; an algorithm's own settings are its registered config
dataclass, nested as ``cfg.algo_config`` (``agents.registry.register_algo(..., config=...)``). For
convenience the algorithm's fields may be given and read flat: ``TrainConfig(algo="ddpo-is", clip_range=1e-3)``
puts ``clip_range`` into ``algo_config``, and ``cfg.clip_range`` reads it from there. Presets are registered
by each algorithm (:func:`preset_config`); the sizes they share are :data:`TINY_COMMON`, :data:`SD14_COMMON`
and :data:`SD35_COMMON`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from agents.core import LR_DECAYS
from agents.fields import doc_field as _doc
from agents.fields import field_names, type_errors
from agents.fields import largest_divisor as _largest_divisor  # noqa: F401  (kept for importers)
from agents.policy import ATTENTION_IMPLS

RENAMED = {"compile_unet": "compile_network"}  # old field name -> current one
# Fields that config.json files written before the algorithm API held flat; they now belong to the algorithms
# that have them (``from_dict`` moves each into ``algo_config`` where the run's algorithm has it, else drops it).
LEGACY_ALGO_FIELDS = ("num_inner_epochs", "clip_range", "rwr_beta", "rwr_weighting", "rwr_cfg_training",
                      "rwr_sparse_quantile", "rwr_updates_per_epoch", "recompute_old_log_probs")  # fmt: skip
PRESETS = ("sd14", "sd35", "tiny")  # the preset names; each algorithm registers its values for them
_TRAIN_TIMESTEPS = re.compile(r"all|(first|last):(\d+)|(\d+):(\d+)")


def _type_errors(cfg: Any) -> list[str]:
    return type_errors(cfg, skip=("algo_config",))


def field_help(name: str) -> str:
    """The documentation of the :class:`TrainConfig` field ``name``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}[name]


def algo_config_class(algo: Any) -> type | None:
    """The config dataclass ``algo`` registered (None for an unknown algorithm)."""
    from agents.registry import find_algo

    spec = find_algo(algo) if isinstance(algo, str) else None
    return spec.config if spec is not None else None


def resolve_algo_config(algo: Any, value: Any) -> Any:
    """``value`` as an instance of ``algo``'s config class where it can be: None gives the defaults, a dict of its
    fields an instance. Anything else (an unknown algorithm, a dict naming fields it lacks) is kept as it is, for
    :meth:`TrainConfig.validate` to report."""
    cls = algo_config_class(algo)
    if cls is None:
        return value
    if value is None:
        return cls()
    if isinstance(value, dict) and set(value) <= set(field_names(cls)):
        return cls(**value)
    return value


def parse_train_timesteps(spec: str, num_steps: int) -> tuple[int, int] | None:
    """The step window ``[a, b)`` that ``train_timesteps`` names for ``num_steps`` steps (None: all of them).

    Raises ValueError when the window does not fit the schedule."""
    m = _TRAIN_TIMESTEPS.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"train_timesteps={spec!r}: expected 'all', 'first:K', 'last:K' or 'A:B'")
    if spec.strip() == "all":
        return None
    if m.group(1):
        k = int(m.group(2))
        a, b = (0, k) if m.group(1) == "first" else (num_steps - k, num_steps)
    else:
        a, b = int(m.group(3)), int(m.group(4))
    if not 0 <= a < b <= num_steps:
        raise ValueError(f"train_timesteps={spec!r} is steps {a}…{b - 1} of a {num_steps}-step schedule: expected "
                         f"a non-empty window within steps 0…{num_steps - 1}")  # fmt: skip
    return (a, b) if (a, b) != (0, num_steps) else None


@dataclass
class _SharedFields:
    """The fields of :class:`TrainConfig` (which adds the flat keyword arguments of the algorithm's fields)."""

    env_id: str = _doc(
        "Denoise-Tiny-Compressibility-v0",
        "Registered environment ID (``gym.make_vec`` is called with it).",
    )
    algo: str = _doc(
        "ddpo-is",
        "Algorithm: a registered one (listed below; agents.registry.register_algo adds one). Its own settings are "
        "algo_config's fields: `denoise-gym train --algo NAME --help` lists them.",
    )
    algo_config: Any = _doc(
        None,
        "The algorithm's own settings: an instance of the config dataclass it registered, or a dict of its "
        "fields (None: its defaults). Keyword arguments and options naming its fields set them.",
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
        "Trajectories per drawn prompt in a sample batch (1: every trajectory draws its own prompt): the "
        "group size G. Groups of repeated prompts give per-prompt statistics, group-relative advantages and "
        "per-prompt weights something to compare.",
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
    timestep_fraction: float = _doc(
        1.0,
        "Fraction of each trajectory's trainable steps (see train_timesteps) trained on, a random subset per "
        "sample of round(f × steps) of them (0 < f <= 1).",
    )
    train_timesteps: str = _doc(
        "all",
        "Which denoising steps are trained on (the others are still sampled with the policy, and every sample "
        "still costs one reward query): \"all\", \"first:K\" (the K highest-noise steps), \"last:K\", or "
        "\"A:B\" (steps A … B-1, counted from 0 at pure noise).",
    )
    learning_rate: float = _doc(1e-5, "AdamW learning rate.")
    lr_warmup_steps: int = _doc(
        0,
        "Optimizer steps over which the learning rate rises linearly to learning_rate (step k of N uses k/N of "
        "it; 0: none). AdamW's first step moves every trainable parameter by about the learning rate, whatever "
        "its gradient's size.",
    )
    lr_decay: str = _doc(
        "constant",
        "Learning-rate decay over the run's planned epochs (num_epochs, or fewer where reward_query_budget "
        "binds): \"constant\"; \"linear\" (epoch e of E trains at (1 - e/E) of learning_rate); \"cosine\" "
        "(at (1 + cos(π e/E)) / 2 of it). A function of the epoch, so a resumed run continues it.",
        choices=LR_DECAYS,
    )
    adam_beta1: float = _doc(0.9, "AdamW β1.")
    adam_beta2: float = _doc(0.999, "AdamW β2.")
    adam_weight_decay: float = _doc(1e-4, "AdamW weight decay (appendix A.6: 1e-4).")
    adam_epsilon: float = _doc(1e-8, "AdamW ε.")
    max_grad_norm: float = _doc(1.0, "Gradient clipping by global norm.")
    adv_clip_max: float = _doc(5.0, "Advantages are clipped to ±adv_clip_max.")
    per_prompt_buffer_size: int = _doc(
        32,
        "Per-prompt reward buffer length (0: normalise by batch statistics only).",
    )
    per_prompt_min_count: int = _doc(
        16,
        "Rewards a prompt needs before its own statistics replace the batch's.",
    )
    lora_rank: int | None = _doc(None, "LoRA rank (None: full fine-tuning of the network).")
    log_prob_reduction: str = _doc(
        "mean",
        "Log-density reduction over latent dimensions: mean (reference convention) or sum (exact).",
        choices=("mean", "sum"),
    )
    guidance_scale: float | None = _doc(None, "Classifier-free guidance weight (None: the env's).")
    cfg_free: bool = _doc(
        False,
        "CFG-free: sample, train and draw the grids without classifier-free guidance (scale 1, one network "
        "call per step: the conditional prediction). Leave guidance_scale unset (or 1).",
    )
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
    threads: int = _doc(
        0,
        "Speed: torch intra-op threads of a CPU run, set when the trainer starts (0: the cores that other "
        "processes do not keep busy, measured over 0.1 s; see agents/runtime.py). Process-wide.",
    )
    processes: int = _doc(
        0,
        "Speed: data-parallel processes of a CPU run started without a launcher, forked on this machine, "
        "one thread each (0: one per idle core where the epoch's sampling batches divide among them and "
        "threads is 0, else 1; must divide samples_per_epoch / sample_batch_size). Same samples, same "
        "update up to summation order (docs/scale-out.md).",
    )
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
    async_rewards: bool = _doc(
        False,
        "Compute each batch's rewards in a worker thread while the next batch is sampled.",
    )
    save_every: int = _doc(1, "Save a checkpoint every this many epochs (and at the end).")
    keep_checkpoints: int = _doc(
        2,
        "Checkpoints kept in run_dir/checkpoints, the newest ones (0: keep every one, e.g. to evaluate a run "
        "along its course; at least 2 otherwise, so that a crash while saving leaves a complete one).",
    )
    grid_every: int = _doc(
        0,
        "Write evaluation sample grids every this many epochs (0: only before and after).",
    )
    num_eval_prompts: int = _doc(8, "Number of fixed evaluation prompts in the grids.")
    diagnostic_samples: int = _doc(
        4,
        "Diagnostics (agents/diagnostics.py): trajectories per epoch on which charts/kl_ref (KL per step to the "
        "base weights) is measured, one extra policy and reference call per step each (0: off). Under full "
        "fine-tuning without a reference of the algorithm's own this keeps a frozen copy of the network.",
    )
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


    def __post_init__(self) -> None:
        self.algo_config = resolve_algo_config(self.algo, self.algo_config)


_SHARED_NAMES = frozenset(f.name for f in dataclasses.fields(_SharedFields))


class TrainConfig(_SharedFields):
    """Every setting of a run: the shared fields below, and the algorithm's own in ``algo_config``.

    Each field's documentation is its ``metadata["help"]`` (see :func:`agents.fields.doc_field`): the command
    line's help (agents/cli.py) is generated from it, so the dataclasses stay the one source. Keyword arguments
    that name fields of the algorithm's config go into ``algo_config``, and reading such a name on the config
    reads it from there (``cfg.clip_range`` is ``cfg.algo_config.clip_range``); a name the algorithm does not
    have is reported by :meth:`validate` with the list of those it has.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        own = {k: kwargs.pop(k) for k in list(kwargs) if k not in _SHARED_NAMES}
        if own:  # fields of the algorithm's config, given flat: merged onto algo_config
            base = kwargs.get("algo_config")
            if dataclasses.is_dataclass(base) and not isinstance(base, type):
                base = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            kwargs["algo_config"] = {**(base if isinstance(base, dict) else {}), **own}
        super().__init__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Fields of the algorithm's config, read flat (only called when ``name`` is not a shared field)."""
        if name.startswith("__") or name == "algo_config":
            raise AttributeError(name)
        ac = self.__dict__.get("algo_config")
        if isinstance(ac, dict) and name in ac:
            return ac[name]
        if dataclasses.is_dataclass(ac) and name in field_names(ac):
            return getattr(ac, name)
        raise AttributeError(f"TrainConfig has no field {name!r}, and algorithm {self.__dict__.get('algo')!r} "
                             "has no setting of that name")  # fmt: skip

    def algo_field_names(self) -> list[str]:
        """The fields of the algorithm's config (empty for an unknown algorithm)."""
        cls = algo_config_class(self.algo)
        return field_names(cls) if cls is not None else []

    def _algo_config_errors(self) -> list[str]:
        cls, ac = algo_config_class(self.algo), self.algo_config
        known = field_names(cls)
        if isinstance(ac, dict):
            have = (f"expected one of its fields {known} (`denoise-gym train --algo {self.algo} --help` lists them)"
                    if known else "it has no settings of its own: expected none")  # fmt: skip
            return [f"{k}={ac[k]!r:.80}: algorithm {self.algo!r} has no setting {k!r}; {have}"
                    for k in sorted(set(ac) - set(known))]  # fmt: skip
        if not isinstance(ac, cls):
            return [f"algo_config is a {type(ac).__name__}: expected {self.algo}'s {cls.__name__} or a dict of its "
                    "fields"]  # fmt: skip
        errors = type_errors(ac)
        if errors or not hasattr(ac, "validate"):  # the algorithm's checks compare values: types first
            return errors
        return list(ac.validate(self))

    def validate(self) -> TrainConfig:
        """Refuse settings that make no sense, with a message that says how to fix them (the algorithm's own
        settings are checked by its config's ``validate``)."""
        from agents.registry import registered_algos

        errors = _type_errors(self)
        if errors:  # the checks below compare values; first make sure they have the right types
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))
        if self.algo not in registered_algos():
            errors.append(f"algo={self.algo!r}: expected one of {registered_algos()}")
        for name in ("num_epochs", "samples_per_epoch", "sample_batch_size", "train_batch_size",
                     "micro_batch_size", "save_every"):  # fmt: skip
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.reward_query_budget < 0:
            errors.append(f"reward_query_budget={self.reward_query_budget}: expected >= 0 (0 = no budget)")
        if self.lr_warmup_steps < 0:
            errors.append(f"lr_warmup_steps={self.lr_warmup_steps}: expected >= 0 (0 = no warm-up)")
        if self.lr_decay not in LR_DECAYS:
            errors.append(f"lr_decay={self.lr_decay!r}: expected one of {list(LR_DECAYS)}")
        if self.keep_checkpoints == 1 or self.keep_checkpoints < 0:
            errors.append(f"keep_checkpoints={self.keep_checkpoints}: expected 0 (keep all) or >= 2")
        if self.samples_per_epoch % max(1, self.sample_batch_size):
            errors.append(
                f"samples_per_epoch={self.samples_per_epoch} is not a multiple of sample_batch_size="
                f"{self.sample_batch_size}: make samples_per_epoch a multiple of it"
            )
        batches = self.samples_per_epoch // max(1, self.sample_batch_size)  # sampling batches per epoch
        if self.processes > 1 and not self.device.startswith("cpu"):
            errors.append(f"processes={self.processes} with device={self.device!r}: processes are forked for CPU "
                          "runs; on GPUs start one process per GPU with torchrun or accelerate launch")
        elif self.processes > 1 and batches % self.processes:
            errors.append(
                f"processes={self.processes}: expected a divisor of the epoch's {batches} sampling batch(es) (samples_per_epoch / "
                f"sample_batch_size), as each process samples whole batches; a smaller sample_batch_size gives more"
            )
        if self.samples_per_prompt < 1 or self.sample_batch_size % self.samples_per_prompt:
            errors.append(
                f"samples_per_prompt={self.samples_per_prompt}: expected a positive divisor of "
                f"sample_batch_size={self.sample_batch_size}"
            )
        if not 0 < self.timestep_fraction <= 1:
            errors.append(f"timestep_fraction={self.timestep_fraction}: expected 0 < fraction <= 1")
        try:
            parse_train_timesteps(self.train_timesteps, 1_000_000)  # the syntax; the window is checked on the env
        except ValueError as exc:
            errors.append(str(exc))
        if self.eta is not None and not self.eta > 0:
            errors.append(f"eta={self.eta}: the policy has no density for eta <= 0; use eta > 0 (DDPO uses 1)")
        # ``not x > 0`` (rather than ``x <= 0``) also refuses NaN.
        for name in ("learning_rate", "adv_clip_max", "max_grad_norm"):
            value = getattr(self, name)
            if not value > 0 or (name != "max_grad_norm" and not math.isfinite(value)):
                errors.append(f"{name}={value}: expected a finite number > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: expected 0 <= beta < 1")
        for name in ("adam_weight_decay", "adam_epsilon", "time_limit_s"):
            if not 0 <= getattr(self, name) < math.inf:
                errors.append(f"{name}={getattr(self, name)}: expected a finite number >= 0")
        for name in ("seed", "per_prompt_buffer_size", "grid_every", "diagnostic_samples", "threads",
                     "processes"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)}: expected an integer >= 0")
        for name in ("per_prompt_min_count", "num_eval_prompts"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.num_steps is not None and self.num_steps < 1:
            errors.append(f"num_steps={self.num_steps}: expected a positive integer (or None: the env's)")
        if self.guidance_scale is not None and not 1 <= self.guidance_scale < math.inf:
            errors.append(f"guidance_scale={self.guidance_scale}: expected a finite number >= 1 (1: no guidance)")
        if self.cfg_free and self.guidance_scale not in (None, 1, 1.0):
            errors.append(f"cfg_free=True with guidance_scale={self.guidance_scale}: CFG-free runs at scale 1; "
                          "expected guidance_scale unset (or 1), or cfg_free=False")  # fmt: skip
        if self.eta is not None and not math.isfinite(self.eta):
            errors.append(f"eta={self.eta}: expected a finite number > 0")
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
        if self.algo in registered_algos():
            errors += self._algo_config_errors()
        if errors:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))
        return self

    @property
    def guidance(self) -> float | None:
        """The guidance scale sampling and training use: 1 when ``cfg_free``, else ``guidance_scale`` (None: the
        env's)."""
        return 1.0 if self.cfg_free else self.guidance_scale

    def policy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~agents.policy.GaussianDenoisingPolicy` that this config sets."""
        return dict(lora_rank=self.lora_rank, reduction=self.log_prob_reduction, channels_last=self.channels_last,
                    autocast_dtype=self.autocast_dtype, compile_network=self.compile_network,
                    attention=self.attention, gradient_checkpointing=self.gradient_checkpointing)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Every field; ``algo_config`` as a dict of the algorithm's fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config written to a run's config.json; credentials redacted there are dropped, so the
        reward falls back to ``api_key_env`` / ``OPENAI_API_KEY`` (see :mod:`rewards.secrets`).

        Files written before the algorithm API hold the algorithms' fields flat (:data:`LEGACY_ALGO_FIELDS`):
        each goes into ``algo_config`` when the run's algorithm has it, and is dropped otherwise (no algorithm
        read it)."""
        from rewards.secrets import drop_redacted

        data = drop_redacted({RENAMED.get(k, k): v for k, v in data.items()})  # and fields renamed since
        legacy = {k: data.pop(k) for k in LEGACY_ALGO_FIELDS if k in data}
        if legacy:
            cls_ = algo_config_class(data.get("algo", _SharedFields.algo))
            own = set(field_names(cls_)) if cls_ is not None else set()
            nested = dict(data.get("algo_config") or {})
            data["algo_config"] = {**{k: v for k, v in legacy.items() if k in own}, **nested}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (shared fields, ``algo_config``, or fields of the algorithm's config). A new
        ``algo`` without ``algo_config`` starts from that algorithm's defaults."""
        if "algo" in changes and changes["algo"] != self.algo and "algo_config" not in changes:
            changes["algo_config"] = None
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TrainConfig(**{**values, **changes})


# DDPO appendix A.6 (Stable Diffusion v1.4): AdamW lr 1e-5, weight decay 1e-4; LoRA rank 4.
SD14_COMMON = dict(lora_rank=4, learning_rate=1e-5, adam_weight_decay=1e-4, sample_batch_size=16,
                   micro_batch_size=64, device="cuda", async_rewards=True)  # fmt: skip
# Flow-GRPO on SD3.5-Medium (github.com/yifan123/flow_grpo): scripts/train_sd3.py puts LoRA rank 32 on the
# transformer's attention projections (lora_alpha 64 there; this project's LoRA scales by alpha = rank) and
# runs the LoRA-wrapped transformer in fp32 without autocast; config/base.py: AdamW lr 3e-4, weight decay 1e-4,
# clip range 1e-4 (set by the algorithms that clip), one inner epoch; config/grpo.py (`pickscore_sd3`,
# `geneval_sd3`): 48 prompts × 24 images per epoch (num_image_per_prompt 24), two optimizer steps per epoch
# (gradient_accumulation_steps = num_batches_per_epoch // 2), timestep_fraction 0.99 of 10 steps, i.e.
# int(9.9) = 9 steps trained; here the count is round(f · S), so 0.9. Its KL penalty is grpo's beta.
SD35_COMMON = dict(lora_rank=32, learning_rate=3e-4, adam_weight_decay=1e-4, sample_batch_size=24,
                   samples_per_prompt=24, samples_per_epoch=48 * 24, timestep_fraction=0.9, micro_batch_size=16,
                   device="cuda", async_rewards=True)  # fmt: skip
# Tiny presets: sized so one epoch of 64 samples takes about 15 s on a 2-core CPU. Training calls of 32 pairs:
# on the 2-core AMD EPYC, DDPO-IS's tiny preset at 192 queries and one thread (denoise-gym train under
# /usr/bin/time -v) peaked at 2,410 / 1,520 / 925 / 739 MB RSS with micro-batches of 320 / 160 / 64 / 32 pairs
# against 639 MB in the reference style (batches of 16), while its epochs took 17.3-18.0 s at every size.
# Since 2026-12-07 (TrainConfig.processes) a CPU run forks one process per idle core, one thread each; so that
# two processes can share an epoch it is sampled in two batches of 32, and each process trains 16 pairs per
# call: one thread's training call took 4.4 / 3.5 / 3.3 ms per row at 16 / 32 / 64 rows (pairs × 2 for
# classifier-free guidance), and 2 forked processes peaked at 813 MB PSS together with 16 pairs against
# 975 MB with 32 (benchmarks/end_to_end.py has the whole run's figures).
TINY_COMMON = dict(learning_rate=3e-4, sample_batch_size=32, samples_per_epoch=64, micro_batch_size=16,
                   per_prompt_buffer_size=32, per_prompt_min_count=8)  # fmt: skip


MEAN_TUNED_CLIP_MAX = 5e-2  # clip ranges at or below this are of the mean-reduced scale (paper 1e-4, tiny 1e-3; trials to 2e-2)


def compatibility_warnings(cfg: TrainConfig, latent_dim: int | None = None) -> list[str]:
    """Settings that validate one by one but do not work together as intended, each with the reason.

    ``latent_dim``: the number of latent dimensions D (the env's ``prod(latent_shape)``), when known.
    A sum-reduced log-prob is D times the mean-reduced one, and so is every log-ratio: PPO's
    ``ratio = exp(Δ)`` then moves D times further from 1, and a clip range tuned for the mean (the
    paper's 1e-4) clips nearly every pair (a trial: clipfrac 0.75, approx_kl 5.7e5). Applies to every
    algorithm whose config has a ``clip_range``.
    """
    out = []
    clip = getattr(cfg.algo_config, "clip_range", None)
    if clip is not None and cfg.log_prob_reduction == "sum" and clip <= MEAN_TUNED_CLIP_MAX:
        d = f"D={latent_dim}" if latent_dim else "D = the number of latent dimensions"
        scaled = f"{clip * latent_dim:.3g}" if latent_dim else "clip_range·D"
        out.append(
            f"log_prob_reduction='sum' with clip_range={clip:g}: that clip range is of the scale of "
            f"mean-reduced log-probs; summed over {d} latent dimensions every log-ratio is D times larger, so "
            f"expect ratios of order exp(±D·δ) and most pairs clipped (clipfrac near 1, huge approx_kl); use "
            f"log_prob_reduction='mean', or scale clip_range by D (about {scaled})"
        )
    return out


def preset_config(preset: str, algo: str, **overrides: Any) -> TrainConfig:
    """The config of ``preset`` ("sd14", "sd35" or "tiny") for ``algo``, with field overrides (shared fields or
    the algorithm's). The values are those ``algo`` registered for the preset (a dict, or a function of the
    ``env_id``, such as RWR's tiny β per task); an algorithm without one gets the defaults."""
    from agents.registry import find_algo

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    spec = find_algo(algo)
    base = spec.preset(preset, overrides.get("env_id", _SharedFields.env_id)) if spec is not None else {}
    return TrainConfig(algo=algo, **{**base, **overrides})
