"""agents.runtime: keeping freed memory removes the page faults of re-allocated activations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Forward + backward steps of a small conv net with 8 MB activations, as in a training loop; prints
# the page faults of each step after the first two (warm-up).
_SCRIPT = """
import json, resource, sys, torch
from agents.runtime import retain_freed_memory
torch.manual_seed(0)
torch.set_num_threads(1)
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
layers = [m for _ in range(4) for m in (torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU())]
net, x = torch.nn.Sequential(*layers), torch.randn(256, 32, 16, 16)
def step():
    net(x).square().mean().backward()
step(); step()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "median_faults": sorted(faults)[3], "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings and ru_minflt: Linux")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    if not retained["applied"]:
        pytest.skip("not glibc: retain_freed_memory() is a no-op here")
    if default["median_faults"] < 1000:
        pytest.skip(f"this C library already reuses freed memory by default: {default}")
    # glibc's defaults fault in ~10,000-25,000 fresh pages (40-100 MB) per step here; retained memory is
    # reused (an occasional step still faults some in: the median step).
    assert retained["median_faults"] < default["median_faults"] / 20, (default, retained)


# ---------------------------------------------------------------------------------------------- threads
@pytest.fixture
def four_cores_load_one(monkeypatch):
    """A machine of 4 usable cores of which other processes keep 1.2 busy."""
    from agents import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 1.2)
    monkeypatch.setattr(runtime, "_AUTO_SET", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_automatic_threads_take_the_idle_cores(four_cores_load_one, monkeypatch):
    from agents.runtime import idle_cores, set_threads

    torch = four_cores_load_one
    torch.set_num_threads(4)  # torch's default: one per usable core
    assert idle_cores() == 3  # 4 cores, one busy
    assert set_threads(0) == 3 and torch.get_num_threads() == 3
    monkeypatch.setattr("agents.runtime.busy_cores", lambda: 9.0)
    assert set_threads(0) == 1  # a saturated machine: one thread, never 0 (a second run re-measures)
    assert set_threads(2) == 2 and torch.get_num_threads() == 2  # an explicit count wins


def test_automatic_threads_keep_the_users_choice_and_share_among_local_processes(four_cores_load_one, monkeypatch):
    from agents.runtime import set_threads

    torch = four_cores_load_one
    torch.set_num_threads(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert set_threads(0) == 1  # 3 idle cores shared by 2 processes of one run
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    torch.set_num_threads(2)  # the user's own choice (neither torch's default 4 nor the automatic 1)
    assert set_threads(0) == 2 and torch.get_num_threads() == 2
    torch.set_num_threads(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert set_threads(0) == 4 and torch.get_num_threads() == 4  # OMP_NUM_THREADS set: torch's count is kept
    with pytest.raises(ValueError, match=r"threads=-1; expected 0"):
        set_threads(-1)


def test_train_config_refuses_negative_threads():
    from agents.config import TrainConfig

    with pytest.raises(ValueError, match=r"threads=-2: expected an integer >= 0"):
        TrainConfig(threads=-2).validate()


def test_busy_cores_is_the_busy_share_of_the_usable_cpus_time_in_the_window(monkeypatch, tmp_path):
    from agents import runtime

    # /proc/stat twice (user nice system idle iowait irq softirq steal). The process may run on CPUs 0 and 2;
    # CPU 1 is another container's, fully busy, and must not count.
    snapshots = iter([
        "cpu 0 0 0 0 0 0 0 0\ncpu0 100 0 0 300 0 0 0 0\ncpu1 400 0 0 0 0 0 0 0\ncpu2 50 0 0 350 0 0 0 0\nintr 1\n",
        "cpu 0 0 0 0 0 0 0 0\ncpu0 200 0 0 300 0 0 0 0\ncpu1 500 0 0 0 0 0 0 0\ncpu2 50 0 0 450 0 0 0 0\nintr 1\n",
    ])
    stat = tmp_path / "stat"
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            stat.write_text(next(snapshots))
            return real_open(stat, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    # In the window, on CPUs 0 and 2: 100 busy jiffies of 200 → one of the two usable cores busy.
    assert runtime.busy_cores(window_s=0) == pytest.approx(1.0)
