"""VLM-judge reward: ask any OpenAI-compatible vision endpoint a question about each image and its
prompt, and turn the answer into a number (UnifiedReward-style judges, GPT-4o, a local vLLM server).

Each image is one ``/chat/completions`` request: a text part (``question`` formatted with
``{prompt}``) and the image as a base64 PNG data URL. Two answer modes:

- ``mode="yes_no"`` (default question: does the image match the prompt, answer Yes or No): the request
  asks for ``logprobs`` with ``top_logprobs`` alternatives, and the reward is
  ``P(yes) / (P(yes) + P(no))`` over the first answer token's alternatives (tokens compared after
  stripping spaces and punctuation, case-insensitively, so "Yes", " yes" and "YES." all count as yes).
  Endpoints that return no log-probabilities are scored from the text: 1.0 for yes, 0.0 for no
  (``info["from_logprobs"]`` says which was used).
- ``mode="score"`` (default question: rate from 0 to 10): the first number in the answer, mapped
  linearly from ``score_range`` to [0, 1] (a number outside the range is unparsable).

An unparsable answer raises (``unparsable="error"``, the default) or scores a fixed value
(``unparsable=0.0``, say). Transport, retries and fault handling are those of
:class:`rewards.alignment.ChatCompletionsClient`: bounded concurrency, per-request timeouts, exponential
backoff on timeouts, connection errors, HTTP 429/5xx and malformed bodies, no retry on other 4xx; when
an image still fails, :class:`rewards.alignment.RewardServerError` carries the whole batch. The API key
comes from ``api_key``, else the environment variable ``api_key_env`` (default ``OPENAI_API_KEY``); it
is only ever sent as an ``Authorization`` header, never logged, shown in ``repr`` or written to disk.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from rewards.alignment import (
    ChatCompletionsClient,
    RewardServerError,
    gather_answers,
    parse_completion,
)
from rewards.base import RewardInfo, as_uint8_images, check_prompts
from rewards.server import image_to_data_url

YES_NO_QUESTION = (
    'Does this image match the description "{prompt}"? Answer with a single word, Yes or No.'
)
SCORE_QUESTION = (
    'How well does this image match the description "{prompt}"? Consider the objects, their attributes, '
    "counts and relations, and the overall quality. Answer with one number from 0 to 10."
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


def parse_score(text: str, lo: float = 0.0, hi: float = 10.0) -> float:
    """The first number in ``text`` mapped from ``[lo, hi]`` to [0, 1]; ValueError if none or out of range."""
    m = _NUMBER.search(text)
    if m is None:
        raise ValueError(f"answer {text[:80]!r} has no number; expected a score in [{lo:g}, {hi:g}]")
    x = float(m.group())
    if not lo <= x <= hi:
        raise ValueError(f"answer {text[:80]!r} scores {x:g}; expected a score in [{lo:g}, {hi:g}]")
    return (x - lo) / (hi - lo)


def _yes_no(token: str) -> str | None:
    words = _WORD.findall(token.lower())
    return words[0] if words and words[0] in ("yes", "no") else None


def parse_yes_no_text(text: str) -> float:
    """1.0 if the answer starts with yes, 0.0 with no; ValueError otherwise."""
    ans = _yes_no(text)
    if ans is None:
        raise ValueError(f"answer {text[:80]!r} is neither yes nor no")
    return 1.0 if ans == "yes" else 0.0


def yes_probability(top_logprobs: Sequence[dict]) -> float:
    """``P(yes) / (P(yes) + P(no))`` from one position's ``top_logprobs`` (``[{"token", "logprob"}, ...]``);
    ValueError when neither answer is among them."""
    p = {"yes": 0.0, "no": 0.0}
    for alt in top_logprobs:
        if not isinstance(alt, dict) or not isinstance(alt.get("token"), str):
            raise ValueError(f"top_logprobs entry {str(alt)[:80]}; expected {{'token': str, 'logprob': float}}")
        ans = _yes_no(alt["token"])
        if ans is not None:
            p[ans] += math.exp(float(alt["logprob"]))
    total = p["yes"] + p["no"]
    if total <= 0.0:
        tokens = [a.get("token") for a in top_logprobs]
        raise ValueError(f"no yes/no token among the top log-probabilities {tokens[:8]}")
    return p["yes"] / total


def first_answer_logprobs(payload: Any) -> list[dict] | None:
    """``top_logprobs`` of the first non-blank answer token of a chat completion, or None if absent."""
    try:
        content = payload["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, list):
        return None
    for entry in content:
        if isinstance(entry, dict) and isinstance(entry.get("token"), str) and entry["token"].strip():
            alts = entry.get("top_logprobs")
            if isinstance(alts, list) and alts:
                return alts
            return [{"token": entry["token"], "logprob": entry.get("logprob", 0.0)}]
    return None


class VlmJudgeClient(ChatCompletionsClient):
    """A :class:`ChatCompletionsClient` asking one question per (image, prompt) pair, with log-probs."""

    def __init__(self, *args: Any, question: str, top_logprobs: int | None = None, **kwargs: Any):
        super().__init__(*args, question=question, **kwargs)
        if top_logprobs is not None and not (isinstance(top_logprobs, int) and 1 <= top_logprobs <= 20):
            raise ValueError(f"top_logprobs={top_logprobs!r}; expected None or an int in [1, 20]")
        self.top_logprobs = top_logprobs

    def judge_body(self, data_url: str, prompt: str) -> bytes:
        body = json.loads(self.request_body(data_url))
        body["messages"][0]["content"][0]["text"] = self.question.format(prompt=prompt)
        if self.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return json.dumps(body).encode()

    def parse_response(self, raw: bytes) -> tuple[str, list[dict] | None]:
        text = parse_completion(raw)  # ValueError (retried) when malformed
        return text, first_answer_logprobs(json.loads(raw))

    def _ask(self, image_chw: torch.Tensor, prompt: str) -> tuple[str, list[dict] | None]:
        image_hwc = image_chw.permute(1, 2, 0).contiguous().numpy()
        return self._post_with_retries(self.judge_body(image_to_data_url(image_hwc, self.png_compress_level), prompt))

    def ask(self, images: Any, prompts: Sequence[str]) -> list[tuple[str, list[dict] | None]]:
        """``(answer text, first-token top log-probs or None)`` per image, in batch order; raises
        :class:`RewardServerError` carrying the batch when any image fails after retries."""
        x = as_uint8_images(images)
        prompts = check_prompts(prompts, x.shape[0])
        futures = [self._pool.submit(self._ask, im, p) for im, p in zip(x.cpu(), prompts)]
        out, errors = gather_answers(futures)
        if errors:
            raise RewardServerError(
                f"{len(errors)} of {len(out)} images got no answer from {self.url}; first error: {errors[min(errors)]}",
                images=images, prompts=prompts, descriptions=[a[0] if a else None for a in out], errors=errors,
            )  # fmt: skip
        return out

    def __repr__(self) -> str:  # never shows the API key
        return f"VlmJudgeClient(url={self.url!r}, model={self.model!r}, timeout={self.timeout:g})"


class VlmJudgeReward:
    """Reward = the judge's answer as a number in [0, 1] (see the module docstring).

    ``info``: ``answers`` (list of B strings), ``from_logprobs`` (bool tensor [B], yes/no mode),
    ``unparsable`` (bool tensor [B]: the fixed ``unparsable`` value was used).
    """

    name = "vlm_judge"

    def __init__(
        self,
        base_url: str | None = None,
        model: str = "gpt-4o-mini",
        *,
        mode: str = "yes_no",
        question: str | None = None,
        score_range: tuple[float, float] = (0.0, 10.0),
        top_logprobs: int = 5,
        unparsable: str | float = "error",
        max_tokens: int | None = None,
        **client_kwargs: Any,
    ):
        if mode not in ("yes_no", "score"):
            raise ValueError(f"mode={mode!r}; expected 'yes_no' or 'score'")
        question = question if question is not None else (YES_NO_QUESTION if mode == "yes_no" else SCORE_QUESTION)
        if not isinstance(question, str) or "{prompt}" not in question:
            raise ValueError(f"question={question!r}; expected a template containing {{prompt}}")
        try:
            question.format(prompt="x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"question={question!r} is not a valid template ({e}); expected only {{prompt}}") from e
        lo, hi = score_range
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
            raise ValueError(f"score_range={score_range!r}; expected (low, high) with low < high")
        if unparsable != "error" and not isinstance(unparsable, (int, float)):
            raise ValueError(f"unparsable={unparsable!r}; expected 'error' or a number to score such answers")
        self.mode = mode
        self.score_range = (float(lo), float(hi))
        self.unparsable = unparsable
        self.client = VlmJudgeClient(
            base_url, model, question=question, top_logprobs=top_logprobs if mode == "yes_no" else None,
            max_tokens=max_tokens if max_tokens is not None else (1 if mode == "yes_no" else 16), **client_kwargs,
        )  # fmt: skip

    def score_answer(self, text: str, logprobs: list[dict] | None) -> tuple[float, bool]:
        """``(reward, from_logprobs)`` of one answer; ValueError when unparsable."""
        if self.mode == "score":
            return parse_score(text, *self.score_range), False
        if logprobs is not None:
            try:
                return yes_probability(logprobs), True
            except ValueError:
                pass  # e.g. a first token that is neither: fall back to the text
        return parse_yes_no_text(text), False

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        x = as_uint8_images(images)
        prompts = check_prompts(prompts, x.shape[0])
        answers = self.client.ask(images, prompts)
        rewards, from_lp, bad = [], [], []
        for i, (text, lp) in enumerate(answers):
            try:
                r, used = self.score_answer(text, lp)
                bad.append(False)
            except ValueError as e:
                if self.unparsable == "error":
                    raise RewardServerError(
                        f"judge answer for image {i} is unparsable: {e}",
                        images=images, prompts=prompts, descriptions=[a for a, _ in answers], errors={i: str(e)},
                    ) from e  # fmt: skip
                r, used = float(self.unparsable), False
                bad.append(True)
            rewards.append(r)
            from_lp.append(used)
        info = {"answers": [a for a, _ in answers], "from_logprobs": torch.tensor(from_lp, device=x.device),
                "unparsable": torch.tensor(bad, device=x.device)}  # fmt: skip
        return torch.tensor(rewards, dtype=torch.float32, device=x.device), info

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"VlmJudgeReward(mode={self.mode!r}, client={self.client!r})"
