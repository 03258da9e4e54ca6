"""The local chat-completions server and the client's fault handling (all on 127.0.0.1)."""

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from rewards.alignment import ChatCompletionsClient, RewardServerError, parse_completion
from rewards.server import data_url_to_array, image_to_data_url, serve_in_thread

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def solid(names, size=8):
    return torch.stack(
        [torch.tensor(COLOURS[n], dtype=torch.uint8).view(3, 1, 1).expand(3, size, size) for n in names]
    ).contiguous()


def colour_name(image):
    return ["red", "green", "blue"][int(image.float().mean(dim=(1, 2)).argmax())]


def describe_colours(images):
    return [f"a {colour_name(im)} square" for im in images]


@pytest.fixture
def server():
    started = []

    def start(describe=describe_colours, **kw):
        url, stop = serve_in_thread(describe, **kw)
        started.append(stop)
        return url

    yield start
    for stop in started:
        stop()


def client(url, sleeps=None, **kw):
    kw.setdefault("backoff", 0.01)
    c = ChatCompletionsClient(url, model="local-describe", api_key="", **kw)
    if sleeps is not None:
        c.sleep = sleeps.append  # record backoff delays instead of sleeping
    return c


def test_round_trip_images_arrive_unchanged_and_in_order(server):
    seen = []

    def describe(images):
        seen.append(images.clone())
        return describe_colours(images)

    url = server(describe)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 256, (1, 3, 9, 7), generator=g, dtype=torch.uint8)
    names = ["blue", "red", "green", "red", "blue"]
    out = client(url, max_concurrency=3).describe(solid(names))
    assert out == [f"a {n} square" for n in names]
    assert all(s.dtype == torch.uint8 and s.shape == (1, 3, 8, 8) for s in seen)
    client(url).describe(noisy)
    assert torch.equal(seen[-1], noisy)  # PNG data URLs are lossless


def test_data_url_round_trip_and_refusals():
    a = torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8).numpy()
    assert (data_url_to_array(image_to_data_url(a)) == a).all()
    with pytest.raises(ValueError, match="remote URLs are not fetched"):
        data_url_to_array("https://example.com/cat.png")
    with pytest.raises(ValueError, match="could not decode"):
        data_url_to_array("data:image/png;base64,aGVsbG8=")


def _post(url, body):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_protocol_errors(server):
    url = server()
    status, body = _post(url + "/chat/completions", b"{oops")
    assert status == 400 and "not JSON" in body["error"]["message"]
    no_image = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    status, body = _post(url + "/chat/completions", json.dumps(no_image).encode())
    assert status == 400 and "no 'image_url' part" in body["error"]["message"]
    status, body = _post(url + "/embeddings", b"{}")
    assert status == 404
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/models", timeout=5) as r:
        assert json.loads(r.read())["data"][0]["id"] == "local-describe"
    url2 = server(lambda images: ["only one"] * (len(images) + 1))
    status, body = _post(url2 + "/chat/completions", client(url2).request_body(image_to_data_url(
        solid(["red"])[0].permute(1, 2, 0).numpy())))  # fmt: skip
    assert status == 500 and "expected a list of 1 strings" in body["error"]["message"]


def test_server_down_raises_with_the_whole_batch_after_backoff(server):
    url = server()
    stop_url, stop = serve_in_thread(describe_colours)
    stop()  # nothing listens there any more
    sleeps = []
    images = solid(["red", "green", "blue"])
    prompts = ["a red square", "a green square", "a blue square"]
    with pytest.raises(RewardServerError, match="3 of 3 images got no description") as err:
        client(stop_url, sleeps, max_retries=2, backoff=0.5, max_concurrency=1).describe(images, prompts)
    e = err.value
    assert e.images is images and e.prompts == prompts
    assert e.failed == [0, 1, 2] and e.descriptions == [None, None, None]
    assert "cannot reach" in e.errors[0] and "3 attempts" in e.errors[0]
    # exponential backoff, 2 sleeps per image: 0.5 then 1.0 (plus at most 10% jitter)
    assert len(sleeps) == 6
    for first, second in zip(sleeps[0::2], sleeps[1::2]):
        assert 0.5 <= first <= 0.55 and 1.0 <= second <= 1.1
    assert url  # the other server is unaffected


def test_slow_request_times_out_others_succeed(server):
    calls = []

    def slow_for_blue(images):
        calls.append(colour_name(images[0]))
        if colour_name(images[0]) == "blue":
            time.sleep(2.0)
        return describe_colours(images)

    url = server(slow_for_blue)
    images = solid(["red", "blue", "green"])
    t0 = time.perf_counter()
    with pytest.raises(RewardServerError) as err:
        client(url, timeout=0.2, max_retries=1).describe(images, ["p", "q", "r"])
    assert time.perf_counter() - t0 < 1.5  # gave up after 2 x 0.2 s, did not wait for the slow handler
    e = err.value
    assert e.failed == [1] and "timed out after 0.2 s" in e.errors[1]
    assert e.descriptions == ["a red square", None, "a green square"]
    assert calls.count("blue") == 2  # first try + one retry


def test_http_500_then_success(server):
    failures = {"left": 2}
    lock = threading.Lock()

    def flaky(images):
        with lock:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise RuntimeError("GPU out of memory")
        return describe_colours(images)

    url = server(flaky)
    sleeps = []
    out = client(url, sleeps, max_retries=3, max_concurrency=1).describe(solid(["green", "red"]))
    assert out == ["a green square", "a red square"]
    assert failures["left"] == 0 and len(sleeps) == 2


def test_http_500_always_gives_error_with_server_message(server):
    def broken(images):
        raise RuntimeError("GPU out of memory")

    url = server(broken)
    with pytest.raises(RewardServerError, match="HTTP 500.*GPU out of memory"):
        client(url, max_retries=1).describe(solid(["red"]))


def test_malformed_json_is_retried_then_errors(server):
    count = {"n": 0}

    def once_malformed(payload):
        count["n"] += 1
        return (200, b"{this is not json") if count["n"] == 1 else None

    url = server(intercept=once_malformed)
    assert client(url, max_retries=2).describe(solid(["blue"])) == ["a blue square"]
    assert count["n"] == 2

    url = server(intercept=lambda payload: (200, json.dumps({"choices": []}).encode()))
    with pytest.raises(RewardServerError, match="malformed response.*choices") as err:
        client(url, max_retries=2).describe(solid(["blue", "red"]), ["x", "y"])
    assert err.value.failed == [0, 1] and "3 attempts" in err.value.errors[0]


def test_client_errors_are_not_retried(server):
    count = {"n": 0}

    def unauthorised(payload):
        count["n"] += 1
        return 401, b'{"error": {"message": "bad key"}}'

    url = server(intercept=unauthorised)
    sleeps = []
    with pytest.raises(RewardServerError, match="HTTP 401"):
        client(url, sleeps, max_retries=3).describe(solid(["red"]))
    assert count["n"] == 1 and sleeps == []


def test_concurrency_is_bounded(server):
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def tracked(images):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return describe_colours(images)

    url = server(tracked)
    out = client(url, max_concurrency=3).describe(solid(["red"] * 9))
    assert out == ["a red square"] * 9
    assert state["max"] == 3


def test_api_key_and_request_shape(server, monkeypatch):
    seen = []
    url = server(intercept=lambda payload: seen.append(payload))
    monkeypatch.setenv("MY_VLM_KEY", "secret-123")
    c = ChatCompletionsClient(url, model="llava-1.5", api_key_env="MY_VLM_KEY", question="what is this?")
    assert c.api_key == "secret-123"
    c.describe(solid(["red"]))
    msg = seen[0]["messages"][0]
    assert seen[0]["model"] == "llava-1.5" and msg["role"] == "user"
    assert msg["content"][0] == {"type": "text", "text": "what is this?"}
    assert msg["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert ChatCompletionsClient(url).question == "what is happening in this image?"


def test_parse_completion():
    ok = {"choices": [{"message": {"role": "assistant", "content": "a cat"}}]}
    assert parse_completion(json.dumps(ok).encode()) == "a cat"
    parts = {
        "choices": [
            {"message": {"content": [{"type": "text", "text": "a "}, {"type": "text", "text": "dog"}]}}
        ]
    }
    assert parse_completion(json.dumps(parts).encode()) == "a dog"
    assert parse_completion(b'{"choices": [{"message": {"content": null}}]}') == ""
    with pytest.raises(ValueError, match="not JSON"):
        parse_completion(b"<html>")
    with pytest.raises(ValueError, match="expected a string"):
        parse_completion(b'{"choices": [{"message": {"content": 3}}]}')


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base_url": "ftp://127.0.0.1/v1"}, "expected an http"),
        ({"timeout": 0}, "timeout=0; expected a positive number"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"question": " "}, "question"),
        ({"model": ""}, "model"),
        ({"png_compress_level": 12}, "png_compress_level"),
    ],
)
def test_client_bad_config(kwargs, match):
    kwargs.setdefault("base_url", "http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match=match):
        ChatCompletionsClient(**kwargs)


def test_client_bad_batch():
    c = ChatCompletionsClient("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="one prompt per image"):
        c.describe(solid(["red", "blue"]), ["only one"])
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        c.describe(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected a callable"):
        serve_in_thread("not callable")


def test_burst_of_concurrent_requests_is_not_stalled(server):
    # a listen backlog that is too small drops connections of a burst; TCP then retries after ~1 s
    url = server()
    c = client(url, max_concurrency=24, max_retries=0)
    images = solid(["red", "green", "blue"] * 8)
    c.describe(images)  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        assert c.describe(images) == describe_colours(images)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"3 bursts of 24 requests took {elapsed:.2f} s"


def test_micro_batching_gathers_concurrent_requests(server):
    sizes = []
    lock = threading.Lock()

    def recording(images):
        with lock:
            sizes.append(tuple(images.shape))
        return describe_colours(images)

    url = server(recording, batch_window_s=0.1, max_batch=64)
    names = ["red", "green", "blue", "blue", "red", "green", "green", "red"]
    big = solid(["blue", "red"], size=12)
    c = client(url, max_concurrency=10)
    results = {}
    t = threading.Thread(target=lambda: results.update(big=c.describe(big)))
    t.start()
    results["small"] = c.describe(solid(names))
    t.join(5)
    assert results["small"] == [f"a {n} square" for n in names]
    assert results["big"] == ["a blue square", "a red square"]
    assert sum(s[0] for s in sizes) == 10
    assert len(sizes) < 10  # several requests answered by one call ...
    assert all(s[1:] in ((3, 8, 8), (3, 12, 12)) for s in sizes)  # ... of one image size each


def test_micro_batching_failure_reaches_every_request(server):
    calls = []

    def broken(images):
        calls.append(images.shape[0])
        raise RuntimeError("batched model crashed")

    url = server(broken, batch_window_s=0.05)
    with pytest.raises(RewardServerError, match="batched model crashed") as err:
        client(url, max_concurrency=4, max_retries=0).describe(solid(["red"] * 4))
    assert err.value.failed == [0, 1, 2, 3]
    assert sum(calls) == 4 and len(calls) < 4


def test_micro_batcher_bad_arguments():
    from rewards.server import MicroBatcher

    with pytest.raises(ValueError, match="max_batch=0"):
        MicroBatcher(describe_colours, max_batch=0)
    with pytest.raises(ValueError, match="window_s=-1"):
        MicroBatcher(describe_colours, window_s=-1)
    b = MicroBatcher(describe_colours, window_s=0.0)
    assert b(solid(["green"])) == ["a green square"]
    b.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        b(solid(["green"]))


def test_unexpected_client_side_failure_still_carries_the_batch(server, monkeypatch):
    import rewards.alignment as alignment

    url = server()

    def broken_encoder(image, level):
        raise MemoryError("cannot encode")

    monkeypatch.setattr(alignment, "image_to_data_url", broken_encoder)
    images = solid(["red", "green"])
    with pytest.raises(RewardServerError, match="MemoryError: cannot encode") as err:
        client(url).describe(images, ["a", "b"])
    assert err.value.images is images and err.value.failed == [0, 1]


def test_process_exits_with_an_unclosed_tiny_alignment_reward():
    """Regression: __del__ at interpreter exit used to block forever in the server's shutdown()."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        from rewards.alignment import TinyPromptAlignment
        reward = TinyPromptAlignment(describe=lambda images: ["a red circle"] * len(images))
        print("made", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "made" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------- hardening
def _raw(url, request: bytes) -> tuple[int, dict]:
    """Send raw bytes to the server; return (status, JSON body)."""
    import socket

    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _call(url, body: bytes, token=None, path="/chat/completions", method="POST"):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _good_body(colour="red"):
    from rewards.server import image_to_data_url

    image = solid([colour])[0].permute(1, 2, 0).contiguous().numpy()
    content = [{"type": "image_url", "image_url": {"url": image_to_data_url(image)}}]
    return json.dumps({"messages": [{"role": "user", "content": content}]}).encode()


def test_auth_refuses_missing_and_wrong_tokens(server):
    url = server(token="s3cret")
    assert _call(url, _good_body(), token=None)[0] == 401
    status, body = _call(url, _good_body(), token="s3cretX")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert _call(url, b"", token="wrong", path="/models", method="GET")[0] == 401
    status, body = _call(url, _good_body("blue"), token="s3cret")
    assert status == 200 and body["choices"][0]["message"]["content"] == "a blue square"
    assert _call(url, b"", token="s3cret", path="/models", method="GET")[0] == 200
    # without a token configured, none is needed (loopback)
    assert _call(server(), _good_body(), token=None)[0] == 200


def test_decompression_bomb_and_bad_lengths_are_4xx_and_the_server_keeps_serving(server):
    from benchmarks.server_load import bomb_png

    url = server()
    bomb = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(bomb_png()).decode()}}]}]}).encode()  # fmt: skip
    status, body = _call(url, bomb)
    assert status == 413 and "pixels" in body["error"]["message"]
    path = url.split("//")[1].split("/", 1)[1]
    for length, expected in (("abc", 400), ("-1", 400), ("1e3", 400)):
        req = f"POST /{path}/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode()
        status, body = _raw(url, req)
        assert status == expected and "Content-Length" in body["error"]["message"], (length, body)
    status, body = _raw(url, f"POST /{path}/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 411
    status, body = _raw(url, b"GET / HTTP/x.y\r\n\r\n")  # the HTTP parser's own refusal is JSON too
    assert status == 400 and "version" in body["error"]["message"]
    status, body = _raw(url, b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # an unknown method: 4xx, not 501
    assert status == 405
    status, body = _call(url, json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()}}]}]}).encode())  # fmt: skip
    assert status == 400
    assert _call(url, b"[" * 100_000)[0] == 400  # deeply nested JSON
    status, body = _call(url, _good_body("green"))  # still serving
    assert status == 200 and body["choices"][0]["message"]["content"] == "a green square"


def test_body_size_limit_is_413_with_a_clean_reply(server):
    url = server(max_body_bytes=1000)
    status, body = _call(url, b"x" * 5000)
    assert status == 413 and "at most 1000" in body["error"]["message"]
    assert _call(url, _good_body())[0] == 200


def test_non_loopback_bind_needs_a_token_or_an_explicit_insecure_flag(tmp_path, monkeypatch):
    from rewards import server as srv

    with pytest.raises(ValueError, match="host='0.0.0.0' is reachable from other machines and no token"):
        serve_in_thread(describe_colours, host="0.0.0.0")
    url, stop = serve_in_thread(describe_colours, host="0.0.0.0", insecure=True)
    stop()
    url, stop = serve_in_thread(describe_colours, host="0.0.0.0", token="t")
    stop()
    with pytest.raises(SystemExit) as info:
        srv.main(["--host", "0.0.0.0", "--port", "0"])
    assert info.value.code == 2
    monkeypatch.setenv("SERVER_TOKEN", " tok-env \n")
    assert srv.read_token("SERVER_TOKEN") == "tok-env"
    (tmp_path / "tok").write_text("tok-file\nignored\n")
    assert srv.read_token(token_file=str(tmp_path / "tok")) == "tok-file"
    with pytest.raises(ValueError, match=r"\$UNSET_TOKEN_VAR is not set"):
        srv.read_token("UNSET_TOKEN_VAR")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        srv.read_token(token_file=str(tmp_path / "empty"))


def test_load_drill_every_request_answered_as_expected():
    from benchmarks.server_load import run_load

    r = run_load(requests=120, clients=6, seed=1)
    assert r["problems"] == [] and r["lost"] == 0 and r["correct"] == 120
    assert r["handler_threads_left"] == 0
    assert {"200", "400", "401", "404", "413", "500"} <= set(r["by_status"])  # the mix really was mixed
