"""The tiny world's GenEval-style rule reward and its scene samplers, on hand-built scenes."""

import math

import numpy as np
import pytest
import torch

from diffusion_env.prompts import make_prompt_sampler, prompt_set
from rewards import make_reward
from rewards.tinyworld.world import Obj, Scene, caption, parse_prompt, render

BG = (128, 128, 128)
RED_CIRCLE = Obj("circle", "red", 16.0, 8.0, 5.0)
BLUE_SQUARE = Obj("square", "blue", 16.0, 24.0, 5.0)


def _images(*scenes: Scene) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255


def test_true_renders_pass_every_check():
    rng = np.random.default_rng(0)
    from rewards.tinyworld.world import sample_scene

    scenes = [sample_scene(rng, split="train", n_objects=n) for n in (1, 2, 3, 1, 2, 3)]
    reward, info = make_reward("tiny_geneval")(_images(*scenes), [caption(s) for s in scenes])
    assert torch.equal(reward, torch.ones(6)) and torch.equal(info["all_correct"], torch.ones(6))
    # checks: objects + count + size (one object) + relation (several objects)
    assert info["checks_total"].tolist() == [3, 4, 5, 3, 4, 5]


def test_partial_credit_is_the_share_of_checks_passed():
    above = Scene((RED_CIRCLE, BLUE_SQUARE), "above", BG)  # the red circle is drawn above (smaller y)
    small = Scene((Obj("triangle", "green", 16.0, 16.0, 8.5, "large"),), None, BG)
    blank = Scene((), None, BG)
    prompts = [
        "a red circle below a blue square",  # objects 2/2, count, relation wrong: 3 of 4
        "a small green triangle",  # object, count, size wrong: 2 of 3
        "a small green triangle",  # nothing there: 0 of 3
        "a red circle above a green square",  # red circle right, green square missing, count right: 2 of 4
    ]
    reward, info = make_reward("tiny_geneval")(_images(above, small, blank, above), prompts)
    torch.testing.assert_close(reward, torch.tensor([3 / 4, 2 / 3, 0.0, 2 / 4]))
    assert info["all_correct"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert info["relation"][0] == 0 and info["size"][1] == 0 and info["objects"][3] == 0.5
    assert math.isnan(info["relation"][1]) and math.isnan(info["size"][0])


def test_all_correct_weight_leans_the_reward_toward_the_strict_bit():
    above = Scene((RED_CIRCLE, BLUE_SQUARE), "above", BG)
    images, prompts = _images(above, above), ["a red circle above a blue square", "a red circle below a blue square"]
    share = torch.tensor([1.0, 3 / 4])  # all right; relation wrong
    for w, expected in [(0.0, share), (1.0, torch.tensor([1.0, 0.0])), (0.5, torch.tensor([1.0, 3 / 8]))]:
        reward, info = make_reward("tiny_geneval", all_correct_weight=w)(images, prompts)
        torch.testing.assert_close(reward, expected)
        assert info["all_correct"].tolist() == [1.0, 0.0]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="all_correct_weight"):
            make_reward("tiny_geneval", all_correct_weight=bad)


def test_prompts_outside_the_world_grammar_are_refused():
    with pytest.raises(ValueError):
        make_reward("tiny_geneval")(_images(Scene((RED_CIRCLE,), None, BG)), ["a cat riding a bike"])


def test_scene_samplers_have_the_training_object_count_mix_and_respect_the_split():
    from rewards.tinyworld.world import HELDOUT_PAIRS

    rng = np.random.default_rng(1)
    train = make_prompt_sampler("tiny_train_scenes")
    counts = np.bincount([len(parse_prompt(train(rng))["objects"]) for _ in range(2000)], minlength=4)[1:] / 2000
    assert np.allclose(counts, [0.4, 0.4, 0.2], atol=0.04)
    held = make_prompt_sampler("tiny_heldout_scenes")
    for _ in range(200):
        assert any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in parse_prompt(held(rng))["objects"])
    for _ in range(200):
        assert not any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in parse_prompt(train(rng))["objects"])
    with pytest.raises(ValueError, match="sampler"):
        prompt_set("tiny_train_scenes")


def test_relation_samplers_leave_the_held_out_relations_out_of_training_prompts():
    from agents.config import TrainConfig
    from agents.evaluate import heldout_prompt_set
    from rewards.tinyworld.world import HELDOUT_PAIRS, HELDOUT_RELATIONS, SEEN_RELATIONS

    rng = np.random.default_rng(3)
    train = make_prompt_sampler("tiny_train_scenes_seen_relations")
    parsed = [parse_prompt(train(rng)) for _ in range(2000)]
    counts = np.bincount([len(p["objects"]) for p in parsed], minlength=4)[1:] / 2000
    assert np.allclose(counts, [0.4, 0.4, 0.2], atol=0.04)  # the training object-count mix
    assert {p["relation"] for p in parsed if len(p["objects"]) == 2} == set(SEEN_RELATIONS)
    assert not any((o["colour"], o["shape"]) in HELDOUT_PAIRS for p in parsed for o in p["objects"])
    for name, relations in (("tiny_seen_relation_scenes", SEEN_RELATIONS),
                            ("tiny_heldout_relation_scenes", HELDOUT_RELATIONS)):  # fmt: skip
        sampler = make_prompt_sampler(name)
        drawn = [parse_prompt(sampler(rng)) for _ in range(200)]
        assert {len(p["objects"]) for p in drawn} == {2}
        assert {p["relation"] for p in drawn} == set(relations)
        assert not any((o["colour"], o["shape"]) in HELDOUT_PAIRS for p in drawn for o in p["objects"])
    # `denoise-gym eval` of a run fine-tuned on them evaluates its held-out prompts on the held-out relations.
    cfg = TrainConfig(env_id="Denoise-Tiny-GenEval-v0", env_kwargs={"prompts": "tiny_train_scenes_seen_relations"})
    assert heldout_prompt_set(cfg) == "tiny_heldout_relation_scenes"
    assert heldout_prompt_set(TrainConfig(env_id="Denoise-Tiny-GenEval-v0")) == "tiny_heldout_scenes"


def test_ceiling_benchmark_scores_true_renders_fully_and_counts_by_object_number():
    from benchmarks.geneval_ceiling import scenes, summary

    images, prompts, counts = scenes("heldout", 24, seed=3)
    s = summary(images, prompts, counts)
    assert s["all_correct"] == 1.0 and s["reward"] == 1.0  # a true render passes every check
    assert sum(v["n"] for v in s["by_count"].values()) == 24 and set(s["by_count"]) <= {"1", "2", "3"}
    blank = summary(torch.zeros_like(images), prompts, counts)  # nothing drawn: no object check can pass
    assert blank["all_correct"] == 0.0 and blank["reward"] < 0.5
