"""One signature for every reward.

A reward is any callable ``reward(images, prompts) -> (rewards, info)`` where

- ``images``: a ``[B, 3, H, W]`` tensor, either ``uint8`` in [0, 255] or floating point in [0, 1],
  on any device, or a list of ``PIL.Image.Image``;
- ``prompts``: a sequence of ``B`` strings (the prompt each image was generated from);
- ``rewards``: a float32 tensor of shape ``[B]`` on the images' device (CPU for PIL input);
- ``info``: a dict of extra per-batch metadata (lists or tensors of length ``B``, or scalars).

:func:`as_float_images` and :func:`as_uint8_images` turn any accepted input into one canonical form
and raise ``ValueError`` naming what was expected otherwise. :func:`check_reward_output` validates what
a reward returned, so user callables get a clear error instead of a shape mismatch deep in training.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

RewardInfo = dict[str, Any]


class RewardFn(Protocol):
    """The reward protocol (see the module docstring)."""

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]: ...


def _pil_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    arrays = []
    for i, im in enumerate(images):
        if not hasattr(im, "convert"):
            raise ValueError(f"images[{i}] is {type(im).__name__}; expected a PIL image in a list of images")
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"all PIL images must share one size, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _as_tensor(images: Any) -> torch.Tensor:
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is empty; expected at least one image")
        return _pil_to_tensor(images)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images is {type(images).__name__}; expected a [B, 3, H, W] tensor (uint8 or float in [0, 1]) "
            "or a list of PIL images"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected [B, 3, H, W]")
    return images


def as_float_images(images: Any) -> torch.Tensor:
    """Return images as a float32 ``[B, 3, H, W]`` tensor in [0, 1] on their own device."""
    x = _as_tensor(images)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images has dtype {x.dtype}; expected uint8 or a floating-point dtype")
    return x.float().clamp(0.0, 1.0)


def as_uint8_images(images: Any) -> torch.Tensor:
    """Return images as a uint8 ``[B, 3, H, W]`` tensor on their own device."""
    x = _as_tensor(images)
    if x.dtype == torch.uint8:
        return x
    return (as_float_images(x) * 255.0).round().to(torch.uint8)


def check_prompts(prompts: Sequence[str], batch: int) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts is {type(prompts).__name__}; expected a sequence of {batch} strings")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images; expected one prompt per image")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] is {type(p).__name__}; expected str")
    return list(prompts)


def check_reward_output(out: Any, batch: int, name: str = "reward") -> tuple[torch.Tensor, RewardInfo]:
    """Validate a reward function's return value and normalise it to ``(float32 tensor [B], dict)``.

    Accepts ``(rewards, info)`` or a bare ``rewards``; ``rewards`` may be a tensor, numpy array or list.
    NaN values are allowed through (the trainer decides what to do with them) but the shape must be ``[B]``.
    """
    info: RewardInfo = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise ValueError(f"{name} returned a tuple of length {len(out)}; expected (rewards, info_dict)")
        out, info = out
    if isinstance(out, (list, np.ndarray, float, int)):
        out = torch.as_tensor(np.asarray(out, dtype=np.float32))
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{name} returned {type(out).__name__}; expected a tensor of shape [{batch}]")
    if out.shape != (batch,):
        raise ValueError(f"{name} returned shape {tuple(out.shape)}; expected [{batch}] (one reward per image)")
    return out.to(torch.float32), info


class RewardError(RuntimeError):
    """A reward function raised while scoring a batch. The message names the reward and its error
    (the original exception is chained as ``__cause__``)."""


def reward_name(fn: Any) -> str:
    """A readable name for a reward callable: its ``name`` attribute, function name or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    for attr in ("__qualname__", "__name__"):  # a qualname with "<locals>" or "<lambda>" reads worse
        name = getattr(fn, attr, None)
        if isinstance(name, str) and name and "<" not in name:
            return name
    return type(fn).__name__


def score_batch(reward_fn: Any, images: Any, prompts: list[str], name: str) -> tuple[torch.Tensor, RewardInfo]:
    """Score one batch: the one place a reward is called for the env, synchronously or in a worker thread.

    An exception from the reward becomes :class:`RewardError` naming the reward (``name``) and its error;
    the output is validated by :func:`check_reward_output`.
    """
    try:
        out = reward_fn(images, prompts)
    except RewardError:
        raise
    except Exception as exc:  # a clear error naming the reward, not a traceback from its insides
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    return check_reward_output(out, len(prompts), name=f"reward {name!r}")


class MissingModelError(FileNotFoundError):
    """Model weights a reward needs are neither at the given path nor in the local Hugging Face cache.

    Rewards never download weights themselves; the message says what is missing and how to get it.
    """


def option_names(fn: Any) -> tuple[list[str], bool]:
    """The keyword options ``fn`` (a function or class) accepts, and whether it takes ``**kwargs`` too."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_options(fn: Any, options: dict[str, Any], what: str, extra: Sequence[str] = ()) -> None:
    """Refuse option names ``fn`` does not accept, listing the known ones (``extra``: more accepted names,
    e.g. those of the caller that forwards the rest to ``fn``). ``fn`` with ``**kwargs`` accepts all."""
    names, open_ended = option_names(fn)
    if open_ended:
        return
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        known = sorted(set(names) | set(extra))
        raise ValueError(f"{what} has no option {', '.join(map(repr, unknown))}; expected one of {known}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int when it is one (numpy integers too) within ``[low, high]``; else one clear
    ``ValueError``. No bool-for-int and no silent truncation of floats (95.9 is refused, not 95)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if low is not None and high is not None:
        expected = f"an integer in [{low}, {high}]"
    elif low is not None:
        expected = f"an integer >= {low}"
    else:
        expected = "an integer"
    raise ValueError(f"{name}={value!r}; expected {expected}")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FollowsImages:
    """A reward model that lives on ``device``, or (``device=None``) on its own device until images arrive on
    an accelerator (the env's device), where it then moves once."""

    def _place(self, model: torch.nn.Module, device: Any) -> None:
        self.follow_images = device is None
        self.device = torch.device(next(model.parameters()).device if device is None else device)
        self._move_lock = threading.Lock()
        self.model = model.eval().to(self.device)
        self.dtype = next(self.model.parameters()).dtype

    def follow(self, device: torch.device) -> None:
        """Move the model to ``device`` when following images (``device=None``) and they are not on the CPU."""
        if self.follow_images and device.type != "cpu" and device != self.device:
            with self._move_lock:
                if device != self.device:
                    self.model.to(device)
                    self.device = device
