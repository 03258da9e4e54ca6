"""Reward functions for denoise-gym: one signature for all (see :mod:`rewards.base`).

``make_reward(name, **kwargs)`` builds a registered reward; ``register_reward(name, factory)`` adds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rewards.base import (
    RewardFn,
    as_float_images,
    as_uint8_images,
    check_prompts,
    check_reward_output,
)
from rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str, factory: Callable[..., RewardFn], *, override: bool = False) -> None:
    """Register ``factory(**kwargs) -> reward`` under ``name``."""
    if name in _REGISTRY and not override:
        raise ValueError(f"reward {name!r} is already registered; pass override=True to replace it")
    _REGISTRY[name] = factory


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def make_reward(name_or_fn: str | RewardFn, **kwargs: Any) -> RewardFn:
    """Build a reward from a registered name, or return a callable unchanged."""
    if callable(name_or_fn) and not isinstance(name_or_fn, str):
        if kwargs:
            raise ValueError("reward kwargs were given with a callable reward; configure the callable instead")
        return name_or_fn
    if name_or_fn not in _REGISTRY:
        raise ValueError(f"unknown reward {name_or_fn!r}; expected a callable or one of {registered_rewards()}")
    return _REGISTRY[name_or_fn](**kwargs)


register_reward("jpeg_compressibility", JpegCompressibility)
register_reward("jpeg_incompressibility", JpegIncompressibility)

__all__ = [
    "RewardFn",
    "as_float_images",
    "as_uint8_images",
    "check_prompts",
    "check_reward_output",
    "jpeg_size_kb",
    "JpegCompressibility",
    "JpegIncompressibility",
    "make_reward",
    "register_reward",
    "registered_rewards",
]
