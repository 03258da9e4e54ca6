"""A small local server speaking the OpenAI chat-completions API, answering with a ``describe`` function.

``describe(images) -> list[str]`` receives a ``uint8 [B, 3, H, W]`` tensor (the images of one request)
and returns one description per image. The server answers ``POST {base}/chat/completions`` (``base`` is
``/v1`` or empty) with a ``chat.completion`` whose message content is the descriptions joined by
newlines, and ``GET {base}/models`` with one model, ``local-describe``. Each request is handled in its
own thread, so ``describe`` may run in several threads at once (guard it with a lock if it must not).

Requests carry images as ``image_url`` content parts holding base64 PNG/JPEG data URLs (what
:mod:`rewards.alignment` sends); remote ``http(s)`` image URLs are refused (the server never fetches).
Errors are JSON ``{"error": {"message": ..., "type": ...}}`` with status 400 (bad request), 404 (unknown
path) or 500 (``describe`` raised or returned the wrong number of strings).

With ``batch_window_s > 0`` concurrent requests are gathered by a :class:`MicroBatcher` (up to
``max_batch`` images arriving within the window) into one ``describe`` call per image size, which
suits batched describers (a GPU VLM, the tiny world's vectorised captioner).

``serve_in_thread(describe)`` starts it on 127.0.0.1 and a free port and returns ``(base_url, stop)``;
``intercept`` lets tests inject faults (return ``(status, body_bytes)`` to answer with that instead).
From the command line: ``python -m rewards.server --describe rewards.tinyworld.captioner:describe``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import io
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

DescribeFn = Callable[[torch.Tensor], list[str]]
InterceptFn = Callable[[dict], "tuple[int, bytes] | None"]
LOCAL_MODEL = "local-describe"
MAX_BODY_BYTES = 64 * 1024 * 1024


class BadRequest(ValueError):
    """The request is not a chat-completions request this server can answer (HTTP 400)."""


def image_to_data_url(image_hwc: np.ndarray, compress_level: int = 1) -> str:
    """Encode a ``uint8 [H, W, 3]`` array as a ``data:image/png;base64,...`` URL (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG", compress_level=compress_level)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def data_url_to_array(url: str) -> np.ndarray:
    """Decode a base64 image data URL into ``uint8 [H, W, 3]``; :class:`BadRequest` otherwise."""
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise BadRequest("image_url.url must be a base64 data URL 'data:image/...;base64,...'; remote URLs "
                         "are not fetched")  # fmt: skip
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise BadRequest(f"image data URL header {header[:40]!r}; expected ';base64' encoding")
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (binascii.Error, OSError, ValueError) as e:
        raise BadRequest(f"could not decode the image data URL: {e}") from e


def request_images(payload: Any) -> list[np.ndarray]:
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
            images.append(data_url_to_array(url))
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


def make_handler(describe: DescribeFn, intercept: InterceptFn | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode())

        def _route(self) -> str | None:
            path = self.path.split("?", 1)[0].rstrip("/")
            for base in ("/v1", ""):
                if path.startswith(base + "/"):
                    return path[len(base) :]
            return None

        def do_GET(self) -> None:
            if self._route() == "/models":
                body = {
                    "object": "list",
                    "data": [{"id": LOCAL_MODEL, "object": "model", "owned_by": "local"}],
                }
                self._send(200, json.dumps(body).encode())
            else:
                self._error(404, f"unknown path {self.path!r}", "not_found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._error(
                    413, f"request body of {length} bytes; at most {MAX_BODY_BYTES}", "invalid_request_error"
                )
                self.close_connection = True
                return
            raw = self.rfile.read(length)
            if self._route() != "/chat/completions":
                self._error(404, f"unknown path {self.path!r}; expected /v1/chat/completions", "not_found")
                return
            try:
                payload = json.loads(raw)
            except ValueError as e:
                self._error(400, f"request body is not JSON: {e}", "invalid_request_error")
                return
            if intercept is not None:
                fault = intercept(payload)
                if fault is not None:
                    self._send(fault[0], fault[1])
                    return
            try:
                images = request_images(payload)
            except BadRequest as e:
                self._error(400, str(e), "invalid_request_error")
                return
            try:
                texts = _describe_images(describe, images)
            except Exception as e:  # the describe function failed: a server error, the client may retry
                self._error(500, f"describe failed: {type(e).__name__}: {e}", "server_error")
                return
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
) -> tuple[str, Callable[[], None]]:
    """Start the server in a daemon thread; return ``(base_url, stop)``.

    ``base_url`` is ``http://host:port/v1`` (give it to :class:`rewards.alignment.ChatCompletionsClient`);
    ``stop()`` closes the listening socket (idempotent). ``port=0`` picks a free port.
    ``batch_window_s > 0`` batches concurrent requests (see :class:`MicroBatcher`).
    """
    if not callable(describe):
        raise ValueError(f"describe is {type(describe).__name__}; expected a callable images -> list[str]")
    batcher = MicroBatcher(describe, max_batch, batch_window_s) if batch_window_s > 0 else None
    server = _Server((host, port), make_handler(batcher or describe, intercept))
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
    args = parser.parse_args(argv)
    describe = _load_describe(args.describe)
    if args.batch_window > 0:
        describe = MicroBatcher(describe, args.max_batch, args.batch_window)
    server = _Server((args.host, args.port), make_handler(describe))
    print(f"serving {args.describe} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
