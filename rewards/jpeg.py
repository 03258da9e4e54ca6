"""JPEG (in)compressibility rewards (DDPO paper, appendix A.4).

The reward is the size in kilobytes (1 kB = 1000 bytes) of the image encoded as a JPEG at quality 95;
incompressibility rewards large files, compressibility (the negation) small ones.

Encoding runs in a thread pool and must not serialise on the GIL. Pillow (checked with 13.0) keeps
the GIL while encoding into a Python file-like object such as ``io.BytesIO`` (``encoder.encode``), but
releases it when encoding straight into a real file descriptor (``encoder.encode_to_file``). So each
worker thread encodes into its own in-memory file (``os.memfd_create``; an unlinked temporary file
where that is unavailable) and reads the size back with ``fstat``: the bytes are the same as with
``BytesIO``, and a batch is spread over cores. The file path costs ~30 us of system calls per image,
more than the whole GIL-held encode of a small image, so images under ``FD_MIN_PIXELS`` (256x256)
still go through ``BytesIO``. ``tests/test_rewards_async.py`` checks the GIL release.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardInfo, as_uint8_images, check_int, check_prompts

JPEG_QUALITY = 95
FD_MIN_PIXELS = 256 * 256

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="jpeg")
    return _POOL


_LOCAL = threading.local()


def _scratch_file():
    """This thread's unbuffered in-memory file (a real descriptor, so Pillow releases the GIL)."""
    f = getattr(_LOCAL, "file", None)
    if f is None:
        if hasattr(os, "memfd_create"):
            f = open(os.memfd_create("denoise-gym-jpeg", os.MFD_CLOEXEC), "w+b", buffering=0)
        else:
            f = tempfile.TemporaryFile(buffering=0)
        _LOCAL.file = f
    return f


def _jpeg_kb(array: np.ndarray, quality: int) -> float:
    if array.shape[0] * array.shape[1] < FD_MIN_PIXELS:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=quality)
        return buf.tell() / 1000.0
    f = _scratch_file()
    f.seek(0)
    f.truncate(0)
    Image.fromarray(array).save(f, format="JPEG", quality=quality)
    return os.fstat(f.fileno()).st_size / 1000.0


def jpeg_size_kb(images, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """Size in kB of each image's JPEG encoding, as float32 ``[B]`` on the images' device."""
    x = as_uint8_images(images)
    cpu = x.cpu()
    # each worker makes its own image channel-last (a torch copy, outside the GIL) and encodes it
    sizes = list(_pool().map(lambda im: _jpeg_kb(im.permute(1, 2, 0).contiguous().numpy(), quality), cpu))
    return torch.tensor(sizes, dtype=torch.float32, device=x.device)


class JpegIncompressibility:
    """Reward = JPEG size in kB at quality 95 (bigger files score higher)."""

    sign = 1.0
    name = "jpeg_incompressibility"

    def __init__(self, quality: int = JPEG_QUALITY):
        self.quality = check_int("quality", quality, 1, 100)  # JPEG quality; True or 95.9 are refused

    def __call__(self, images, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        kb = jpeg_size_kb(images, self.quality)
        check_prompts(prompts, kb.shape[0])
        return self.sign * kb, {"jpeg_kb": kb}

    @property
    def unit(self) -> str:
        """What a reward value measures, for axis labels: the JPEG size in kB (negated for compressibility)."""
        return f"{'−' if self.sign < 0 else ''}JPEG kB at quality {self.quality}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quality={self.quality})"


class JpegCompressibility(JpegIncompressibility):
    """Reward = minus the JPEG size in kB at quality 95 (smaller files score higher)."""

    sign = -1.0
    name = "jpeg_compressibility"
