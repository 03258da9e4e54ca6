"""A procedural world of captioned 32x32 RGB images, the data of the embedded tiny text-to-image model.

A scene holds one to three flat-coloured shapes on a plain, near-neutral background:

- one object: ``"a small green triangle"`` / ``"a large red circle"`` (the size is part of the caption);
- two objects: ``"a red circle above a blue square"`` with the relation one of ``above``, ``below``,
  ``left of``, ``right of`` (the first object stands in that relation to the second);
- three objects in a row, named left to right: ``"a red circle, a blue square and a green triangle"``.

Objects in one scene always have distinct colours. Geometry is in units of a 32-pixel canvas; ``render``
scales it to any size. Everything random comes from a ``numpy.random.Generator`` passed in, so a seed
fixes the data.

Held-out split: a few colour x shape pairs (:data:`HELDOUT_PAIRS`) never appear in a training scene or
prompt; :func:`heldout_prompts` holds every prompt containing at least one of them, so the two prompt
lists are disjoint and the held-out prompts test composition of attributes seen only separately.

Held-out relations: :data:`HELDOUT_RELATIONS` (one word per axis) can be left out of the prompts a policy is
fine-tuned on (``sample_scene(..., relations=SEEN_RELATIONS)``), so that its two-object scenes are described only
by the other word of each axis. The tiny models themselves were trained on every relation: like the paper's
held-out animals (section 6.3), these words are known to the base model and unseen only by the RL fine-tuning.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 4.5, "large": 8.5}  # half-extent of a lone object, in 32-pixel units
MULTI_HALF = 5.0  # half-extent of each object of a two-object scene
ROW_HALF = 4.0  # half-extent of each object of a three-object row
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
HELDOUT_RELATIONS: tuple[str, ...] = ("below", "right of")
SEEN_RELATIONS: tuple[str, ...] = tuple(r for r in RELATIONS if r not in HELDOUT_RELATIONS)
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("blue", "triangle"), ("yellow", "circle"), ("purple", "square")}
)
# Background grey levels (before a small per-channel tint): light, mid and dark.
BACKGROUND_LEVELS: tuple[int, ...] = (235, 200, 128, 60)
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class Obj:
    """One shape: ``cx, cy`` its centre and ``half`` its half-extent, in 32-pixel units.

    ``size`` is ``"small"``/``"large"`` for a lone object (then it is part of the caption), else ``None``.
    """

    shape: str
    colour: str
    cx: float
    cy: float
    half: float
    size: str | None = None


@dataclass(frozen=True)
class Scene:
    """Objects in caption order, the relation between them and the background colour.

    ``relation`` is ``None`` for one object, one of :data:`RELATIONS` for two, ``"row"`` for three.
    """

    objects: tuple[Obj, ...]
    relation: str | None
    background: tuple[int, int, int]


def words() -> list[str]:
    """Every word a caption can use (the vocabulary of the tiny text encoder)."""
    out = ["a", *SIZES, *COLOURS, *SHAPES, "above", "below", "left", "right", "of", ",", "and"]
    return list(dict.fromkeys(out))


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    return split


def _pairs(split: str) -> list[tuple[str, str]]:
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return [p for p in all_pairs if p not in HELDOUT_PAIRS]
    return all_pairs


def _pick_objects(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
    """``n`` colour x shape pairs with distinct colours; with split ``"heldout"`` at least one held out."""
    pairs = _pairs(split)
    while True:
        idx = rng.choice(len(pairs), size=n, replace=True)
        chosen = [pairs[i] for i in idx]
        if len({c for c, _ in chosen}) != n:
            continue
        if split == "heldout" and not any(p in HELDOUT_PAIRS for p in chosen):
            continue
        return chosen


def sample_scene(rng: np.random.Generator, split: str = "all", n_objects: int | None = None,
                 relations: tuple[str, ...] = RELATIONS) -> Scene:
    """Draw one scene. ``split`` restricts colour x shape pairs (see the module docstring);
    ``n_objects`` (1-3) fixes the object count, otherwise it is 1, 2 or 3 with probabilities .4/.4/.2;
    ``relations`` (a non-empty subset of :data:`RELATIONS`) are those a two-object scene may take."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng is {type(rng).__name__}; expected a numpy.random.Generator")
    _check_split(split)
    relations = tuple(relations)
    if not relations or any(r not in RELATIONS for r in relations):
        raise ValueError(f"relations={relations!r}; expected a non-empty subset of {RELATIONS}")
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    if n_objects not in (1, 2, 3):
        raise ValueError(f"n_objects={n_objects}; expected 1, 2 or 3")
    pairs = _pick_objects(rng, n_objects, split)
    level = float(rng.choice(BACKGROUND_LEVELS))
    tint = rng.uniform(-12, 12, size=3)
    background = tuple(int(np.clip(round(level + t), 0, 255)) for t in tint)

    objects: list[Obj] = []
    if n_objects == 1:
        (colour, shape), size = pairs[0], str(rng.choice(list(SIZES)))
        half = SIZES[size]
        lo, hi = half + 1.0, 31.0 - half
        objects.append(Obj(shape, colour, rng.uniform(lo, hi), rng.uniform(lo, hi), half, size))
        relation = None
    elif n_objects == 2:
        relation = str(rng.choice(relations))
        h = MULTI_HALF
        # Along the relation axis: one object in each half, centres >= 11 apart so they never touch;
        # across it: a shared centre +- 2, so the offset along the axis always dominates.
        near = (rng.uniform(h + 1.0, 10.5), rng.uniform(21.5, 31.0 - h))
        base = rng.uniform(h + 3.0, 29.0 - h)
        across = (base + rng.uniform(-2, 2), base + rng.uniform(-2, 2))
        first_low = relation in ("above", "left of")  # first object at the smaller coordinate
        along = near if first_low else near[::-1]
        for k, (colour, shape) in enumerate(pairs):
            if relation in ("above", "below"):
                cx, cy = across[k], along[k]
            else:
                cx, cy = along[k], across[k]
            objects.append(Obj(shape, colour, cx, cy, h))
    else:
        relation = "row"
        h = ROW_HALF
        cy = rng.uniform(h + 2.0, 30.0 - h)
        for k, (colour, shape) in enumerate(pairs):
            cx = 5.5 + 10.5 * k + rng.uniform(-0.5, 0.5)
            objects.append(Obj(shape, colour, cx, cy + rng.uniform(-1.0, 1.0), h))
    return Scene(tuple(objects), relation, background)  # type: ignore[arg-type]


def _mask(obj: Obj, size: int) -> np.ndarray:
    scale = size / 32.0
    centres = (np.arange(size) + 0.5) / scale
    py, px = np.meshgrid(centres, centres, indexing="ij")
    dx, dy, h = px - obj.cx, py - obj.cy, obj.half
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":  # apex up, base of width 2h at the bottom
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    raise ValueError(f"shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Rasterise ``scene`` to a ``uint8 [size, size, 3]`` image (hard edges, flat colours)."""
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size={size!r}; expected an integer >= 8")
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = np.asarray(scene.background, dtype=np.uint8)
    for obj in scene.objects:
        if obj.colour not in COLOURS:
            raise ValueError(f"colour {obj.colour!r}; expected one of {list(COLOURS)}")
        img[_mask(obj, size)] = COLOURS[obj.colour]
    return img


def _phrase(colour: str, shape: str, size: str | None = None) -> str:
    return f"a {size} {colour} {shape}" if size else f"a {colour} {shape}"


def caption_of(objects: list[dict], relation: str | None) -> str:
    """The caption of structured attributes (the format :func:`parse_prompt` returns)."""
    phrases = [_phrase(o["colour"], o["shape"], o.get("size")) for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} {relation} {phrases[1]}"
    if len(phrases) == 3:
        return f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    raise ValueError(f"{len(phrases)} objects; expected 1 to 3")


def caption(scene: Scene) -> str:
    """The caption of a scene, e.g. ``"a red circle above a blue square"``."""
    objs = [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in scene.objects]
    return caption_of(objs, scene.relation)


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_Z = "|".join(SIZES)
_OBJ = rf"a (?:({_Z}) )?({_C}) ({_S})"
_OBJ_BARE = rf"a ({_C}) ({_S})"
_REL = "|".join(RELATIONS)
_RE1 = re.compile(rf"^{_OBJ}$")
_RE2 = re.compile(rf"^{_OBJ_BARE} ({_REL}) {_OBJ_BARE}$")
_RE3 = re.compile(rf"^{_OBJ_BARE} , {_OBJ_BARE} and {_OBJ_BARE}$")


def _normalise(prompt: str) -> str:
    text = prompt.strip().lower().replace(",", " , ")
    return " ".join(text.split())


def parse_prompt(prompt: str) -> dict:
    """Inverse of :func:`caption`: ``{"objects": [{"colour", "shape", "size"}], "relation": ...}``.

    ``size`` is ``None`` where the prompt names none; ``relation`` is ``None``, a relation or ``"row"``.
    Case, extra spaces and spacing around the comma are ignored. Raises ``ValueError`` for any other text.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is {type(prompt).__name__}; expected str")
    text = _normalise(prompt)
    if m := _RE1.match(text):
        size, colour, shape = m.groups()
        return {"objects": [{"colour": colour, "shape": shape, "size": size}], "relation": None}
    if m := _RE2.match(text):
        c1, s1, rel, c2, s2 = m.groups()
        objs = [{"colour": c1, "shape": s1, "size": None}, {"colour": c2, "shape": s2, "size": None}]
        return {"objects": objs, "relation": rel}
    if m := _RE3.match(text):
        g = m.groups()
        objs = [{"colour": g[i], "shape": g[i + 1], "size": None} for i in (0, 2, 4)]
        return {"objects": objs, "relation": "row"}
    raise ValueError(
        f"prompt {prompt!r} is not a tiny-world caption; expected e.g. 'a small red circle', "
        "'a red circle above a blue square' or 'a red circle, a blue square and a green triangle' "
        f"with colours {list(COLOURS)}, shapes {list(SHAPES)} and sizes {list(SIZES)}"
    )


def all_prompts() -> list[str]:
    """Every caption the world can produce, in a fixed order."""
    pairs = _pairs("all")
    out = [_phrase(c, s, z) for z in SIZES for c, s in pairs]
    for (c1, s1), (c2, s2) in itertools.permutations(pairs, 2):
        if c1 != c2:
            out.extend(f"{_phrase(c1, s1)} {rel} {_phrase(c2, s2)}" for rel in RELATIONS)
    for a, b, c in itertools.permutations(pairs, 3):
        if len({a[0], b[0], c[0]}) == 3:
            out.append(f"{_phrase(*a)}, {_phrase(*b)} and {_phrase(*c)}")
    return out


def _is_heldout(prompt: str) -> bool:
    return any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in parse_prompt(prompt)["objects"])


def train_prompts() -> list[str]:
    """Prompts made only of colour x shape pairs seen in training (fixed order)."""
    return [p for p in all_prompts() if not _is_heldout(p)]


def heldout_prompts() -> list[str]:
    """Prompts with at least one colour x shape pair never seen in training (fixed order)."""
    return [p for p in all_prompts() if _is_heldout(p)]


def sample_dataset(n: int, seed: int, split: str = "train", size: int = 32) -> tuple[np.ndarray, list[str]]:
    """``n`` rendered scenes (``uint8 [n, size, size, 3]``) and their captions, fixed by ``seed``."""
    if n < 1:
        raise ValueError(f"n={n}; expected a positive number of scenes")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split=split) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), [caption(s) for s in scenes]
