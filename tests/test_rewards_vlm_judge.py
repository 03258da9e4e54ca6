"""VLM-judge reward against local chat-completions servers (127.0.0.1): answer parsing (log-probs,
text, numeric scores) and the fault cases of the alignment reward's client."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import rewards
from rewards.alignment import RewardServerError
from rewards.server import completion_body, data_url_to_array, serve_in_thread
from rewards.vlm_judge import (
    VlmJudgeReward,
    first_answer_logprobs,
    parse_score,
    parse_yes_no_text,
    yes_probability,
)

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def solid(names, size=8):
    return torch.stack(
        [torch.tensor(COLOURS[n], dtype=torch.uint8).view(3, 1, 1).expand(3, size, size) for n in names]
    ).contiguous()


def colour_of(payload):
    parts = payload["messages"][0]["content"]
    image = data_url_to_array(parts[1]["image_url"]["url"])
    return ["red", "green", "blue"][int(image.reshape(-1, 3).mean(0).argmax())], parts[0]["text"]


def judge_answer(payload, with_logprobs=True):
    """A judge that says yes (p = 0.9 over yes-like tokens) when the question names the image's colour."""
    colour, question = colour_of(payload)
    match = colour in question
    if payload.get("max_tokens", 0) > 1:  # score mode
        body = completion_body("Score: 8/10" if match else "I'd give it 2.", "judge")
    else:
        py = 0.9 if match else 0.2
        body = completion_body("Yes" if match else "No", "judge")
        if with_logprobs:
            alts = [{"token": "Yes", "logprob": math.log(py * 0.8)}, {"token": " yes", "logprob": math.log(py * 0.2)},
                    {"token": "No", "logprob": math.log((1 - py) * 0.9)},
                    {"token": "Maybe", "logprob": math.log((1 - py) * 0.1)}]  # fmt: skip
            body["choices"][0]["logprobs"] = {"content": [{"token": body["choices"][0]["message"]["content"],
                                                           "logprob": alts[0]["logprob"], "top_logprobs": alts}]}  # fmt: skip
    return 200, json.dumps(body).encode()


@pytest.fixture
def server():
    stops = []

    def start(intercept=judge_answer):
        url, stop = serve_in_thread(lambda images: ["unused"] * len(images), intercept=intercept)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


def judge(url, sleeps=None, **kw):
    kw.setdefault("backoff", 0.01)
    r = VlmJudgeReward(url, "judge", api_key="", **kw)
    if sleeps is not None:
        r.client.sleep = sleeps.append
    return r


def test_yes_probability_from_logprobs_and_request_shape(server):
    seen = []

    def recording(payload):
        seen.append(payload)
        return judge_answer(payload)

    url = server(recording)
    r, info = judge(url)(solid(["red", "blue"]), ["a red square", "a green square"])
    # P(yes) / (P(yes) + P(no)) over the alternatives: 0.9 / (0.9 + 0.09) and 0.2 / (0.2 + 0.72)
    torch.testing.assert_close(r, torch.tensor([0.9 / 0.99, 0.2 / 0.92]))
    assert info["from_logprobs"].tolist() == [True, True] and info["answers"] == ["Yes", "No"]
    p = seen[0]
    assert p["logprobs"] is True and p["top_logprobs"] == 5 and p["max_tokens"] == 1 and p["model"] == "judge"
    assert {colour_of(q)[1] for q in seen} == {
        'Does this image match the description "a red square"? Answer with a single word, Yes or No.',
        'Does this image match the description "a green square"? Answer with a single word, Yes or No.',
    }


def test_text_answers_without_logprobs_and_numeric_scores(server):
    url = server(lambda payload: judge_answer(payload, with_logprobs=False))
    r, info = judge(url)(solid(["green", "red"]), ["green", "blue"])
    assert r.tolist() == [1.0, 0.0] and info["from_logprobs"].tolist() == [False, False]
    url = server()
    r, info = judge(url, mode="score")(solid(["green", "red"]), ["a green thing", "a blue thing"])
    torch.testing.assert_close(r, torch.tensor([0.8, 0.2]))
    assert info["answers"] == ["Score: 8/10", "I'd give it 2."]
    r, _ = judge(url, mode="score", score_range=(0, 20), question="Rate {prompt} from 0 to 20")(
        solid(["green"]), ["green"]
    )
    assert r.item() == pytest.approx(0.4)


def test_unparsable_answers_raise_with_the_batch_or_score_a_fixed_value(server):
    url = server(lambda payload: (200, json.dumps(completion_body("It is a nice picture.", "judge")).encode()))
    images, prompts = solid(["red", "blue"]), ["a", "b"]
    with pytest.raises(RewardServerError, match="unparsable.*neither yes nor no") as err:
        judge(url)(images, prompts)
    assert err.value.images is images and err.value.prompts == prompts
    r, info = judge(url, unparsable=0.0)(images, prompts)
    assert r.tolist() == [0.0, 0.0] and info["unparsable"].tolist() == [True, True]
    with pytest.raises(RewardServerError, match="has no number"):
        judge(url, mode="score")(images, prompts)


def test_parsers():
    assert parse_score("8") == 0.8 and parse_score("score 7.5 out of 10") == 0.75
    with pytest.raises(ValueError, match="scores 11"):
        parse_score("11/10")
    assert parse_yes_no_text(" Yes.") == 1.0 and parse_yes_no_text("no, it is not") == 0.0
    with pytest.raises(ValueError, match="neither yes nor no"):
        parse_yes_no_text("Maybe")
    assert yes_probability([{"token": "YES", "logprob": 0.0}]) == 1.0
    with pytest.raises(ValueError, match="no yes/no token"):
        yes_probability([{"token": "Maybe", "logprob": -0.1}])
    blank_first = {"choices": [{"logprobs": {"content": [{"token": " ", "logprob": 0.0, "top_logprobs": []},
                                                         {"token": "No", "logprob": -0.2}]}}]}  # fmt: skip
    assert first_answer_logprobs(blank_first) == [{"token": "No", "logprob": -0.2}]
    assert first_answer_logprobs({"choices": [{"message": {}}]}) is None


def test_server_down_backs_off_then_raises_with_the_batch(server):
    url = server()
    down_url, stop = serve_in_thread(lambda images: [""] * len(images))
    stop()
    sleeps = []
    images, prompts = solid(["red", "green"]), ["a", "b"]
    with pytest.raises(RewardServerError, match="2 of 2 images got no answer") as err:
        judge(down_url, sleeps, max_retries=2, backoff=0.5, max_concurrency=1)(images, prompts)
    assert err.value.images is images and err.value.failed == [0, 1] and "3 attempts" in err.value.errors[0]
    assert len(sleeps) == 4 and all(0.5 <= s <= 0.55 or 1.0 <= s <= 1.1 for s in sleeps)
    assert judge(url)(solid(["red"]), ["red"])[0].item() > 0.9  # the live server is unaffected


def test_transient_failures_are_retried_client_errors_are_not(server):
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(payload):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 1:
            return 500, b'{"error": {"message": "GPU out of memory"}}'
        if n == 2:
            return 200, b"{not json"
        return judge_answer(payload)

    sleeps = []
    r, _ = judge(server(flaky), sleeps, max_retries=3, max_concurrency=1)(solid(["red"]), ["red"])
    assert r.item() == pytest.approx(0.9 / 0.99) and calls["n"] == 3 and len(sleeps) == 2
    unauthorised = {"n": 0}

    def deny(payload):
        unauthorised["n"] += 1
        return 401, b'{"error": {"message": "bad key"}}'

    sleeps = []
    with pytest.raises(RewardServerError, match="HTTP 401"):
        judge(server(deny), sleeps, max_retries=3)(solid(["red"]), ["red"])
    assert unauthorised["n"] == 1 and sleeps == []


def test_slow_answer_times_out_others_succeed(server):
    def slow_for_blue(payload):
        if colour_of(payload)[0] == "blue":
            time.sleep(1.5)
        return judge_answer(payload)

    t0 = time.perf_counter()
    with pytest.raises(RewardServerError) as err:
        judge(server(slow_for_blue), timeout=0.2, max_retries=1)(solid(["red", "blue"]), ["red", "blue"])
    assert time.perf_counter() - t0 < 1.4
    assert err.value.failed == [1] and "timed out after 0.2 s" in err.value.errors[1]
    assert err.value.descriptions[0] == "Yes"


def test_api_key_from_env_is_sent_as_a_header_and_never_shown(monkeypatch):
    headers = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            headers.append(self.headers.get("Authorization"))
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, body = judge_answer(payload)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
        reward = VlmJudgeReward(f"http://127.0.0.1:{srv.server_address[1]}/v1", "judge", api_key_env="MY_JUDGE_KEY")
        reward(solid(["red"]), ["red"])
        assert headers == ["Bearer sk-secret-123"]
        assert "sk-secret" not in repr(reward) and "sk-secret" not in repr(reward.client)
        made = rewards.make_reward("vlm_judge", base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1",
                                   model="judge", api_key="other-key")  # fmt: skip
        made(solid(["blue"]), ["blue"])
        assert headers[-1] == "Bearer other-key"
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_configuration():
    url = "http://127.0.0.1:1/v1"
    with pytest.raises(ValueError, match="mode='rank'"):
        VlmJudgeReward(url, mode="rank")
    with pytest.raises(ValueError, match=r"expected a template containing \{prompt\}"):
        VlmJudgeReward(url, question="Is this good?")
    with pytest.raises(ValueError, match="not a valid template"):
        VlmJudgeReward(url, question="{prompt} {0}")
    with pytest.raises(ValueError, match="score_range"):
        VlmJudgeReward(url, mode="score", score_range=(10, 0))
    with pytest.raises(ValueError, match="top_logprobs=50"):
        VlmJudgeReward(url, top_logprobs=50)
    with pytest.raises(ValueError, match="unparsable='skip'"):
        VlmJudgeReward(url, unparsable="skip")
    with pytest.raises(ValueError, match="one prompt per image"):
        VlmJudgeReward(url)(solid(["red"]), ["a", "b"])
