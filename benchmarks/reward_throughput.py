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
  tiny world's captioner at 32x32;
- ``pickscore`` / ``clip_score`` / ``hpsv2`` / ``image_reward``: the full pipelines (preprocessing at 224,
  tokenisation, both towers, scoring) on *tiny random models of the published classes* (CLIP width 32,
  BLIP ViT width 32 + BERT width 32), labelled as such: pipeline overhead, not CLIP-H / BLIP-L speed;
- ``ocr``: the *real* PP-OCRv4 models shipped in the rapidocr_onnxruntime wheel, on images with a
  word rendered in them, with RapidOCR's default detector size (short side scaled to 736) and with
  ``det_limit_type="max", det_limit_side_len=320``;
- ``vlm_judge``: local chat-completions server answering yes/no with log-probabilities (canned judge);
- ``remote``: loopback reward server (``rewards.remote``) with ``jpeg_compressibility`` behind it.

``--only NAME ...`` measures a subset (e.g. ``--only pickscore hpsv2 ocr``).
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


def tiny_letter_tokenizer():
    """A CLIP BPE tokenizer over letters only (ids 0-51, start 52, end 53): no files needed."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_text_clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=52, eos_token_id=53, pad_token_id=53)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32)  # fmt: skip
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)).eval()


def tiny_image_reward():
    from transformers import BertTokenizer

    from rewards.aesthetic import AestheticHead
    from rewards.image_reward import BlipArch, ImageRewardModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a red picture of cat dog".split()]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    arch = BlipArch(image_size=224, patch_size=32, vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                    vocab_size=len(tok), text_width=32, text_layers=2, text_heads=2, text_mlp=64, max_positions=40)  # fmt: skip
    torch.manual_seed(0)
    vision, text = arch.build()
    return ImageRewardModel(vision, text, AestheticHead(32)), tok


def text_images(batch: int, size: int, word: str = "HELLO") -> torch.Tensor:
    from PIL import ImageDraw, ImageFont

    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).text((size // 16, size // 3), word, fill="black",
                            font=ImageFont.load_default(size=max(6, size // 6)))  # fmt: skip
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).unsqueeze(0).repeat(batch, 1, 1, 1).contiguous()


def canned_judge(payload: dict) -> tuple[int, bytes]:
    import json

    from rewards.server import completion_body

    body = completion_body("Yes", "judge")
    alts = [{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.4}]
    body["choices"][0]["logprobs"] = {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": alts}]}
    return 200, json.dumps(body).encode()


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
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="measure only these rewards (jpeg_compressibility aesthetic prompt_alignment pickscore "
                             "clip_score hpsv2 image_reward ocr vlm_judge remote)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    from rewards import AestheticReward, TinyPromptAlignment, make_bert_scorer, make_reward
    from rewards.aesthetic import AestheticHead, load_aesthetic_head
    from rewards.jpeg import FD_MIN_PIXELS

    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, {cores} CPU cores, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    names = ("jpeg_compressibility", "aesthetic", "prompt_alignment", "pickscore", "clip_score", "hpsv2",
             "image_reward", "ocr", "vlm_judge", "remote")  # fmt: skip
    only = set(args.only or names)
    unknown = only - set(names)
    if unknown:
        parser.error(f"--only {sorted(unknown)}; expected names among {list(names)}")
    closers: list[Callable[[], object]] = []
    measured: list[tuple[str, Callable[..., object], Callable[[int], bool]]] = []  # (label, reward, size filter)
    every = lambda size: True  # noqa: E731
    if "aesthetic" in only:
        head = load_aesthetic_head(HEAD) if HEAD.is_file() else AestheticHead(768)
        head_label = "published head" if HEAD.is_file() else "random head"
        measured.append((f"aesthetic [TINY RANDOM CLIP, {head_label}]",
                         AestheticReward(clip_model=tiny_clip(), head=head), every))  # fmt: skip
    if "prompt_alignment" in only:
        scorer = make_bert_scorer("minilm", device="cpu")
        colour = TinyPromptAlignment(colour_describe, scorer=scorer, max_concurrency=8)
        closers.append(colour.close)
        measured.append(("prompt_alignment [local server, colour describer, MiniLM]", colour, every))
        try:
            tiny_world = TinyPromptAlignment(scorer=scorer, max_concurrency=8)
            closers.append(tiny_world.close)
            measured.append(("prompt_alignment [local server, tiny world captioner, MiniLM]", tiny_world,
                             lambda size: size <= 64))  # fmt: skip
        except ImportError:
            pass
    if "pickscore" in only:
        from rewards.pickscore import PickScoreReward

        measured.append(("pickscore [TINY RANDOM CLIPModel, 224 input]",
                         PickScoreReward(model=tiny_text_clip(), tokenizer=tiny_letter_tokenizer()), every))  # fmt: skip
    if "clip_score" in only:
        from rewards.clip_score import ClipScoreReward

        measured.append(("clip_score [TINY RANDOM CLIPModel, 224 input]",
                         ClipScoreReward(model=tiny_text_clip(), tokenizer=tiny_letter_tokenizer()), every))  # fmt: skip
    if "hpsv2" in only:
        from rewards.hps import HPSv2Reward

        measured.append(("hpsv2 [TINY RANDOM CLIPModel, 224 input, resize-max preprocessing]",
                         HPSv2Reward(tiny_text_clip(), tokenizer=tiny_letter_tokenizer()), every))  # fmt: skip
    if "image_reward" in only:
        from rewards.image_reward import ImageRewardReward

        model, tok = tiny_image_reward()
        measured.append(("image_reward [TINY RANDOM BLIP ViT + BERT, 224 input]",
                         ImageRewardReward(model, tokenizer=tok), every))  # fmt: skip
    ocr_rewards = []
    if "ocr" in only:
        from rewards.ocr import OcrReward

        ocr_rewards = [("ocr [REAL PP-OCRv4 from the wheel, default det size 736]", OcrReward()),
                       ("ocr [REAL PP-OCRv4 from the wheel, det_limit max 320]",
                        OcrReward(det_limit_type="max", det_limit_side_len=320))]  # fmt: skip
    if "vlm_judge" in only:
        from rewards.server import serve_in_thread
        from rewards.vlm_judge import VlmJudgeReward

        url, stop = serve_in_thread(lambda b: ["unused"] * len(b), intercept=canned_judge)
        judge = VlmJudgeReward(url, "judge", api_key="", max_concurrency=8)
        closers += [judge.close, stop]
        measured.append(("vlm_judge [local server, canned yes/no with log-probs]", judge, every))
    if "remote" in only:
        from rewards.remote import RemoteReward, serve_reward_in_thread

        url, stop = serve_reward_in_thread(make_reward("jpeg_compressibility"))
        remote = RemoteReward(url, api_key="", max_batch=8)
        closers += [remote.close, stop]
        measured.append(("remote [loopback server, jpeg_compressibility behind it, 8 per request]", remote, every))
    jpeg = make_reward("jpeg_compressibility")

    rows: list[tuple[str, int, float]] = []
    try:
        for size in args.sizes:
            x = images(args.batch, size)
            arrays = list(x.permute(0, 2, 3, 1).contiguous().numpy())
            prompts = ["a red picture"] * args.batch
            timing = (args.batch, args.seconds)
            if "jpeg_compressibility" in only:
                rows.append(("jpeg_compressibility (reward, module thread pool)", size,
                             rate(jpeg, (x, prompts), *timing)))  # fmt: skip
                for workers in sorted({1, cores}):
                    with ThreadPoolExecutor(workers) as pool:
                        path = "fd" if size * size >= FD_MIN_PIXELS else "BytesIO"
                        r = rate(_encode_ours, (pool, arrays), *timing)
                        rows.append((f"  JPEG encode, rewards.jpeg ({path} path), {workers} thread(s)", size, r))
                        if path == "fd":
                            r = rate(_encode_bytesio, (pool, arrays), *timing)
                            rows.append((f"  JPEG encode, BytesIO path (GIL held), {workers} thread(s)", size, r))
            for label, fn, keep in measured:
                if keep(size):
                    rows.append((label, size, rate(fn, (x, prompts), *timing)))
            if ocr_rewards:
                tx = text_images(args.batch, size)
                for label, fn in ocr_rewards:
                    rows.append((label, size, rate(fn, (tx, ['a sign that says "hello"'] * args.batch), *timing)))
    finally:
        for close in closers:
            close()

    width = max(len(name) for name, _, _ in rows)
    print(f"{'reward'.ljust(width)}  {'size':>7}  {'rewards/s':>10}")
    for name, size, r in rows:
        print(f"{name.ljust(width)}  {f'{size}x{size}':>7}  {r:10.1f}")


if __name__ == "__main__":
    main()
