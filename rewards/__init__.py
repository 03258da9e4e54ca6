"""Reward functions for denoise-gym: one signature for all (see :mod:`rewards.base`).

``make_reward(name, **kwargs)`` builds a registered reward; ``register_reward(name, factory)`` adds one.
``make_reward({"aesthetic": 1.0, "jpeg_compressibility": 0.1})`` builds a :class:`WeightedSum`
(multi-objective reward; names and callables may be mixed), and ``make_reward(fn)`` returns a user
callable unchanged (wrap it in :class:`CallableReward` to have its output validated).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rewards.aesthetic import AestheticHead, AestheticReward, clip_preprocess, load_aesthetic_head
from rewards.alignment import (
    ChatCompletionsClient,
    PromptAlignmentReward,
    RewardServerError,
    TinyPromptAlignment,
    make_bert_scorer,
)
from rewards.async_eval import AsyncRewardEvaluator, RewardHandle
from rewards.base import (
    MissingModelError,
    RewardError,
    RewardFn,
    as_float_images,
    as_uint8_images,
    check_options,
    check_prompts,
    check_reward_output,
    reward_name,
    score_batch,
)
from rewards.clip_score import ClipScoreReward
from rewards.composite import CallableReward, WeightedSum
from rewards.hps import HPSv2Reward
from rewards.image_reward import ImageRewardReward
from rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from rewards.ocr import OcrReward
from rewards.pickscore import PickScoreReward
from rewards.remote import RemoteReward, serve_reward_in_thread
from rewards.server import serve_in_thread
from rewards.tinyworld.geneval import TinyGenEval
from rewards.vlm_judge import VlmJudgeReward

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str, factory: Callable[..., RewardFn], *, override: bool = False) -> None:
    """Register ``factory(**kwargs) -> reward`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name is {name!r}; expected a non-empty string")
    if not callable(factory):
        raise ValueError(f"factory for {name!r} is {type(factory).__name__}; expected a callable")
    if name in _REGISTRY and not override:
        raise ValueError(f"reward {name!r} is already registered; pass override=True to replace it")
    _REGISTRY[name] = factory


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def make_reward(name_or_fn: str | RewardFn | Mapping[Any, float], **kwargs: Any) -> RewardFn:
    """Build a reward from a registered name, a ``{reward: weight}`` mapping (a :class:`WeightedSum`;
    ``kwargs`` go to its ``component_kwargs``), or return a callable unchanged."""
    if isinstance(name_or_fn, Mapping):
        return WeightedSum(name_or_fn, component_kwargs=kwargs or None)
    if callable(name_or_fn) and not isinstance(name_or_fn, str):
        if kwargs:
            raise ValueError("reward kwargs were given with a callable reward; configure the callable instead")
        return name_or_fn
    if name_or_fn not in _REGISTRY:
        raise ValueError(f"unknown reward {name_or_fn!r}; expected a callable or one of {registered_rewards()}")
    factory = _REGISTRY[name_or_fn]
    check_options(factory, kwargs, f"reward {name_or_fn!r}")  # a misspelt option: one line, not a TypeError
    return factory(**kwargs)


def no_reward(images, prompts):
    """``reward="none"``: zeros, nothing evaluated (envs that only draw pictures: grids, sample tools)."""
    import torch

    return torch.zeros(len(prompts)), {}


register_reward("none", lambda: no_reward)
register_reward("jpeg_compressibility", JpegCompressibility)
register_reward("jpeg_incompressibility", JpegIncompressibility)
register_reward("weighted_sum", WeightedSum)
register_reward("aesthetic", AestheticReward)
register_reward("prompt_alignment", PromptAlignmentReward)
register_reward("tiny_prompt_alignment", TinyPromptAlignment)
register_reward("tiny_geneval", TinyGenEval)
register_reward("pickscore", PickScoreReward)
register_reward("hpsv2", HPSv2Reward)
register_reward("image_reward", ImageRewardReward)
register_reward("clip_score", ClipScoreReward)
register_reward("ocr", OcrReward)
register_reward("vlm_judge", VlmJudgeReward)
register_reward("remote", RemoteReward)

__all__ = [
    "AestheticHead",
    "AestheticReward",
    "AsyncRewardEvaluator",
    "CallableReward",
    "ClipScoreReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "PickScoreReward",
    "ChatCompletionsClient",
    "JpegCompressibility",
    "JpegIncompressibility",
    "MissingModelError",
    "OcrReward",
    "PromptAlignmentReward",
    "RewardError",
    "RewardFn",
    "RewardHandle",
    "RemoteReward",
    "RewardServerError",
    "TinyGenEval",
    "TinyPromptAlignment",
    "VlmJudgeReward",
    "WeightedSum",
    "as_float_images",
    "as_uint8_images",
    "check_prompts",
    "check_reward_output",
    "clip_preprocess",
    "jpeg_size_kb",
    "load_aesthetic_head",
    "make_bert_scorer",
    "make_reward",
    "register_reward",
    "registered_rewards",
    "reward_name",
    "score_batch",
    "serve_in_thread",
    "serve_reward_in_thread",
]
