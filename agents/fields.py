"""Documented configuration fields, shared by :class:`~agents.config.TrainConfig` and the algorithms' own configs.

An algorithm's config is a dataclass whose fields are made with :func:`doc_field` (a default and a help text,
from which ``denoise-gym train --algo NAME --help`` is generated) and which may define
``validate(self, shared) -> list[str]``: one message per problem, each saying how to fix it, where
``shared`` is the run's :class:`~agents.config.TrainConfig` (for checks that involve shared sizes).
:class:`AlgoConfig` is a convenient base; any dataclass with documented fields works.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


def doc_field(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with its documentation (and allowed values) in ``metadata``.

    Mutable defaults (dicts, lists) become a ``default_factory`` that returns a fresh copy.
    """
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def type_errors(obj: Any, skip: typing.Iterable[str] = ()) -> list[str]:
    """Fields of the dataclass instance ``obj`` whose value does not have the annotated type (bools are not
    ints; ints are floats). Fields annotated ``Any`` and those in ``skip`` are not checked."""
    hints = typing.get_type_hints(type(obj))
    errors = []
    for f in dataclasses.fields(obj):
        if f.name in skip or hints[f.name] is Any:
            continue
        value, tp = getattr(obj, f.name), hints[f.name]
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


def field_names(cls_or_obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls_or_obj)]


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is <= ``at_most`` (pairs d, n/d up to √n; bounded work for huge n)."""
    best, d = 1, 1
    while d * d <= n and d <= 1_000_000:
        if n % d == 0:
            best = max([best] + [c for c in (d, n // d) if c <= at_most])
        d += 1
    return best


# ---------------------------------------------------------------------------- checks the algorithms share
def positive_int(obj: Any, *names: str) -> list[str]:
    return [f"{n}={getattr(obj, n)}: expected a positive integer" for n in names if not getattr(obj, n) >= 1]


def finite_positive(obj: Any, *names: str) -> list[str]:
    """``not x > 0`` (rather than ``x <= 0``) also refuses NaN."""
    return [f"{n}={getattr(obj, n)}: expected a finite number > 0" for n in names
            if not (getattr(obj, n) > 0 and math.isfinite(getattr(obj, n)))]  # fmt: skip


def train_batch_divides_epoch(shared: Any) -> list[str]:
    """For algorithms that cut each epoch into optimizer steps of ``train_batch_size`` samples."""
    if shared.samples_per_epoch % max(1, shared.train_batch_size):
        return [
            f"train_batch_size={shared.train_batch_size} does not divide samples_per_epoch="
            f"{shared.samples_per_epoch}: choose a divisor, e.g. "
            f"{largest_divisor(shared.samples_per_epoch, shared.train_batch_size)}"
        ]
    return []


def train_batch_within_epoch(shared: Any) -> list[str]:
    """For algorithms that draw batches of ``train_batch_size`` samples from each epoch's samples."""
    if shared.train_batch_size > shared.samples_per_epoch:
        return [
            f"train_batch_size={shared.train_batch_size} exceeds samples_per_epoch={shared.samples_per_epoch}: "
            "the algorithm draws its batches from the epoch's samples; expected train_batch_size <= samples_per_epoch"
        ]
    return []


@dataclass
class AlgoConfig:
    """Base of an algorithm's own settings (no fields): subclass it as a dataclass with :func:`doc_field` fields."""

    def validate(self, shared: Any) -> list[str]:
        """Problems of these settings (with the run's shared ``TrainConfig``), each saying how to fix it."""
        return []


@dataclass
class StepBatchesConfig(AlgoConfig):
    """The settings of an algorithm registered without a config: none of its own; the epoch is cut into
    optimizer steps of ``train_batch_size`` samples (:meth:`agents.core.RolloutBuffer.train_steps`)."""

    def validate(self, shared: Any) -> list[str]:
        return train_batch_divides_epoch(shared)


def grouped_samples(shared: Any, algo: str) -> list[str]:
    """For algorithms that compare the samples of one prompt (groups of ``samples_per_prompt``)."""
    if shared.samples_per_prompt < 2:
        return [f"samples_per_prompt={shared.samples_per_prompt}: {algo} compares the samples of one prompt; "
                "expected a group size >= 2 (e.g. 8)"]  # fmt: skip
    return []


def final_samples_only(shared: Any, algo: str) -> list[str]:
    """For algorithms that regress final samples x_0, not denoising steps: no train window."""
    if shared.train_timesteps != "all":
        return [f"train_timesteps={shared.train_timesteps!r}: {algo} regresses final samples, not steps; "
                "expected 'all'"]  # fmt: skip
    return []
