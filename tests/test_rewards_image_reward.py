"""ImageReward on a tiny random BLIP stored in the published checkpoint layout, against a reference that
runs a hand-written timm ViT on the raw checkpoint tensors, the BLIP text encoder and the head as
explicit matmuls; plus the missing-weights errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch
import torch.nn.functional as F

import rewards
from rewards.aesthetic import CLIP_MEAN, CLIP_STD
from rewards.base import MissingModelError
from rewards.image_reward import (
    IMAGE_REWARD_ENV,
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_REPO,
    IMAGE_REWARD_STD,
    IMAGE_REWARD_TOKENIZER,
    BlipArch,
    ImageRewardReward,
    convert_image_reward_state_dict,
)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "red", "blue", "on", "the", "mat", "sky"]
PROMPTS = ["a red cat", "the dog on the mat", "a red cat", "blue sky"]


def tiny_tokenizer():
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


ARCH = BlipArch(image_size=32, patch_size=8, vision_width=24, vision_layers=2, vision_heads=2, vision_mlp=40,
                vocab_size=len(WORDS) + 2, text_width=16, text_layers=2, text_heads=2, text_mlp=32,
                max_positions=40)  # fmt: skip


def checkpoint_and_text_model(arch=ARCH, seed=0):
    """Random weights in ImageReward.pt's layout; the text encoder is a BlipTextModel kept for the reference."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w, n = arch.vision_width, (arch.image_size // arch.patch_size) ** 2 + 1
    v = "blip.visual_encoder."
    sd = {v + "cls_token": rnd(1, 1, w), v + "pos_embed": rnd(1, n, w),
          v + "patch_embed.proj.weight": rnd(w, 3, arch.patch_size, arch.patch_size, scale=0.05),
          v + "patch_embed.proj.bias": rnd(w), v + "norm.weight": 1 + rnd(w, scale=0.1),
          v + "norm.bias": rnd(w, scale=0.1)}  # fmt: skip
    for i in range(arch.vision_layers):
        p = f"{v}blocks.{i}."
        for ln in ("norm1", "norm2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + rnd(w, scale=0.1), rnd(w, scale=0.1)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = rnd(3 * w, w), rnd(3 * w)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = rnd(w, w), rnd(w)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(arch.vision_mlp, w), rnd(arch.vision_mlp)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(w, arch.vision_mlp), rnd(w)
    torch.manual_seed(seed)
    _, text = arch.build()
    for k, x in text.state_dict().items():
        sd["blip.text_encoder." + k] = x.clone()
    dims = [arch.text_width, 1024, 128, 64, 16, 1]
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd[f"mlp.layers.{layer}.weight"] = rnd(o, i, scale=1 / i**0.5)
        sd[f"mlp.layers.{layer}.bias"] = rnd(o, scale=0.1)
    sd["blip.vision_proj.weight"] = rnd(4, w)  # BLIP parts the reward does not use are ignored
    return sd, text


def reference_pixels(images, size):
    x = F.interpolate(images.double() / 255, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    return ((x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)).float()


def reference_vit(sd, arch, pix):
    """BLIP's timm-style VisionTransformer written out: conv patches, cls token, pre-LN blocks with a fused
    qkv laid out as (3, heads, head_dim), exact GELU, final LayerNorm (eps 1e-6); all tokens returned."""
    v = "blip.visual_encoder."

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"].double(), sd[p + ".bias"].double(), eps=1e-6)

    def lin(x, p):
        return x @ sd[p + ".weight"].double().T + sd[p + ".bias"].double()

    x = F.conv2d(pix.double(), sd[v + "patch_embed.proj.weight"].double(), sd[v + "patch_embed.proj.bias"].double(),
                 stride=arch.patch_size).flatten(2).transpose(1, 2)  # fmt: skip
    x = torch.cat([sd[v + "cls_token"].double().expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"].double()
    b, n, w = x.shape
    h, d = arch.vision_heads, w // arch.vision_heads
    for i in range(arch.vision_layers):
        p = f"{v}blocks.{i}."
        qkv = lin(ln(x, p + "norm1"), p + "attn.qkv").reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-1, -2) * d**-0.5).softmax(-1)
        x = x + lin((att @ qkv[2]).transpose(1, 2).reshape(b, n, w), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return ln(x, v + "norm")


def reference_image_reward(sd, text_model, arch, tok, images, prompts):
    emb = reference_vit(sd, arch, reference_pixels(images, arch.image_size)).float()
    enc = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tok.cls_token_id).all()  # the reference keeps [CLS] first
    with torch.no_grad():
        hidden = text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            encoder_hidden_states=emb, is_decoder=False).last_hidden_state[:, 0].double()  # fmt: skip
    for layer in (0, 2, 4, 6, 7):  # the MLP in eval mode: dropout is the identity, no nonlinearities
        hidden = hidden @ sd[f"mlp.layers.{layer}.weight"].double().T + sd[f"mlp.layers.{layer}.bias"].double()
    return (hidden[:, 0] - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def random_images(n=4, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_image_reward_matches_the_written_out_reference(tmp_path):
    sd, text = checkpoint_and_text_model()
    tok = tiny_tokenizer()
    images = random_images()
    ref = reference_image_reward(sd, text, ARCH, tok, images, PROMPTS)
    torch.save(sd, tmp_path / "ImageReward.pt")
    reward = ImageRewardReward(tmp_path / "ImageReward.pt", tokenizer=tok, arch=ARCH, batch_size=3)
    r, _ = reward(images, PROMPTS)
    assert r.shape == (4,) and r.dtype == torch.float32
    torch.testing.assert_close(r.double(), ref, rtol=1e-4, atol=1e-4)
    assert len(set(r.tolist())) == 4  # image and text both matter
    perm = [2, 0, 3, 1]
    torch.testing.assert_close(reward(images[perm], [PROMPTS[i] for i in perm])[0], r[perm], rtol=1e-5, atol=1e-5)
    swapped, _ = reward(images, PROMPTS[::-1])
    assert not torch.allclose(swapped, r)


def test_image_reward_registry_and_missing_weights(tmp_path, monkeypatch):
    sd, _ = checkpoint_and_text_model(seed=1)
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    torch.save(sd, tmp_path / "ir.pt")
    monkeypatch.setenv(IMAGE_REWARD_ENV, str(tmp_path / "ir.pt"))
    made = rewards.make_reward("image_reward", tokenizer=str(tmp_path / "tok"), arch=ARCH)
    assert made(random_images(2), PROMPTS[:2])[0].shape == (2,)
    monkeypatch.delenv(IMAGE_REWARD_ENV)
    with pytest.raises(MissingModelError, match=rf"ImageReward.pt.*hf download {IMAGE_REWARD_REPO} ImageReward.pt"):
        ImageRewardReward(tokenizer=tok, arch=ARCH, cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match=rf"hf download {IMAGE_REWARD_TOKENIZER} config.json tokenizer.json tokenizer_config.json vocab.txt`"):
        ImageRewardReward(cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match="does not exist"):
        ImageRewardReward(tmp_path / "nope.pt", tokenizer=tok, arch=ARCH)


def test_image_reward_bad_checkpoints():
    sd, _ = checkpoint_and_text_model()
    bad = dict(sd)
    del bad["blip.visual_encoder.blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match="no key 'blip.visual_encoder.blocks.1.attn.qkv.bias'"):
        convert_image_reward_state_dict(bad, ARCH)
    wrong = BlipArch(**{**ARCH.__dict__, "text_mlp": 48})
    with pytest.raises(ValueError, match=r"intermediate.dense.weight has shape \(32, 16\); expected \(48, 16\)"):
        ImageRewardReward(sd, tokenizer=tiny_tokenizer(), arch=wrong)
    with pytest.raises(ValueError, match="expected None, a path, a state dict"):
        ImageRewardReward(3, tokenizer=tiny_tokenizer(), arch=ARCH)
    with pytest.raises(ValueError, match="vision_layers=0"):
        BlipArch(vision_layers=0)


def test_image_reward_follows_images_to_an_accelerator_only_when_no_device_was_given():
    sd, _ = checkpoint_and_text_model()
    following = ImageRewardReward(sd, tokenizer=tiny_tokenizer(), arch=ARCH)
    following.follow(torch.device("meta"))  # 'meta' stands in for an accelerator
    assert following.device.type == "meta" and next(following.model.parameters()).device.type == "meta"
    pinned = ImageRewardReward(sd, tokenizer=tiny_tokenizer(), arch=ARCH, device="cpu")
    pinned.follow(torch.device("meta"))
    assert pinned.device.type == "cpu" and next(pinned.model.parameters()).device.type == "cpu"
