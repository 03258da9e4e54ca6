"""Remote rewards: a reward function served over HTTP, for scorers whose dependencies must live in
another environment (GenEval's mmdet stack, a judge on another GPU, a pinned torch).

Protocol (JSON over HTTP/1.1, version 1)
----------------------------------------
``POST {base}/score`` with ``Content-Type: application/json`` and body::

    {"images": ["data:image/png;base64,...", ...],   # B images, all of one size (PNG or JPEG data URLs)
     "prompts": ["a cat riding a bike", ...]}          # B strings

answered ``200`` with::

    {"rewards": [0.73, null, ...],                     # B numbers; null stands for NaN
     "info": {"key": [...B values...] or a scalar}}   # optional per-batch metadata (JSON values)

``GET {base}/health`` answers ``{"status": "ok", "reward": name, "max_batch": N, "max_body_bytes": M}``.
Errors are ``{"error": {"message": ..., "type": ...}}`` with status 400 (malformed request), 401 (missing
or wrong bearer token, when the server has one), 404 (unknown path), 413 (body over ``max_body_bytes`` or
more than ``max_batch`` images) or 500 (the reward raised or returned the wrong shape). ``{base}`` is the
URL the server prints, e.g. ``http://127.0.0.1:8100/v1``. Images are checked against ``max_pixels`` from
their header before decoding (413), so a decompression bomb is refused, and a server bound to a
non-loopback address refuses to start without a token unless told ``--insecure``.

Client: :class:`RemoteReward` (a reward like any other, so :class:`rewards.async_eval.AsyncRewardEvaluator`
runs it in the background) splits a batch into requests of at most ``max_batch`` images, sends them
concurrently (``max_concurrency``), and applies the alignment client's fault handling: a timeout on
connect and on every read, retries with exponential backoff on timeouts, connection errors, HTTP 429/5xx
and malformed answers (not JSON, no list of numbers), no retry on other 4xx nor on a wrong number of
rewards (a server bug); when any request still
fails, :class:`rewards.alignment.RewardServerError` carries the whole batch. A request body over
``max_request_bytes`` is refused before sending (ValueError: lower ``max_batch``). The bearer token comes
from ``api_key`` or ``$DENOISE_GYM_REMOTE_KEY``; it is only sent as a header.

Server: :func:`serve_reward_in_thread` (tests, notebooks) or
``python -m rewards.remote --reward jpeg_compressibility --port 8100`` (a registered name or
``module:factory``, with ``--kwargs '{"...": ...}'``). Reward calls are serialised by default (GPU
models are rarely thread-safe); images reach the reward as ``uint8 [B, 3, H, W]`` on the CPU.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import importlib
import io
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards.alignment import ChatCompletionsClient, RewardServerError, _Fatal, _Retryable
from rewards.base import (
    RewardFn,
    RewardInfo,
    as_uint8_images,
    check_prompts,
    check_reward_output,
    is_loopback_host,
)
from rewards.server import BadRequest, image_to_data_url

REMOTE_KEY_ENV = "DENOISE_GYM_REMOTE_KEY"
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
PROTOCOL_VERSION = 1


class TooLarge(BadRequest):
    """More images in one request than the server accepts (HTTP 413)."""


# --- JSON helpers shared by both ends ----------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Tensors/arrays to lists, NaN/inf to None; anything else JSON cannot hold becomes its str()."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def encode_request(images: torch.Tensor, prompts: Sequence[str], compress_level: int = 1) -> bytes:
    """The request body for ``uint8 [B, 3, H, W]`` images and their prompts."""
    urls = [image_to_data_url(im.permute(1, 2, 0).contiguous().numpy(), compress_level) for im in images.cpu()]
    return json.dumps({"images": urls, "prompts": list(prompts)}).encode()


def decode_image(url: Any, max_pixels: int) -> np.ndarray:
    """A base64 image data URL as ``uint8 [H, W, 3]``; :class:`TooLarge` when its header declares more than
    ``max_pixels`` pixels (checked before decoding: no decompression bomb), :class:`BadRequest` when malformed."""
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise BadRequest("images must be base64 data URLs 'data:image/...;base64,...'; remote URLs are not fetched")
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise BadRequest(f"image data URL header {header[:40]!r}; expected ';base64' encoding")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise TooLarge(f"image of {w}x{h} pixels; at most {max_pixels} pixels per image")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except TooLarge:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses on open past twice its own pixel limit
        raise TooLarge(f"image refused as too large: {e}; at most {max_pixels} pixels per image") from e
    except Exception as e:  # binascii.Error, OSError, PIL's DecompressionBombError, truncated data, ...
        raise BadRequest(f"could not decode the image data URL: {type(e).__name__}: {e}") from e


def decode_request(payload: Any, max_batch: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, list[str]]:
    """``(uint8 [B, 3, H, W], prompts)`` from a request body; :class:`BadRequest` when malformed."""
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object with 'images' and 'prompts'")
    images, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(images, list) or not images:
        raise BadRequest("'images' must be a non-empty list of base64 image data URLs")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompts' must be a list of strings")
    if len(prompts) != len(images):
        raise BadRequest(f"got {len(images)} images and {len(prompts)} prompts; expected one prompt per image")
    if len(images) > max_batch:
        raise TooLarge(f"got {len(images)} images; at most {max_batch} per request")
    arrays = [decode_image(u, max_pixels) for u in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise BadRequest(f"images have sizes {sorted(shapes)}; expected one size per request")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), prompts


def decode_response(raw: bytes, batch: int | None = None) -> tuple[torch.Tensor, RewardInfo]:
    """``(float32 [B], info)`` from a response body; ValueError when malformed (or not ``batch`` rewards)."""
    try:
        payload = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"response is not JSON ({e}): {raw[:80]!r}") from e
    rewards = payload.get("rewards") if isinstance(payload, dict) else None
    if not isinstance(rewards, list) or (batch is not None and len(rewards) != batch):
        got = f"a list of {len(rewards)}" if isinstance(rewards, list) else type(rewards).__name__
        raise ValueError(f"response 'rewards' is {got}; expected a list of {batch or 'B'} numbers")
    if not all(r is None or (isinstance(r, (int, float)) and not isinstance(r, bool)) for r in rewards):
        raise ValueError(f"response 'rewards' holds non-numbers: {str(rewards)[:80]}")
    info = payload.get("info", {})
    if not isinstance(info, dict):
        raise ValueError(f"response 'info' is {type(info).__name__}; expected an object")
    values = [math.nan if r is None else float(r) for r in rewards]
    return torch.tensor(values, dtype=torch.float32), info


# --- server ------------------------------------------------------------------------------------------


def make_remote_handler(reward_fn: RewardFn, *, name: str, max_batch: int, max_body_bytes: int,
                        api_key: str | None, serialise: bool,
                        max_pixels: int = MAX_PIXELS) -> type[BaseHTTPRequestHandler]:  # fmt: skip
    lock = threading.Lock() if serialise else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(status, {"error": {"message": message, "type": kind}})

        def _path(self) -> str:
            path = self.path.split("?", 1)[0].rstrip("/")
            return path.removeprefix("/v1")

        def _authorised(self) -> bool:
            if not api_key:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return True
            self._error(401, "missing or wrong bearer token", "authentication_error")
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self._path() == "/health":
                self._send(200, {"status": "ok", "reward": name, "max_batch": max_batch,
                                 "max_body_bytes": max_body_bytes, "protocol": PROTOCOL_VERSION})  # fmt: skip
            else:
                self._error(404, f"unknown path {self.path!r}; expected /v1/health or /v1/score", "not_found")

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise ValueError(length)
            except ValueError:
                self._error(400, f"Content-Length {self.headers.get('Content-Length')!r}; expected a byte count",
                            "invalid_request_error")  # fmt: skip
                self.close_connection = True
                return
            if length > max_body_bytes:
                self._error(413, f"request body of {length} bytes; at most {max_body_bytes}", "too_large")
                self.close_connection = True
                return
            raw = self.rfile.read(length)
            if not self._authorised():
                return
            if self._path() != "/score":
                self._error(404, f"unknown path {self.path!r}; expected /v1/score", "not_found")
                return
            try:
                images, prompts = decode_request(json.loads(raw), max_batch, max_pixels)
            except ValueError as e:  # BadRequest is a ValueError, and so is JSON's decode error
                self._error(413 if isinstance(e, TooLarge) else 400, f"bad request: {e}", "invalid_request_error")
                return
            try:
                if lock is not None:
                    with lock:
                        out = reward_fn(images, prompts)
                else:
                    out = reward_fn(images, prompts)
                rewards, info = check_reward_output(out, images.shape[0], name)
            except Exception as e:  # the reward failed: a server error, the client may retry
                self._error(500, f"reward {name!r} failed: {type(e).__name__}: {e}", "server_error")
                return
            self._send(200, {"rewards": _jsonable(rewards), "info": _jsonable(info)})

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up (its timeout passed): nothing to answer
        super().handle_error(request, client_address)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")


def make_remote_server(reward_fn: RewardFn, host: str = "127.0.0.1", port: int = 0, *, name: str | None = None,
                       max_batch: int = 256, max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_PIXELS,
                       api_key: str | None = None, serialise: bool = True, insecure: bool = False) -> _Server:  # fmt: skip
    """A (not yet started) HTTP server answering the protocol above with ``reward_fn``.

    Bound to a non-loopback address it requires ``api_key`` (clients send it as a bearer token) unless
    ``insecure=True`` says that an open server is intended."""
    if not callable(reward_fn):
        raise ValueError(f"reward_fn is {type(reward_fn).__name__}; expected a callable reward(images, prompts)")
    _check_int("max_batch", max_batch)
    _check_int("max_body_bytes", max_body_bytes)
    _check_int("max_pixels", max_pixels)
    if not is_loopback_host(host) and not api_key and not insecure:
        raise ValueError(
            f"host={host!r} is reachable from other machines and no api_key is set; expected a bearer token "
            "(api_key / --api-key-env / --api-key-file) or insecure=True (--insecure) for an open server"
        )
    name = name or getattr(reward_fn, "name", None) or type(reward_fn).__name__
    handler = make_remote_handler(reward_fn, name=name, max_batch=max_batch, max_body_bytes=max_body_bytes,
                                  api_key=api_key, serialise=serialise, max_pixels=max_pixels)  # fmt: skip
    return _Server((host, port), handler)


def serve_reward_in_thread(reward_fn: RewardFn, host: str = "127.0.0.1", port: int = 0,
                           **kwargs: Any) -> tuple[str, Callable[[], None]]:  # fmt: skip
    """Start :func:`make_remote_server` in a daemon thread; return ``(base_url, stop)`` (``stop`` is idempotent)."""
    server = make_remote_server(reward_fn, host, port, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"reward-server-{server.server_address[1]}")  # fmt: skip
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    h, p = server.server_address[:2]
    return f"http://{h}:{p}/v1", stop


# --- client ------------------------------------------------------------------------------------------


class _ScoreClient(ChatCompletionsClient):
    """The alignment client's transport and retry policy, pointed at ``{base}/score``."""

    def __init__(self, base_url: str, **kwargs: Any):
        super().__init__(base_url, model="remote", **kwargs)
        self.url = base_url.rstrip("/") + "/score"

    def parse_response(self, raw: bytes) -> tuple[torch.Tensor, RewardInfo]:
        return decode_response(raw)  # ValueError (malformed) is retried by the shared retry loop


class RemoteReward:
    """A reward computed by a server speaking the protocol of the module docstring.

    ``base_url``: e.g. ``http://127.0.0.1:8100/v1``. ``max_batch``: images per request;
    ``max_request_bytes``: refuse larger request bodies before sending. Other keywords (``timeout``,
    ``max_retries``, ``backoff``, ``backoff_max``, ``max_concurrency``, ``png_compress_level``) are the
    alignment client's. ``info``: the server's info, per-image lists concatenated across requests.
    """

    name = "remote"

    def __init__(
        self,
        base_url: str,
        *,
        max_batch: int = 32,
        max_request_bytes: int = MAX_BODY_BYTES,
        api_key: str | None = None,
        api_key_env: str = REMOTE_KEY_ENV,
        timeout: float = 120.0,
        max_concurrency: int = 4,
        **client_kwargs: Any,
    ):
        if not isinstance(base_url, str) or not base_url:
            raise ValueError(f"base_url={base_url!r}; expected the server's URL, e.g. http://127.0.0.1:8100/v1")
        _check_int("max_batch", max_batch)
        _check_int("max_request_bytes", max_request_bytes)
        self.client = _ScoreClient(base_url, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                                   max_concurrency=max_concurrency, **client_kwargs)  # fmt: skip
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes

    def _score_chunk(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, RewardInfo]:
        body = encode_request(images, prompts, self.client.png_compress_level)
        if len(body) > self.max_request_bytes:
            raise _Fatal(
                f"request body of {len(body)} bytes for {len(prompts)} images; max_request_bytes="
                f"{self.max_request_bytes}: expected a smaller max_batch"
            )
        rewards, info = self.client._post_with_retries(body)  # malformed bodies were retried there
        if rewards.shape[0] != len(prompts):
            raise _Fatal(f"server {self.client.url} returned {rewards.shape[0]} rewards for {len(prompts)} images")
        return rewards, info

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        x = as_uint8_images(images)
        prompts = check_prompts(prompts, x.shape[0])
        starts = list(range(0, x.shape[0], self.max_batch))
        futures = [self.client._pool.submit(self._score_chunk, x[s : s + self.max_batch].cpu(),
                                            prompts[s : s + self.max_batch]) for s in starts]  # fmt: skip
        results: list[Any] = []
        errors: dict[int, str] = {}
        for s, f in zip(starts, futures):
            try:
                results.append(f.result())
            except Exception as e:  # _Retryable/_Fatal or anything unexpected: the batch must survive
                results.append(None)
                msg = str(e) if isinstance(e, (_Retryable, _Fatal)) else f"{type(e).__name__}: {e}"
                errors.update({i: msg for i in range(s, min(s + self.max_batch, x.shape[0]))})
        if errors:
            raise RewardServerError(
                f"{len(errors)} of {x.shape[0]} images got no reward from {self.client.url}; "
                f"first error: {errors[min(errors)]}",
                images=images, prompts=prompts, descriptions=[None] * x.shape[0], errors=errors,
            )  # fmt: skip
        rewards = torch.cat([r for r, _ in results]).to(x.device)
        return rewards, merge_info([i for _, i in results], [min(self.max_batch, x.shape[0] - s) for s in starts])

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteReward(url={self.client.url!r}, max_batch={self.max_batch})"


def merge_info(infos: list[RewardInfo], sizes: list[int]) -> RewardInfo:
    """Concatenate per-image lists across requests; a scalar stays one value when every request agrees,
    else becomes the list of per-request values."""
    if len(infos) == 1:
        return dict(infos[0])
    out: RewardInfo = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        vals = [info.get(key) for info in infos]
        if all(isinstance(v, list) and len(v) == n for v, n in zip(vals, sizes)):
            out[key] = [x for v in vals for x in v]
        elif all(v == vals[0] for v in vals):
            out[key] = vals[0]
        else:
            out[key] = vals
    return out


# --- command line ------------------------------------------------------------------------------------


def _load_reward(spec: str, kwargs: dict) -> RewardFn:
    if ":" in spec:
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)(**kwargs)
    from rewards import make_reward

    return make_reward(spec, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a reward over HTTP (protocol: rewards.remote)")
    parser.add_argument("--reward", required=True, help="a registered reward name or 'module:factory'")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser.add_argument("--api-key-env", default=REMOTE_KEY_ENV,
                        help="environment variable holding the bearer token clients must send (unset: none)")  # fmt: skip
    parser.add_argument("--api-key-file", default=None, help="file holding the bearer token (first line)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without a token (anyone who reaches it may call the reward)")  # fmt: skip
    args = parser.parse_args(argv)
    api_key = os.environ.get(args.api_key_env) or None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                api_key = f.readline().strip() or None
        except OSError as e:
            parser.error(f"--api-key-file={args.api_key_file!r} cannot be read ({e.strerror}); expected a token file")
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as e:
        parser.error(f"--kwargs={args.kwargs!r} is not JSON ({e}); expected an object")
    if not isinstance(kwargs, dict):
        parser.error(f"--kwargs={args.kwargs!r}; expected a JSON object")
    reward = _load_reward(args.reward, kwargs)
    try:
        server = make_remote_server(reward, args.host, args.port, name=args.reward, max_batch=args.max_batch,
                                    max_body_bytes=args.max_body_bytes, api_key=api_key, insecure=args.insecure)  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    print(f"serving reward {args.reward!r} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
