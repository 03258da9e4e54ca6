"""Pictures of a run that read on their own: sample grids labelled with their prompts and seed, and the
reward curve with its unit and a labelled band.

:func:`labelled_grid` draws images in rows of ``nrow`` with each image's prompt under it (a row whose
images share one prompt gets it once, under the whole row) and a footer with the seed and a title.
:func:`save_labelled_grid` writes that PNG and, next to it, a JSON with the prompts (in image order),
the seed and the layout, so the pictures can be matched to prompts by a program as well.
:func:`plot_reward_curve` plots the mean reward per epoch against reward queries with a ±1 std band.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

GAP = 4  # pixels between images
MAX_CAPTION_LINES = 4
FONT_SIZE = 11


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int = MAX_CAPTION_LINES) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (the last one ends in … when cut)."""
    if not text:
        return ["(empty prompt)"]
    chars = max(4, int(width / max(1.0, draw.textlength("n", font=font))))
    while True:
        lines = textwrap.wrap(text, width=chars, break_long_words=True) or [""]
        if chars <= 4 or all(draw.textlength(line, font=font) <= width for line in lines):
            break
        chars -= 1
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return lines


def to_uint8_hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, 3, H, W]`` floats in [0, 1] (tensor or array) → ``uint8 [N, H, W, 3]``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"images have shape {arr.shape}; expected [N, 3, H, W]")
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def labelled_grid(
    images: torch.Tensor | np.ndarray,
    prompts: Sequence[str],
    *,
    nrow: int | None = None,
    scale: int = 4,
    seed: int | None = None,
    title: str | None = None,
) -> np.ndarray:
    """One ``uint8 [H, W, 3]`` picture: images in rows of ``nrow``, each prompt under its image (or once
    under a row whose images share it), and a footer with ``title`` and ``seed``.

    ``images``: ``[N, 3, H, W]`` in [0, 1]; ``prompts``: N strings; ``scale``: pixel magnification.
    """
    from PIL import Image, ImageDraw

    arr = to_uint8_hwc(images)
    n, h, w = arr.shape[0], arr.shape[1] * scale, arr.shape[2] * scale
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images; expected one prompt per image")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r}; expected a positive integer")
    nrow = min(n, nrow or n)
    rows = [list(range(r, min(r + nrow, n))) for r in range(0, n, nrow)]
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3] - font.getbbox("Ag")[1]) + 3
    grid_w = nrow * w + (nrow + 1) * GAP

    # Captions: one per image, or one per row when the row repeats a prompt.
    captions = []
    for row in rows:
        shared = len({prompts[i] for i in row}) == 1 and len(row) > 1
        if shared:
            captions.append([(0, grid_w - 2 * GAP, _wrap(probe, prompts[row[0]], font, grid_w - 2 * GAP))])
        else:
            captions.append([(c * (w + GAP), w, _wrap(probe, prompts[i], font, w)) for c, i in enumerate(row)])
    caption_h = [max(len(lines) for _, _, lines in caps) * line_h + GAP for caps in captions]
    footer = " · ".join(x for x in (title, f"seed {seed}" if seed is not None else None) if x)
    footer_h = line_h + GAP if footer else 0
    height = GAP + sum(h + GAP + ch for ch in caption_h) + footer_h
    canvas = Image.new("RGB", (grid_w, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for row, caps, ch in zip(rows, captions, caption_h):
        for c, i in enumerate(row):
            tile = Image.fromarray(arr[i]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (GAP + c * (w + GAP), y))
        y += h + 2
        for x0, _, lines in caps:
            for k, line in enumerate(lines):
                draw.text((GAP + x0, y + k * line_h), line, fill=(20, 20, 20), font=font)
        y += ch + GAP - 2
    if footer:
        draw.text((GAP, y), footer, fill=(90, 90, 90), font=font)
    return np.asarray(canvas)


def save_labelled_grid(
    path: str | os.PathLike,
    images: torch.Tensor | np.ndarray,
    prompts: Sequence[str],
    *,
    seed: int | None = None,
    nrow: int | None = None,
    scale: int = 4,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the labelled grid to ``path`` (PNG) and its prompts, seed and layout to ``path`` with a
    ``.json`` suffix (both atomically); return both paths."""
    from PIL import Image

    path = Path(path)
    prompts = list(prompts)
    grid = labelled_grid(images, prompts, nrow=nrow, scale=scale, seed=seed, title=title)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    meta = {"image": path.name, "prompts": prompts, "seed": seed, "title": title,
            "layout": {"nrow": min(len(prompts), nrow or len(prompts)), "order": "row-major"}, **(extra or {})}  # fmt: skip
    js = path.with_suffix(".json")
    tmp = js.with_name(f".{js.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, js)
    return path, js


def reward_label(reward_fn: Any) -> str:
    """``"reward (<unit>)"`` when the reward declares a ``unit``, else ``"reward (<its name>)"``."""
    unit = getattr(reward_fn, "unit", None)
    if unit:
        return f"reward ({unit})"
    name = getattr(reward_fn, "name", None) or type(reward_fn).__name__
    return f"reward ({name})"


def plot_reward_curve(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str, label: str, ylabel: str = "reward"
) -> Path | None:
    """Mean reward of each epoch against reward queries, with a band of ±1 std of that epoch's rewards.

    ``rows``: the run's metrics lines (``charts/reward_queries``, ``charts/reward_mean``,
    ``charts/reward_std``). Returns the PNG's path, or None when there is nothing to plot.
    """
    rows = [r for r in rows if "charts/reward_queries" in r and "charts/reward_mean" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    x = np.array([r["charts/reward_queries"] for r in rows], dtype=float)
    y = np.array([r["charts/reward_mean"] for r in rows], dtype=float)
    s = np.array([r.get("charts/reward_std", 0.0) for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, marker="o" if len(x) < 20 else None, ms=3, label=f"{label}: mean reward of each epoch")
    ax.fill_between(x, y - s, y + s, alpha=0.2, label="±1 std of the epoch's sample rewards")
    ax.set_xlabel("reward queries (images scored so far)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------- TensorBoard
HPARAM_METRICS = ("charts/reward_mean", "charts/reward_std", "losses/approx_kl")


def hparam_values(config: dict[str, Any]) -> dict[str, float | str | bool]:
    """A config as TensorBoard hparams: numbers and strings kept, None → "none", the rest as JSON."""
    out: dict[str, float | str | bool] = {}
    for k, v in config.items():
        if v is None:
            out[k] = "none"
        elif isinstance(v, (bool, int, float, str)):
            out[k] = v
        else:
            out[k] = json.dumps(v, default=repr, sort_keys=True)
    return out


def write_tb_hparams(writer: Any, config: dict[str, Any], metrics: Sequence[str] = HPARAM_METRICS) -> None:
    """Record the run's settings in TensorBoard's HPARAMS tab, in the run's own log directory (so the
    listed metrics are the run's scalars; ``SummaryWriter.add_hparams`` would open a second run)."""
    from torch.utils.tensorboard.summary import hparams

    from rewards.secrets import redact

    for summary in hparams(hparam_values(redact(config)), {m: 0.0 for m in metrics}):  # no credential on disk
        writer.file_writer.add_summary(summary)


def write_tb_image(writer: Any, tag: str, png: str | os.PathLike, step: int) -> None:
    """Add a PNG (a labelled grid) to TensorBoard's IMAGES tab at ``step``."""
    from PIL import Image

    with Image.open(png) as im:
        writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
