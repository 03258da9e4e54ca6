"""Process-level settings that make training on a CPU faster without changing any number it computes.

``retain_freed_memory()``: glibc's allocator gives large freed blocks back to the kernel (``munmap``,
heap trimming), so every training micro-batch's activations land on fresh pages that the kernel must
fault in and zero again. For one DDPO-IS epoch of the tiny model that was about 300,000 page faults
(1.2 GB zeroed) in the update alone, and 10% of the epoch's time (measured with
``resource.getrusage().ru_minflt`` on a 2-core Xeon; with the setting: about 100 faults). The setting
keeps freed memory in the process for reuse instead: the resident size stays at its peak.

It is process-wide, so the library never applies it on import: the trainer, ``make demo`` and the
benchmarks call it on CPU runs. Other allocators (jemalloc, tcmalloc, macOS, Windows) are left alone.

``idle_cores()`` / ``set_threads(n)``: torch's intra-op thread count for a CPU run. torch starts with one
thread per core; on a small machine another job's process makes those threads wait on each other at every
operator (measured on this project's 2-core machine: 2 threads 4-5x slower than 1 while another job held a
core; on the idle machine 2 threads 1.5x faster than 1). A training run therefore takes the cores that are
not busy when it starts (TrainConfig.threads = 0, the default), or the count it is given. A thread count
the user chose for the process (``OMP_NUM_THREADS``, which torchrun also sets to 1 per process, or
``torch.set_num_threads``) is kept, and several processes of one run on a machine (``LOCAL_WORLD_SIZE``)
share its cores.

``local_processes(...)``: a CPU run started without a launcher may instead run data-parallel on several
processes of this machine, one thread each (:func:`agents.distributed.run_forked`). For the tiny models
that is the faster way to use the cores: on the 2-core machine 2 processes × 1 thread ran a DDPO-IS epoch
in 9.0 s against 13.4 s for 1 process × 2 threads, with the same numbers up to summation order (the
tiny UNet's operators are too small for two threads to share well: one training call of 64 rows took
197 ms on one thread and 119 ms on two). TrainConfig.processes = 0 (the default) chooses one process per
idle core, fewer where the epoch's sampling batches do not divide among them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit systems
_TRIM_THRESHOLD = 2**31 - 1  # trim the heap's top only when 2 GB of it are free


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (no trimming; mmap only above 32 MB).

    Returns True when the settings took effect, False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        # Only glibc has gnu_get_libc_version; musl's mallopt is a stub that accepts anything.
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    mmap = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(trim and mmap)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parse_cpu_line(line: str) -> tuple[int, int]:
    """(busy, total) jiffies from one of /proc/stat's "cpu..." lines."""
    fields = [int(x) for x in line.split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies summed over the CPUs this process may run on, from /proc/stat (Linux), or None.

    Per-CPU lines, not the all-CPU one: in a container pinned to a few of a host's CPUs, /proc/stat lists
    them all, and the others' load is not this process's concern."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = total = 0
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name = line.split(maxsplit=1)[0] if line.strip() else ""
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if not name[3:].isdigit():
                    break
                if allowed is None or int(name[3:]) in allowed:
                    b, t = _parse_cpu_line(line)
                    busy, total = busy + b, total + t
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total > 0 else None


def busy_cores(window_s: float = 0.1) -> float:
    """How many of this process's usable cores other processes keep busy right now.

    Measured over ``window_s`` seconds from /proc/stat while this process sleeps, so it is the present
    load, not the past minute's: the 1-minute load average (the fallback where /proc/stat is missing)
    still counts a job that ended seconds ago, and would give a run that follows another one core.
    """
    before = _cpu_times()
    if before is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window_s)
    after = _cpu_times()
    if after is None:
        return 0.0
    busy, total = after[0] - before[0], after[1] - before[1]
    return usable_cores() * busy / total if total > 0 else 0.0


def idle_cores() -> int:
    """Cores not already busy: usable cores minus :func:`busy_cores`, rounded, at least 1."""
    return max(1, min(usable_cores(), round(usable_cores() - busy_cores())))


_AUTO_SET: int | None = None  # the count set_threads(0) chose last in this process
AUTO_PROCESSES = True  # False: processes=0 means one process (the test suite sets this, tests/conftest.py)


def threads_chosen_by_user() -> bool:
    """True when this process's thread count was chosen by its user: ``OMP_NUM_THREADS`` is set, or
    ``torch.set_num_threads`` left a count that is neither torch's default (one per usable core) nor the
    one :func:`set_threads` chose before."""
    import torch

    return bool(os.environ.get("OMP_NUM_THREADS")) or torch.get_num_threads() not in (usable_cores(), _AUTO_SET)


def launched() -> bool:
    """True inside a process that a launcher (torchrun, accelerate, :func:`agents.distributed.run_forked`)
    started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


# What a training run imports beyond its entry point (measured: 1,300 modules while the tiny model's Trainer is
# built, then tensorboard's): :func:`preload_modules` imports them in a parent before it forks data-parallel
# workers, so that the workers share those pages instead of each importing its own copy.
PRELOAD = ("agents.trainer", "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
           "diffusers.models.transformers.transformer_sd3", "transformers.models.clip.modeling_clip", "peft",
           "scipy.optimize", "scipy.sparse.linalg", "scipy.spatial", "torch.utils.tensorboard", "PIL.Image")  # fmt: skip


def preload_modules(names: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``names`` (those that exist); returns the ones that could not be imported."""
    import importlib

    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def local_processes(processes: int, threads: int, num_sample_batches: int, device: str) -> int:
    """How many data-parallel processes a run started without a launcher uses on this machine.

    ``processes`` (TrainConfig.processes) > 0 is taken as it is; :meth:`TrainConfig.validate` has
    checked that it divides the epoch's ``num_sample_batches``. 0 (automatic) gives 1 on a GPU, under a
    launcher, where the thread count is the user's (``threads`` > 0, or :func:`threads_chosen_by_user`),
    where ``os.fork`` is not Linux's, or when :data:`AUTO_PROCESSES` is off; otherwise the largest divisor
    of ``num_sample_batches`` that is at most :func:`idle_cores`.
    """
    if launched():
        if processes > 1:
            raise ValueError(f"processes={processes} in a process that a launcher started (WORLD_SIZE="
                             f"{os.environ['WORLD_SIZE']}): the launcher decides the processes; expected 0 or 1")
        return 1
    if processes > 0:
        return processes
    if (not AUTO_PROCESSES or threads > 0 or not device.startswith("cpu")
            or not sys.platform.startswith("linux") or threads_chosen_by_user()):  # fmt: skip
        return 1
    cores = idle_cores()
    return max(n for n in range(1, cores + 1) if num_sample_batches % n == 0)


def local_plan(cfg, hint: str = "--processes 1 for one") -> tuple[int, int]:
    """How a CPU run of ``cfg`` started without a launcher runs on this machine: ``(processes, threads per
    process)`` (threads 0: :func:`set_threads` decides in the one process). With several processes, the run's
    modules are imported now, before :func:`agents.distributed.run_forked` forks (so that the processes share
    their pages), and the choice is announced in one line ending with ``hint``."""
    processes = local_processes(cfg.processes, cfg.threads, cfg.samples_per_epoch // cfg.sample_batch_size,
                                cfg.device)  # fmt: skip
    if processes == 1:
        return 1, cfg.threads
    threads = cfg.threads or max(1, idle_cores() // processes)
    preload_modules()
    print(f"data-parallel on {processes} processes of this machine, {threads} torch thread(s) each "
          f"(processes={cfg.processes}{': one per idle core' if not cfg.processes else ''}; {hint})", flush=True)
    return processes, threads


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads to ``threads``; returns the count in use.

    ``threads=0`` (automatic): :func:`idle_cores` divided among the run's processes on this machine
    (``LOCAL_WORLD_SIZE``), unless the process's count was chosen by its user: ``OMP_NUM_THREADS`` is set,
    or ``torch.set_num_threads`` left a count that is neither torch's default (one per usable core) nor
    the one this function chose before. That count is kept.
    """
    import torch

    global _AUTO_SET
    if threads < 0:
        raise ValueError(f"threads={threads}; expected 0 (the idle cores) or a positive integer")
    if threads == 0:
        if threads_chosen_by_user():
            return torch.get_num_threads()
        threads = _AUTO_SET = max(1, idle_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    torch.set_num_threads(threads)
    return threads
