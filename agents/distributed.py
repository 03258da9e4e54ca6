"""Data-parallel training: one process per device, launched by ``torchrun`` or ``accelerate launch``.

Nothing here does anything in a single process: :func:`context` then returns a context with
``world_size == 1`` whose every method is the identity, so a run without a launcher behaves exactly
as before (bit for bit). With ``WORLD_SIZE > 1`` in the environment (both launchers set ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), :func:`init` joins the process
group (NCCL on CUDA, gloo on CPU) and:

- **Sampling is sharded by global batch index.** An epoch has ``samples_per_epoch //
  sample_batch_size`` batches; process p collects the contiguous block of batch indices
  ``[p·n/P, (p+1)·n/P)``, and batch b is seeded from ``(seed, epoch, b)`` as in one process. So the
  P processes together collect *exactly* the samples a single process collects, every process
  samples different environments, and the data do not depend on P (a run can resume on another P).
- **Sizes are global.** ``samples_per_epoch`` and ``train_batch_size`` are totals over all processes
  (each process collects ``samples_per_epoch / P``); ``micro_batch_size`` is per process (memory).
- **Rewards and prompts are gathered** (small: one float and one string per sample) so every process
  updates the per-prompt statistics identically and computes the same advantages; latents stay where
  they were sampled.
- **Updates are split by ownership.** The algorithms draw their shuffles from a generator seeded the
  same on every process, so all processes agree on which (sample, timestep) pairs form each optimizer
  step; each process evaluates the pairs of its own samples, with the loss normalised by the step's
  *global* pair count, and :func:`all_reduce_grads` sums the gradients of every trainable parameter
  (LoRA adapters included) before clipping. The summed gradient is the one-process gradient of the
  same step, up to floating-point summation order.
- **Only the main process writes** (metrics, TensorBoard, grids, checkpoints); :meth:`DistContext.on_main`
  runs such a write on rank 0 and then broadcasts success or the error, so no process waits forever
  on a failed write: all of them raise.

Process-group collectives time out after ``DENOISE_DIST_TIMEOUT_S`` seconds (default 1800).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class ShardedRollout(NamedTuple):
    """One process's share of an epoch's rollout plus the epoch's gathered prompts and rewards.

    ``prompts``, ``rewards`` and ``num_samples`` describe the *global* batch (all processes, in global
    sample order); ``local`` holds this process's trajectories, which are global samples
    ``offset … offset + local.num_samples - 1``. Algorithms reach trajectory tensors only through
    :func:`local_pairs` / :func:`local_samples`, which map global indices to local ones.
    """

    local: Any  # agents.core.Rollout
    prompts: tuple[str, ...]
    rewards: torch.Tensor
    offset: int

    @property
    def num_samples(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.local.num_steps


class DistContext:
    """Rank, world size and the few collectives the trainer needs (identities when ``world_size == 1``)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.comm_device = device or torch.device("cpu")  # where collective tensors live (CUDA for NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # ------------------------------------------------------------------ sharding
    def check_config(self, cfg: Any) -> None:
        """Refuse sizes that cannot be split evenly over the processes (global sizes, see module doc)."""
        n_batches = cfg.samples_per_epoch // cfg.sample_batch_size
        if n_batches % self.world_size:
            raise ValueError(
                f"samples_per_epoch={cfg.samples_per_epoch} is {n_batches} batches of sample_batch_size="
                f"{cfg.sample_batch_size}, which {self.world_size} processes cannot share evenly; expected "
                f"samples_per_epoch to be a multiple of sample_batch_size × processes = "
                f"{cfg.sample_batch_size * self.world_size} (samples_per_epoch is the global total)"
            )
        if self.enabled and str(cfg.device).startswith("cuda:"):
            raise ValueError(
                f"device={cfg.device!r} names one GPU for {self.world_size} processes; expected device='cuda' "
                "(each process then uses cuda:LOCAL_RANK)"
            )

    def shard_range(self, n: int) -> range:
        """This process's contiguous block of ``range(n)`` (``n`` must be a multiple of the world size)."""
        per = n // self.world_size
        return range(self.rank * per, (self.rank + 1) * per)

    def gather_rollout(self, collect: Callable[[], Any]) -> Any:
        """Run ``collect()`` (this process's share) and gather every process's prompts and rewards.

        One process returns the rollout itself. With several, returns a :class:`ShardedRollout`. If
        ``collect`` raises on any process, every process raises a RuntimeError naming the failing
        rank and its error (nobody is left waiting in a collective).
        """
        if not self.enabled:
            return collect()
        try:
            rollout, error = collect(), None
        except Exception as exc:  # reported to every process below, then re-raised here
            rollout, error = None, exc
        payload = {"error": f"{type(error).__name__}: {error}" if error else None,
                   "prompts": list(rollout.prompts) if rollout is not None else []}  # fmt: skip
        gathered = self.all_gather_json(payload)
        failed = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"]]
        if failed:
            rank, msg = failed[0]
            raise RuntimeError(f"process {rank} of {self.world_size} failed while collecting samples: {msg}") from error
        local_rewards = rollout.rewards.detach().float().to(self.comm_device)
        rewards = self.all_gather_equal(local_rewards).to(rollout.rewards.device)
        prompts = tuple(p for g in gathered for p in g["prompts"])
        return ShardedRollout(local=rollout, prompts=prompts, rewards=rewards, offset=self.rank * rollout.num_samples)

    # ------------------------------------------------------------------ collectives
    def all_gather_json(self, obj: Any) -> list[Any]:
        """Gather a JSON-serialisable object from every process (as UTF-8 bytes; no pickle)."""
        if not self.enabled:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.comm_device)
        sizes = self.all_gather_equal(torch.tensor([data.numel()], device=self.comm_device))
        padded = torch.zeros(int(sizes.max()), dtype=torch.uint8, device=self.comm_device)
        padded[: data.numel()] = data
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [json.loads(p[: int(n)].cpu().numpy().tobytes().decode()) for p, n in zip(parts, sizes.tolist())]

    def all_gather_equal(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally-shaped tensors of every process along dim 0, in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over processes (returned; the input is not modified)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone().to(self.comm_device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (for decisions all must take together)."""
        if not self.enabled:
            return bool(flag)
        return bool(self.all_reduce_sum(torch.tensor([float(bool(flag))], device=self.comm_device)) > 0)

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over processes, in place, as one flat buffer.

        A parameter without a gradient on some process (it owned no pair of this step) counts as
        zeros there; one without a gradient on every process keeps ``grad = None``, as in one process
        (so AdamW skips it there too). Afterwards every process holds the same gradients.
        """
        if not self.enabled or not params:
            return
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                         + [has_grad])  # fmt: skip
        flat = flat.to(self.comm_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        has_grad = flat[-len(params) :].tolist()
        offset = 0
        for p, anywhere in zip(params, has_grad):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype) if anywhere else None
            offset += n

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``params`` to every process (as DDP does at construction)."""
        if not self.enabled or not params:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self.comm_device)
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on the main process only; every process returns once it is done.

        The main process broadcasts whether ``fn`` succeeded; if it raised, every other process raises
        a RuntimeError with its message instead of waiting (the main process re-raises the original).
        """
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        status = self._broadcast_json(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if status is not None:
            raise RuntimeError(f"the main process failed: {status}")
        return result

    def _broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (a gather: these messages are a few bytes)."""
        return self.all_gather_json(obj)[0]


_CONTEXT = DistContext()


def context() -> DistContext:
    """The process's context (world size 1 unless :func:`init` joined a process group)."""
    return _CONTEXT


def init() -> DistContext:
    """Join the process group described by the launcher's environment variables, once.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this does nothing and returns the one-process
    context. Otherwise it picks NCCL when CUDA is available (and makes ``cuda:LOCAL_RANK`` this
    process's default GPU) and gloo otherwise.
    """
    global _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or _CONTEXT.enabled:
        return _CONTEXT
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun or accelerate launch")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=float(os.environ.get("DENOISE_DIST_TIMEOUT_S", "1800")))
    if torch.cuda.is_available() and os.environ.get("DENOISE_DIST_BACKEND", "nccl") == "nccl":
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    _CONTEXT = DistContext(rank, world_size, local_rank, device)
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (after a final barrier); a no-op in one process."""
    global _CONTEXT
    if _CONTEXT.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = DistContext()


# ---------------------------------------------------------------------- helpers for algorithms
def local_pairs(rollout: Any, sample_idx: torch.Tensor, step_idx: torch.Tensor, per_sample: torch.Tensor):
    """The (sample, timestep) pairs of ``sample_idx``/``step_idx`` (global indices) this process owns.

    Returns ``(local_rollout, local_sample_idx, step_idx, per_sample[sample_idx])`` restricted to owned
    pairs, in their original order. For a plain (one-process) rollout everything is owned and the
    inputs come back unchanged.
    """
    if not isinstance(rollout, ShardedRollout):
        return rollout, sample_idx, step_idx, per_sample[sample_idx]
    local, keep, lidx = local_samples(rollout, sample_idx)
    return local, lidx, step_idx[keep], per_sample[sample_idx][keep]


def local_samples(rollout: Any, idx: torch.Tensor):
    """``(local_rollout, keep_mask, local_idx)`` for global sample indices ``idx``."""
    if not isinstance(rollout, ShardedRollout):
        return rollout, torch.ones(len(idx), dtype=torch.bool, device=idx.device), idx
    n = rollout.local.num_samples
    keep = (idx >= rollout.offset) & (idx < rollout.offset + n)
    return rollout.local, keep, idx[keep] - rollout.offset


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _CONTEXT.all_reduce_sum(tensor)


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    _CONTEXT.all_reduce_grads(params)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: this (forked) process gets SIGTERM when its parent dies, so no worker outlives a killed launch."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_forked(processes: int, threads: int, fn: Callable[[], int], grace_s: float = 10.0) -> int:
    """Run ``fn`` data-parallel in ``processes`` forked copies of this process, ``threads`` torch threads each;
    returns rank 0's exit code (or the first failing process's, if rank 0 succeeded).

    Forked, not spawned: the children share the parent's imported modules page for page (copy-on-write), so
    the run's memory grows by each process's working set, not by a second Python and torch. Each child sets
    the variables a launcher sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), so :func:`init` joins a gloo group as under torchrun, and leaves with
    ``os._exit``. The parent only waits. Ctrl-C reaches every child from the terminal (the trainer stops them
    together at the epoch's end), so the parent ignores it; a child that fails gets its siblings terminated
    (SIGTERM, then SIGKILL after ``grace_s``), since they would otherwise wait for it in a collective.
    The parent must not have run a parallel torch operator before (OpenMP's threads do not survive a fork).
    """
    import gc
    import signal
    import sys
    import traceback

    gc.freeze()  # the parent's objects stay out of the children's collections: fewer shared pages copied
    port, pids = _free_port(), []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's stack
            code = 1
            try:
                _die_with_parent()
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                  LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
                torch.set_num_threads(threads)
                code = fn()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    gc.unfreeze()  # the parent's objects are collectable again (it only waits from here)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    codes: dict[int, int] = {}
    failure = None  # the exit code of the first process that failed (a signal's death counts as 1)
    try:
        while len(codes) < processes:
            pid, status = os.wait()
            if pid not in pids:
                continue
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] not in (0, 130) and failure is None:
                failure = codes[pid] if codes[pid] > 0 else 1
                _stop(set(pids) - set(codes), grace_s, codes)
    finally:
        signal.signal(signal.SIGINT, previous)
    return failure if failure is not None else codes[pids[0]]


def _stop(pids: set[int], grace_s: float, codes: dict[int, int]) -> None:
    """SIGTERM ``pids``, SIGKILL those still alive after ``grace_s``; their exit codes go into ``codes``."""
    import signal
    import time

    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids:
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                pids.discard(pid)
        if pids and time.monotonic() > deadline:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.05)
