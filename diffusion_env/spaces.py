"""The prompt part of the observation space: any Unicode text the env accepts, declared truthfully.

Gymnasium's ``Text`` space holds strings over a finite ``charset``; ``Text(charset=string.printable)``
declared only ASCII while the env ran prompts with NUL, right-to-left marks, Hebrew or emoji, and
``gym.make``'s checker warned on every reset. :class:`PromptText` is a ``Text`` whose members are the
prompts the env accepts (:func:`check_prompt`): any ``str`` of at most ``max_length`` code points
that can be encoded as UTF-8 (no lone surrogates, which tokenizers and JSON writers reject).
``sample()`` still draws from a finite ``charset`` (printable ASCII by default), a subset.

A space of unbounded alphabet has no fixed-size integer encoding, so ``is_np_flattenable`` is False
(``gymnasium.spaces.flatten`` of a prompt would need an index for every code point).
"""

from __future__ import annotations

import string
from typing import Any

from gymnasium import spaces

MAX_PROMPT_LENGTH = 10_000
SAMPLE_CHARSET = string.printable


def prompt_problem(prompt: Any, max_length: int = MAX_PROMPT_LENGTH) -> str | None:
    """Why ``prompt`` is not an acceptable prompt, or None when it is."""
    if not isinstance(prompt, str):
        return f"a prompt is {type(prompt).__name__}; expected str"
    if len(prompt) > max_length:
        return f"a prompt has {len(prompt)} characters; expected at most {max_length}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"prompt {prompt[:40]!r} holds a lone surrogate {prompt[exc.start]!r} at {exc.start}; "
                "expected text that can be encoded as UTF-8")  # fmt: skip
    return None


def check_prompt(prompt: Any, max_length: int = MAX_PROMPT_LENGTH) -> str:
    """``prompt`` when the env accepts it; ``ValueError`` saying why otherwise."""
    problem = prompt_problem(prompt, max_length)
    if problem is not None:
        raise ValueError(problem)
    return prompt


class PromptText(spaces.Text):
    """``Text`` whose members are all prompts the env accepts (any UTF-8-encodable text up to
    ``max_length`` code points); ``charset`` is only the alphabet of :meth:`sample`."""

    def __init__(self, max_length: int = MAX_PROMPT_LENGTH, *, min_length: int = 0,
                 charset: str = SAMPLE_CHARSET, seed: Any = None):  # fmt: skip
        super().__init__(max_length, min_length=min_length, charset=charset, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) >= self.min_length and prompt_problem(x, self.max_length) is None

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"PromptText({self.min_length}, {self.max_length}, any UTF-8 text; samples from {self.characters!r})"

    def __eq__(self, other: object, /) -> bool:
        return isinstance(other, PromptText) and super().__eq__(other)
