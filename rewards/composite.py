"""User callables and weighted sums of rewards (multi-objective rewards).

:class:`CallableReward` wraps any user function with the reward signature so its output is validated
(``check_reward_output``) and it carries a ``name``. :class:`WeightedSum` combines rewards given by
registered name or as callables::

    WeightedSum({"aesthetic": 1.0, "jpeg_compressibility": 0.1})
    WeightedSum([(my_fn, 0.5), ("jpeg_incompressibility", 2.0)])

Its reward is ``sum_i w_i * r_i``. Its info merges the components' infos per component: for a
component named ``c`` it holds ``c/reward`` (the unweighted component reward) and ``c/<key>`` for every
key of that component's info, so two components with the same info keys never collide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rewards.base import RewardFn, RewardInfo, _as_tensor, check_prompts, check_reward_output, reward_name


def _batch_size(images: Any) -> int:
    return int(_as_tensor(images).shape[0])


def _images_device(images: Any) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")


class CallableReward:
    """Wrap a user callable ``fn(images, prompts)`` as a validated reward.

    ``fn`` may return ``(rewards, info)`` or bare rewards (tensor, numpy array or list of length B);
    the wrapper always returns a float32 tensor ``[B]`` on the images' device and a dict.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        if not callable(fn):
            raise ValueError(f"reward is {type(fn).__name__}; expected a callable fn(images, prompts)")
        self.fn = fn
        self.name = name or reward_name(fn)

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        batch = _batch_size(images)
        check_prompts(prompts, batch)
        rewards, info = check_reward_output(self.fn(images, prompts), batch, name=f"reward {self.name!r}")
        return rewards.to(_images_device(images)), info

    def __repr__(self) -> str:
        return f"CallableReward({self.fn!r}, name={self.name!r})"


def _as_items(components: Any) -> list[tuple[Any, Any]]:
    if isinstance(components, Mapping):
        return list(components.items())
    if isinstance(components, Sequence) and not isinstance(components, str):
        items = []
        for i, item in enumerate(components):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"components[{i}] is {item!r}; expected a (reward, weight) pair")
            items.append((item[0], item[1]))
        return items
    raise ValueError(
        f"components is {type(components).__name__}; expected a mapping {{reward: weight}} "
        "or a sequence of (reward, weight) pairs"
    )


class WeightedSum:
    """Reward = ``sum_i weight_i * reward_i`` over rewards given by registered name or as callables.

    ``components``: a mapping ``{name_or_callable: weight}`` or a sequence of ``(name_or_callable,
    weight)`` pairs. ``component_kwargs``: optional ``{name: kwargs}`` passed to :func:`make_reward`
    for components given by name. Components are evaluated in the given order.
    """

    name = "weighted_sum"

    def __init__(self, components: Any, component_kwargs: Mapping[str, Mapping[str, Any]] | None = None):
        from rewards import make_reward  # late import: the registry imports this module

        items = _as_items(components)
        if not items:
            raise ValueError("components is empty; expected at least one (reward, weight)")
        component_kwargs = dict(component_kwargs or {})
        for key in component_kwargs:
            if not any(isinstance(r, str) and r == key for r, _ in items):
                raise ValueError(f"component_kwargs has {key!r}, which is not a component given by name")
        self.names: list[str] = []
        self.weights: list[float] = []
        self.rewards: list[RewardFn] = []
        for reward, weight in items:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of {reward!r} is {weight!r}; expected a finite number")
            if isinstance(reward, str):
                fn = make_reward(reward, **component_kwargs.get(reward, {}))
                base = reward
            elif callable(reward):
                fn = reward
                base = reward_name(reward)
            else:
                raise ValueError(f"component {reward!r}; expected a registered reward name or a callable")
            name, k = base, 2
            while name in self.names:
                name, k = f"{base}#{k}", k + 1
            self.names.append(name)
            self.weights.append(float(weight))
            self.rewards.append(fn if isinstance(fn, CallableReward) else CallableReward(fn, name=name))

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        batch = _batch_size(images)
        check_prompts(prompts, batch)
        device = _images_device(images)
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        info: RewardInfo = {}
        for name, weight, fn in zip(self.names, self.weights, self.rewards):
            r, sub = fn(images, prompts)
            r = r.to(device=device, dtype=torch.float32)
            total = total + weight * r
            info[f"{name}/reward"] = r
            for key, value in sub.items():
                info[f"{name}/{key}"] = value
        return total, info

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: {w}" for n, w in zip(self.names, self.weights))
        return f"WeightedSum({{{parts}}})"
