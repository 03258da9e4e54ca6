"""Aesthetic reward: the published head file, CLIP preprocessing, end to end on a tiny random CLIP."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.aesthetic import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_HEAD_FILENAME,
    DEFAULT_HEAD_REPO,
    HEAD_ENV,
    AestheticHead,
    AestheticReward,
    clip_preprocess,
    load_aesthetic_head,
    load_clip,
    resolve_head_path,
)
from rewards.base import MissingModelError

REAL_HEAD = Path(__file__).parents[2] / "shared/assets/sac+logos+ava1-l14-linearMSE.pth"
needs_real_head = pytest.mark.skipif(
    not REAL_HEAD.is_file(), reason=f"published aesthetic head not found at {REAL_HEAD} (../shared/assets)"
)


def tiny_clip(projection_dim=768, image_size=32, seed=0):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval()


def random_head(in_dim, seed=1):
    torch.manual_seed(seed)
    return AestheticHead(in_dim).eval()


def reference_head(state, e):
    """The published MLP written out as explicit matmuls (eval mode: dropout is the identity)."""
    h = e
    for i in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return h[:, 0]


@needs_real_head
def test_real_head_loads_and_matches_explicit_matmuls():
    head = load_aesthetic_head(REAL_HEAD)
    assert head.in_dim == 768 and not head.training
    dims = [(m.in_features, m.out_features) for m in head.layers if isinstance(m, torch.nn.Linear)]
    assert dims == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1234)
    e = torch.randn(5, 768, generator=g, dtype=torch.float64)
    e = e / e.norm(dim=1, keepdim=True)
    ref = reference_head({k: v.double() for k, v in state.items()}, e)
    with torch.no_grad():
        out = head(e.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(head(e.float()), out)  # dropout off: deterministic


@needs_real_head
def test_end_to_end_tiny_clip_with_real_head_matches_reference():
    clip = tiny_clip(projection_dim=768, image_size=32)
    reward = AestheticReward(clip_model=clip, head=REAL_HEAD, batch_size=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 48, 48), generator=g, dtype=torch.uint8)
    r, _info = reward(images, ["p"] * 5)
    assert r.shape == (5,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    # reference: same steps written out here
    x = torch.nn.functional.interpolate(images.float() / 255, size=(32, 32), mode="bicubic", antialias=True)
    x = (x.clamp(0, 1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output).double()
    emb = emb / emb.norm(dim=1, keepdim=True)
    state = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    ref = reference_head({k: v.double() for k, v in state.items()}, emb)
    torch.testing.assert_close(r.double(), ref, rtol=1e-4, atol=1e-4)
    assert len(set(r.tolist())) == 5  # different images, different scores


def test_head_resolution_order_env_then_hf_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(HEAD_ENV, raising=False)
    with pytest.raises(MissingModelError, match=rf"hf download {DEFAULT_HEAD_REPO}.*{HEAD_ENV}"):
        resolve_head_path(cache_dir=tmp_path)
    # a fake HF cache entry holding a (tiny) head
    snap = tmp_path / f"models--{DEFAULT_HEAD_REPO.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    torch.save(random_head(8).state_dict(), snap / DEFAULT_HEAD_FILENAME)
    assert resolve_head_path(cache_dir=tmp_path) == snap / DEFAULT_HEAD_FILENAME
    assert load_aesthetic_head(cache_dir=tmp_path).in_dim == 8
    # the environment variable wins over the cache, an explicit path over both
    env_file = tmp_path / "env_head.pth"
    torch.save(random_head(4).state_dict(), env_file)
    monkeypatch.setenv(HEAD_ENV, str(env_file))
    assert load_aesthetic_head(cache_dir=tmp_path).in_dim == 4
    explicit = tmp_path / "explicit.pth"
    torch.save(random_head(6).state_dict(), explicit)
    assert load_aesthetic_head(explicit, cache_dir=tmp_path).in_dim == 6
    monkeypatch.setenv(HEAD_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(MissingModelError, match=HEAD_ENV):
        resolve_head_path(cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match="does not exist"):
        resolve_head_path(tmp_path / "nope.pth")


def test_head_bad_state_dicts(tmp_path):
    sd = random_head(8).state_dict()
    with pytest.raises(ValueError, match="expected exactly"):
        AestheticHead.from_state_dict({k: v for k, v in sd.items() if k != "layers.7.bias"})
    bad = dict(sd)
    bad["layers.2.weight"] = torch.zeros(128, 3)
    with pytest.raises(ValueError, match=r"layers.2.weight has shape \(128, 3\); expected \(128, 1024\)"):
        AestheticHead.from_state_dict(bad)
    with pytest.raises(ValueError, match="expected a state dict"):
        AestheticHead.from_state_dict([1, 2])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read aesthetic head"):
        load_aesthetic_head(junk)


def test_clip_preprocess_matches_transformers_processor():
    from transformers import CLIPImageProcessor  # PIL backend without torchvision: an independent path

    g = torch.Generator().manual_seed(3)
    # smooth images so that PIL's uint8 resampling and ours agree to within quantisation
    small = torch.randint(0, 256, (2, 3, 6, 9), generator=g, dtype=torch.uint8).float()
    images = torch.nn.functional.interpolate(small, size=(60, 90), mode="bilinear").round().to(torch.uint8)
    proc = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    ref = torch.as_tensor(np.asarray(proc(images=pil, return_tensors="np")["pixel_values"]))
    ours = clip_preprocess(images, 24)
    assert ours.shape == ref.shape == (2, 3, 24, 24)
    # one uint8 step is 1/255/0.27 ~ 0.015 after normalisation; bilinear would be off by ~0.1
    assert (ours - ref).abs().mean() < 0.01
    assert (ours - ref).abs().max() < 0.05


def test_clip_preprocess_centre_crops_and_validates():
    x = torch.zeros(1, 3, 10, 30)
    x[..., 10:20] = 1.0  # a white band exactly in the middle third
    out = clip_preprocess(x, 10, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out, torch.ones(1, 3, 10, 10))
    with pytest.raises(ValueError, match="expected 'bicubic' or 'bilinear'"):
        clip_preprocess(x, 10, mode="nearest")
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        clip_preprocess(torch.zeros(3, 10, 10), 10)


def test_reward_inputs_agree_across_forms_and_batching():
    clip = tiny_clip(projection_dim=12)
    head = random_head(12)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (4, 3, 40, 40), generator=g, dtype=torch.uint8)
    full, _ = AestheticReward(clip_model=clip, head=head, batch_size=4)(images, list("abcd"))
    chunked, _ = AestheticReward(clip_model=clip, head=head, batch_size=3)(images, list("abcd"))
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-5)
    as_float, _ = AestheticReward(clip_model=clip, head=head)(images.float() / 255, list("abcd"))
    torch.testing.assert_close(full, as_float, rtol=1e-5, atol=1e-5)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    as_pil, _ = AestheticReward(clip_model=clip, head=head)(pil, list("abcd"))
    torch.testing.assert_close(full, as_pil, rtol=1e-5, atol=1e-5)
    # each score depends on its own image only: permuting the batch permutes the scores
    perm = torch.tensor([2, 0, 3, 1])
    permuted, _ = AestheticReward(clip_model=clip, head=head)(images[perm], list("abcd"))
    torch.testing.assert_close(permuted, full[perm], rtol=1e-5, atol=1e-5)


def test_reward_loads_saved_clip_directory_and_registry(tmp_path):
    clip = tiny_clip(projection_dim=12)
    clip.save_pretrained(tmp_path / "clip")
    head = random_head(12)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    direct, _ = AestheticReward(clip_model=clip, head=head)(images, ["a", "b"])
    made = rewards.make_reward("aesthetic", clip_model=str(tmp_path / "clip"), head=tmp_path / "head.pth")
    loaded, _ = made(images, ["a", "b"])
    torch.testing.assert_close(loaded, direct)


def test_reward_bad_inputs(tmp_path):
    clip = tiny_clip(projection_dim=12)
    with pytest.raises(ValueError, match="head expects 8-d embeddings but the CLIP model projects to 12"):
        AestheticReward(clip_model=clip, head=random_head(8))
    with pytest.raises(ValueError, match="expected a transformers CLIPModel"):
        AestheticReward(clip_model=object(), head=random_head(12))
    with pytest.raises(ValueError, match="expected None, a path"):
        AestheticReward(clip_model=clip, head=3)
    with pytest.raises(ValueError, match="batch_size"):
        AestheticReward(clip_model=clip, head=random_head(12), batch_size=0)
    reward = AestheticReward(clip_model=clip, head=random_head(12))
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.zeros(2, 3, 32, 32), ["only one"])
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        reward(torch.zeros(2, 1, 32, 32), ["a", "b"])
    with pytest.raises(MissingModelError, match="hf download openai/clip-vit-large-patch14"):
        load_clip("openai/clip-vit-large-patch14", cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match="existing local directory"):
        load_clip(str(tmp_path / "no" / "such" / "dir"), cache_dir=tmp_path)
