"""A line every few seconds while a long, silent, untimed phase runs (compilation, replays), so a user
sees the benchmark is alive and how long the phase has taken so far."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def heartbeat(label: str, every_s: float = 15.0, *, out=None) -> Iterator[None]:
    """Print ``"  … <label>: N s so far"`` every ``every_s`` seconds until the block ends.

    Use it only around untimed phases: the printing thread wakes up a few times a minute.
    """
    import sys

    out = out or sys.stdout
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            print(f"  … {label}: {time.perf_counter() - t0:.0f} s so far", file=out, flush=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
