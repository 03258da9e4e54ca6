"""Bounded load test of the reward server (:mod:`rewards.server`) on loopback.

Several concurrent clients send a few hundred requests, a seeded mix of good and bad ones, to a server
with authentication on and small size limits, whose ``describe`` fails at random (10% of the images,
chosen by a marker pixel, so the client knows which answer to expect):

=========== ====================================================== ========
kind        request                                                expected
=========== ====================================================== ========
good        one 8×8 image, right token                             200 with the image's own description, or 500
                                                                   where describe was made to fail
models      ``GET /v1/models``                                      200
no_token    a good request without ``Authorization``               401
bad_token   a good request with a wrong bearer token                401
not_json    ``{not json``                                          400
bad_length  ``Content-Length: abc`` (raw)                          400
oversized   a body over ``max_body_bytes``                          413
bomb        a PNG whose header declares 30000×30000 pixels          413
bad_image   a data URL of bytes that are no image                  400
wrong_path  ``POST /v1/nothing``                                   404
=========== ====================================================== ========

Every request must get exactly that answer, and every non-200 body must be the JSON error shape; none
may be lost (no exception, no missing reply); afterwards no request-handler thread may remain. It
prints requests/s and latency p50/p99 (a correctness drill with figures, not a timing benchmark)::

    python -m benchmarks.server_load [--requests 400] [--clients 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from rewards.server import image_to_data_url, serve_in_thread

TOKEN = "load-test-token"
MAX_BODY = 256 * 1024
MAX_PIXELS = 1024 * 1024
KINDS = {  # kind: weight in the mix
    "good": 50, "models": 5, "no_token": 6, "bad_token": 6, "not_json": 6, "bad_length": 6,
    "oversized": 6, "bomb": 5, "bad_image": 5, "wrong_path": 5,
}  # fmt: skip
FAIL_EVERY = 10  # describe fails for images whose marker % FAIL_EVERY == 0 (10%)


def describe(images: torch.Tensor) -> list[str]:
    """``value K`` for each image, K its marker pixel; fails for one marker in ten (random per request)."""
    out = []
    for im in images:
        k = int(im[0, 0, 0])
        if k % FAIL_EVERY == 0:
            raise RuntimeError(f"injected describe failure for marker {k}")
        out.append(f"value {k}")
    return out


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small PNG whose header declares ``width``×``height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _chat_body(data_url: str) -> bytes:
    content = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": data_url}}]
    return json.dumps({"model": "local-describe", "messages": [{"role": "user", "content": content}]}).encode()


@dataclass
class Outcome:
    kind: str
    expected: int
    status: int | None
    ok: bool
    latency_s: float
    problem: str = ""


def _request(port: int, kind: str, rng: random.Random) -> Outcome:
    marker = rng.randrange(256)
    expected = {"good": 500 if marker % FAIL_EVERY == 0 else 200, "models": 200, "no_token": 401,
                "bad_token": 401, "not_json": 400, "bad_length": 400, "oversized": 413, "bomb": 413,
                "bad_image": 400, "wrong_path": 404}[kind]  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    method, path, body, headers = "POST", "/v1/chat/completions", b"", dict(auth)
    if kind in ("good", "no_token", "bad_token"):
        image = np.full((8, 8, 3), rng.randrange(256), dtype=np.uint8)
        image[0, 0, 0] = marker
        body = _chat_body(image_to_data_url(image))
        if kind == "no_token":
            headers = {}
        elif kind == "bad_token":
            headers = {"Authorization": f"Bearer {TOKEN}x"}
    elif kind == "models":
        method, path = "GET", "/v1/models"
    elif kind == "not_json":
        body = b"{not json"
    elif kind == "oversized":
        body = b"x" * (MAX_BODY + rng.randrange(1, 64 * 1024))
    elif kind == "bomb":
        body = _chat_body("data:image/png;base64," + base64.b64encode(bomb_png()).decode())
    elif kind == "bad_image":
        body = _chat_body("data:image/png;base64," + base64.b64encode(b"no image here").decode())
    elif kind == "wrong_path":
        path = "/v1/nothing"
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if kind == "bad_length":
            conn.putrequest("POST", path)
            conn.putheader("Authorization", auth["Authorization"])
            conn.putheader("Content-Length", "abc")
            conn.endheaders()
            conn.send(b"{}")
        else:
            conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        status = resp.status
    except Exception as e:  # a lost request: no reply at all
        return Outcome(kind, expected, None, False, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    latency = time.perf_counter() - t0
    problem = ""
    try:
        payload = json.loads(data)
    except ValueError:
        payload, problem = None, f"body is not JSON: {data[:80]!r}"
    if status != expected:
        problem = f"status {status}, expected {expected}: {data[:160]!r}"
    elif status == 200 and kind == "good":
        text = payload["choices"][0]["message"]["content"] if isinstance(payload, dict) else None
        if text != f"value {marker}":
            problem = f"description {text!r}, expected 'value {marker}'"
    elif status != 200 and not (isinstance(payload, dict) and isinstance(payload.get("error", {}).get("message"), str)):
        problem = f"error body {data[:120]!r} is not {{'error': {{'message': ...}}}}"
    return Outcome(kind, expected, status, not problem, latency, problem)


def _handler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "process_request" in t.name]


def run_load(requests: int = 400, clients: int = 8, seed: int = 0) -> dict:
    """Run the drill; return figures and every problem found (``problems`` empty when all is well)."""
    threads_before = threading.active_count()
    url, stop = serve_in_thread(describe, token=TOKEN, max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=requests)
    seeds = [rng.randrange(2**32) for _ in kinds]
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(lambda ks: _request(port, ks[0], random.Random(ks[1])), zip(kinds, seeds)))
        wall = time.perf_counter() - t0
        deadline = time.monotonic() + 10
        while _handler_threads() and time.monotonic() < deadline:
            time.sleep(0.02)
        leftover = len(_handler_threads())
    finally:
        stop()
    time.sleep(0.1)
    lat = np.array([o.latency_s for o in outcomes])
    return {
        "requests": requests,
        "clients": clients,
        "answered": sum(o.status is not None for o in outcomes),
        "correct": sum(o.ok for o in outcomes),
        "lost": sum(o.status is None for o in outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "by_status": {str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items(), key=str)},
        "requests_per_s": requests / wall,
        "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "latency_p99_ms": float(np.percentile(lat, 99) * 1e3),
        "handler_threads_left": leftover,
        "threads_before": threads_before,
        "threads_after": threading.active_count(),
        "problems": [f"{o.kind}: {o.problem}" for o in outcomes if not o.ok],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = run_load(args.requests, args.clients, args.seed)
    print(f"{r['requests']} requests from {r['clients']} clients: {r['correct']} answered as expected, "
          f"{r['lost']} lost; {r['requests_per_s']:.0f} requests/s, latency p50 {r['latency_p50_ms']:.1f} ms, "
          f"p99 {r['latency_p99_ms']:.1f} ms; handler threads left {r['handler_threads_left']}, "
          f"threads before/after {r['threads_before']}/{r['threads_after']}")  # fmt: skip
    print("statuses:", r["by_status"], "kinds:", r["by_kind"])
    for p in r["problems"][:20]:
        print("problem:", p)
    return 0 if not r["problems"] and not r["lost"] and not r["handler_threads_left"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
