"""A small local server speaking the OpenAI chat-completions API, answering with a ``describe`` function.

``describe(images) -> list[str]`` receives a ``uint8 [B, 3, H, W]`` tensor (the images of one request)
and returns one description per image. The server answers ``POST {base}/chat/completions`` (``base`` is
``/v1`` or empty) with a ``chat.completion`` whose message content is the descriptions joined by
newlines, and ``GET {base}/models`` with one model, ``local-describe``. Each request is handled in its
own thread, so ``describe`` may run in several threads at once (guard it with a lock if it must not).

Requests carry images as ``image_url`` content parts holding base64 PNG/JPEG data URLs (what
:mod:`rewards.alignment` sends); remote ``http(s)`` image URLs are refused (the server never fetches).
Errors are JSON ``{"error": {"message": ..., "type": ...}}``: every malformed request gets a 4xx — 400
(not JSON, not a chat-completions request, an undecodable image, a bad ``Content-Length``), 401 (missing
or wrong bearer token), 404 (unknown path), 411 (a POST without ``Content-Length``), 413 (a body over
``max_body_bytes`` or an image over ``max_image_pixels``: decompression bombs are refused from the
header, before any pixel is decoded) — and every failure of the server's own code a 500 (``describe``
raised or returned the wrong number of strings, or anything unexpected). The server keeps serving.
Each connection's socket times out after ``REQUEST_TIMEOUT_S`` (a client that stops sending mid-body
does not hold a thread forever).

Authentication: with ``token`` set, every request must carry ``Authorization: Bearer <token>``
(compared in constant time); others get 401. From the command line the token comes from an environment
variable (``--token-env NAME``) or a file (``--token-file PATH``), never from the command line itself
(other users can read it there). Binding a non-loopback address without a token is refused unless the
operator passes ``--insecure-no-auth`` (``insecure=True`` in :func:`serve_in_thread`).

With ``batch_window_s > 0`` concurrent requests are gathered by a :class:`MicroBatcher` (up to
``max_batch`` images arriving within the window) into one ``describe`` call per image size, which
suits batched describers (a GPU VLM, the tiny world's vectorised captioner).

``serve_in_thread(describe)`` starts it on 127.0.0.1 and a free port and returns ``(base_url, stop)``;
``intercept`` lets tests inject faults (return ``(status, body_bytes)`` to answer with that instead).
From the command line: ``python -m rewards.server --describe rewards.tinyworld.captioner:describe
[--token-env REWARD_SERVER_TOKEN] [--host 0.0.0.0]``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import importlib
import io
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards.base import is_loopback_host

DescribeFn = Callable[[torch.Tensor], list[str]]
InterceptFn = Callable[[dict], "tuple[int, bytes] | None"]
LOCAL_MODEL = "local-describe"
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # per image, read from the header before decoding
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024  # a refused body up to this size is read and dropped (clean reply)
REQUEST_TIMEOUT_S = 60.0


class BadRequest(ValueError):
    """The request is not a chat-completions request this server can answer (HTTP 400, or ``status``)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_bind(host: str, token: str | None, insecure: bool = False) -> None:
    """Refuse to serve a non-loopback address without a token, unless ``insecure`` says so explicitly."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("token is empty; expected a non-empty bearer token (or None for no authentication)")
    if not token and not insecure and not is_loopback_host(host):
        raise ValueError(
            f"host={host!r} is reachable from other machines and no token is set; give a token "
            "(--token-env NAME or --token-file PATH) or pass --insecure-no-auth to serve without one"
        )


def image_to_data_url(image_hwc: np.ndarray, compress_level: int = 1) -> str:
    """Encode a ``uint8 [H, W, 3]`` array as a ``data:image/png;base64,...`` URL (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG", compress_level=compress_level)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def data_url_to_array(url: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a base64 image data URL into ``uint8 [H, W, 3]``; :class:`BadRequest` otherwise (413 for
    an image of more than ``max_pixels`` pixels, judged from its header before decoding)."""
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise BadRequest("image_url.url must be a base64 data URL 'data:image/...;base64,...'; remote URLs "
                         "are not fetched")  # fmt: skip
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise BadRequest(f"image data URL header {header[:40]!r}; expected ';base64' encoding")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"image data URL is not valid base64: {e}") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadRequest(f"image of {w}x{h} pixels; expected at most {max_pixels} pixels", 413)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except BadRequest:
        raise
    except Image.DecompressionBombError as e:
        raise BadRequest(f"image refused as a decompression bomb: {e}", 413) from e
    except Exception as e:  # PIL raises many types for damaged files (OSError, SyntaxError, struct.error...)
        raise BadRequest(f"could not decode the image data URL: {type(e).__name__}: {e}") from e


def request_images(payload: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> list[np.ndarray]:
    """The images of the last user message of a chat-completions request body."""
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        raise BadRequest("request body must be a JSON object with a 'messages' list")
    users = [m for m in payload["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("no message with role 'user'")
    content = users[-1].get("content")
    if not isinstance(content, list):
        raise BadRequest("the user message content must be a list of parts with at least one 'image_url'")
    images = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(data_url_to_array(url, max_pixels))
    if not images:
        raise BadRequest("the user message has no 'image_url' part; expected at least one image")
    return images


def completion_body(text: str, model: str) -> dict:
    return {
        "id": f"chatcmpl-local-{next(_IDS)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": len(text.split()),
            "total_tokens": len(text.split()),
        },
    }


_IDS = itertools.count()


def _describe_images(describe: DescribeFn, images: list[np.ndarray]) -> list[str]:
    if len({a.shape for a in images}) == 1:
        groups = [np.stack(images)]
    else:  # mixed sizes: one call per image
        groups = [a[None] for a in images]
    out: list[str] = []
    for g in groups:
        batch = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
        texts = describe(batch)
        if (
            isinstance(texts, str)
            or len(texts) != batch.shape[0]
            or not all(isinstance(t, str) for t in texts)
        ):
            raise RuntimeError(f"describe returned {texts!r}; expected a list of {batch.shape[0]} strings")
        out.extend(texts)
    return out


class MicroBatcher:
    """Wrap ``describe`` so that concurrent calls are answered by one batched call.

    Calling the wrapper with ``uint8 [b, 3, H, W]`` blocks until its ``b`` descriptions are ready. A
    worker thread waits for the first call, gathers more for up to ``window_s`` seconds (or until
    ``max_batch`` images), concatenates those of the same size, calls ``describe`` once per size and
    splits the answers back. If ``describe`` raises, every call of that group gets the exception.
    """

    def __init__(self, describe: DescribeFn, max_batch: int = 64, window_s: float = 0.005):
        if not callable(describe):
            raise ValueError(f"describe is {type(describe).__name__}; expected a callable images -> list")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}; expected a positive int")
        if not isinstance(window_s, (int, float)) or window_s < 0:
            raise ValueError(f"window_s={window_s!r}; expected a non-negative number of seconds")
        self.describe = describe
        self.max_batch = max_batch
        self.window_s = float(window_s)
        self.calls = 0  # describe calls made (for tests and monitoring)
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="describe-batcher")
        self._thread.start()

    def __call__(self, images: torch.Tensor) -> list[str]:
        if self._stopped.is_set():
            raise RuntimeError("MicroBatcher is stopped")
        fut: Future = Future()
        self._queue.put((images, fut))
        return fut.result()

    def _gather(self) -> list[tuple[torch.Tensor, Future]]:
        try:
            items = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        count = items[0][0].shape[0]
        deadline = time.monotonic() + self.window_s
        while count < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            count += item[0].shape[0]
        return items

    def _loop(self) -> None:
        while not self._stopped.is_set():
            items = self._gather()
            groups: dict[tuple, list[tuple[torch.Tensor, Future]]] = {}
            for images, fut in items:
                groups.setdefault(tuple(images.shape[1:]), []).append((images, fut))
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[tuple[torch.Tensor, Future]]) -> None:
        batch = torch.cat([images for images, _ in group])
        try:
            self.calls += 1
            texts = self.describe(batch)
            if isinstance(texts, str) or len(texts) != batch.shape[0]:
                raise RuntimeError(
                    f"describe returned {texts!r}; expected a list of {batch.shape[0]} strings"
                )
            texts = list(texts)
        except Exception as e:
            for _, fut in group:
                fut.set_exception(e)
            return
        start = 0
        for images, fut in group:
            fut.set_result(texts[start : start + images.shape[0]])
            start += images.shape[0]

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        while True:  # fail whatever arrived too late
            try:
                _, fut = self._queue.get_nowait()
            except queue.Empty:
                break
            fut.set_exception(RuntimeError("MicroBatcher is stopped"))


def make_handler(
    describe: DescribeFn,
    intercept: InterceptFn | None = None,
    *,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> type[BaseHTTPRequestHandler]:
    """The request handler class (see the module docstring for statuses, auth and limits)."""
    expected_auth = f"Bearer {token}".encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        default_request_version = "HTTP/1.1"  # replies to unparsable request lines carry a status line too
        timeout = REQUEST_TIMEOUT_S  # socket timeout of each connection

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:  # fmt: skip
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode(), headers=headers)

        def _route(self) -> str | None:
            path = self.path.split("?", 1)[0].rstrip("/")
            for base in ("/v1", ""):
                if path.startswith(base + "/"):
                    return path[len(base) :]
            return None

        def _authorized(self) -> bool:
            if expected_auth is None:
                return True
            given = (self.headers.get("Authorization") or "").strip().encode("utf-8", "replace")
            return hmac.compare_digest(given, expected_auth)

        def _body_length(self) -> tuple[int | None, tuple[int, str] | None]:
            """The declared body length, or the (status, message) of a refusal."""
            raw = self.headers.get("Content-Length")
            if raw is None:
                if self.command == "POST":
                    return None, (411, "a POST needs a Content-Length header")
                return 0, None
            raw = raw.strip()
            if not raw.isdigit():  # also refuses "-1", "+5", "1e3", "abc"
                return None, (400, f"Content-Length={raw[:40]!r}; expected a non-negative integer")
            return int(raw), None

        def _discard(self, length: int | None) -> None:
            """Read and drop a refused body (so the reply reaches the client), or close if it is huge."""
            if length is None or length > DRAIN_LIMIT_BYTES:
                self.close_connection = True
                return
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    self.close_connection = True
                    return
                length -= len(chunk)

        def _refuse(self, length: int | None, status: int, message: str, kind: str, **kw: Any) -> None:
            self._discard(length)
            self._error(status, message, kind, **kw)

        def _guarded(self, handle: Callable[[], None]) -> None:
            try:
                handle()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True  # the client went away or stalled: nobody to answer
            except Exception as e:  # our own failure: a 500, and the server keeps serving
                self.close_connection = True
                try:
                    self._error(500, f"internal server error: {type(e).__name__}: {e}", "server_error")
                except OSError:
                    pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Errors found by the HTTP parser itself (bad request line, headers too long...) as JSON too."""
            self.close_connection = True
            if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method is the client's error
                code, message = 405, f"method {self.command!r} is not supported; expected GET or POST"
            try:
                text = message or HTTPStatus(code).phrase
            except ValueError:
                text = f"HTTP {code}"
            kind = "invalid_request_error" if 400 <= code < 500 else "server_error"
            self._error(code, f"{text}{f': {explain}' if explain else ''}", kind)

        def _method_not_allowed(self) -> None:
            self.close_connection = True
            self._error(405, f"method {self.command} is not supported; expected GET or POST", "invalid_request_error",
                        headers={"Allow": "GET, POST"})  # fmt: skip

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _method_not_allowed

        def do_GET(self) -> None:
            self._guarded(self._get)

        def do_POST(self) -> None:
            self._guarded(self._post)

        def _get(self) -> None:
            length, problem = self._body_length()
            if problem is not None and problem[0] != 411:
                return self._refuse(None, problem[0], problem[1], "invalid_request_error")
            if not self._authorized():
                return self._refuse(length, 401, "missing or wrong bearer token", "authentication_error",
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            self._discard(length)
            if self._route() == "/models":
                body = {
                    "object": "list",
                    "data": [{"id": LOCAL_MODEL, "object": "model", "owned_by": "local"}],
                }
                self._send(200, json.dumps(body).encode())
            else:
                self._error(404, f"unknown path {self.path!r}", "not_found")

        def _post(self) -> None:
            length, problem = self._body_length()
            if problem is not None:
                return self._refuse(None, problem[0], problem[1], "invalid_request_error")
            if not self._authorized():
                return self._refuse(length, 401, "missing or wrong bearer token", "authentication_error",
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            if length > max_body_bytes:
                return self._refuse(length, 413, f"request body of {length} bytes; expected at most {max_body_bytes}",
                                    "invalid_request_error")  # fmt: skip
            if self._route() != "/chat/completions":
                return self._refuse(length, 404, f"unknown path {self.path!r}; expected /v1/chat/completions",
                                    "not_found")  # fmt: skip
            raw = self.rfile.read(length)
            if len(raw) < length:
                self.close_connection = True
                return self._error(400, f"request body ended after {len(raw)} of {length} bytes",
                                   "invalid_request_error")  # fmt: skip
            try:
                payload = json.loads(raw)
            except (ValueError, RecursionError) as e:
                return self._error(400, f"request body is not JSON: {str(e)[:200]}", "invalid_request_error")
            if intercept is not None:
                fault = intercept(payload)
                if fault is not None:
                    return self._send(fault[0], fault[1])
            try:
                images = request_images(payload, max_image_pixels)
            except BadRequest as e:
                return self._error(e.status, str(e), "invalid_request_error")
            try:
                texts = _describe_images(describe, images)
            except Exception as e:  # the describe function failed: a server error, the client may retry
                return self._error(500, f"describe failed: {type(e).__name__}: {e}", "server_error")
            model = payload.get("model") if isinstance(payload.get("model"), str) else LOCAL_MODEL
            self._send(200, json.dumps(completion_body("\n".join(texts), model)).encode())

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow handler never blocks stop()
    request_queue_size = 128  # the default 5 drops connections under a burst of concurrent requests
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up (e.g. its timeout passed): nothing to answer
        super().handle_error(request, client_address)


def serve_in_thread(
    describe: DescribeFn,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    intercept: InterceptFn | None = None,
    batch_window_s: float = 0.0,
    max_batch: int = 64,
    token: str | None = None,
    insecure: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[str, Callable[[], None]]:
    """Start the server in a daemon thread; return ``(base_url, stop)``.

    ``base_url`` is ``http://host:port/v1`` (give it to :class:`rewards.alignment.ChatCompletionsClient`);
    ``stop()`` closes the listening socket (idempotent). ``port=0`` picks a free port.
    ``batch_window_s > 0`` batches concurrent requests (see :class:`MicroBatcher`). ``token``: the
    bearer token every request must carry (None: no authentication, refused off loopback unless
    ``insecure``). ``max_body_bytes``, ``max_image_pixels``: the size limits (413 beyond them).
    """
    if not callable(describe):
        raise ValueError(f"describe is {type(describe).__name__}; expected a callable images -> list[str]")
    check_bind(host, token, insecure)
    for name, value in (("max_body_bytes", max_body_bytes), ("max_image_pixels", max_image_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    batcher = MicroBatcher(describe, max_batch, batch_window_s) if batch_window_s > 0 else None
    handler = make_handler(batcher or describe, intercept, token=token, max_body_bytes=max_body_bytes,
                           max_image_pixels=max_image_pixels)  # fmt: skip
    server = _Server((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"chat-server-{server.server_address[1]}")  # fmt: skip
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        if batcher is not None:
            batcher.stop()

    bound_host, bound_port = server.server_address[:2]
    return f"http://{bound_host}:{bound_port}/v1", stop


def read_token(token_env: str | None = None, token_file: str | None = None) -> str | None:
    """The bearer token from the environment variable ``token_env`` or the first line of ``token_file``
    (at most one of them); None when neither is given. An unset variable or empty file is an error."""
    if token_env and token_file:
        raise ValueError("give --token-env or --token-file, not both")
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ValueError(f"--token-env {token_env}: ${token_env} is not set or empty; expected the token in it")
        return token
    if token_file:
        try:
            lines = open(token_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise ValueError(f"--token-file {token_file}: {e.strerror}; expected a readable file holding the token") from e
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"--token-file {token_file} is empty; expected the token on its first line")
        return token
    return None


def _load_describe(spec: str) -> DescribeFn:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"describe={spec!r}; expected 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a describe(images) function as OpenAI chat completions"
    )
    parser.add_argument("--describe", default="rewards.tinyworld.captioner:describe",
                        help="'module:function' taking uint8 [B,3,H,W] and returning B strings")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--batch-window", type=float, default=0.0, help="seconds to gather concurrent requests"
    )
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--token-env", metavar="NAME", help="environment variable holding the bearer token")
    parser.add_argument("--token-file", metavar="PATH", help="file holding the bearer token (first line)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve a non-loopback address without a token (anyone who can reach it may use it)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS)
    args = parser.parse_args(argv)
    try:
        token = read_token(args.token_env, args.token_file)
        check_bind(args.host, token, args.insecure_no_auth)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    describe = _load_describe(args.describe)
    if args.batch_window > 0:
        describe = MicroBatcher(describe, args.max_batch, args.batch_window)
    handler = make_handler(describe, token=token, max_body_bytes=args.max_body_bytes,
                           max_image_pixels=args.max_image_pixels)  # fmt: skip
    server = _Server((args.host, args.port), handler)
    auth = "bearer token required" if token else "no authentication"
    print(f"serving {args.describe} at http://{args.host}:{server.server_address[1]}/v1 ({auth})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
