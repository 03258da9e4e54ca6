"""Asynchronous reward evaluation: compute the rewards of batch k while batch k+1 is being sampled.

::

    evaluator = AsyncRewardEvaluator(make_reward("jpeg_compressibility"), max_workers=2)
    handles = []
    for k in range(n_batches):
        images, prompts = sample_batch(k)                 # keeps the GPU busy ...
        handles.append(evaluator.submit(images, prompts)) # ... while earlier rewards are computed
    for h in handles:                                     # submission order, whatever finished first
        rewards, info = h.result()

Each :class:`RewardHandle` is bound to its own batch (``handle.images``, ``handle.prompts``, an
optional ``tag``), so results can never be matched to the wrong samples, whatever the completion
order. Tensor and numpy images are copied at submission (``copy_images=True``; PIL lists become a
uint8 tensor) so the sampler may reuse its buffers. A failing reward raises from ``handle.result()``;
the handle still holds the batch (and a :class:`rewards.alignment.RewardServerError` carries it too),
so the trainer can resubmit or checkpoint.
``max_pending`` bounds the number of batches in flight: ``submit`` blocks when it is reached.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from rewards.base import RewardFn, RewardInfo, _as_tensor, check_prompts, reward_name, score_batch


class RewardHandle:
    """A pending reward of one submitted batch; ``result()`` returns ``(rewards [B], info)``."""

    def __init__(self, index: int, images: Any, prompts: list[str], tag: Any, future: Future):
        self.index = index
        self.images = images
        self.prompts = prompts
        self.tag = tag
        self.future = future

    def result(self, timeout: float | None = None) -> tuple[torch.Tensor, RewardInfo]:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self.future.exception(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"RewardHandle(index={self.index}, batch={len(self.prompts)}, tag={self.tag!r}, {state})"


class AsyncRewardEvaluator:
    """Run ``reward_fn(images, prompts)`` in a thread pool of ``max_workers``; see the module docstring.

    Threads suit rewards whose heavy parts release the GIL (torch ops, Pillow JPEG encoding, network
    waits). ``max_pending``: at most this many batches submitted and not yet finished (None: no bound).
    """

    def __init__(self, reward_fn: RewardFn, max_workers: int = 2, *, max_pending: int | None = None,
                 copy_images: bool = True, name: str | None = None):  # fmt: skip
        if not callable(reward_fn):
            raise ValueError(
                f"reward_fn is {type(reward_fn).__name__}; expected a callable reward(images, prompts)"
            )
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r}; expected a positive int")
        if max_pending is not None and (
            isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1
        ):
            raise ValueError(f"max_pending={max_pending!r}; expected None or a positive int")
        self.reward_fn = reward_fn
        self.max_workers = max_workers
        self.max_pending = max_pending
        self.copy_images = copy_images
        self.name = name or reward_name(reward_fn)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
        self._slots = threading.BoundedSemaphore(max_pending) if max_pending is not None else None
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._outstanding: dict[int, RewardHandle] = {}
        self._closed = False

    def _run(self, images: Any, prompts: list[str], batch: int) -> tuple[torch.Tensor, RewardInfo]:
        return score_batch(self.reward_fn, images, prompts, self.name)

    def submit(self, images: Any, prompts: Sequence[str], tag: Any = None) -> RewardHandle:
        """Queue one batch; returns at once (or when a ``max_pending`` slot frees up)."""
        if self._closed:
            raise RuntimeError("AsyncRewardEvaluator is closed; expected submit() before close()")
        x = _as_tensor(images)  # validates the shape now, not later in a worker thread
        batch = int(x.shape[0])
        prompts = check_prompts(prompts, batch)
        if isinstance(images, (list, tuple)):
            images = x  # PIL images: snapshot as a uint8 tensor
        elif self.copy_images:
            images = images.detach().clone() if isinstance(images, torch.Tensor) else images.copy()
        if self._slots is not None:
            self._slots.acquire()
        index = next(self._counter)
        try:
            future = self._pool.submit(self._run, images, prompts, batch)
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise
        handle = RewardHandle(index, images, prompts, tag, future)
        with self._lock:
            self._outstanding[index] = handle
        future.add_done_callback(lambda f, i=index: self._finished(i))
        return handle

    def _finished(self, index: int) -> None:
        with self._lock:
            self._outstanding.pop(index, None)
        if self._slots is not None:
            self._slots.release()

    @property
    def pending(self) -> int:
        """Batches submitted and not yet finished."""
        with self._lock:
            return len(self._outstanding)

    def as_completed(
        self, handles: Iterable[RewardHandle], timeout: float | None = None
    ) -> Iterator[RewardHandle]:
        """Yield ``handles`` as they finish (completion order); each still carries its own batch."""
        left = {h.future: h for h in handles}
        while left:
            done, _ = wait(list(left), timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                raise TimeoutError(f"{len(left)} reward batches still pending after {timeout} s")
            for f in sorted(done, key=lambda f: left[f].index):
                yield left.pop(f)

    def gather(
        self, handles: Iterable[RewardHandle], timeout: float | None = None
    ) -> list[tuple[torch.Tensor, RewardInfo]]:
        """Results of ``handles`` in the order given (raises the first failure)."""
        return [h.result(timeout) for h in handles]

    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting batches; by default wait for those in flight."""
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=cancel_pending)

    def __enter__(self) -> AsyncRewardEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AsyncRewardEvaluator({self.name!r}, max_workers={self.max_workers}, pending={self.pending})"
