"""Honest progress: which limit ends a run (epochs, reward-query budget, time limit, Ctrl-C), and a
Ctrl-C that stops training cleanly after the current epoch's checkpoint.

A run has up to three limits: ``num_epochs``, ``reward_query_budget`` (each epoch queries
``samples_per_epoch`` rewards) and ``time_limit_s`` (no epoch starts that the last epoch's duration
says would end past it). :func:`planned_epochs` gives the epochs the first two allow and which of them
binds; :func:`epochs_within_time` the epochs the time limit allows at the measured epoch duration. The
progress bar's total is the smaller of the two, so its ETA is that of the limit that will stop the run.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from typing import Any

# Why a run stopped (Trainer.stop_reason).
EPOCHS, BUDGET, TIME_LIMIT, INTERRUPTED = "num_epochs", "reward_query_budget", "time_limit_s", "interrupted"


def planned_epochs(cfg: Any) -> tuple[int, str]:
    """``(epochs, limit)``: the epochs ``num_epochs`` and ``reward_query_budget`` allow, and which binds.

    >>> from agents.config import TrainConfig
    >>> planned_epochs(TrainConfig(num_epochs=40, samples_per_epoch=64, sample_batch_size=64))
    (40, 'num_epochs')
    >>> planned_epochs(TrainConfig(num_epochs=40, reward_query_budget=1000, samples_per_epoch=64, sample_batch_size=64))
    (16, 'reward_query_budget')
    """
    if cfg.reward_query_budget:
        by_budget = math.ceil(cfg.reward_query_budget / cfg.samples_per_epoch)
        if by_budget < cfg.num_epochs:
            return by_budget, BUDGET
    return cfg.num_epochs, EPOCHS


def finished_reason(cfg: Any, epoch: int, reward_queries: int) -> str | None:
    """The epoch or budget limit a run at ``epoch`` with ``reward_queries`` queries has reached, or None."""
    if cfg.reward_query_budget and reward_queries >= cfg.reward_query_budget:
        return BUDGET
    if epoch >= cfg.num_epochs:
        return EPOCHS
    return None


def epochs_within_time(limit_s: float, elapsed_s: float, epoch_s: float) -> int:
    """More epochs that start before the time limit says stop, at ``epoch_s`` seconds each.

    The trainer starts an epoch only while ``elapsed + last epoch's duration <= limit``, so at a steady
    duration that is ``floor((limit - elapsed) / epoch_s)`` epochs (at least 0).
    """
    if epoch_s <= 0:
        return 0 if elapsed_s >= limit_s else sys.maxsize
    return max(0, math.floor((limit_s - elapsed_s) / epoch_s))


def describe_stop(reason: str | None, cfg: Any, epoch: int, reward_queries: int, last_epoch_s: float = 0.0) -> str:
    """One sentence saying which limit stopped a run, in the command line's terms."""
    if reason == EPOCHS:
        return f"stopped: all {cfg.num_epochs} epochs done (--num-epochs {cfg.num_epochs})"
    if reason == BUDGET:
        return (f"stopped: the reward-query budget is spent ({reward_queries} of --reward-query-budget "
                f"{cfg.reward_query_budget}, after {epoch} of --num-epochs {cfg.num_epochs})")  # fmt: skip
    if reason == TIME_LIMIT:
        return (f"stopped by the time limit (--time-limit-s {cfg.time_limit_s:g}) after {epoch} of --num-epochs "
                f"{cfg.num_epochs}: another epoch (about {last_epoch_s:.0f} s) would have ended past it")  # fmt: skip
    if reason == INTERRUPTED:
        return f"stopped by Ctrl-C after epoch {epoch} of {cfg.num_epochs}"
    return f"stopped after epoch {epoch}"


class GracefulInterrupt:
    """Context manager: the first SIGINT (Ctrl-C) sets :attr:`requested` and says what happens next;
    a second one raises ``KeyboardInterrupt`` at once. Outside the main thread it does nothing.

    The trainer checks ``requested`` between epochs: it saves the finished epoch's checkpoint and stops.
    """

    def __init__(self, message: str | None = "Ctrl-C: stopping after this epoch's checkpoint (Ctrl-C again to stop at once)"):
        self.message = message
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message is not None:  # None: quiet (e.g. every process of a data-parallel run but the main one)
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
