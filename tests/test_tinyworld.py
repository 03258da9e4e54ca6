"""The embedded tiny world: scenes, captions, captioner, tokenizer and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rewards.tinyworld import world
from rewards.tinyworld.captioner import describe, detect, score
from rewards.tinyworld.tokenizer import build_merges, build_tokenizer
from rewards.tinyworld.world import (
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    Obj,
    Scene,
    caption,
    heldout_prompts,
    parse_prompt,
    render,
    sample_dataset,
    sample_scene,
    train_prompts,
    words,
)

# ----------------------------------------------------------------------------------------------- world


def test_world_is_deterministic_from_a_seed():
    a, ca = sample_dataset(50, seed=3)
    b, cb = sample_dataset(50, seed=3)
    c, cc = sample_dataset(50, seed=4)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c)


def test_render_draws_the_scene_geometry():
    bg = (100, 100, 100)
    scene = Scene((Obj("square", "red", cx=16.0, cy=16.0, half=4.0, size="small"),), None, bg)
    img = render(scene)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    red = np.all(img == COLOURS["red"], axis=-1)
    # pixel centres 12.5 .. 19.5 lie within |x - 16| <= 4: an 8x8 block
    assert red.sum() == 64 and red[12:20, 12:20].all()
    assert np.all(img[~red] == bg)
    assert render(scene, size=64).shape == (64, 64, 3)


def test_captions_round_trip_through_parse_prompt():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene)
        parsed = parse_prompt(text)
        assert [(o["colour"], o["shape"]) for o in parsed["objects"]] == [
            (o.colour, o.shape) for o in scene.objects
        ]
        assert parsed["relation"] == scene.relation
        assert world.caption_of(parsed["objects"], parsed["relation"]) == text


def test_parse_prompt_examples_and_errors():
    assert parse_prompt("A small green triangle") == {
        "objects": [{"colour": "green", "shape": "triangle", "size": "small"}],
        "relation": None,
    }
    two = parse_prompt("a red circle  left of a blue square")
    assert two["relation"] == "left of" and [o["colour"] for o in two["objects"]] == ["red", "blue"]
    three = parse_prompt("a red circle,a blue square and a green triangle")
    assert three["relation"] == "row" and [o["shape"] for o in three["objects"]] == list(SHAPES)
    for bad in ["a pink circle", "a red circle above", "", "two red circles"]:
        with pytest.raises(ValueError, match="expected"):
            parse_prompt(bad)


def test_train_and_heldout_prompts_are_disjoint_and_cover_the_pairs():
    train, held = train_prompts(), heldout_prompts()
    assert train and held
    assert not set(train) & set(held)
    assert len(set(train)) == len(train)

    def pairs(prompts):
        return {(o["colour"], o["shape"]) for p in prompts for o in parse_prompt(p)["objects"]}

    assert not pairs(train) & HELDOUT_PAIRS
    assert HELDOUT_PAIRS <= pairs(held)
    assert pairs(train) | HELDOUT_PAIRS == {(c, s) for c in COLOURS for s in SHAPES}


def test_training_split_scenes_never_show_heldout_pairs():
    rng = np.random.default_rng(1)
    train = set(train_prompts())
    for _ in range(300):
        scene = sample_scene(rng, split="train")
        assert not {(o.colour, o.shape) for o in scene.objects} & HELDOUT_PAIRS
        assert caption(scene) in train
    held = set(heldout_prompts())
    assert all(caption(sample_scene(rng, split="heldout")) in held for _ in range(50))


def test_sample_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        sample_scene(0)
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), split="test")
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(np.random.default_rng(0), n_objects=4)
    for bad in ((), ("under",), ("above", "beside")):
        with pytest.raises(ValueError, match="relations=.*expected a non-empty subset"):
            sample_scene(np.random.default_rng(0), relations=bad)


def test_held_out_relations_leave_one_word_per_axis_and_restrict_two_object_scenes():
    assert set(world.SEEN_RELATIONS) | set(world.HELDOUT_RELATIONS) == set(world.RELATIONS)
    assert not set(world.SEEN_RELATIONS) & set(world.HELDOUT_RELATIONS)
    for axis in ({"above", "below"}, {"left of", "right of"}):  # each axis keeps one word seen, one held out
        assert len(axis & set(world.SEEN_RELATIONS)) == 1 and len(axis & set(world.HELDOUT_RELATIONS)) == 1
    rng = np.random.default_rng(2)
    seen = [sample_scene(rng, split="train", relations=world.SEEN_RELATIONS) for _ in range(400)]
    assert {s.relation for s in seen if len(s.objects) == 2} == set(world.SEEN_RELATIONS)
    assert {len(s.objects) for s in seen} == {1, 2, 3}  # the other scenes are drawn as before
    held = [sample_scene(rng, split="train", n_objects=2, relations=world.HELDOUT_RELATIONS) for _ in range(100)]
    assert {s.relation for s in held} == set(world.HELDOUT_RELATIONS)
    for s in held:  # the geometry follows the word: "below" puts the first object lower (larger y), etc.
        a, b = s.objects
        assert (a.cy > b.cy + 5) if s.relation == "below" else (a.cx > b.cx + 5)


# ------------------------------------------------------------------------------------------- captioner


def test_captioner_reads_ground_truth_renders():
    images, captions = sample_dataset(400, seed=11, split="all")
    chw = images.transpose(0, 3, 1, 2)
    results = score(chw, captions)
    assert np.mean([r["all_correct"] for r in results]) >= 0.99
    described = describe(torch.from_numpy(chw))
    # describe names two objects upper/left first, so compare meanings through score
    assert np.mean([r["all_correct"] for r in score(chw, described)]) >= 0.99
    # float input in [0, 1] reads the same
    assert describe(torch.from_numpy(chw).float() / 255.0) == described


def test_captioner_scores_a_wrong_image_as_wrong():
    rng = np.random.default_rng(5)
    scene = sample_scene(rng, n_objects=1)
    img = render(scene).transpose(2, 0, 1)[None]
    obj = scene.objects[0]
    other_colour = next(c for c in COLOURS if c != obj.colour)
    other_shape = next(s for s in SHAPES if s != obj.shape)
    other_size = "large" if obj.size == "small" else "small"
    right = score(img, [caption(scene)])[0]
    assert right["all_correct"] and right["colour_shape"]
    assert not score(img, [f"a {obj.size} {other_colour} {obj.shape}"])[0]["colour_shape"]
    assert not score(img, [f"a {obj.size} {obj.colour} {other_shape}"])[0]["colour_shape"]
    wrong_size = score(img, [f"a {other_size} {obj.colour} {obj.shape}"])[0]
    assert wrong_size["colour_shape"] and not wrong_size["all_correct"]


def test_captioner_checks_relations():
    bg = (235, 235, 235)
    a = Obj("circle", "red", cx=16.0, cy=8.0, half=5.0)
    b = Obj("square", "blue", cx=16.0, cy=24.0, half=5.0)
    img = render(Scene((a, b), "above", bg)).transpose(2, 0, 1)[None]
    assert score(img, ["a red circle above a blue square"])[0]["all_correct"]
    assert score(img, ["a blue square below a red circle"])[0]["all_correct"]
    wrong = score(img, ["a red circle below a blue square"])[0]
    assert wrong["colour_shape"] and wrong["relation"] is False and not wrong["all_correct"]
    assert describe(img) == ["a red circle above a blue square"]


def test_captioner_on_an_empty_canvas():
    img = np.full((1, 3, 32, 32), 200, dtype=np.uint8)
    assert detect(img) == [[]]
    r = score(img, ["a small red circle"])[0]
    assert r["n_found"] == 0 and not r["colour_shape"] and not r["all_correct"]


def test_captioner_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        describe(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="one prompt per image"):
        score(np.zeros((2, 3, 32, 32), dtype=np.uint8), ["a small red circle"])


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_every_world_word(tmp_path):
    tok = build_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    for w in words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids)
        assert tok.decode(ids) == w
    text = "a red circle, a blue square and a green triangle"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.replace(",", " ,").split())
    assert tok.decode(ids).replace(" ,", ",") == text
    # unknown text falls back to characters instead of failing
    odd = tok("zebra 42", add_special_tokens=False).input_ids
    assert len(odd) > 2 and tok.eos_token_id not in odd
    batch = tok([text, ""], padding="max_length", max_length=tok.model_max_length).input_ids
    assert all(len(row) == tok.model_max_length for row in batch)


def test_build_merges_makes_each_word_one_token_even_with_shared_prefixes():
    from rewards.tinyworld.tokenizer import _apply, _symbols

    vocab = ["re", "red", "green", "greed", "reed", "d"]
    merges = build_merges(vocab)
    ranks = {m: i for i, m in enumerate(merges)}
    for w in vocab:
        assert _apply(_symbols(w), ranks) == [w + "</w>"]
    with pytest.raises(ValueError, match="lower-case word"):
        build_merges(["Red"])


# ------------------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def tiny_model():
    from diffusion_env.tiny.sample import ASSET_DIR, load_tiny

    assert (ASSET_DIR / "model_index.json").is_file(), f"the shipped tiny model is missing from {ASSET_DIR}"
    # one intra-op thread: the model is tiny, and on a busy 2-core machine two threads are ~30x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_tiny(ASSET_DIR)
    torch.set_num_threads(threads)


def test_shipped_model_loads_offline_with_sd_classes(tiny_model, monkeypatch):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusion_env.tiny.sample import ASSET_DIR, load_tiny

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    m = load_tiny(ASSET_DIR)  # the SD v1.4 classes' own from_pretrained, offline
    unet, vae, text, tok, sched = m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler
    for part, cls in ((unet, UNet2DConditionModel), (vae, AutoencoderKL), (text, CLIPTextModel),
                      (tok, CLIPTokenizer), (sched, DDIMScheduler)):  # fmt: skip
        assert type(part) is cls
    assert unet.config.sample_size == 8 and unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 3  # 32 -> 8
    assert sched.config.num_train_timesteps == 1000 and not sched.config.set_alpha_to_one
    assert not sched.config.clip_sample and sched.config.steps_offset == 1
    assert sched.config.prediction_type == "epsilon"
    assert text.config.vocab_size == len(tok)
    for w in words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1
    # the VAE's scaling factor makes scaled latents about unit variance on world images
    images, _ = sample_dataset(64, seed=2, split="train")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
    assert 0.7 < z.std().item() < 1.4
    total = sum(f.stat().st_size for f in ASSET_DIR.rglob("*") if f.is_file())
    assert total <= 30e6


def test_sampling_is_deterministic_at_fixed_seeds(tiny_model):
    from diffusion_env.tiny.sample import sample

    prompts = ["a small red circle", "a blue square above a green triangle"]
    a = sample(tiny_model, prompts, seed=7, steps=4)
    b = sample(tiny_model, prompts, seed=7, steps=4)
    c = sample(tiny_model, prompts, seed=8, steps=4)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pretraining_is_reproducible_from_a_seed(tmp_path):
    """A few steps of the real pretraining script, twice with one seed and once with another."""
    from safetensors.torch import load_file

    from diffusion_env.tiny import pretrain

    threads = torch.get_num_threads()

    def run(seed: int, name: str):
        out = tmp_path / name
        pretrain.main(
            ["--out", str(out), "--seed", str(seed), "--vae-steps", "2", "--unet-steps", "2",
             "--batch", "4", "--vae-batch", "4"]
        )
        return out

    try:
        a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    finally:
        torch.set_num_threads(threads)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (a / sub).is_dir()
    assert (a / "model_index.json").is_file() and (a / "train_log.jsonl").is_file()
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    wc = load_file(c / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    va = load_file(a / "vae" / "diffusion_pytorch_model.safetensors")
    vb = load_file(b / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)
    summary = json.loads((a / "train_summary.json").read_text())
    assert summary["unet_steps"] == 2 and summary["seed"] == 0


def test_pretrain_rejects_bad_arguments():
    from diffusion_env.tiny import pretrain

    with pytest.raises(ValueError, match="--unet-steps=0; expected a positive integer"):
        pretrain.parse_args(["--unet-steps", "0"])
    with pytest.raises(ValueError, match="caption-dropout"):
        pretrain.parse_args(["--caption-dropout", "1.5"])
