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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
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
        current = torch.get_num_threads()
        if os.environ.get("OMP_NUM_THREADS") or current not in (usable_cores(), _AUTO_SET):
            return current
        threads = _AUTO_SET = max(1, idle_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    torch.set_num_threads(threads)
    return threads
