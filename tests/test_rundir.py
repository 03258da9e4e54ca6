"""The run-directory lock: a second process is refused with the holder named, a SIGKILLed holder's lock is
taken over, and through the CLI a second trainer changes nothing of the first's run directory."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agents.rundir import LOCK_NAME, RunDirLockedError, lock_run_dir

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from agents.rundir import lock_run_dir\n"
    "lock = lock_run_dir(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _start_holder(args: list[str], code: str = HOLD) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()[-3000:]
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def test_second_process_is_refused_naming_the_holder(tmp_path):
    holder = _start_holder([str(tmp_path / "run")])
    try:
        with pytest.raises(RunDirLockedError) as info:
            lock_run_dir(tmp_path / "run")
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "\n" not in message
        assert info.value.holder["pid"] == holder.pid
        assert "since 20" in message  # the holder's start time, ISO 8601 UTC
    finally:
        _stop(holder)


def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder([str(run)])
    holder.send_signal(signal.SIGKILL)
    _stop(holder)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # the dead holder's file remains
    with pytest.warns(UserWarning, match=f"took over the lock of pid {holder.pid} on host .* no longer running"):
        lock = lock_run_dir(run)
    try:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run / LOCK_NAME).exists()
    again = lock_run_dir(run)  # released cleanly: nothing to take over
    assert again.took_over == {}
    again.release()


def test_lock_is_released_for_the_next_process_and_reentrant_in_one(tmp_path):
    run = tmp_path / "run"
    a = lock_run_dir(run)
    b = lock_run_dir(run)  # the same process: counted, not refused
    assert b is a and a.count == 2
    b.release()
    code = "import sys\nfrom agents.rundir import lock_run_dir\nlock_run_dir(sys.argv[1])\n"
    still = subprocess.run([sys.executable, "-c", code, str(run)], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert still.returncode != 0 and "RunDirLockedError" in still.stderr  # one release of two: still held
    a.release()
    free = subprocess.run([sys.executable, "-c", code, str(run)], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr[-2000:]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


TRAINER_HOLD = (
    "import json, sys, time\n"
    "from agents.config import TrainConfig\n"
    "from agents.trainer import Trainer\n"
    "cfg = TrainConfig.from_dict(json.loads(open(sys.argv[1] + '/config.json').read()))\n"
    "trainer = Trainer(cfg.replace(run_dir=sys.argv[1]), resume=True)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.mark.timeout(300)
def test_a_second_trainer_on_a_live_run_dir_is_refused_and_changes_nothing(tiny_sd, tmp_path):
    from agents.config import TrainConfig
    from agents.trainer import Trainer

    run = tmp_path / "run"
    env_kwargs = dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"])
    cfg = TrainConfig(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=1, samples_per_epoch=2,
                      sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, num_eval_prompts=1,
                      per_prompt_min_count=2, per_prompt_buffer_size=8, env_kwargs=env_kwargs, run_dir=str(run),
                      progress=False, seed=3)  # fmt: skip
    with Trainer(cfg) as trainer:
        trainer.train()
    assert not (run / LOCK_NAME).exists()  # close() released it
    holder = _start_holder([str(run)], TRAINER_HOLD)  # a live trainer (resumed) holds the run directory
    try:
        before = _snapshot(run)
        assert LOCK_NAME in before
        resume = subprocess.run([sys.executable, "-m", "agents.cli", "train", "--resume", str(run)], env=_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        fresh = subprocess.run([sys.executable, "-m", "agents.cli", "train", "--env", cfg.env_id, "--algo", "ddpo-is",
                                "--env-kwargs", json.dumps(env_kwargs), "--num-steps", "2", "--seed", "4",
                                "--run-dir", str(run), "--progress", "false"],
                               env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        for proc in (resume, fresh):
            assert proc.returncode == 5, proc.stderr[-3000:]
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: run directory"), proc.stderr[-3000:]
            assert f"pid {holder.pid}" in lines[0]
        assert _snapshot(run) == before  # neither refused process wrote anything
        assert json.loads((run / "config.json").read_text())["seed"] == 3
    finally:
        _stop(holder)
