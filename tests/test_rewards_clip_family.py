"""PickScore, CLIPScore and HPSv2.1 on tiny random-weight models, against reference computations written
out here (CLIPModel's own forward for PickScore/CLIPScore; a hand-written open_clip forward on the raw
open_clip state dict for HPS), plus the missing-weights errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import string

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from rewards.aesthetic import CLIP_MEAN, CLIP_STD
from rewards.base import MissingModelError
from rewards.clip_score import ClipScoreReward
from rewards.hps import (
    HPS_ENV,
    HPS_REPO,
    HPSv2Reward,
    OpenClipArch,
    convert_open_clip_state_dict,
    resize_max_preprocess,
)
from rewards.pickscore import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, PickScoreReward

LETTERS = list(string.ascii_lowercase)
SOT, EOT = 52, 53  # the end-of-text token has the largest id, as in CLIP's real vocabulary
PROMPTS = ["a red cat", "a dog on a mat", "a red cat", "blue sky"]


def tiny_tokenizer():
    """A CLIP BPE tokenizer with letters only (no merges): each word is spelled out."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(LETTERS)})
    vocab.update({"<|startoftext|>": SOT, "<|endoftext|>": EOT})
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(projection_dim=12, image_size=32, seed=0, logit_scale=None):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=24, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    return model


def random_images(n=4, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def reference_pixels(images, size):
    """Shorter side → size (square inputs: a plain resize), bicubic antialiased, CLIP mean/std."""
    x = F.interpolate(images.double() / 255, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    return ((x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)).float()


def reference_logits(model, tok, images, prompts):
    """CLIPModel's own forward, one pair at a time, unpadded prompt: logits_per_image = exp(s) * cos."""
    pix = reference_pixels(images, model.config.vision_config.image_size)
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = torch.tensor([tok(p)["input_ids"]])
            out.append(float(model(input_ids=ids, pixel_values=pix[i : i + 1]).logits_per_image[0, 0]))
    return torch.tensor(out, dtype=torch.float64)


def test_pickscore_matches_clip_forward_logits():
    model, tok = tiny_clip(logit_scale=2.0), tiny_tokenizer()
    images = random_images()
    reward = PickScoreReward(model=model, tokenizer=tok, batch_size=3)
    r, info = reward(images, PROMPTS)
    assert r.shape == (4,) and r.dtype == torch.float32
    ref = reference_logits(model, tok, images, PROMPTS)
    torch.testing.assert_close(r.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(info["cosine"].double() * torch.e**2, ref, rtol=1e-4, atol=1e-4)
    assert len(set(r.tolist())) == 4
    # per sample: permuting the batch permutes the rewards
    perm = [3, 1, 0, 2]
    r_perm, _ = reward(images[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(r_perm, r[perm], rtol=1e-5, atol=1e-5)
    # PIL and float inputs agree with uint8
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    torch.testing.assert_close(reward(pil, PROMPTS)[0], r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward(images.float() / 255, PROMPTS)[0], r, rtol=1e-5, atol=1e-5)


def test_clip_score_both_conventions_and_clipping():
    model, tok = tiny_clip(seed=3), tiny_tokenizer()
    images = random_images(seed=1)
    ref_cos = reference_logits(model, tok, images, PROMPTS) / model.logit_scale.exp().item()
    paper = ClipScoreReward(model=model, tokenizer=tok)
    r, info = paper(images, PROMPTS)
    torch.testing.assert_close(info["cosine"].double(), ref_cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.double(), 2.5 * ref_cos.clamp_min(0), rtol=1e-4, atol=1e-5)
    r100, _ = ClipScoreReward(model=model, tokenizer=tok, weight=100)(images, PROMPTS)
    torch.testing.assert_close(r100.double(), 100 * ref_cos.clamp_min(0), rtol=1e-4, atol=1e-3)
    # random weights give some negative cosines: they must be clipped to 0, not passed through
    neg = ClipScoreReward(model=tiny_clip(seed=7), tokenizer=tok)
    many = random_images(8, seed=5)
    prompts = ["a cat", "dog", "sky", "red", "mat", "blue sky", "a b c", "zebra"]
    rr, ii = neg(many, prompts)
    assert (ii["cosine"] < 0).any() and (rr[ii["cosine"] < 0] == 0).all()
    prefixed, info = ClipScoreReward(model=model, tokenizer=tok, prefix="my ")(images, PROMPTS)
    ref_prefixed = reference_logits(model, tok, images, ["my " + p for p in PROMPTS])
    torch.testing.assert_close(info["cosine"].double(), ref_prefixed / model.logit_scale.exp().item(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"weight=0; expected a positive number"):
        ClipScoreReward(model=model, tokenizer=tok, weight=0)
    with pytest.raises(ValueError, match="tokenizer is None with a loaded model"):
        ClipScoreReward(model=model)


def test_clip_rewards_load_from_directories_and_registry(tmp_path):
    model, tok = tiny_clip(logit_scale=1.0), tiny_tokenizer()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    images = random_images(2)
    direct, _ = PickScoreReward(model=model, tokenizer=tok)(images, PROMPTS[:2])
    made = rewards.make_reward("pickscore", model=str(tmp_path / "clip"), tokenizer=str(tmp_path / "clip"))
    torch.testing.assert_close(made(images, PROMPTS[:2])[0], direct, rtol=1e-5, atol=1e-5)
    cs = rewards.make_reward("clip_score", model=str(tmp_path / "clip"))
    assert cs(images, PROMPTS[:2])[0].shape == (2,)


def test_clip_rewards_missing_weights_name_the_repo_and_command(tmp_path):
    with pytest.raises(MissingModelError, match=rf"hf download {PICKSCORE_PROCESSOR} config.json tokenizer.json tokenizer_config.json vocab.json merges.txt special_tokens_map.json`"):
        PickScoreReward(cache_dir=tmp_path)
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    with pytest.raises(MissingModelError, match=rf"PickScore CLIPModel '{PICKSCORE_MODEL}'.*hf download {PICKSCORE_MODEL}"):
        PickScoreReward(tokenizer=str(tok_dir), cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match="hf download openai/clip-vit-base-patch32"):
        ClipScoreReward(cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match="expected an existing local directory"):
        ClipScoreReward(model=str(tmp_path / "no" / "such"), cache_dir=tmp_path)


def test_clip_rewards_bad_inputs():
    reward = PickScoreReward(model=tiny_clip(), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(random_images(2), ["only one"])
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        reward(torch.zeros(2, 1, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="expected a transformers CLIPModel"):
        PickScoreReward(model=object(), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="batch_size=0"):
        PickScoreReward(model=tiny_clip(), tokenizer=tiny_tokenizer(), batch_size=0)


# --- HPSv2.1: open_clip layout -------------------------------------------------------------------

ARCH = OpenClipArch(embed_dim=12, image_size=32, patch_size=8, vision_width=24, vision_layers=2, vision_heads=3,
                    vision_mlp=40, text_width=16, text_layers=2, text_heads=2, text_mlp=32, context_length=20,
                    vocab_size=54, eot_token_id=EOT)  # fmt: skip


def open_clip_state_dict(arch=ARCH, seed=0):
    """Random tensors with the key names and shapes of an open_clip ViT-CLIP (as HPS_v2.1 stores it)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    n_patches = (arch.image_size // arch.patch_size) ** 2

    def blocks(prefix, width, mlp, layers):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            for ln in ("ln_1", "ln_2"):
                sd[f"{p}.{ln}.weight"] = 1 + rnd(width, scale=0.1)
                sd[f"{p}.{ln}.bias"] = rnd(width, scale=0.1)
            sd[f"{p}.attn.in_proj_weight"] = rnd(3 * width, width)
            sd[f"{p}.attn.in_proj_bias"] = rnd(3 * width)
            sd[f"{p}.attn.out_proj.weight"] = rnd(width, width)
            sd[f"{p}.attn.out_proj.bias"] = rnd(width)
            sd[f"{p}.mlp.c_fc.weight"] = rnd(mlp, width)
            sd[f"{p}.mlp.c_fc.bias"] = rnd(mlp)
            sd[f"{p}.mlp.c_proj.weight"] = rnd(width, mlp)
            sd[f"{p}.mlp.c_proj.bias"] = rnd(width)

    w = arch.vision_width
    sd["visual.class_embedding"] = rnd(w)
    sd["visual.positional_embedding"] = rnd(n_patches + 1, w)
    sd["visual.conv1.weight"] = rnd(w, 3, arch.patch_size, arch.patch_size, scale=0.05)
    for ln in ("ln_pre", "ln_post"):
        sd[f"visual.{ln}.weight"] = 1 + rnd(w, scale=0.1)
        sd[f"visual.{ln}.bias"] = rnd(w, scale=0.1)
    blocks("visual.transformer", w, arch.vision_mlp, arch.vision_layers)
    sd["visual.proj"] = rnd(w, arch.embed_dim)
    t = arch.text_width
    sd["token_embedding.weight"] = rnd(arch.vocab_size, t)
    sd["positional_embedding"] = rnd(arch.context_length, t)
    sd["ln_final.weight"] = 1 + rnd(t, scale=0.1)
    sd["ln_final.bias"] = rnd(t, scale=0.1)
    blocks("transformer", t, arch.text_mlp, arch.text_layers)
    sd["text_projection"] = rnd(t, arch.embed_dim)
    sd["logit_scale"] = torch.tensor(4.6052)
    sd["attn_mask"] = torch.full((arch.context_length, arch.context_length), float("-inf")).triu(1)
    return sd


def _ln(sd, x, p):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"].double(), sd[p + ".bias"].double(), eps=1e-5)


def _resblock(sd, x, p, heads, causal):
    """open_clip's ResidualAttentionBlock written out: fused in_proj, nn.GELU, pre-LN."""
    b, n, w = x.shape
    d = w // heads
    q, k, v = (_ln(sd, x, p + ".ln_1") @ sd[p + ".attn.in_proj_weight"].double().T
               + sd[p + ".attn.in_proj_bias"].double()).chunk(3, dim=-1)  # fmt: skip
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / d**0.5
    if causal:
        att = att + torch.full((n, n), float("-inf"), dtype=att.dtype).triu(1)
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + o @ sd[p + ".attn.out_proj.weight"].double().T + sd[p + ".attn.out_proj.bias"].double()
    h = F.gelu(_ln(sd, x, p + ".ln_2") @ sd[p + ".mlp.c_fc.weight"].double().T + sd[p + ".mlp.c_fc.bias"].double())
    return x + h @ sd[p + ".mlp.c_proj.weight"].double().T + sd[p + ".mlp.c_proj.bias"].double()


def reference_open_clip_hps(sd, arch, images, prompts, tok):
    """open_clip encode_image / encode_text (normalised) on the raw state dict, HPS = cos."""
    pix = reference_pixels(images, arch.image_size).double()
    x = F.conv2d(pix, sd["visual.conv1.weight"].double(), stride=arch.patch_size).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].double().expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"].double()
    x = _ln(sd, x, "visual.ln_pre")
    for i in range(arch.vision_layers):
        x = _resblock(sd, x, f"visual.transformer.resblocks.{i}", arch.vision_heads, causal=False)
    img = _ln(sd, x[:, 0], "visual.ln_post") @ sd["visual.proj"].double()
    # open_clip's tokenizer pads with 0 to the full context length
    ids = torch.zeros(len(prompts), arch.context_length, dtype=torch.long)
    for i, p in enumerate(prompts):
        t = tok(p)["input_ids"][: arch.context_length]
        ids[i, : len(t)] = torch.tensor(t)
    y = sd["token_embedding.weight"].double()[ids] + sd["positional_embedding"].double()
    for i in range(arch.text_layers):
        y = _resblock(sd, y, f"transformer.resblocks.{i}", arch.text_heads, causal=True)
    y = _ln(sd, y, "ln_final")
    txt = y[torch.arange(len(prompts)), ids.argmax(dim=-1)] @ sd["text_projection"].double()
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


def test_hps_matches_a_hand_written_open_clip_forward(tmp_path):
    sd = open_clip_state_dict()
    tok = tiny_tokenizer()
    images = random_images(4, seed=2)
    ref = reference_open_clip_hps(sd, ARCH, images, PROMPTS, tok)
    # as stored by HPSv2: {"state_dict": ...}, here with DDP's "module." prefix on top
    torch.save({"state_dict": {"module." + k: v.half() if k != "logit_scale" else v for k, v in sd.items()}},
               tmp_path / "hps.pt")  # fmt: skip
    ref_half = reference_open_clip_hps({k: v.half().float() for k, v in sd.items()}, ARCH, images, PROMPTS, tok)
    reward = HPSv2Reward(tmp_path / "hps.pt", tokenizer=tok, arch=ARCH, batch_size=3)
    r, _ = reward(images, PROMPTS)
    assert r.shape == (4,) and r.dtype == torch.float32
    torch.testing.assert_close(r.double(), ref_half, rtol=1e-4, atol=1e-4)
    assert (ref - ref_half).abs().max() < 0.05  # fp16 storage moves scores only slightly
    assert len(set(r.tolist())) == 4
    from_sd, _ = HPSv2Reward(sd, tokenizer=tok, arch=ARCH)(images, PROMPTS)
    torch.testing.assert_close(from_sd.double(), ref, rtol=1e-4, atol=1e-4)


def test_hps_checkpoint_lookup_and_errors(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    monkeypatch.delenv(HPS_ENV, raising=False)
    with pytest.raises(MissingModelError, match=rf"HPS_v2.1_compressed.pt.*hf download {HPS_REPO} HPS_v2.1_compressed.pt"):
        HPSv2Reward(tokenizer=tok, arch=ARCH, cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match=rf"hf download {HPS_REPO} HPS_v2_compressed.pt"):
        HPSv2Reward(tokenizer=tok, arch=ARCH, version="v2.0", cache_dir=tmp_path)
    # found in a (fake) HF cache entry
    snap = tmp_path / f"models--{HPS_REPO.replace('/', '--')}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    torch.save({"state_dict": open_clip_state_dict()}, snap / "HPS_v2.1_compressed.pt")
    assert HPSv2Reward(tokenizer=tok, arch=ARCH, cache_dir=tmp_path)(random_images(1), ["cat"])[0].shape == (1,)
    monkeypatch.setenv(HPS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(MissingModelError, match=HPS_ENV):
        HPSv2Reward(tokenizer=tok, arch=ARCH, cache_dir=tmp_path)
    monkeypatch.delenv(HPS_ENV)
    with pytest.raises(MissingModelError, match="hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        HPSv2Reward(cache_dir=tmp_path)
    with pytest.raises(ValueError, match="version='v3'"):
        HPSv2Reward(tokenizer=tok, version="v3")
    bad = open_clip_state_dict()
    del bad["transformer.resblocks.1.ln_2.bias"]
    with pytest.raises(ValueError, match="no key 'transformer.resblocks.1.ln_2.bias'"):
        convert_open_clip_state_dict(bad, ARCH)
    with pytest.raises(ValueError, match=r"visual_projection.weight has shape \(12, 24\); expected \(8, 24\)"):
        HPSv2Reward(open_clip_state_dict(), tokenizer=tok, arch=OpenClipArch(**{**ARCH.__dict__, "embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_heads=0"):
        OpenClipArch(vision_heads=0)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not read HPS checkpoint"):
        HPSv2Reward(tmp_path / "junk.pt", tokenizer=tok, arch=ARCH)


def test_resize_max_preprocess_pads_non_square_images_with_black():
    x = torch.ones(1, 3, 16, 32)  # white, twice as wide as high
    out = resize_max_preprocess(x, 8, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out[..., 2:6, :], torch.ones(1, 3, 4, 8))  # the resized image, centred
    torch.testing.assert_close(out[..., :2, :], torch.zeros(1, 3, 2, 8))  # black padding above and below
    torch.testing.assert_close(out[..., 6:, :], torch.zeros(1, 3, 2, 8))
    sq = random_images(2, 48)
    torch.testing.assert_close(resize_max_preprocess(sq, 32), reference_pixels(sq, 32), rtol=1e-5, atol=1e-5)


def test_weighted_multi_reward_through_the_registry():
    """The field combines preference rewards with weights: component_kwargs reach each registered one."""
    model, tok = tiny_clip(logit_scale=1.0), tiny_tokenizer()
    images = random_images(3, seed=4)
    prompts = PROMPTS[:3]
    combo = rewards.make_reward({"pickscore": 1.0, "clip_score": 0.5, "hpsv2": 2.0},
                                pickscore=dict(model=model, tokenizer=tok),
                                clip_score=dict(model=model, tokenizer=tok, weight=100),
                                hpsv2=dict(checkpoint=open_clip_state_dict(), tokenizer=tok, arch=ARCH))  # fmt: skip
    r, info = combo(images, prompts)
    ref = reference_logits(model, tok, images, prompts)  # exp(1) * cos
    cos = ref / torch.e
    hps = reference_open_clip_hps(open_clip_state_dict(), ARCH, images, prompts, tok)
    torch.testing.assert_close(r.double(), ref + 0.5 * 100 * cos.clamp_min(0) + 2 * hps, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(info["hpsv2/reward"].double(), hps, rtol=1e-4, atol=1e-4)


def test_scorer_follows_images_to_an_accelerator_only_when_no_device_was_given():
    """device=None: the model moves once to where images arrive (the env's GPU); an explicit device stays.
    ('meta' stands in for an accelerator: the move is what is checked, not a forward pass.)"""
    from rewards.clip_common import ClipTextImage

    following = ClipTextImage(tiny_clip(), tiny_tokenizer())
    following.follow(torch.device("cpu"))
    assert following.device.type == "cpu"
    following.follow(torch.device("meta"))
    assert following.device.type == "meta" and next(following.model.parameters()).device.type == "meta"
    pinned = ClipTextImage(tiny_clip(), tiny_tokenizer(), device="cpu")
    pinned.follow(torch.device("meta"))
    assert pinned.device.type == "cpu" and next(pinned.model.parameters()).device.type == "cpu"
