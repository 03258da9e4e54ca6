"""OCR accuracy reward: does the image show the text the prompt asks for?

    target = the text inside double quotes in the prompt ("..." or “...”; several quoted spans are
             joined with one space), e.g. 'a shop sign that says "OPEN 24 HOURS"' → OPEN 24 HOURS
    read   = the text an OCR model reads in the image (every detected line, top to bottom, joined)
    reward = 1 - min(d, len(target)) / len(target),  d = Levenshtein distance(normalise(target),
                                                                          normalise(read))

``normalise`` lower-cases (unless ``case_sensitive``) and drops whitespace (unless
``keep_spaces``), as the OCR rewards of text-rendering RL work do; so the reward is 1 for a perfect
rendering, drops by ``1/len(target)`` for each wrong, missing or extra character, and is clipped at 0.
A prompt without quoted text raises ValueError (``on_missing="error"``) or scores 0 (``"zero"``).

The OCR model is RapidOCR's PP-OCRv4 (ONNX detection + recognition models shipped inside the
``rapidocr_onnxruntime`` wheel: ``pip install denoise-gym[rewards]``), so it runs offline; it runs on
the CPU with onnxruntime whatever device the images are on. Any object with
``engine(bgr_uint8_hwc) -> (results, timings)`` (RapidOCR's call convention, ``results`` a list of
``[box, text, confidence]`` or None) can be passed as ``engine``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rewards.base import RewardInfo, as_uint8_images, check_prompts

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def quoted_text(prompt: str) -> str | None:
    """The text inside double quotes in ``prompt`` (spans joined by one space), or None if there is none."""
    spans = [(a or b).strip() for a, b in _QUOTED.findall(prompt)]
    spans = [s for s in spans if s]
    return " ".join(spans) if spans else None


def normalise_text(text: str, *, case_sensitive: bool = False, keep_spaces: bool = False) -> str:
    text = text if case_sensitive else text.lower()
    return text if keep_spaces else "".join(text.split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_accuracy(target: str, read: str, *, case_sensitive: bool = False, keep_spaces: bool = False) -> float:
    """``1 - min(d, len(t)) / len(t)`` on normalised strings (see the module docstring); 0 for an empty target."""
    t = normalise_text(target, case_sensitive=case_sensitive, keep_spaces=keep_spaces)
    r = normalise_text(read, case_sensitive=case_sensitive, keep_spaces=keep_spaces)
    if not t:
        return 0.0
    return 1.0 - min(levenshtein(t, r), len(t)) / len(t)


def load_rapidocr(**engine_kwargs: Any) -> Any:
    """RapidOCR with its bundled PP-OCR ONNX models (no download)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise ImportError(
            "the ocr reward needs rapidocr_onnxruntime (its wheel ships the PP-OCR models); "
            "pip install 'denoise-gym[rewards]' or pip install rapidocr_onnxruntime"
        ) from e
    return RapidOCR(**engine_kwargs)


class OcrReward:
    """Reward = OCR accuracy of the quoted text of each prompt (see the module docstring).

    ``engine``: None (RapidOCR, built with ``engine_kwargs``) or a RapidOCR-compatible callable.
    ``min_confidence``: recognised lines below this confidence are ignored.
    ``info``: ``ocr_text`` (list of B strings read), ``target`` (list of B quoted texts, None if absent).
    """

    name = "ocr"

    def __init__(
        self,
        engine: Any = None,
        *,
        case_sensitive: bool = False,
        keep_spaces: bool = False,
        min_confidence: float = 0.0,
        on_missing: str = "error",
        **engine_kwargs: Any,
    ):
        if on_missing not in ("error", "zero"):
            raise ValueError(f"on_missing={on_missing!r}; expected 'error' or 'zero'")
        if not isinstance(min_confidence, (int, float)) or not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence={min_confidence!r}; expected a number in [0, 1]")
        if engine is None:
            engine = load_rapidocr(**engine_kwargs)
        elif engine_kwargs:
            raise ValueError(f"engine options {sorted(engine_kwargs)} were given with an engine; configure it instead")
        if not callable(engine):
            raise ValueError(f"engine is {type(engine).__name__}; expected a RapidOCR-compatible callable")
        self.engine = engine
        self.case_sensitive = case_sensitive
        self.keep_spaces = keep_spaces
        self.min_confidence = float(min_confidence)
        self.on_missing = on_missing
        self._lock = threading.Lock()  # one OCR call at a time: onnxruntime already uses the cores

    def read(self, image_chw: torch.Tensor) -> str:
        """The text read in one ``uint8 [3, H, W]`` image (lines in reading order, joined by spaces)."""
        bgr = np.ascontiguousarray(image_chw.permute(1, 2, 0).cpu().numpy()[..., ::-1])
        with self._lock:
            out = self.engine(bgr)
        results = out[0] if isinstance(out, tuple) else out
        if not results:
            return ""
        # RapidOCR returns lines in reading order (its boxes are sorted top to bottom, left to right)
        return " ".join(str(item[1]) for item in results if float(item[2]) >= self.min_confidence)

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        x = as_uint8_images(images)
        prompts = check_prompts(prompts, x.shape[0])
        targets = [quoted_text(p) for p in prompts]
        missing = [i for i, t in enumerate(targets) if t is None]
        if missing and self.on_missing == "error":
            i = missing[0]
            raise ValueError(
                f"prompts[{i}]={prompts[i]!r} has no text in double quotes; expected the text to render in "
                '"..." (or pass on_missing="zero")'
            )
        read = [self.read(im) if t is not None else "" for im, t in zip(x, targets)]
        r = [
            ocr_accuracy(t, s, case_sensitive=self.case_sensitive, keep_spaces=self.keep_spaces) if t else 0.0
            for t, s in zip(targets, read)
        ]
        return torch.tensor(r, dtype=torch.float32, device=x.device), {"ocr_text": read, "target": targets}

    def __repr__(self) -> str:
        return f"OcrReward(engine={type(self.engine).__name__}, case_sensitive={self.case_sensitive})"
