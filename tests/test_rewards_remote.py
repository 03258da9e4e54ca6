"""Remote rewards over HTTP on 127.0.0.1: the protocol, asynchronous use, size limits, auth and the
fault cases of the alignment reward's client."""

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import rewards
from rewards.alignment import RewardServerError
from rewards.async_eval import AsyncRewardEvaluator
from rewards.remote import (
    REMOTE_KEY_ENV,
    RemoteReward,
    decode_response,
    encode_request,
    merge_info,
    serve_reward_in_thread,
)


def brightness(images, prompts):
    """Mean brightness in [0, 1], plus per-image and per-batch info."""
    b = images.float().mean(dim=(1, 2, 3)) / 255
    return b, {"mean": b, "n_words": [len(p.split()) for p in prompts], "scorer": "brightness"}


def random_images(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture
def serve():
    stops = []

    def start(fn=brightness, **kw):
        url, stop = serve_reward_in_thread(fn, **kw)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


def remote(url, sleeps=None, **kw):
    kw.setdefault("backoff", 0.01)
    r = RemoteReward(url, api_key="", **kw)
    if sleeps is not None:
        r.client.sleep = sleeps.append
    return r


def _request(url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="POST" if body is not None else "GET")  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_round_trip_in_chunks_matches_the_local_reward(serve):
    seen = []

    def recording(images, prompts):
        seen.append((images.clone(), list(prompts)))
        return brightness(images, prompts)

    url = serve(recording)
    images = random_images(5)
    prompts = ["a", "a b", "a b c", "d", "e f"]
    r, info = remote(url, max_batch=2)(images, prompts)
    expected, _ = brightness(images, prompts)
    torch.testing.assert_close(r, expected)
    assert info["mean"] == pytest.approx(expected.tolist()) and info["n_words"] == [1, 2, 3, 1, 2]
    assert info["scorer"] == "brightness"
    assert sorted(len(p) for _, p in seen) == [1, 2, 2]  # three requests of at most max_batch images
    got = torch.cat([im for im, p in sorted(seen, key=lambda s: prompts.index(s[1][0]))])
    assert torch.equal(got, images)  # PNG is lossless, order kept
    pil_and_float, _ = remote(url)(images.float() / 255, prompts)
    torch.testing.assert_close(pil_and_float, expected)


def test_asynchronous_evaluation_keeps_batches_apart(serve):
    def slow(images, prompts):
        time.sleep(0.05)
        return brightness(images, prompts)

    reward = remote(serve(slow, serialise=False))
    evaluator = AsyncRewardEvaluator(reward, max_workers=3)
    batches = [random_images(3, seed=s) for s in range(4)]
    t0 = time.perf_counter()
    handles = [evaluator.submit(b, ["p"] * 3, tag=i) for i, b in enumerate(batches)]
    for h, b in zip(handles, batches):
        torch.testing.assert_close(h.result(timeout=10)[0], brightness(b, ["p"] * 3)[0])
    assert time.perf_counter() - t0 < 4 * 0.05 * 3  # requests overlapped
    evaluator.close()


def test_reward_failure_is_retried_then_raised_with_the_batch(serve):
    state = {"left": 2}
    lock = threading.Lock()

    def flaky(images, prompts):
        with lock:
            if state["left"] > 0:
                state["left"] -= 1
                raise RuntimeError("CUDA out of memory")
        return brightness(images, prompts)

    sleeps = []
    r, _ = remote(serve(flaky), sleeps, max_retries=3)(random_images(2), ["a", "b"])
    assert r.shape == (2,) and state["left"] == 0 and len(sleeps) == 2

    def broken(images, prompts):
        raise RuntimeError("detector crashed")

    images, prompts = random_images(3), ["a", "b", "c"]
    with pytest.raises(RewardServerError, match="HTTP 500.*detector crashed") as err:
        remote(serve(broken), max_retries=1, max_batch=2)(images, prompts)
    assert err.value.images is images and err.value.prompts == prompts and err.value.failed == [0, 1, 2]


def test_server_down_backs_off_and_keeps_the_batch(serve):
    url = serve()
    stop_url, stop = serve_reward_in_thread(brightness)
    stop()
    sleeps = []
    images = random_images(2)
    with pytest.raises(RewardServerError, match="2 of 2 images got no reward") as err:
        remote(stop_url, sleeps, max_retries=2, backoff=0.5)(images, ["a", "b"])
    assert err.value.images is images and "cannot reach" in err.value.errors[0] and "3 attempts" in err.value.errors[0]
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 0.55 and 1.0 <= sleeps[1] <= 1.1
    assert remote(url)(images, ["a", "b"])[0].shape == (2,)


def test_slow_server_times_out(serve):
    def slow(images, prompts):
        time.sleep(1.5)
        return brightness(images, prompts)

    t0 = time.perf_counter()
    with pytest.raises(RewardServerError, match="timed out after 0.2 s"):
        remote(serve(slow, serialise=False), timeout=0.2, max_retries=1)(random_images(1), ["a"])
    assert time.perf_counter() - t0 < 1.4


@pytest.fixture
def raw_server():
    """A server answering POSTs with ``answer(payload) -> (status, bytes)``, for malformed responses."""
    servers = []

    def start(answer):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                status, body = answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_malformed_answers_retried_wrong_count_is_not(raw_server):
    count = {"n": 0}

    def once_garbage(payload):
        count["n"] += 1
        if count["n"] == 1:
            return 200, b"{not json"
        return 200, json.dumps({"rewards": [0.5] * len(payload["images"]), "info": {}}).encode()

    r, _ = remote(raw_server(once_garbage), max_retries=2)(random_images(2), ["a", "b"])
    assert r.tolist() == [0.5, 0.5] and count["n"] == 2
    with pytest.raises(RewardServerError, match="malformed response.*non-numbers.*3 attempts"):
        remote(raw_server(lambda p: (200, b'{"rewards": ["x"]}')), max_retries=2)(random_images(1), ["a"])
    wrong = {"n": 0}

    def one_short(payload):
        wrong["n"] += 1
        return 200, json.dumps({"rewards": [0.1]}).encode()

    with pytest.raises(RewardServerError, match="returned 1 rewards for 2 images"):
        remote(raw_server(one_short), max_retries=3)(random_images(2), ["a", "b"])
    assert wrong["n"] == 1
    nan, _ = remote(raw_server(lambda p: (200, b'{"rewards": [null]}')))(random_images(1), ["a"])
    assert torch.isnan(nan).all()  # null is NaN, passed through like any reward's NaN


def test_size_limits(serve):
    calls = []

    def counting(images, prompts):
        calls.append(len(prompts))
        return brightness(images, prompts)

    big = random_images(2, size=64)
    body_size = len(encode_request(big, ["a", "b"]))
    url = serve(counting, max_body_bytes=body_size - 1, max_batch=4)
    sleeps = []
    with pytest.raises(RewardServerError, match="HTTP 413.*at most") as err:
        remote(url, sleeps, max_retries=3)(big, ["a", "b"])
    assert sleeps == [] and calls == [] and err.value.failed == [0, 1]  # not retried, never scored
    assert remote(url, max_batch=1)(big, ["a", "b"])[0].shape == (2,)  # smaller requests fit
    with pytest.raises(RewardServerError, match="HTTP 413.*at most 4 per request"):
        remote(url, max_batch=5)(random_images(5), list("abcde"))
    with pytest.raises(RewardServerError, match="max_request_bytes=100: expected a smaller max_batch"):
        remote(url, max_request_bytes=100)(big, ["a", "b"])
    assert calls == [1, 1]


def test_bearer_token_and_health(serve, monkeypatch):
    url = serve(api_key="s3cret", name="brightness")
    with pytest.raises(RewardServerError, match="HTTP 401"):
        remote(url, max_retries=3)(random_images(1), ["a"])
    monkeypatch.setenv(REMOTE_KEY_ENV, "s3cret")
    reward = RemoteReward(url, backoff=0.01)
    assert reward(random_images(1), ["a"])[0].shape == (1,) and "s3cret" not in repr(reward)
    made = rewards.make_reward("remote", base_url=url, api_key="s3cret")
    assert made(random_images(1), ["a"])[0].shape == (1,)
    status, body = _request(url + "/health", headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and body["reward"] == "brightness" and body["max_batch"] == 256
    assert _request(url + "/health")[0] == 401


def test_protocol_errors(serve):
    url = serve()
    status, body = _request(url + "/score", b"{oops")
    assert status == 400 and "bad request" in body["error"]["message"]
    two = [encode_request(random_images(1, size=s), ["a"]) for s in (8, 9)]
    mixed = {"images": [json.loads(b)["images"][0] for b in two], "prompts": ["a", "b"]}
    status, body = _request(url + "/score", json.dumps(mixed).encode())
    assert status == 400 and "one size per request" in body["error"]["message"]
    mixed["prompts"] = ["a"]
    status, body = _request(url + "/score", json.dumps(mixed).encode())
    assert status == 400 and "one prompt per image" in body["error"]["message"]
    remote_url = {"images": ["https://example.com/x.png"], "prompts": ["a"]}
    status, body = _request(url + "/score", json.dumps(remote_url).encode())
    assert status == 400 and "not fetched" in body["error"]["message"]
    assert _request(url + "/nope", b"{}")[0] == 404

    def wrong_shape(images, prompts):
        return torch.zeros(len(prompts) + 1)

    status, body = _request(serve(wrong_shape) + "/score", encode_request(random_images(1), ["a"]))
    assert status == 500 and "expected [1]" in body["error"]["message"]


def test_helpers_and_bad_configuration():
    assert merge_info([{"a": [1, 2], "s": "x", "t": 1}, {"a": [3], "s": "x", "t": 2}], [2, 1]) == {
        "a": [1, 2, 3], "s": "x", "t": [1, 2]}  # fmt: skip
    with pytest.raises(ValueError, match="expected a list of 2 numbers"):
        decode_response(b'{"rewards": [1]}', 2)
    with pytest.raises(ValueError, match="max_batch=0"):
        RemoteReward("http://127.0.0.1:1/v1", max_batch=0)
    with pytest.raises(ValueError, match="expected an http"):
        RemoteReward("ftp://x/v1")
    with pytest.raises(ValueError, match="reward_fn is int"):
        serve_reward_in_thread(3)


def _png_declaring(width, height):
    """A small real PNG whose header is patched to declare width x height (a decompression bomb)."""
    import base64
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode()


def test_hostile_requests_get_4xx_and_the_server_keeps_serving(serve):
    import http.client

    url = serve()
    bomb = {"images": [_png_declaring(30000, 30000)], "prompts": ["a"]}
    status, body = _request(url + "/score", json.dumps(bomb).encode())
    assert status == 413 and "900000000 pixels" in body["error"]["message"]
    small_limit = serve(max_pixels=8 * 8)
    status, _ = _request(small_limit + "/score", encode_request(random_images(1, size=9), ["a"]))
    assert status == 413
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", "/v1/score")
    conn.putheader("Content-Length", "abc")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and b"Content-Length" in resp.read()
    conn.close()
    assert remote(url)(random_images(2), ["a", "b"])[0].shape == (2,)  # still serving


def test_non_loopback_server_needs_a_token():
    from rewards.remote import make_remote_server

    with pytest.raises(ValueError, match="reachable from other machines and no api_key"):
        make_remote_server(brightness, "0.0.0.0", 0)


def test_declared_size_is_checked_before_decoding():
    from rewards.remote import TooLarge, decode_image

    with pytest.raises(TooLarge, match="image of 5000x5000 pixels; at most 1000000"):
        decode_image(_png_declaring(5000, 5000), 1000 * 1000)  # under PIL's own limit: ours refuses it
