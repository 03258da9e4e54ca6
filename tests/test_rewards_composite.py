"""Registry extras: user callables and weighted sums of rewards."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards
from rewards import CallableReward, WeightedSum, jpeg_size_kb, make_reward


def _images(b=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def mean_pixel(images, prompts):
    x = images.float().mean(dim=(1, 2, 3)) / 255.0
    return x, {"mean": x, "tag": "mp"}


def prompt_length(images, prompts):
    return [float(len(p)) for p in prompts]  # bare list: no info


def test_callable_reward_validates_and_normalises():
    images = _images()
    r, info = CallableReward(prompt_length)(images, ["a", "bb", "cccc"])
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 2.0, 4.0]
    assert info == {}
    bad = CallableReward(lambda im, p: torch.zeros(2), name="short")
    with pytest.raises(ValueError, match=r"'short'.*expected \[3\]"):
        bad(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="expected a callable"):
        CallableReward(3)
    with pytest.raises(ValueError, match="one prompt per image"):
        CallableReward(prompt_length)(images, ["a"])


def test_weighted_sum_of_names_and_callables_merges_info_per_component():
    images = _images()
    prompts = ["x", "yy", "zzz"]
    ws = WeightedSum({"jpeg_compressibility": 0.1, mean_pixel: 2.0, prompt_length: -1.0})
    r, info = ws(images, prompts)
    kb = jpeg_size_kb(images)
    mp = images.float().mean(dim=(1, 2, 3)) / 255.0
    expected = -0.1 * kb + 2.0 * mp - torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(r, expected)
    assert ws.names == ["jpeg_compressibility", "mean_pixel", "prompt_length"]
    torch.testing.assert_close(info["jpeg_compressibility/reward"], -kb)
    torch.testing.assert_close(info["jpeg_compressibility/jpeg_kb"], kb)
    torch.testing.assert_close(info["mean_pixel/mean"], mp)
    assert info["mean_pixel/tag"] == "mp"
    torch.testing.assert_close(info["prompt_length/reward"], torch.tensor([1.0, 2.0, 3.0]))


def test_weighted_sum_same_component_twice_gets_distinct_names():
    ws = WeightedSum([(mean_pixel, 1.0), (mean_pixel, 3.0)])
    assert ws.names == ["mean_pixel", "mean_pixel#2"]
    images = _images(2)
    r, info = ws(images, ["a", "b"])
    torch.testing.assert_close(r, 4.0 * info["mean_pixel/reward"])
    assert "mean_pixel#2/mean" in info


def test_make_reward_from_mapping_and_registry():
    images = _images(2)
    a = make_reward({"jpeg_incompressibility": 1.0, "jpeg_compressibility": 1.0})
    r, _ = a(images, ["p", "q"])
    torch.testing.assert_close(r, torch.zeros(2))  # the two cancel exactly
    b = make_reward("weighted_sum", components={"jpeg_incompressibility": 0.5})
    torch.testing.assert_close(b(images, ["p", "q"])[0], 0.5 * jpeg_size_kb(images))
    c = make_reward({"jpeg_incompressibility": 1.0}, jpeg_incompressibility={"quality": 10})
    torch.testing.assert_close(c(images, ["p", "q"])[0], jpeg_size_kb(images, quality=10))
    assert "weighted_sum" in rewards.registered_rewards()


def test_user_callable_registered_under_a_name_plugs_into_weighted_sum():
    name = "test_rewards_composite_mean_pixel"
    rewards.register_reward(name, lambda scale=1.0: lambda im, p: mean_pixel(im, p)[0] * scale, override=True)
    ws = make_reward({name: 1.0}, **{name: {"scale": 10.0}})
    images = _images(2)
    torch.testing.assert_close(ws(images, ["a", "b"])[0], 10.0 * images.float().mean(dim=(1, 2, 3)) / 255.0)


@pytest.mark.parametrize(
    "components, match",
    [
        ({}, "empty"),
        ({"jpeg_compressibility": float("nan")}, "finite number"),
        ({"jpeg_compressibility": "1"}, "finite number"),
        ({"no_such_reward": 1.0}, "unknown reward 'no_such_reward'"),
        ({3: 1.0}, "registered reward name or a callable"),
        ([("jpeg_compressibility",)], r"\(reward, weight\) pair"),
        ("jpeg_compressibility", "expected a mapping"),
    ],
)
def test_weighted_sum_bad_input(components, match):
    with pytest.raises(ValueError, match=match):
        WeightedSum(components)


def test_weighted_sum_kwargs_for_unknown_component():
    with pytest.raises(ValueError, match="not a component given by name"):
        WeightedSum({"jpeg_compressibility": 1.0}, component_kwargs={"aesthetic": {}})


def test_register_reward_bad_input():
    with pytest.raises(ValueError, match="non-empty string"):
        rewards.register_reward("", lambda: None)
    with pytest.raises(ValueError, match="expected a callable"):
        rewards.register_reward("x_not_callable", 5)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("jpeg_compressibility", lambda: None)


def test_weighted_sum_accepts_pil_and_numpy_returning_callables():
    from PIL import Image

    pil = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (0, 255)]
    ws = WeightedSum({(lambda im, p: np.array([1.0, 2.0])): 3.0})
    r, _info = ws(pil, ["a", "b"])
    assert r.tolist() == [3.0, 6.0]


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(w1=finite, w2=finite, seed=st.integers(0, 2**16))
def test_weighted_sum_is_linear_in_its_components(w1, w2, seed):
    images = _images(2, seed=seed)
    prompts = ["ab", "c"]
    r, info = WeightedSum([(mean_pixel, w1), (prompt_length, w2)])(images, prompts)
    expected = w1 * mean_pixel(images, prompts)[0] + w2 * torch.tensor([2.0, 1.0])
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(info["prompt_length/reward"], torch.tensor([2.0, 1.0]))
