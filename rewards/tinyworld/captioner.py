"""A programmatic captioner for the tiny world: reads objects back from pixels (the world's reward model).

Per image:

1. the background colour is the per-channel median of the border pixels;
2. a pixel is foreground when it is more than half-way from the background to a palette colour (see
   :func:`_labels`) and far from the background (RGB distance > ``FG_DISTANCE``); it takes that colour;
3. 4-connected components of equal colour label (vectorised min-label propagation over the batch);
   components smaller than ``MIN_AREA`` (in 32x32 pixels) are dropped as specks;
4. each component gets a shape from descriptors of its mask: a triangle (apex up) has much less than
   half its area in the top half of its bounding box (~1/4); otherwise a square fills its bounding box (fill ratio
   >= ``SQUARE_FILL``, or at least three of its four corner pixels set) and a circle does not (fill
   pi/4 ~ 0.79, corners empty);
5. a lone object's size is ``large`` when its bounding-box extent is over ``LARGE_EXTENT``;
6. two objects are related by their centroids along the axis of larger offset; three are named left
   to right.

:func:`describe` writes that as a world caption; :func:`score` checks an image against the prompt it
was generated from, attribute by attribute.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rewards.base import as_uint8_images, check_prompts
from rewards.tinyworld.world import COLOURS, caption_of, parse_prompt

FG_DISTANCE = 40.0
FG_ALPHA = 0.5
MIN_AREA = 10.0  # pixels at 32x32; smallest true object (a row triangle) covers ~32
TRIANGLE_TOP_SHARE = 0.38
SQUARE_FILL = 0.92
LARGE_EXTENT = 13.5  # 32-pixel units; small objects span ~9, large ~17

_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in _NAMES], dtype=np.float32)


def _to_hwc(images) -> np.ndarray:
    """Any accepted image batch (``[B, 3, H, W]`` uint8 or float in [0, 1], numpy or torch, or a list
    of PIL images) as ``uint8 [B, H, W, 3]``."""
    x = as_uint8_images(images)
    if x.shape[2] < 8 or x.shape[3] < 8:
        raise ValueError(f"images are {x.shape[2]}x{x.shape[3]}; expected at least 8x8 pixels")
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _labels(img: np.ndarray) -> np.ndarray:
    """Colour class per pixel: ``-1`` background, else an index into the palette. ``img`` is [B,H,W,3].

    Each pixel is explained as a mix ``bg + alpha * (colour - bg)`` of the background and one palette
    colour (the one whose mixing segment passes closest); it belongs to the object when ``alpha`` is
    over one half, i.e. the half-way contour, which keeps a blurred edge where the sharp edge was.
    """
    x = img.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # [B, N, 3]
    bg = np.median(border, axis=1)[:, None, None, None, :]  # [B, 1, 1, 1, 3]
    seg = _PALETTE - bg  # [B, 1, 1, K, 3]
    rel = x[..., None, :] - bg  # [B, H, W, 1, 3]
    alpha = (rel * seg).sum(-1) / np.maximum((seg * seg).sum(-1), 1.0)  # [B, H, W, K]
    alpha_c = np.clip(alpha, 0.0, 1.0)
    resid = np.linalg.norm(rel - alpha_c[..., None] * seg, axis=-1)
    cls = resid.argmin(-1)
    a = np.take_along_axis(alpha, cls[..., None], -1)[..., 0]
    d_bg = np.linalg.norm(rel[..., 0, :], axis=-1)
    fg = (a > FG_ALPHA) & (d_bg > FG_DISTANCE)
    return np.where(fg, cls, -1)


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal class, batched: ``[B,H,W]`` ids (unique per batch), -1 for bg."""
    b, h, w = cls.shape
    big = b * h * w
    lab = np.where(cls >= 0, np.arange(big).reshape(b, h, w), big)
    while True:
        new = lab.copy()
        for axis in (1, 2):
            for shift in (1, -1):
                nb_lab = np.roll(lab, shift, axis=axis)
                nb_cls = np.roll(cls, shift, axis=axis)
                # np.roll wraps around; forbid links across the image edge
                edge = [slice(None)] * 3
                edge[axis] = 0 if shift == 1 else -1
                ok = nb_cls == cls
                ok[tuple(edge)] = False
                new = np.where(ok & (cls >= 0), np.minimum(new, nb_lab), new)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(cls >= 0, lab, -1)


def _shape_of(mask: np.ndarray) -> tuple[str, dict]:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    fill = crop.sum() / float(h * w)
    # share of the area above the bbox's middle row line (a middle row counts half): ~1/4 for an
    # apex-up triangle, ~1/2 for a circle or square
    widths = crop.sum(1).astype(np.float32)
    pos = np.arange(h) + 0.5 - h / 2.0
    above = widths[pos < 0].sum() + 0.5 * widths[pos == 0].sum()
    ratio = above / max(widths.sum(), 1e-6)
    corners = int(crop[0, 0]) + int(crop[0, -1]) + int(crop[-1, 0]) + int(crop[-1, -1])
    if ratio < TRIANGLE_TOP_SHARE:
        shape = "triangle"
    elif fill >= SQUARE_FILL or corners >= 3:
        shape = "square"
    else:
        shape = "circle"
    return shape, {"fill": float(fill), "top_share": float(ratio), "corners": corners, "height": h, "width": w}


def detect(images) -> list[list[dict]]:
    """Objects found in each image: dicts with ``colour, shape, size, cx, cy, area`` (32-pixel units),
    the largest first (at most one list entry per component above the speck threshold)."""
    img = _to_hwc(images)
    b, h, w, _ = img.shape
    scale = 32.0 / w, 32.0 / h
    cls = _labels(img)
    comp = _components(cls)
    min_area = MIN_AREA * (h * w) / 1024.0
    out: list[list[dict]] = []
    for i in range(b):
        ids, counts = np.unique(comp[i][comp[i] >= 0], return_counts=True)
        objs = []
        for cid, n in zip(ids, counts):
            if n < min_area:
                continue
            mask = comp[i] == cid
            ys, xs = np.nonzero(mask)
            shape, desc = _shape_of(mask)
            extent = max(desc["height"] * scale[1], desc["width"] * scale[0])
            objs.append(
                {
                    "colour": _NAMES[int(cls[i][ys[0], xs[0]])],
                    "shape": shape,
                    "size": "large" if extent > LARGE_EXTENT else "small",
                    "cx": float((xs.mean() + 0.5) * scale[0]),
                    "cy": float((ys.mean() + 0.5) * scale[1]),
                    "area": float(n * scale[0] * scale[1]),
                    **desc,
                }
            )
        objs.sort(key=lambda o: -o["area"])
        out.append(objs)
    return out


def _relation(a: dict, b: dict) -> str:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _describe_objects(objs: list[dict]) -> str:
    if not objs:
        return ""
    if len(objs) == 1:
        return caption_of([objs[0]], None)
    if len(objs) == 2:
        a, b = objs
        if abs(b["cy"] - a["cy"]) > abs(b["cx"] - a["cx"]):
            a, b = sorted(objs, key=lambda o: o["cy"])
        else:
            a, b = sorted(objs, key=lambda o: o["cx"])
        bare = [{"colour": o["colour"], "shape": o["shape"]} for o in (a, b)]
        return caption_of(bare, _relation(a, b))
    row = sorted(objs, key=lambda o: o["cx"])
    bare = [{"colour": o["colour"], "shape": o["shape"]} for o in row]
    if len(bare) == 3:
        return caption_of(bare, "row")
    phrases = [f"a {o['colour']} {o['shape']}" for o in bare]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(images) -> list[str]:
    """A world caption for each image (``""`` when no object is found; more than three objects are
    listed left to right, which is outside the world's grammar)."""
    return [_describe_objects(objs) for objs in detect(images)]


def _match(expected: list[dict], found: list[dict]) -> list[dict | None]:
    """For each expected object the found object standing for it: same colour, preferring the same
    shape, then the largest; each found object used once."""
    used: set[int] = set()
    out: list[dict | None] = []
    for e in expected:
        best, key = None, None
        for j, f in enumerate(found):
            if j in used or f["colour"] != e["colour"]:
                continue
            k = (f["shape"] == e["shape"], f["area"])
            if key is None or k > key:
                best, key = j, k
        if best is None:
            out.append(None)
        else:
            used.add(best)
            out.append(found[best])
    return out


def score(images, prompts: Sequence[str]) -> list[dict]:
    """Per image, how far it shows its prompt (a world caption, see :func:`parse_prompt`):

    - ``n_expected``, ``n_found``: object counts in the prompt and in the image;
    - ``objects_correct``: prompt objects found with the right colour and shape;
    - ``colour_shape``: every prompt object found with the right colour and shape;
    - ``count``: no missing or extra object;
    - ``size``: the lone object's size is right (``None`` when the prompt names no size);
    - ``relation``: the objects are placed as the prompt says (``None`` for one object);
    - ``all_correct``: all of the above;
    - ``description``: :func:`describe`'s caption of the image.
    """
    found_all = detect(images)
    prompts = check_prompts(prompts, len(found_all))
    results = []
    for found, prompt in zip(found_all, prompts):
        spec = parse_prompt(prompt)
        expected = spec["objects"]
        matched = _match(expected, found)
        ok = [m is not None and m["shape"] == e["shape"] for e, m in zip(expected, matched)]
        colour_shape = all(ok)
        size_ok = None
        if len(expected) == 1 and expected[0]["size"] is not None:
            size_ok = bool(matched[0] is not None and matched[0]["size"] == expected[0]["size"])
        rel_ok = None
        if len(expected) > 1:
            if any(m is None for m in matched):
                rel_ok = False
            elif spec["relation"] == "row":
                rel_ok = bool(all(a["cx"] < b["cx"] for a, b in zip(matched, matched[1:])))
            else:
                rel_ok = _relation(matched[0], matched[1]) == spec["relation"]
        count_ok = len(found) == len(expected)
        results.append(
            {
                "n_expected": len(expected),
                "n_found": len(found),
                "objects_correct": int(sum(ok)),
                "colour_shape": bool(colour_shape),
                "count": bool(count_ok),
                "size": size_ok,
                "relation": rel_ok,
                "all_correct": bool(colour_shape and count_ok and size_ok is not False and rel_ok is not False),
                "description": _describe_objects(found),
            }
        )
    return results
