"""Rewards per second for each reward at 32x32 and 512x512 (``python -m benchmarks.reward_throughput``).

What is measured, on random uint8 images, batch by batch (``--batch`` images per call):

- ``jpeg_compressibility``: Pillow JPEG at quality 95 in the module's thread pool; also the same
  encoder with 1 thread vs all cores and, for images encoded through a file descriptor (256x256 and
  up), the plain ``io.BytesIO`` encoding (which holds the GIL) for comparison, so the scaling shows
  (on an idle machine: other processes' load hides it);
- ``aesthetic``: the full preprocessing + head on a *tiny random CLIP* (2 layers, width 32, 224x224
  input), labelled as such: it measures the pipeline's overhead, not ViT-L/14 speed; the head is the
  published one when ``../shared/assets`` has it, else random;
- ``prompt_alignment``: PNG data URLs → local chat-completions server on 127.0.0.1 → offline MiniLM
  BERTScore recall. The server's describe function is a trivial colour describer (labelled), plus the
  tiny world's captioner at 32x32.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HEAD = Path(__file__).resolve().parents[2] / "shared/assets/sac+logos+ava1-l14-linearMSE.pth"


def rate(fn: Callable[..., object], fn_args: tuple, n_items: int, seconds: float) -> float:
    """Items per second of ``fn(*fn_args)`` (one warm-up call, then repeated for at least ``seconds``)."""
    fn(*fn_args)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(*fn_args)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return calls * n_items / elapsed


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


def _bytesio_kb(a: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.tell() / 1000.0


def _encode_ours(pool: ThreadPoolExecutor, arrays: list[np.ndarray]) -> list[float]:
    from rewards.jpeg import _jpeg_kb

    return list(pool.map(lambda a: _jpeg_kb(a, 95), arrays))


def _encode_bytesio(pool: ThreadPoolExecutor, arrays: list[np.ndarray]) -> list[float]:
    return list(pool.map(_bytesio_kb, arrays))


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32)  # fmt: skip
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()


def colour_describe(batch: torch.Tensor) -> list[str]:
    names = ["red", "green", "blue"]
    return [f"a {names[int(im.float().mean(dim=(1, 2)).argmax())]} picture" for im in batch]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per reward call (default: 16)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 512], help="image sizes in pixels (default: 32 512)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing per measurement in seconds (default: 2)")
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's own; 1 is faster on a busy machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    from rewards import AestheticReward, TinyPromptAlignment, make_bert_scorer, make_reward
    from rewards.aesthetic import AestheticHead, load_aesthetic_head
    from rewards.jpeg import FD_MIN_PIXELS

    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, {cores} CPU cores, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    head = load_aesthetic_head(HEAD) if HEAD.is_file() else AestheticHead(768)
    head_label = "published head" if HEAD.is_file() else "random head"
    aesthetic = AestheticReward(clip_model=tiny_clip(), head=head)
    scorer = make_bert_scorer("minilm", device="cpu")
    colour = TinyPromptAlignment(colour_describe, scorer=scorer, max_concurrency=8)
    tiny_world = None
    try:
        tiny_world = TinyPromptAlignment(scorer=scorer, max_concurrency=8)
    except ImportError:
        pass
    jpeg = make_reward("jpeg_compressibility")

    rows: list[tuple[str, int, float]] = []
    try:
        for size in args.sizes:
            x = images(args.batch, size)
            arrays = list(x.permute(0, 2, 3, 1).contiguous().numpy())
            prompts = ["a red picture"] * args.batch
            timing = (args.batch, args.seconds)
            rows.append(("jpeg_compressibility (reward, module thread pool)", size, rate(jpeg, (x, prompts), *timing)))
            for workers in sorted({1, cores}):
                with ThreadPoolExecutor(workers) as pool:
                    path = "fd" if size * size >= FD_MIN_PIXELS else "BytesIO"
                    r = rate(_encode_ours, (pool, arrays), *timing)
                    rows.append((f"  JPEG encode, rewards.jpeg ({path} path), {workers} thread(s)", size, r))
                    if path == "fd":
                        r = rate(_encode_bytesio, (pool, arrays), *timing)
                        rows.append((f"  JPEG encode, BytesIO path (GIL held), {workers} thread(s)", size, r))
            r = rate(aesthetic, (x, prompts), *timing)
            rows.append((f"aesthetic [TINY RANDOM CLIP, {head_label}]", size, r))
            r = rate(colour, (x, prompts), *timing)
            rows.append(("prompt_alignment [local server, colour describer, MiniLM]", size, r))
            if tiny_world is not None and size <= 64:
                r = rate(tiny_world, (x, prompts), *timing)
                rows.append(("prompt_alignment [local server, tiny world captioner, MiniLM]", size, r))
    finally:
        colour.close()
        if tiny_world is not None:
            tiny_world.close()

    width = max(len(name) for name, _, _ in rows)
    print(f"{'reward'.ljust(width)}  {'size':>7}  {'rewards/s':>10}")
    for name, size, r in rows:
        print(f"{name.ljust(width)}  {f'{size}x{size}':>7}  {r:10.1f}")


if __name__ == "__main__":
    main()
