"""Asynchronous reward evaluation, and JPEG encoding not serialising on the GIL."""

import threading
import time

import numpy as np
import pytest
import torch

from rewards import make_reward
from rewards.async_eval import AsyncRewardEvaluator
from rewards.jpeg import _jpeg_kb


def batch(k, b=3):
    """Batch k: image i filled with value 10*k + i, prompt naming both."""
    images = torch.stack([torch.full((3, 4, 4), 10 * k + i, dtype=torch.uint8) for i in range(b)])
    return images, [f"batch {k} sample {i}" for i in range(b)]


def expected_rewards(images, prompts):
    return images.float().mean(dim=(1, 2, 3)) + torch.tensor([float(p.split()[-1]) / 100 for p in prompts])


def test_results_match_their_samples_under_shuffled_completion_order():
    order = []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    delays = {k: d for k, d in enumerate(rng.permutation(8) * 0.15)}  # batch k finishes after delays[k]; 150 ms apart so load cannot reorder them

    def slow_reward(images, prompts):
        k = int(prompts[0].split()[1])
        time.sleep(delays[k])
        with lock:
            order.append(k)
        return expected_rewards(images, prompts), {"k": k, "prompts": list(prompts)}

    with AsyncRewardEvaluator(slow_reward, max_workers=8) as ev:
        handles = [ev.submit(*batch(k), tag=f"step-{k}") for k in range(8)]
        completed = [h.index for h in ev.as_completed(handles, timeout=10)]
        results = ev.gather(handles)
    assert order != sorted(order)  # the completion order really was shuffled ...
    assert completed == order  # ... as_completed reports it ...
    for k, (h, (r, info)) in enumerate(zip(handles, results)):  # ... and every result is still its own
        images, prompts = batch(k)
        assert h.index == k and h.tag == f"step-{k}" and h.prompts == prompts
        torch.testing.assert_close(r, expected_rewards(images, prompts))
        assert info == {"k": k, "prompts": prompts}


def test_reward_overlaps_with_sampling():
    def reward(images, prompts):
        time.sleep(0.15)
        return expected_rewards(images, prompts), {}

    t0 = time.perf_counter()
    with AsyncRewardEvaluator(reward, max_workers=1) as ev:
        handles = []
        for k in range(4):
            time.sleep(0.15)  # "sampling" batch k while batch k-1 is scored
            handles.append(ev.submit(*batch(k)))
        ev.gather(handles)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"took {elapsed:.2f} s; sampling and scoring in series would take 1.2 s"


def test_submitted_images_are_snapshots():
    gate = threading.Event()

    def reward(images, prompts):
        gate.wait(5)
        return torch.as_tensor(images).float().mean(dim=(1, 2, 3)), {}

    with AsyncRewardEvaluator(reward) as ev:
        images, prompts = batch(1)
        h = ev.submit(images, prompts)
        images.fill_(200)  # the sampler reuses its buffer
        gate.set()
        torch.testing.assert_close(h.result(5)[0], torch.tensor([10.0, 11.0, 12.0]))
        gate.clear()
        arr = batch(2)[0].numpy()
        h = ev.submit(arr, batch(2)[1])
        arr[:] = 0
        gate.set()
        torch.testing.assert_close(h.result(5)[0], torch.tensor([20.0, 21.0, 22.0]))


def test_failures_keep_the_batch_and_do_not_affect_others():
    def reward(images, prompts):
        if "batch 1" in prompts[0]:
            raise RuntimeError("reward server down")
        return expected_rewards(images, prompts), {}

    with AsyncRewardEvaluator(reward, max_workers=2) as ev:
        handles = [ev.submit(*batch(k)) for k in range(3)]
        with pytest.raises(RuntimeError, match="reward server down"):
            handles[1].result(5)
        assert handles[1].prompts == batch(1)[1] and torch.equal(handles[1].images, batch(1)[0])
        retried = ev.submit(handles[1].images, handles[1].prompts)  # e.g. after the server is back
        torch.testing.assert_close(handles[0].result(5)[0], expected_rewards(*batch(0)))
        torch.testing.assert_close(handles[2].result(5)[0], expected_rewards(*batch(2)))
        with pytest.raises(RuntimeError):
            retried.result(5)
    assert ev.pending == 0


def test_bad_reward_output_is_reported_from_result():
    with AsyncRewardEvaluator(lambda im, p: torch.zeros(2), name="short") as ev:
        h = ev.submit(*batch(0))
        with pytest.raises(ValueError, match=r"'short' returned shape \(2,\); expected \[3\]"):
            h.result(5)


def test_max_pending_bounds_batches_in_flight():
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def reward(images, prompts):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.03)
        with lock:
            state["now"] -= 1
        return expected_rewards(images, prompts), {}

    with AsyncRewardEvaluator(reward, max_workers=4, max_pending=2) as ev:
        handles = []
        for k in range(6):
            handles.append(ev.submit(*batch(k)))
            assert ev.pending <= 2
        for k, (r, _) in enumerate(ev.gather(handles, timeout=10)):
            torch.testing.assert_close(r, expected_rewards(*batch(k)))
    assert state["max"] == 2


def test_real_rewards_through_the_evaluator():
    images = torch.randint(
        0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    prompts = list("abcd")
    reward = make_reward({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5})
    with AsyncRewardEvaluator(reward, max_workers=2) as ev:
        r, info = ev.submit(images, prompts).result(10)
    torch.testing.assert_close(r, reward(images, prompts)[0])
    assert "jpeg_compressibility/jpeg_kb" in info


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected a callable"):
        AsyncRewardEvaluator("jpeg")
    with pytest.raises(ValueError, match="max_workers=0"):
        AsyncRewardEvaluator(lambda im, p: None, max_workers=0)
    with pytest.raises(ValueError, match="max_pending=0"):
        AsyncRewardEvaluator(lambda im, p: None, max_pending=0)
    ev = AsyncRewardEvaluator(lambda im, p: torch.zeros(len(p)))
    with pytest.raises(ValueError, match="one prompt per image"):
        ev.submit(*batch(0)[:1], ["one"])
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        ev.submit(torch.zeros(3, 4, 4), ["a", "b", "c"])
    ev.close()
    with pytest.raises(RuntimeError, match="closed"):
        ev.submit(*batch(0))


def _max_probe_gap(fn):
    """Longest interval (as a share of fn's run time) during which a thread waking every 0.5 ms could not
    run Python code, i.e. could not get the GIL, while ``fn`` ran in the main thread."""
    done = threading.Event()
    gaps = []

    def probe():
        last, gap = time.perf_counter(), 0.0
        while not done.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            gap, last = max(gap, now - last), now
        gaps.append(gap)

    t = threading.Thread(target=probe)
    t.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    fn()
    duration = time.perf_counter() - t0
    done.set()
    t.join()
    return gaps[0] / duration


def test_jpeg_encoding_releases_the_gil():
    # one encoder call of ~60 ms on noise; Pillow's BytesIO path would hold the GIL throughout it
    noise = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    # control: a long C call that keeps the GIL blocks the probe for about its whole duration
    holding = min(_max_probe_gap(lambda: sum(range(2_000_000))) for _ in range(2))
    releasing = min(_max_probe_gap(lambda: _jpeg_kb(noise, 95)) for _ in range(3))
    assert holding > 0.6, f"the probe cannot see the GIL held (gap share {holding:.2f})"
    assert releasing < 0.5, f"JPEG encoding blocked other threads for {releasing:.0%} of its run time"


def test_jpeg_size_equals_the_plain_bytesio_encoding():
    import io

    from PIL import Image

    from rewards.jpeg import FD_MIN_PIXELS

    def bytesio_kb(a, q):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=q)
        return len(buf.getvalue()) / 1000.0

    rng = np.random.default_rng(1)
    shapes = [(8, 8, 3), (37, 53, 3), (256, 256, 3), (300, 261, 3)]
    assert {h * w >= FD_MIN_PIXELS for h, w, _ in shapes} == {False, True}
    for shape in shapes:  # both encoding paths
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        for q in (10, 95):
            assert _jpeg_kb(a, q) == bytesio_kb(a, q)
    # the per-thread scratch file is truncated between images: a small file after a big one
    big = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    flat = np.zeros((256, 256, 3), np.uint8)
    assert _jpeg_kb(big, 95) > 10 * _jpeg_kb(flat, 95)
    assert _jpeg_kb(flat, 95) == bytesio_kb(flat, 95)
